"""The timed steps every suite shares: forward, backward and forward+backward of one call.

A cases module (``sinkhorn_cases``, ``topk_cases``, ``loss_cases``) turns (impl, case) into a
``run`` closure that returns the scalar objective of one forward, and the input tensors ``wrt``
whose gradients the backward computes. :func:`make_steps` wraps them:

- ``forward()``: ``run()`` with autograd recording, as in training;
- ``backward(objective)``: ``torch.autograd.grad(objective, wrt)``, after ``setup()`` has run the
  forward (pytest-benchmark's ``pedantic(setup=...)`` keeps the forward out of the time);
- ``forward_backward()``: both.

On CUDA every step ends with ``torch.cuda.synchronize()``, so a wall-clock time covers the
kernels, not just their launches.
"""

import importlib.util
from typing import Callable, NamedTuple

import torch

MODES = ("forward", "backward", "forward_backward")


class Impl(NamedTuple):
    """One implementation in a cases module's table."""

    run: Callable  # the cases module's call: (inputs..., case) -> output
    computes: str  # what it computes, for the report (the ground cost, for Sinkhorn)
    needs: tuple = ()  # optional modules it imports

    def available(self):
        return all(importlib.util.find_spec(module) is not None for module in self.needs)


class Steps(NamedTuple):
    forward: Callable
    setup: Callable  # runs the forward for backward: returns ((objective,), {})
    backward: Callable
    forward_backward: Callable


def synchronizer(device):
    """A callable that waits for ``device``'s queued work: ``torch.cuda.synchronize`` on CUDA,
    nothing on CPU."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def make_steps(run, wrt, device):
    """:class:`Steps` of the objective ``run()`` differentiated with respect to ``wrt``."""
    sync = synchronizer(device)

    def forward():
        out = run()
        sync()
        return out

    def setup():
        return (forward(),), {}

    def backward(objective):
        grads = torch.autograd.grad(objective, wrt)
        sync()
        return grads

    def forward_backward():
        return backward(run())

    return Steps(forward, setup, backward, forward_backward)
