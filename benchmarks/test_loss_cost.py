"""pytest-benchmark suite of the whole loss's cost at a realistic size (benchmarks/
loss_cost_cases.py): plain cross-entropy from the logits; each preset and ULD from the logits;
each from hidden states, and what that replaces (both output layers' matmuls, then the logits
path). The report (benchmarks/report.py) adds TRL GOLD's ULDLoss. Forward, backward and
forward+backward of every implementation, and the peak extra memory
of one forward+backward; the summary gives each one's time and memory over its baseline's.

Run from the repository root (plain ``pytest`` does not collect it)::

    python -m pytest benchmarks/test_loss_cost.py --benchmark-json benchmarks/results/cpu-loss-cost.json
    python -m benchmarks.summarize benchmarks/results/cpu-loss-cost.json
"""

import pytest

from benchmarks.loss_cost_cases import IMPLS, named_cases, student_logits_mib
from benchmarks.steps import MODES
from benchmarks.suite import DEVICE, QUICK, bench

CASES = named_cases(DEVICE, QUICK)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", [impl for impl in IMPLS if not impl.startswith("gold_")])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_cost(benchmark, case, impl, mode):
    info = bench(benchmark, "loss_cost", impl, case, CASES[case], mode)
    info["student_logits_mib"] = round(student_logits_mib(CASES[case]), 2)
