"""CPU timing and peak memory of one Sinkhorn-loss forward+backward: the fused op
(``mlot``) against the two eager PyTorch peers in benchmarks/peers.py, which compute the same
values and gradients (tests/test_benchmark_peers.py).

Run from the repository root (plain ``pytest`` does not collect it)::

    python -m pytest benchmarks/test_sinkhorn_cpu.py --benchmark-json benchmarks/results/cpu-sinkhorn.json
    python -m benchmarks.summarize benchmarks/results/cpu-sinkhorn.json

Each benchmark times ``make_step(impl, case)`` (benchmarks/sinkhorn_cases.py) as
benchmarks/timing.py does, and stores in ``extra_info["peak_extra_mib"]`` the peak extra resident memory
of one step measured in a fresh subprocess (benchmarks/memory.py). ``MLOT_BENCH_QUICK=1``: tiny
cases, 2 rounds.
"""

import pytest

from benchmarks.memory import probe
from benchmarks.timing import time_step
from benchmarks.sinkhorn_cases import CASES, IMPLS, QUICK, make_step



@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", list(CASES))
def test_sinkhorn_forward_backward(benchmark, case, impl):
    """Wall time of one forward+backward of ``impl`` on ``case``, plus its peak extra memory."""
    benchmark.group = case
    benchmark.extra_info.update(CASES[case], suite="sinkhorn", impl=impl, case=case, quick=QUICK)
    benchmark.extra_info["peak_extra_mib"] = probe("sinkhorn", impl, case)["peak_extra_mib"]
    time_step(benchmark, make_step(impl, case), QUICK)
