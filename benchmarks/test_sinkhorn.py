"""pytest-benchmark suite of the Sinkhorn loss: forward, backward and forward+backward of the
fused op (``mlot``) and of the two eager peers that compute the same values and gradients
(benchmarks/peers.py, checked by tests/test_benchmark_peers.py), on the cases of
benchmarks/sinkhorn_cases.py (the paper's QA size, variable answer lengths, long sequences).
The report (benchmarks/report.py) adds the other peers.

Run from the repository root (plain ``pytest`` does not collect it)::

    python -m pytest benchmarks/test_sinkhorn.py --benchmark-json benchmarks/results/cpu-sinkhorn.json
    python -m benchmarks.summarize benchmarks/results/cpu-sinkhorn.json
"""

import pytest

from benchmarks.sinkhorn_cases import named_cases
from benchmarks.steps import MODES
from benchmarks.suite import DEVICE, QUICK, bench

CASES = named_cases(DEVICE, QUICK)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["mlot", "released_loop", "batched_log_domain"])
@pytest.mark.parametrize("case", list(CASES))
def test_sinkhorn(benchmark, case, impl, mode):
    bench(benchmark, "sinkhorn", impl, case, CASES[case], mode)
