"""Peak extra memory of ONE forward+backward: :func:`peak_extra_mib`.

- CUDA: ``torch.cuda.max_memory_allocated()`` during the step minus the memory allocated before
  it, in this process, after one warm-up step.
- CPU: the peak extra resident memory, VmHWM after the step minus VmRSS before it (Linux /proc),
  everything the step made resident at its peak (autograd's saved tensors, temporaries, the
  gradients) beyond the imports and the inputs. It is measured in a fresh process per
  (suite, impl, case), ``python -m benchmarks.memory SUITE IMPL CASE_JSON``, which prints the
  result as JSON: a long-lived process's allocator state would hide or inflate the next
  measurement. That process first sets glibc's mmap threshold to 64 KiB (``mallopt``): every
  large block is then mapped on allocation and unmapped on free, so resident memory follows the
  live tensors instead of heap fragments kept from earlier steps. It runs one warm-up step on
  the case itself (which also compiles what ``torch.compile`` compiles), returns free heap memory
  to the system (``malloc_trim``), resets the peak (writes "5" to /proc/self/clear_refs) and
  measures the next step.

SUITE names a cases module and its implementation table (:data:`SUITES`).
"""

import ctypes
import gc
import importlib
import json
import os
import subprocess
import sys

import torch

# suite: (cases module, the name of its implementation table)
SUITES = {
    "sinkhorn": ("benchmarks.sinkhorn_cases", "IMPLS"),
    "sinkhorn_tolerance": ("benchmarks.sinkhorn_cases", "TOLERANCE_IMPLS"),
    "topk_probs": ("benchmarks.topk_cases", "IMPLS"),
    "loss": ("benchmarks.loss_cases", "IMPLS"),
    "loss_cost": ("benchmarks.loss_cost_cases", "IMPLS"),
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def case_steps(suite, impl, case):
    """The :class:`benchmarks.steps.Steps` of ``impl`` of ``suite`` on ``case``."""
    module_name, table = SUITES[suite]
    cases = importlib.import_module(module_name)
    return cases.make_case_steps(impl, case, getattr(cases, table))


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_measure(suite, impl, case):
    """Peak extra resident MiB of one forward+backward, in this (fresh) process."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    step = case_steps(suite, impl, case).forward_backward
    step()  # warm-up on the case itself
    gc.collect()
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    grads = step()
    peak = _status_kib("VmHWM")
    del grads
    return (peak - before) / 1024


def _cuda_measure(suite, impl, case):
    step = case_steps(suite, impl, case).forward_backward
    step()  # warm-up
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = step()
    peak = torch.cuda.max_memory_allocated()
    del grads
    return (peak - before) / 2**20


def peak_extra_mib(suite, impl, case):
    """Peak extra MiB of one forward+backward of ``impl`` of ``suite`` on ``case`` (a dict)."""
    if torch.device(case["device"]).type == "cuda":
        return _cuda_measure(suite, impl, case)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory", suite, impl, json.dumps(case)],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"memory probe of {suite}/{impl} on {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"]


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in SUITES:
        sys.exit(f"usage: python -m benchmarks.memory {{{','.join(SUITES)}}} IMPL CASE_JSON")
    suite, impl, case = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    print(json.dumps(dict(suite=suite, impl=impl, case=case,
                          peak_extra_mib=round(_cpu_measure(suite, impl, case), 2))))
