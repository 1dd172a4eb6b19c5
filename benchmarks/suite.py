"""What the pytest-benchmark suites (benchmarks/test_*.py) share.

A suite runs on one device: ``MLOT_BENCH_DEVICE`` (default: ``cuda`` when a GPU is visible,
else ``cpu``). ``MLOT_BENCH_QUICK=1`` shrinks every case for smoke runs (2 rounds each). Each
benchmark stores in ``extra_info`` the suite, implementation, case name and parameters, mode and
device, and for forward_backward the peak extra memory of one step (benchmarks/memory.py).
"""

import os

import torch

from benchmarks.memory import case_steps, peak_extra_mib
from benchmarks.timing import time_step

QUICK = os.environ.get("MLOT_BENCH_QUICK", "") not in ("", "0")
DEVICE = os.environ.get("MLOT_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"MLOT_BENCH_DEVICE must be 'cpu' or 'cuda', got {DEVICE!r}")


def bench(benchmark, suite, impl, name, case, mode):
    """Times ``mode`` of ``impl`` of ``suite`` on ``case`` (named ``name``); returns extra_info."""
    benchmark.group = f"{suite} {name} {mode}"
    info = benchmark.extra_info
    info.update(suite=suite, impl=impl, case=name, params=case, mode=mode, device=DEVICE,
                quick=QUICK)
    if mode == "forward_backward":
        info["peak_extra_mib"] = round(peak_extra_mib(suite, impl, case), 2)
    time_step(benchmark, case_steps(suite, impl, case), mode, QUICK)
    return info
