"""CPU timing and peak memory of one topk_probs forward+backward: the fused op (``mlot``) against
the eager softmax-sort-gather (``eager``, benchmarks/peers.py), which computes the same values
and gradient (tests/test_benchmark_peers.py).

Run from the repository root (plain ``pytest`` does not collect it)::

    python -m pytest benchmarks/test_topk_probs_cpu.py --benchmark-json benchmarks/results/cpu-topk-probs.json
    python -m benchmarks.summarize benchmarks/results/cpu-topk-probs.json

Each benchmark times ``make_step(impl, case)`` (benchmarks/topk_cases.py) as
benchmarks/timing.py does. ``extra_info`` holds the peak extra resident memory of one step measured in a
fresh subprocess (benchmarks/memory.py, ``peak_extra_mib``), the logits' size (``logits_mib``)
and ``extra_beyond_grad_per_logits = (peak_extra_mib - logits_mib) / logits_mib``: what the step
needs beyond the logits and their gradient (the step returns the gradient, the size of the
logits), as a multiple of the logits' size. For mlot, a full-size run asserts that multiple is
at most BOUND. ``MLOT_BENCH_QUICK=1``: tiny cases, 2 rounds, no bound.
"""

import pytest

from benchmarks.memory import probe
from benchmarks.timing import time_step
from benchmarks.topk_cases import CASES, IMPLS, QUICK, make_step

BOUND = 1.5  # mlot's peak beyond the logits' gradient, in logits sizes


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", list(CASES))
def test_topk_probs_forward_backward(benchmark, case, impl):
    """Wall time of one forward+backward of ``impl`` on ``case``, plus its peak extra memory."""
    c = CASES[case]
    benchmark.group = case
    memory = probe("topk_probs", impl, case)
    peak, logits = memory["peak_extra_mib"], memory["logits_mib"]
    ratio = round((peak - logits) / logits, 4)
    benchmark.extra_info.update(c, suite="topk_probs", impl=impl, case=case, quick=QUICK,
                                shape=[c["batch"], c["length"], c["vocab"]], peak_extra_mib=peak,
                                logits_mib=logits, extra_beyond_grad_per_logits=ratio)
    time_step(benchmark, make_step(impl, case), QUICK)
    if impl == "mlot" and not QUICK:
        assert ratio <= BOUND, f"{case}: {peak} MiB extra = grad + {ratio} × the {logits} MiB logits"
