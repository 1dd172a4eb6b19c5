"""torch.ops.mlot.topk_probs* on CUDA tensors (the Triton kernels, compiled). The public op at the
paper's size [8, 256, 32000], k=50: values, order and gradient against the float64 reference,
bf16 logits, gradcheck, opcheck, torch.compile, out-of-range lengths. The losses' op
(answer_topk_probs: answer rows, cross-entropy targets, two temperatures) against the CPU op:
row statistics, ce, order, probs and gradient; bf16 logits, strided logits, gradcheck, opcheck,
torch.compile, and the bad data that gives NaN. Skipped without a CUDA GPU, and under the Triton
interpreter."""

import os

import pytest
import torch

import mlot_kernels
from mlot_kernels.ops import reference
from mlot_kernels.ops.topk_probs import answer_topk_probs
from tests.conftest import assert_close_rel

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="the Triton interpreter is on: kernels are not compiled"),
]

OPS = torch.ops.mlot
B, L, V, K = 8, 256, 32000, 50
A = 128  # answer rows per sequence in the losses' cases
TEMPERATURE = 1.0
TEMPERATURES = [1.0, 2.0]
RANKINGS = ["token", "sequence", "batch"]


def make_logits(gen, shape, dtype=torch.float32):
    return (3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype).cuda()


def make_lengths(gen, batch, length):
    """Random lengths in [0, length], the first sequence empty."""
    lengths = torch.randint(0, length + 1, (batch,), generator=gen)
    lengths[0] = 0
    return lengths.cuda()


def make_answers(gen, batch, length, answers, vocab):
    """rows [B, A] (a random subset of each sequence's rows, in random order), lengths in [0, A]
    (the first 0) and targets [B, L] (-100 on about a third of the rows)."""
    rows = torch.stack([torch.randperm(length, generator=gen)[:answers] for _ in range(batch)])
    lengths = torch.randint(1, answers + 1, (batch,), generator=gen)
    lengths[0] = 0
    targets = torch.randint(0, vocab, (batch, length), generator=gen)
    targets = targets.masked_fill(torch.rand(batch, length, generator=gen) < 0.35, -100)
    return rows.cuda(), lengths.cuda(), targets.cuda()


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


def answer_rows(values, rows):
    """values [B, L, ...] at the answer rows: [B, A, ...] (rows past the lengths: any row)."""
    return values[torch.arange(values.shape[0], device=values.device)[:, None],
                  rows.clamp(0, values.shape[1] - 1)]


def q_from_stats(logits, rows, row_stats, temperatures):
    """q^t [n_t, B, A, V] of the answer rows in float64 from row statistics (the CPU kernels')."""
    z, stats = answer_rows(logits.double(), rows), answer_rows(row_stats.double(), rows)
    mx, scale = stats[..., 0:1], stats[..., 1:2]
    return torch.stack([torch.exp((z - mx) / (scale * t) - stats[..., 5 + 2 * i:6 + 2 * i])
                        for i, t in enumerate(temperatures)])


# ------------------------------------------------------------------ the public op


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
    args = (None, lengths, None, K, [TEMPERATURE], std_scale, ranking)
    probs, indices, _, stats = OPS.topk_probs_forward(logits, *args)
    p32, i32, _, s32 = OPS.topk_probs_forward(logits.float(), *args)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, p32, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats, s32, rtol=1e-6, atol=1e-7)
    if ranking == "token":
        assert torch.equal(at_columns(logits, indices[0], ranking),
                           at_columns(logits, i32[0], ranking))
    else:
        assert torch.equal(indices, i32)
    grad_probs = torch.rand(probs.shape, generator=gen).cuda()
    backward = (None, lengths, None, probs, indices, stats, [TEMPERATURE], std_scale, ranking)
    grad = OPS.topk_probs_backward(grad_probs, None, logits, *backward)
    g32 = OPS.topk_probs_backward(grad_probs, None, logits.float(), *backward)
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
    forward_args = (None, lengths, None, K, [2.0], True, ranking)
    torch.library.opcheck(OPS.topk_probs_forward.default, (logits, *forward_args))
    probs, indices, _, stats = OPS.topk_probs_forward(logits.detach(), *forward_args)
    grad = torch.rand(probs.shape, generator=gen).cuda()
    backward_args = (None, logits.detach(), None, lengths, None, probs, indices, stats, [2.0],
                     True, ranking)
    torch.library.opcheck(OPS.topk_probs_backward.default, (grad, *backward_args))

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
        options = (None, K, [1.0], False, ranking)
        probs = OPS.topk_probs_forward(logits, None, lengths, *options)[0]
        alone = OPS.topk_probs_forward(logits[:1], None, lengths[:1], *options)[0]
        assert torch.isnan(probs[:, 1:]).all() and torch.equal(probs[:, :1], alone)


# ------------------------------------------------------------------ the losses' op


@pytest.mark.parametrize("std_scale", [False, True], ids=["plain", "std"])
@pytest.mark.parametrize("ranking", RANKINGS)
def test_answer_matches_cpu_op(gen, ranking, std_scale):
    """At the paper's size with answer rows, targets and two temperatures (float32 logits): the
    row statistics, ce and ranking mass equal the CPU op's; the chosen columns carry the CPU's
    top-k mass (near-ties may go either way; 'token': the top-k logits); probs are the CPU
    statistics' q at those columns; and the gradient of a weighted sum of probs and ce equals
    the CPU backward's given the same choice."""
    logits = make_logits(gen, (B, L, V))
    rows, lengths, targets = make_answers(gen, B, L, A, V)
    args = (rows, lengths, targets, K, TEMPERATURES, std_scale, ranking)
    probs, indices, ce, stats = OPS.topk_probs_forward(logits, *args)
    cpu = [None if t is None else t.cpu() for t in (logits, rows, lengths, targets)]
    c_probs, c_indices, c_ce, c_stats = OPS.topk_probs_forward(*cpu, *args[3:])
    assert probs.is_cuda and probs.dtype == ce.dtype == stats.dtype == torch.float32
    assert probs.shape == c_probs.shape and indices.shape == c_indices.shape
    assert_close_rel(stats.cpu(), c_stats, 1e-5)
    assert_close_rel(ce.cpu(), c_ce, 1e-5)

    answers = answer_rows(logits, rows).cpu()
    if ranking == "token":
        valid = torch.arange(A)[None, :] < lengths.cpu()[:, None]
        for t in range(len(TEMPERATURES)):
            chosen = at_columns(answers, indices[t].cpu(), ranking)
            assert torch.equal(chosen[valid], at_columns(answers, c_indices[t], ranking)[valid])
            assert (indices[t].cpu()[~valid] == -1).all()
    else:
        mass = OPS.topk_probs_stats(*cpu, TEMPERATURES, std_scale, ranking)[1].double()
        gpu_mass = OPS.topk_probs_stats(logits, rows, lengths, targets, TEMPERATURES, std_scale,
                                        ranking)[1]
        assert_close_rel(gpu_mass.cpu(), mass, 1e-5)
        if ranking == "batch":
            mass = mass.sum(1, keepdim=True)
        top = mass.topk(K, dim=-1).values
        picked = mass.gather(2, indices.cpu().reshape(top.shape))
        if ranking == "sequence":  # a sequence without answer rows has no order
            picked, top = picked[:, lengths.cpu() > 0], top[:, lengths.cpu() > 0]
        assert_close_rel(picked, top, 1e-5)

    q = q_from_stats(logits.cpu(), rows.cpu(), c_stats, TEMPERATURES)  # [n_t, B, A, V]
    expected = torch.stack([at_columns(q[t], indices[t].cpu(), ranking)
                            for t in range(len(TEMPERATURES))])
    valid = (torch.arange(A)[None, :] < lengths.cpu()[:, None])[None, :, :, None]
    assert_close_rel(probs.cpu(), torch.where(valid, expected, 0.0), 1e-5)

    grad_probs = (torch.rand(probs.shape, generator=gen) + 0.5).cuda()
    grad_ce = (torch.rand(ce.shape, generator=gen) + 0.5).cuda()
    grad = OPS.topk_probs_backward(grad_probs, grad_ce, logits, rows, lengths, targets, probs,
                                   indices, stats, TEMPERATURES, std_scale, ranking)
    c_grad = OPS.topk_probs_backward(grad_probs.cpu(), grad_ce.cpu(), *cpu, probs.cpu(),
                                     indices.cpu(), c_stats, TEMPERATURES, std_scale, ranking)
    assert grad.dtype == torch.float32 and grad.is_contiguous()
    assert_close_rel(grad.cpu(), c_grad, 1e-5)


@pytest.mark.parametrize("ranking", RANKINGS)
def test_answer_bf16_logits_compute_in_float32(gen, ranking):
    """The losses' op on bf16 logits gives its float32 result of the same values: probs, ce,
    statistics, order (under 'token' up to ties) and the gradient given the same choice."""
    logits = make_logits(gen, (B, L, V), torch.bfloat16)
    rows, lengths, targets = make_answers(gen, B, L, A, V)
    args = (rows, lengths, targets, K, TEMPERATURES, True, ranking)
    probs, indices, ce, stats = OPS.topk_probs_forward(logits, *args)
    p32, i32, c32, s32 = OPS.topk_probs_forward(logits.float(), *args)
    for a, e in ((probs, p32), (ce, c32), (stats, s32)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
    if ranking == "token":
        answers = answer_rows(logits, rows)
        for t in range(len(TEMPERATURES)):
            assert torch.equal(at_columns(answers, indices[t], ranking),
                               at_columns(answers, i32[t], ranking))
    else:
        assert torch.equal(indices, i32)
    grad_probs = torch.rand(probs.shape, generator=gen).cuda()
    grad_ce = torch.rand(ce.shape, generator=gen).cuda()
    backward = (rows, lengths, targets, probs, indices, stats, TEMPERATURES, True, ranking)
    grad = OPS.topk_probs_backward(grad_probs, grad_ce, logits, *backward)
    g32 = OPS.topk_probs_backward(grad_probs, grad_ce, logits.float(), *backward)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, g32.to(torch.bfloat16))


def test_answer_strided_logits_and_rows_never_read(gen):
    """A view with unit stride along V (logits[:, :-1]) gives the contiguous logits' result, and
    NaN in the rows never read changes nothing (their gradient is exactly 0)."""
    full = make_logits(gen, (4, 65, 3000))
    view = full[:, :-1]
    rows, lengths, targets = make_answers(gen, 4, 64, 20, 3000)
    read = torch.zeros(4, 64, dtype=torch.bool, device=rows.device)
    for b in range(4):
        read[b, rows[b, :lengths[b]]] = True
    read |= targets != -100
    dirty = view.contiguous().masked_fill(~read[..., None], float("nan"))
    weights = torch.rand(2, 4, 20, K, generator=gen).cuda(), torch.rand(4, 64, generator=gen).cuda()
    results = []
    for logits in (view, view.contiguous(), dirty):
        z = logits.detach().requires_grad_()
        probs, indices, ce = answer_topk_probs(z, rows, lengths, targets, K, TEMPERATURES, True,
                                               "sequence")
        (grad,) = torch.autograd.grad((probs * weights[0]).sum() + (ce * weights[1]).sum(), z)
        results.append((probs, indices, ce, grad))
    for other in results[1:]:
        for a, e in zip(results[0], other):
            assert torch.equal(a, e)
    assert (results[2][3][~read] == 0).all()


@pytest.mark.parametrize("ranking", RANKINGS)
def test_answer_gradcheck(gen, ranking):
    logits = make_logits(gen, (3, 6, 40), torch.float64).requires_grad_()
    rows = torch.tensor([[4, 0, 2, 5], [1, 3, 0, 2], [5, 4, 3, 2]]).cuda()
    lengths = torch.tensor([4, 0, 2]).cuda()
    targets = torch.tensor([[3, -100, 7, -100, 0, 39], [-100] * 6, [1, 2, -100, 4, -100, -100]])

    def fn(z):
        out = answer_topk_probs(z, rows, lengths, targets.cuda(), 12, TEMPERATURES, True, ranking)
        return out.probs, out.ce

    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("ranking", RANKINGS)
def test_answer_opcheck_and_compile(gen, ranking):
    logits = make_logits(gen, (3, 40, 3000)).requires_grad_()
    rows, lengths, targets = make_answers(gen, 3, 40, 24, 3000)
    torch.library.opcheck(OPS.topk_probs_stats.default,
                          (logits.detach(), rows, lengths, targets, TEMPERATURES, True, ranking))
    forward_args = (rows, lengths, targets, K, TEMPERATURES, True, ranking)
    torch.library.opcheck(OPS.topk_probs_forward.default, (logits, *forward_args))
    probs, indices, ce, stats = OPS.topk_probs_forward(logits.detach(), *forward_args)
    grad_probs = torch.rand(probs.shape, generator=gen).cuda()
    grad_ce = torch.rand(ce.shape, generator=gen).cuda()
    backward_args = (logits.detach(), rows, lengths, targets, probs, indices, stats, TEMPERATURES,
                     True, ranking)
    torch.library.opcheck(OPS.topk_probs_backward.default, (grad_probs, grad_ce, *backward_args))

    weights = torch.rand(2, 3, 24, K, generator=gen).cuda()

    def fn(z, rows, lengths, targets):
        probs, indices, ce = answer_topk_probs(z, rows, lengths, targets, K, TEMPERATURES, True,
                                               ranking)
        return probs * 2, indices, ce

    results = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        probs, indices, ce = f(logits, rows, lengths, targets)
        (grad,) = torch.autograd.grad((probs * weights).sum() + ce.sum(), logits)
        results.append((probs.detach(), indices, ce.detach(), grad))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


def test_answer_bad_data_gives_nan(gen):
    """Not checked on the host (no synchronisation): answer rows outside [0, L) or repeated
    within a sequence's valid prefix, and lengths outside [0, A], make that sequence's probs NaN;
    a target outside [0, V) (not -100) makes that row's ce NaN; the rest is left alone."""
    logits = make_logits(gen, (5, 6, 500))
    rows = torch.tensor([[0, 2, 99], [1, 7, 3], [2, 4, 2], [4, 1, 0], [3, 0, 1]]).cuda()
    lengths = torch.tensor([2, 2, 3, 4, -1]).cuda()
    targets = torch.tensor([[1, -100, 500, 3, -100, 4]] + [[-100] * 6] * 4).cuda()
    tidy_targets = targets[:1].masked_fill(targets[:1] >= 500, -100)
    for ranking in ("token", "sequence"):
        options = (K, TEMPERATURES, True, ranking)
        probs, _, ce, _ = OPS.topk_probs_forward(logits, rows, lengths, targets, *options)
        alone = OPS.topk_probs_forward(logits[:1], rows[:1], lengths[:1], tidy_targets, *options)
        assert torch.isnan(probs[:, 1:]).all() and torch.equal(probs[:, :1], alone[0])
        assert torch.isnan(ce[0, 2]) and ce.isnan().sum() == 1
        assert torch.equal(ce[:1].nan_to_num(0.0), alone[2])
