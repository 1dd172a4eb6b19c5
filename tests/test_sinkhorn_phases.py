"""benchmarks/sinkhorn_phases.py on a quick case: every phase timed (no speed asserted)."""

import math

from benchmarks import sinkhorn_cases, sinkhorn_phases


def test_phases_time_each_op_and_the_step():
    case = sinkhorn_cases.named_cases("cpu", quick=True)["paper"]
    out = sinkhorn_phases.phases(case, target_s=0.01)
    assert list(out) == ["forward, 0 iterations", f"forward, {case['n_iters']} iterations",
                         "backward, plan detached", "backward, exact", "autograd step",
                         "beyond the ops, 8×4×4"]
    assert all(math.isfinite(v) for v in out.values())
    assert all(v > 0 for name, v in out.items() if name != "beyond the ops, 8×4×4")
