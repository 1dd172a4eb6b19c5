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


def make_logits(gen, shape, dtype=torch.float64):
    """Logits with a realistic spread and no ties (with probability 1)."""
    return (3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)


def probs_indices_grad(fn, logits, weights, *args, **kwargs):
    """fn's (probs, indices) and the gradient of sum(weights * probs) with respect to the logits."""
    logits = logits.detach().requires_grad_()
    probs, indices = fn(logits, *args, **kwargs)
    (grad,) = torch.autograd.grad((probs * weights.to(probs.dtype)).sum(), logits)
    return probs.detach(), indices, grad


def defined_indices(indices, lengths, ranking):
    """The entries of topk_probs' `indices` that the ranking defines: a sequence (or a batch)
    with no valid row has no mass to order by."""
    if lengths is None or ranking == "token":
        return indices
    if ranking == "sequence":
        return indices[lengths > 0]
    return indices if (lengths > 0).any() else indices[:0]


def check_topk_probs(gen, fn, logits, lengths, ranking, rtol, **opts):
    """fn's probs, indices and logits' gradient equal those of the float64 reference of
    topk_probs (indices where the ranking defines them); returns them."""
    from mlot_kernels.ops import reference

    weights = torch.rand(*logits.shape[:2], opts["k"], generator=gen, dtype=torch.float64) + 0.5
    probs, indices, grad = probs_indices_grad(fn, logits, weights, lengths, ranking=ranking, **opts)
    e_probs, e_indices, e_grad = probs_indices_grad(reference.topk_probs, logits.double(), weights,
                                                    lengths, ranking=ranking, **opts)
    assert probs.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert grad.dtype == logits.dtype
    assert indices.dtype == torch.int64 and indices.shape == e_indices.shape
    assert torch.equal(defined_indices(indices, lengths, ranking),
                       defined_indices(e_indices, lengths, ranking))
    assert_close_rel(probs, e_probs, rtol)
    assert_close_rel(grad, e_grad, rtol)
    return probs, indices, grad


def check_half_logits(fn, logits, weights, lengths, **opts):
    """fn on float16/bfloat16 logits gives its float32 result on the same values: probs in
    float32, the same indices, the gradient in the logits' dtype."""
    probs, indices, grad = probs_indices_grad(fn, logits, weights, lengths, **opts)
    p32, i32, g32 = probs_indices_grad(fn, logits.float(), weights, lengths, **opts)
    assert probs.dtype == torch.float32 and grad.dtype == logits.dtype
    assert torch.equal(indices, i32)
    torch.testing.assert_close(probs, p32, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, g32.to(logits.dtype))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny local tokenizers, models and data for the distillation-loop tests."""
    from tests.distill_setup import build
    return build(str(tmp_path_factory.mktemp("tiny")))
