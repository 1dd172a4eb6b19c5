"""torch.ops.mlot.topk_probs on CUDA tensors (the Triton kernels, compiled) at the paper's size
[8, 256, 32000], k=50: values, order and gradient against the float64 reference, bf16 logits,
gradcheck, opcheck, torch.compile, out-of-range lengths. Skipped without a CUDA GPU, and under
the Triton interpreter."""

import os

import pytest
import torch

import mlot_kernels
from mlot_kernels import reference
from tests.conftest import assert_close_rel

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="the Triton interpreter is on: kernels are not compiled"),
]

OPS = torch.ops.mlot
B, L, V, K = 8, 256, 32000, 50
TEMPERATURE = 1.0
RANKINGS = ["token", "sequence", "batch"]


def make_logits(gen, shape, dtype=torch.float32):
    return (3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype).cuda()


def make_lengths(gen, batch, length):
    """Random lengths in [0, length], the first sequence empty."""
    lengths = torch.randint(0, length + 1, (batch,), generator=gen)
    lengths[0] = 0
    return lengths.cuda()


def reference_q(logits, lengths, std_scale):
    """The float64 reference's probabilities q [B, L, V] in column order (0 past the lengths),
    differentiable: its 'token' ranking with k = V, scattered back."""
    probs, order = reference.topk_probs(logits.double(), lengths, logits.shape[2], TEMPERATURE,
                                        std_scale, "token")
    return torch.zeros_like(probs).scatter(2, order.clamp(min=0), probs)


def at_columns(values, indices, ranking):
    """values [B, L, V] at the chosen columns: [B, L, k] (0 at index -1)."""
    batch, length, _ = values.shape
    lead = {"token": (batch, length), "sequence": (batch, 1), "batch": (1, 1)}[ranking]
    idx = indices.reshape(*lead, -1).expand(batch, length, -1)
    return torch.where(idx >= 0, values.gather(2, idx.clamp(min=0)), 0.0)


def ranking_mass(q, ranking):
    """What orders the columns, [B, L, V]: q itself, its sum over each sequence or the batch."""
    if ranking == "token":
        return q
    dims = 1 if ranking == "sequence" else (0, 1)
    return q.sum(dims, keepdim=True).expand_as(q)


@pytest.mark.parametrize("std_scale", [False, True], ids=["plain", "std"])
@pytest.mark.parametrize("ranking", RANKINGS)
def test_matches_float64_reference(gen, ranking, std_scale):
    """At the paper's size (float32 logits, random lengths with an empty sequence): the chosen
    columns carry the reference's top-k mass in order (near-ties at float32 precision may go
    either way), and probs and the gradient of a weighted sum equal the float64 reference's at
    those columns."""
    logits = make_logits(gen, (B, L, V)).requires_grad_()
    lengths = make_lengths(gen, B, L)
    weights = torch.rand(B, L, K, generator=gen, dtype=torch.float64).cuda() + 0.5
    probs, indices = mlot_kernels.topk_probs(logits, lengths, K, TEMPERATURE, std_scale, ranking)
    (grad,) = torch.autograd.grad((probs * weights.float()).sum(), logits)
    assert probs.is_cuda and probs.dtype == torch.float32 and grad.dtype == torch.float32

    z = logits.detach().double().requires_grad_()
    q = reference_q(z, lengths, std_scale)
    expected = at_columns(q, indices, ranking)
    (e_grad,) = torch.autograd.grad((expected * weights).sum(), z)
    mass = ranking_mass(q.detach(), ranking)
    assert_close_rel(at_columns(mass, indices, ranking), mass.topk(K, dim=-1).values, 1e-5)
    assert_close_rel(probs, expected.detach(), 1e-5)
    assert_close_rel(grad, e_grad, 1e-5)


@pytest.mark.parametrize("std_scale", [False, True], ids=["plain", "std"])
@pytest.mark.parametrize("ranking", RANKINGS)
def test_bf16_logits_compute_in_float32(gen, ranking, std_scale):
    """bf16 logits give the float32 result of the same values: probs, statistics and order
    (under 'token' ranking up to ties between equal logits, frequent in bf16), and the same
    gradient given the same choice."""
    logits = make_logits(gen, (B, L, V), torch.bfloat16)
    lengths = make_lengths(gen, B, L)
    args = (lengths, K, TEMPERATURE, std_scale, ranking)
    probs, indices, stats = OPS.topk_probs_forward(logits, *args)
    p32, i32, s32 = OPS.topk_probs_forward(logits.float(), *args)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, p32, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats, s32, rtol=1e-6, atol=1e-7)
    if ranking == "token":
        assert torch.equal(at_columns(logits, indices, ranking), at_columns(logits, i32, ranking))
    else:
        assert torch.equal(indices, i32)
    grad_probs = torch.rand(probs.shape, generator=gen).cuda()
    backward = (lengths, probs, indices, stats, TEMPERATURE, std_scale, ranking)
    grad = OPS.topk_probs_backward(grad_probs, logits, *backward)
    g32 = OPS.topk_probs_backward(grad_probs, logits.float(), *backward)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, g32.to(torch.bfloat16))


@pytest.mark.parametrize("ranking", RANKINGS)
def test_gradcheck(gen, ranking):
    logits = make_logits(gen, (3, 4, 40), torch.float64).requires_grad_()
    lengths = torch.tensor([4, 0, 2]).cuda()
    fn = lambda z: mlot_kernels.topk_probs(z, lengths, 12, 1.5, True, ranking)[0]
    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("ranking", RANKINGS)
def test_opcheck_and_compile(gen, ranking):
    logits = make_logits(gen, (3, 40, 3000)).requires_grad_()
    lengths = torch.tensor([40, 0, 17]).cuda()
    args = (lengths, K, 2.0, True, ranking)
    torch.library.opcheck(OPS.topk_probs.default, (logits, *args))
    torch.library.opcheck(OPS.topk_probs_forward.default, (logits, *args))
    probs, indices, stats = OPS.topk_probs_forward(logits.detach(), *args)
    grad = torch.rand(probs.shape, generator=gen).cuda()
    backward_args = (lengths, probs, indices, stats, 2.0, True, ranking)
    torch.library.opcheck(OPS.topk_probs_backward.default, (grad, logits.detach(), *backward_args))

    weights = torch.rand(3, 40, K, generator=gen).cuda()

    def fn(z, lengths):
        probs, indices = mlot_kernels.topk_probs(z, lengths, *args[1:])
        return probs * 2, indices

    results = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        probs, indices = f(logits, lengths)
        (grad,) = torch.autograd.grad((probs * weights).sum(), logits)
        results.append((probs.detach(), indices, grad))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


def test_out_of_range_lengths_give_nan(gen):
    """Lengths are not checked on the host (no synchronisation): a length outside [0, L] makes
    that sequence's probs NaN and leaves the others alone."""
    logits = make_logits(gen, (3, 20, 500))
    lengths = torch.tensor([13, 21, -1]).cuda()
    for ranking in ("token", "sequence"):
        probs, _, _ = OPS.topk_probs_forward(logits, lengths, K, 1.0, False, ranking)
        alone, _, _ = OPS.topk_probs_forward(logits[:1], lengths[:1], K, 1.0, False, ranking)
        assert torch.isnan(probs[1:]).all() and torch.equal(probs[:1], alone)
