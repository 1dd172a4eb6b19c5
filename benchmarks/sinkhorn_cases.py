"""The Sinkhorn benchmark cases and their forward+backward step, shared by the timing suite
(benchmarks/test_sinkhorn_cpu.py) and the memory probe (benchmarks/memory.py).

Every case is float32 random-normal logits x [B, M, K] and y [B, N, K] (a fixed seed per case),
``epsilon=0.1, n_iters=20, temperature=2.0, p=1`` and unit marginals; a step is one forward and
one backward (``torch.autograd.grad`` of ``loss.sum()`` wrt x and y). ``MLOT_BENCH_QUICK=1``
shrinks every case to B=2, M=N=16 for smoke runs.
"""

import os

import torch

import mlot_kernels
from benchmarks.peers import batched_log_domain, released_loop

QUICK = os.environ.get("MLOT_BENCH_QUICK", "") not in ("", "0")

CASES = {
    "paper": dict(batch=8, m=128, n=128, k=50, seed=0),
    "long": dict(batch=4, m=1024, n=1024, k=50, seed=1),
}
if QUICK:
    CASES = {name: dict(case, batch=2, m=16, n=16) for name, case in CASES.items()}

OPTIONS = dict(epsilon=0.1, n_iters=20, temperature=2.0)

IMPLS = {
    "mlot": lambda x, y: mlot_kernels.sinkhorn_loss(x, y, **OPTIONS, p=1, unit_marginals=True),
    "released_loop": lambda x, y: released_loop(x, y, **OPTIONS),
    "batched_log_domain": lambda x, y: batched_log_domain(x, y, **OPTIONS, unit_marginals=True),
}


def make_inputs(case):
    """The case's x [B, M, K] and y [B, N, K]: float32 standard normal, requires_grad."""
    c = CASES[case] if isinstance(case, str) else case
    gen = torch.Generator().manual_seed(c["seed"])
    x = torch.randn(c["batch"], c["m"], c["k"], generator=gen).requires_grad_()
    y = torch.randn(c["batch"], c["n"], c["k"], generator=gen).requires_grad_()
    return x, y


def make_step(impl, case):
    """A callable running one forward+backward of ``impl`` on the case's inputs; returns the grads."""
    fn = IMPLS[impl]
    x, y = make_inputs(case)

    def step():
        return torch.autograd.grad(fn(x, y).sum(), (x, y))

    return step
