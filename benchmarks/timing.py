"""How the CPU suites time a step: one warm-up round, then as many rounds as fit in about
TARGET_S seconds (MIN_ROUNDS..MAX_ROUNDS, judged from one untimed call); 2 rounds when quick."""

import time

TARGET_S, MIN_ROUNDS, MAX_ROUNDS = 8.0, 5, 200


def time_step(benchmark, step, quick):
    """Times ``step`` with pytest-benchmark's ``benchmark`` fixture."""
    start = time.perf_counter()
    step()
    once = time.perf_counter() - start
    rounds = 2 if quick else max(MIN_ROUNDS, min(MAX_ROUNDS, int(TARGET_S / once)))
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
