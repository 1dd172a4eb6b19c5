"""Peak extra resident memory of ONE forward+backward: ``python -m benchmarks.memory IMPL CASE``.

Prints ``{"impl", "case", "baseline_mib", "peak_extra_mib"}`` as JSON, where peak_extra_mib is
VmHWM after the step minus VmRSS before it (Linux /proc): everything the step itself made
resident at its peak (autograd's saved tensors, temporaries, the gradients), beyond the imports
and the inputs. The peak is reset just before the step by writing "5" to /proc/self/clear_refs.
A tiny warm-up step (B=1, M=N=8) first takes one-time lazy initialisation (thread pools, kernel
dispatch tables) out of the number.

It runs in a fresh process per (impl, case) so that every implementation starts from the same
allocator state: in a long-lived process, memory cached or fragmented by an earlier benchmark
would hide (or inflate) the next one's peak.
"""

import json
import sys

from benchmarks.sinkhorn_cases import CASES, make_step


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(impl, case):
    """(baseline MiB, peak extra MiB) of one forward+backward of ``impl`` on ``case``."""
    make_step(impl, dict(CASES[case], batch=1, m=8, n=8))()  # warm-up, tiny
    step = make_step(impl, case)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    grads = step()
    peak = _status_kib("VmHWM")
    del grads
    return before / 1024, (peak - before) / 1024


if __name__ == "__main__":
    impl, case = sys.argv[1:3]
    baseline, extra = measure(impl, case)
    print(json.dumps(dict(impl=impl, case=case, baseline_mib=round(baseline, 2),
                          peak_extra_mib=round(extra, 2))))
