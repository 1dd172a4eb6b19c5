"""pytest-benchmark suite of topk_probs: forward, backward and forward+backward of the fused op
(``mlot``) and of the eager softmax-sort-gather users would write (benchmarks/peers.py
``eager_topk_probs``, checked by tests/test_benchmark_peers.py), on the cases of
benchmarks/topk_cases.py.

Run from the repository root (plain ``pytest`` does not collect it)::

    python -m pytest benchmarks/test_topk_probs.py --benchmark-json benchmarks/results/cpu-topk-probs.json
    python -m benchmarks.summarize benchmarks/results/cpu-topk-probs.json

The step returns the logits' gradient, as large as the logits, so what the op itself needs is
the peak extra memory beyond that: ``(peak extra - logits) / logits``, stored as
``extra_beyond_grad_per_logits``. A full-size forward+backward of the op fails if it exceeds
BOUND.
"""

import pytest

from benchmarks.steps import MODES
from benchmarks.suite import DEVICE, QUICK, bench
from benchmarks.topk_cases import IMPLS, logits_mib, named_cases

CASES = named_cases(DEVICE, QUICK)
BOUND = 1.5  # the op's peak beyond the logits' gradient, in logits sizes


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", list(CASES))
def test_topk_probs(benchmark, case, impl, mode):
    info = bench(benchmark, "topk_probs", impl, case, CASES[case], mode)
    if mode == "forward_backward":
        logits = logits_mib(CASES[case])
        ratio = (info["peak_extra_mib"] - logits) / logits
        info.update(logits_mib=round(logits, 2), extra_beyond_grad_per_logits=round(ratio, 4))
        if impl == "mlot" and not QUICK:
            assert ratio <= BOUND, (f"{case}: {info['peak_extra_mib']} MiB = grad + {ratio:.3f} "
                                    f"× {logits:.1f} MiB logits")
