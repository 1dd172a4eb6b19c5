"""The hidden-state ops torch.ops.mlot.linear_topk_probs and torch.ops.mlot.linear_uld: equal to
the logits ops on hidden @ weight.T + bias in any chunking, opcheck, torch.compile, only the
gradients needed, and rows never read."""

import pytest
import torch

from mlot_kernels.ops import row_chunks
from mlot_kernels.ops.linear_topk_probs import linear_topk_probs
from mlot_kernels.ops.linear_uld_distance import linear_uld_distance
from mlot_kernels.ops.topk_probs import answer_topk_probs
from mlot_kernels.ops.uld_distance import uld_distance

RANKINGS = ["token", "sequence", "batch"]


def model(gen, B, L, H, V, dtype=torch.float64):
    hidden = torch.randn(B, L, H, generator=gen, dtype=torch.float64).to(dtype)
    weight = (3 * torch.randn(V, H, generator=gen, dtype=torch.float64) / H ** 0.5).to(dtype)
    bias = torch.randn(V, generator=gen, dtype=torch.float64).to(dtype)
    return hidden, weight, bias


def answers(gen, B, L, A, V):
    rows = torch.stack([torch.randperm(L, generator=gen)[:A] for _ in range(B)])
    lengths = torch.randint(0, A + 1, (B,), generator=gen)
    lengths[0], lengths[-1] = A, 0
    targets = torch.randint(0, V, (B, L), generator=gen)
    targets[torch.rand(B, L, generator=gen) < 0.4] = -100
    return rows, lengths, targets


def topk_outputs_and_grads(fn, tensors, args, gen_seed=0):
    tensors = [t.detach().requires_grad_() for t in tensors]
    probs, indices, ce = fn(*tensors, *args)
    gen = torch.Generator().manual_seed(gen_seed)
    w = torch.rand(probs.shape, generator=gen, dtype=probs.dtype)
    w_ce = torch.rand(ce.shape, generator=gen, dtype=ce.dtype)
    grads = torch.autograd.grad((probs * w).sum() + (ce * w_ce).sum(), tensors)
    return (probs.detach(), indices, ce.detach()), grads


@pytest.mark.parametrize("chunk", [1, 4, None], ids=["row", "rows", "default"])
@pytest.mark.parametrize("ranking", RANKINGS)
def test_linear_topk_probs_in_any_chunking(gen, ranking, chunk, monkeypatch):
    """Chunks of one row, of a few rows across sequences, or the default: the logits op's results
    on the built logits (float64 to rounding), and the gradients of hidden, weight and bias."""
    monkeypatch.setattr(row_chunks, "CHUNK_ROWS", chunk)
    hidden, weight, bias = model(gen, 3, 8, 6, 40)
    rows, lengths, targets = answers(gen, 3, 8, 5, 40)
    args = (rows, lengths, targets, 6, (1.0, 2.0), True, ranking)
    (out, grads) = topk_outputs_and_grads(linear_topk_probs, (hidden, weight, bias), args)

    def on_logits(h, w, b, *rest):
        return answer_topk_probs(torch.nn.functional.linear(h, w, b), *rest)

    (e_out, e_grads) = topk_outputs_and_grads(on_logits, (hidden, weight, bias), args)
    assert torch.equal(out[1], e_out[1])
    for a, e in zip(out[::2] + grads, e_out[::2] + e_grads):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_only_needed_gradients(gen):
    """A frozen weight and bias (LoRA, a teacher's head) get no gradient, hidden does; without
    a bias the op takes None."""
    hidden, weight, _ = model(gen, 2, 6, 5, 30, torch.float32)
    rows, lengths, targets = answers(gen, 2, 6, 3, 30)
    hidden.requires_grad_()
    probs, _, ce = linear_topk_probs(hidden, weight, None, rows, lengths, targets, 4)
    (probs.sum() + ce.sum()).backward()
    assert hidden.grad is not None and weight.grad is None


@pytest.mark.parametrize("ranking", RANKINGS)
def test_linear_topk_probs_opcheck(gen, ranking):
    hidden, weight, bias = model(gen, 3, 6, 5, 20, torch.float32)
    rows, lengths, targets = answers(gen, 3, 6, 4, 20)
    op = torch.ops.mlot.linear_topk_probs.default
    torch.library.opcheck(op, (hidden.requires_grad_(), weight.requires_grad_(),
                               bias.requires_grad_(), rows, lengths, targets, 4, [1.0, 2.0], True,
                               ranking))


def test_linear_uld_opcheck(gen):
    s_hidden, s_weight, s_bias = model(gen, 3, 6, 5, 20, torch.float32)
    t_hidden, t_weight, t_bias = model(gen, 3, 7, 4, 30, torch.float32)
    s_rows, lengths, targets = answers(gen, 3, 6, 4, 20)
    t_rows = torch.stack([torch.randperm(7, generator=gen)[:4] for _ in range(3)])
    for teacher_grad in (False, True):
        args = (s_hidden.requires_grad_(), s_weight.requires_grad_(), s_bias, s_rows, targets,
                t_hidden.requires_grad_(teacher_grad), t_weight, t_bias, t_rows, lengths, 1.0,
                teacher_grad)
        torch.library.opcheck(torch.ops.mlot.linear_uld.default, args)


def test_compile_matches_eager(gen):
    """Both hidden-state ops under torch.compile(fullgraph=True) give the eager results."""
    hidden, weight, bias = model(gen, 2, 7, 5, 30, torch.float32)
    rows, lengths, targets = answers(gen, 2, 7, 4, 30)
    t_hidden, t_weight, t_bias = model(gen, 2, 6, 5, 25, torch.float32)
    t_rows = torch.stack([torch.randperm(6, generator=gen)[:4] for _ in range(2)])

    def fn(h, w, b):
        probs, _, ce = linear_topk_probs(h, w, b, rows, lengths, targets, 5, (1.0, 2.0))
        distance, ce2 = linear_uld_distance(h, w, b, rows, targets, t_hidden, t_weight, t_bias,
                                            t_rows, lengths)
        return probs.sum() + ce.sum() + distance.sum() + ce2.sum()

    def run(f):
        tensors = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
        value = f(*tensors)
        return (value.detach(), *torch.autograd.grad(value, tensors))

    for a, e in zip(run(torch.compile(fn, fullgraph=True)), run(fn)):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_rows_not_read(gen, monkeypatch):
    """Hidden states of rows that are neither answer nor target rows are never read: NaN there
    changes nothing, and their gradient is exactly 0."""
    monkeypatch.setattr(row_chunks, "CHUNK_ROWS", 2)
    hidden, weight, bias = model(gen, 3, 8, 5, 30, torch.float32)
    rows, lengths, targets = answers(gen, 3, 8, 4, 30)
    read = targets != -100
    for b in range(3):
        read[b, rows[b, :lengths[b]]] = True
    args = (rows, lengths, targets, 4, (1.0,), False, "sequence")
    clean = topk_outputs_and_grads(linear_topk_probs, (hidden, weight, bias), args)
    hidden[~read] = float("nan")
    dirty = topk_outputs_and_grads(linear_topk_probs, (hidden, weight, bias), args)
    for a, e in zip(dirty[0] + dirty[1], clean[0] + clean[1]):
        assert torch.equal(a, e)
    assert (clean[1][0][~read] == 0).all()


def test_linear_uld_in_any_chunking(gen, monkeypatch):
    """linear_uld in chunks of one row equals uld_distance on the built logits, both models'
    gradients included."""
    monkeypatch.setattr(row_chunks, "CHUNK_ROWS", 1)
    student = model(gen, 3, 8, 6, 40)
    teacher = model(gen, 3, 7, 5, 55)
    s_rows, lengths, targets = answers(gen, 3, 8, 4, 40)
    t_rows = torch.stack([torch.randperm(7, generator=gen)[:4] for _ in range(3)])

    def run(fn):
        tensors = [t.detach().requires_grad_() for t in student + teacher]
        distance, ce = fn(tensors, s_rows, targets, t_rows, lengths)
        w = torch.rand(distance.shape, generator=torch.Generator().manual_seed(0),
                       dtype=distance.dtype)
        return (distance.detach(), ce.detach(),
                *torch.autograd.grad((distance * w).sum() + ce.sum(), tensors))

    def hidden(t, s_rows, targets, t_rows, lengths):
        return linear_uld_distance(*t[:3], s_rows, targets, *t[3:], t_rows, lengths, 1.5)

    def logits(t, s_rows, targets, t_rows, lengths):
        linear = torch.nn.functional.linear
        return uld_distance(linear(*t[:3]), s_rows, targets, linear(*t[3:]), t_rows, lengths, 1.5)

    for a, e in zip(run(hidden), run(logits)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
