"""Peak extra resident memory of ONE forward+backward: ``python -m benchmarks.memory SUITE IMPL CASE``.

SUITE is ``sinkhorn`` (benchmarks/sinkhorn_cases.py) or ``topk_probs``
(benchmarks/topk_cases.py); IMPL and CASE are keys of that module's IMPLS and CASES.

Prints ``{"suite", "impl", "case", "baseline_mib", "peak_extra_mib", ...}`` as JSON, where
peak_extra_mib is VmHWM after the step minus VmRSS before it (Linux /proc): everything the step
itself made resident at its peak (autograd's saved tensors, temporaries, the gradients), beyond
the imports and the inputs. The peak is reset just before the step by writing "5" to
/proc/self/clear_refs. A tiny warm-up step first takes one-time lazy initialisation (thread
pools, kernel dispatch tables) out of the number. A cases module may define
``input_sizes_mib(case)``, a dict of input sizes printed with the rest (topk_probs: the logits'
``logits_mib``).

It runs in a fresh process per (suite, impl, case) so that every implementation starts from the
same allocator state: in a long-lived process, memory cached or fragmented by an earlier
benchmark would hide (or inflate) the next one's peak. :func:`probe` starts that process.
"""

import importlib
import json
import os
import subprocess
import sys

# suite: (cases module, the case keys overridden for the tiny warm-up step)
SUITES = {
    "sinkhorn": ("benchmarks.sinkhorn_cases", dict(batch=1, m=8, n=8)),
    "topk_probs": ("benchmarks.topk_cases", dict(batch=1, length=8, vocab=256)),
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(suite, impl, case):
    """(baseline MiB, peak extra MiB) of one forward+backward of ``impl`` on ``case``, in this process."""
    module_name, tiny = SUITES[suite]
    cases = importlib.import_module(module_name)
    cases.make_step(impl, dict(cases.CASES[case], **tiny))()  # warm-up, tiny
    step = cases.make_step(impl, case)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    grads = step()
    peak = _status_kib("VmHWM")
    del grads
    return before / 1024, (peak - before) / 1024


def report(suite, impl, case):
    """The JSON-ready dict that ``python -m benchmarks.memory SUITE IMPL CASE`` prints."""
    baseline, extra = measure(suite, impl, case)
    cases = importlib.import_module(SUITES[suite][0])
    sizes = cases.input_sizes_mib(case) if hasattr(cases, "input_sizes_mib") else {}
    return dict(suite=suite, impl=impl, case=case, baseline_mib=round(baseline, 2),
                peak_extra_mib=round(extra, 2), **sizes)


def probe(suite, impl, case):
    """:func:`report` of one step of ``impl`` on ``case``, from a fresh ``benchmarks.memory`` process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory", suite, impl, case], cwd=ROOT,
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in SUITES:
        sys.exit(f"usage: python -m benchmarks.memory {{{','.join(SUITES)}}} IMPL CASE")
    print(json.dumps(report(*sys.argv[1:4])))
