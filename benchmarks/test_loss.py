"""pytest-benchmark suite of the whole MultiLevelOT loss: forward, backward and forward+backward
of ``MultiLevelOTLoss('official')`` (``mlot``, the ops) and of the released code's loss
(``released``, benchmarks/peers.py; both compute the same value and gradient,
tests/test_benchmark_peers.py), on the cases of benchmarks/loss_cases.py.

Run from the repository root (plain ``pytest`` does not collect it)::

    python -m pytest benchmarks/test_loss.py --benchmark-json benchmarks/results/cpu-loss.json
    python -m benchmarks.summarize benchmarks/results/cpu-loss.json
"""

import pytest

from benchmarks.loss_cases import IMPLS, named_cases
from benchmarks.steps import MODES
from benchmarks.suite import DEVICE, QUICK, bench

CASES = named_cases(DEVICE, QUICK)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", list(CASES))
def test_loss(benchmark, case, impl, mode):
    bench(benchmark, "loss", impl, case, CASES[case], mode)
