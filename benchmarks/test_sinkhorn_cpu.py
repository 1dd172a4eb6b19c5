"""CPU timing and peak memory of one Sinkhorn-loss forward+backward: the fused op
(``mlot``) against the two eager PyTorch peers in benchmarks/peers.py, which compute the same
values and gradients (tests/test_benchmark_peers.py).

Run from the repository root (plain ``pytest`` does not collect it)::

    python -m pytest benchmarks/test_sinkhorn_cpu.py --benchmark-json benchmarks/results/cpu-sinkhorn.json
    python -m benchmarks.summarize benchmarks/results/cpu-sinkhorn.json

Each benchmark times ``make_step(impl, case)`` (benchmarks/sinkhorn_cases.py) with one warm-up
round and as many rounds as fit in about TARGET_S seconds (MIN_ROUNDS..MAX_ROUNDS, judged from
one untimed call), and stores in ``extra_info["peak_extra_mib"]`` the peak extra resident memory
of one step measured in a fresh subprocess (benchmarks/memory.py). ``MLOT_BENCH_QUICK=1``: tiny
cases, 2 rounds.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from benchmarks.sinkhorn_cases import CASES, IMPLS, QUICK, make_step

TARGET_S, MIN_ROUNDS, MAX_ROUNDS = 8.0, 5, 200
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_extra_mib(impl, case):
    """Peak extra MiB of one step of ``impl`` on ``case``, from a fresh ``benchmarks.memory`` process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory", impl, case], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_extra_mib"]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", list(CASES))
def test_sinkhorn_forward_backward(benchmark, case, impl):
    """Wall time of one forward+backward of ``impl`` on ``case``, plus its peak extra memory."""
    benchmark.group = case
    benchmark.extra_info.update(CASES[case], impl=impl, case=case, quick=QUICK)
    benchmark.extra_info["peak_extra_mib"] = peak_extra_mib(impl, case)
    step = make_step(impl, case)
    start = time.perf_counter()
    step()
    once = time.perf_counter() - start
    rounds = 2 if QUICK else max(MIN_ROUNDS, min(MAX_ROUNDS, int(TARGET_S / once)))
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
