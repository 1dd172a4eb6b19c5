"""The topk_probs benchmark cases and their forward+backward step, shared by the timing suite
(benchmarks/test_topk_probs_cpu.py) and the memory probe (benchmarks/memory.py).

Every case is float32 logits [B, L, V] = 3 * standard normal (a fixed seed per case), no lengths,
``k=50, temperature=1``, ranking 'sequence'; "paper-vocab" without and "paper-vocab-std" with
std_scale. A step is one forward and one backward: ``torch.autograd.grad`` of
``(probs * w).sum()`` wrt the logits, with a fixed random weight w [B, L, k] (so that every
kept probability gets its own gradient). ``MLOT_BENCH_QUICK=1`` shrinks every case to B=2,
L=16, V=1000 for smoke runs.
"""

import os

import torch

import mlot_kernels
from benchmarks.peers import eager_topk_probs

QUICK = os.environ.get("MLOT_BENCH_QUICK", "") not in ("", "0")

_PAPER = dict(batch=8, length=256, vocab=32000, k=50, temperature=1.0, ranking="sequence")
CASES = {
    "paper-vocab": dict(_PAPER, std_scale=False, seed=0),
    "paper-vocab-std": dict(_PAPER, std_scale=True, seed=1),
}
if QUICK:
    CASES = {name: dict(case, batch=2, length=16, vocab=1000) for name, case in CASES.items()}

OPTIONS = ("k", "temperature", "std_scale", "ranking")  # the case keys passed to the op

IMPLS = {
    "mlot": mlot_kernels.topk_probs,
    "eager": eager_topk_probs,
}


def _case(case):
    return CASES[case] if isinstance(case, str) else case


def logits_mib(case):
    """The size of the case's float32 logits [B, L, V] in MiB (that of their gradient too)."""
    c = _case(case)
    return c["batch"] * c["length"] * c["vocab"] * 4 / 2**20


def input_sizes_mib(case):
    """The input sizes benchmarks/memory.py reports next to the peak: {"logits_mib": ...}."""
    return {"logits_mib": round(logits_mib(case), 2)}


def make_inputs(case):
    """The case's logits [B, L, V] (float32, 3 * standard normal, requires_grad) and the
    weight w [B, L, k] (uniform in [0.5, 1.5)) of the loss ``(probs * w).sum()``."""
    c = _case(case)
    gen = torch.Generator().manual_seed(c["seed"])
    logits = torch.randn(c["batch"], c["length"], c["vocab"], generator=gen).mul_(3).requires_grad_()
    weight = torch.rand(c["batch"], c["length"], c["k"], generator=gen) + 0.5
    return logits, weight


def make_step(impl, case):
    """A callable running one forward+backward of ``impl`` on the case's inputs; returns the
    logits' gradient (a 1-tuple)."""
    fn = IMPLS[impl]
    c = _case(case)
    options = {key: c[key] for key in OPTIONS}
    logits, weight = make_inputs(c)

    def step():
        probs, _ = fn(logits, **options)
        return torch.autograd.grad((probs * weight).sum(), logits)

    return step
