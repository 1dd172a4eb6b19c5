"""Shared input builders: fresh random problems for the op tests and the benchmarks' checks.

Without a CUDA GPU the Triton kernels run under the Triton interpreter on CPU tensors; the
interpreter is chosen when the kernels are defined, so before mlot_kernels is imported.
"""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mlot_kernels  # noqa: E402,F401  (registers torch.ops.mlot)


@pytest.fixture
def gen(request):
    """A generator seeded from the test's id: fresh data per test, reproducible per test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def make_vectors(gen, shape, kind, dtype=torch.float64):
    """Random rows: 'logits' (for temperature > 0), 'probs' (softmax rows, for temperature 0),
    or 'raw' (unnormalised values, temperature 0, large costs)."""
    z = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "logits":
        out = 2 * z
    elif kind == "probs":
        out = torch.softmax(2 * z, dim=-1)
    elif kind == "raw":
        out = 3 * z
    else:
        raise ValueError(kind)
    return out.to(dtype)


def make_lengths(gen, batch, size, mode):
    """[B] lengths: 'full', 'random' in [0, size], or 'zero-and-full' (first problem empty)."""
    if mode == "full":
        return None
    if mode == "random":
        return torch.randint(0, size + 1, (batch,), generator=gen)
    if mode == "zero-and-full":
        lengths = torch.full((batch,), size)
        lengths[0] = 0
        return lengths
    raise ValueError(mode)


def value_and_grads(fn, x, y, weights, *args, **kwargs):
    """fn's [B] losses and the gradients of sum_b weights_b * loss_b with respect to x and y."""
    x = x.detach().requires_grad_()
    y = y.detach().requires_grad_()
    loss = fn(x, y, *args, **kwargs)
    gx, gy = torch.autograd.grad((loss * weights.to(loss.dtype)).sum(), (x, y))
    return loss.detach(), gx, gy


def make_problem(gen, B, M, N, K, kind, lengths, dtype=torch.float64):
    """x [B, M, K], y [B, N, K] of one kind, and their lengths."""
    x = make_vectors(gen, (B, M, K), kind, dtype)
    y = make_vectors(gen, (B, N, K), kind, dtype)
    return x, y, make_lengths(gen, B, M, lengths), make_lengths(gen, B, N, lengths)


def assert_close_rel(actual, expected, rtol):
    """Agreement to rtol relative to the largest magnitude of `expected`."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol,
                               atol=rtol * max(scale, 1e-30))
