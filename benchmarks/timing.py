"""How the benchmarks time a step: one warm-up call, then as many rounds as fit in about
``target_s`` seconds (``min_rounds``..``max_rounds``, judged from the warm-up call); the median.

:func:`time_step` does it with pytest-benchmark's fixture (the suites), :func:`median_seconds`
with ``time.perf_counter`` (the report).
"""

import statistics
import time

SUITE_TARGET_S, MIN_ROUNDS, MAX_ROUNDS = 3.0, 5, 200


def _rounds(once, target_s, min_rounds, max_rounds):
    return max(min_rounds, min(max_rounds, int(target_s / max(once, 1e-9))))


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_step(benchmark, steps, mode, quick):
    """Times ``mode`` ('forward', 'backward' or 'forward_backward') of a
    :class:`benchmarks.steps.Steps` with the ``benchmark`` fixture; backward rounds run the
    forward in pytest-benchmark's untimed ``setup``. Quick: 2 rounds."""
    target = getattr(steps, mode)
    setup = steps.setup if mode == "backward" else None
    once = _timed(steps.forward_backward if mode == "backward" else target)
    rounds = 2 if quick else _rounds(once, SUITE_TARGET_S, MIN_ROUNDS, MAX_ROUNDS)
    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)


def median_seconds(step, target_s, min_rounds, max_rounds=MAX_ROUNDS):
    """(median seconds of ``step()``, rounds) after one warm-up call."""
    once = _timed(step)
    rounds = _rounds(once, target_s, min_rounds, max_rounds)
    return statistics.median(_timed(step) for _ in range(rounds)), rounds
