"""The Triton kernels of topk_probs (mlot_kernels.ops.topk_probs_triton) under the Triton interpreter on CPU
tensors: the public op's values, indices and gradients against the float64 reference with small
column chunks, and those of the losses' op (answer rows, cross-entropy targets, two
temperatures) against reference.answer_topk_probs; the row statistics and the backward against
the CPU kernels; half-precision logits, gradcheck, opcheck through the ops' schemas, the rows
never read, the bad data that gives NaN, numerics at the edges. CUDA runs are in
test_topk_probs_cuda.py."""

import functools
import os

import pytest
import torch

from mlot_kernels.ops import reference, topk_probs_triton
from tests.conftest import (assert_close_rel, check_half_logits, check_topk_probs,
                            defined_indices, make_lengths, make_logits, probs_indices_grad)

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the Triton interpreter is off (TRITON_INTERPRET=1)")

OPS = torch.ops.mlot
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}
RANKINGS = ["token", "sequence", "batch"]

# (B, L, V, k, temperature, std_scale, lengths mode, block_v)
CASES = [
    (2, 4, 37, 5, 1.5, False, "random", 16),         # V not a multiple of the chunk
    (3, 3, 50, 20, 1.0, True, "zero-and-full", 16),  # several chunks of chosen columns
    (2, 3, 4, 6, 2.0, True, "random", None),         # V < k
    (2, 2, 70, 7, 0.5, True, "full", None),          # one chunk
]
CASE_IDS = ["B{}-L{}-V{}-k{}-T{}-std{}-{}-block{}".format(*c) for c in CASES]

# The losses' op: (B, L, A, V, k, temperatures, std_scale, block_v); lengths in [0, A] with a 0.
ANSWER_CASES = [
    (3, 5, 3, 37, 5, (1.0, 0.7), False, 16),  # the cross-entropy shares the temperature 1
    (2, 4, 4, 30, 7, (1.5,), True, 16),       # rows a permutation of every row
    (3, 5, 3, 14, 16, (2.0, 1.0), True, 8),   # k > V; std scaling: the ce has its own sum
]
ANSWER_IDS = ["B{}-L{}-A{}-V{}-k{}-T{}-std{}-block{}".format(*c[:5], ",".join(map(str, c[5])),
                                                            *c[6:]) for c in ANSWER_CASES]


def kernels(block_v):
    """topk_probs through the Triton kernels with column chunks of block_v."""
    return functools.partial(topk_probs_triton.topk_probs, block_v=block_v)


# ------------------------------------------------------------------ helpers of the losses' op


def make_rows(gen, batch, length, answers):
    """[B, A] answer rows: a random subset of the rows of each sequence, in random order."""
    return torch.stack([torch.randperm(length, generator=gen)[:answers] for _ in range(batch)])


def make_answer_lengths(gen, batch, answers):
    """[B] lengths in [0, A], the first sequence's 0."""
    lengths = torch.randint(1, answers + 1, (batch,), generator=gen)
    lengths[0] = 0
    return lengths


def make_targets(gen, batch, length, vocab):
    """[B, L] targets in [0, V), -100 (no cross-entropy) on about a third of the rows."""
    targets = torch.randint(0, vocab, (batch, length), generator=gen)
    return targets.masked_fill(torch.rand(batch, length, generator=gen) < 0.35, -100)


def rows_read(shape, rows, lengths, targets):
    """[B, L] bool: the answer rows within the lengths and the rows with a target."""
    B, L = shape[:2]
    read = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        read[b, rows[b, :lengths[b]]] = True
    return read | (targets != -100) if targets is not None else read


def answer_problem(gen, case, dtype):
    """The case's logits (NaN in the rows not read), rows, lengths, targets and the clean logits
    (for the reference)."""
    B, L, A, V = case[:4]
    logits = make_logits(gen, (B, L, V), dtype)
    rows, lengths = make_rows(gen, B, L, A), make_answer_lengths(gen, B, A)
    targets = make_targets(gen, B, L, V)
    read = rows_read(logits.shape, rows, lengths, targets)
    dirty = logits.masked_fill(~read[..., None], float("nan"))
    return dirty, rows, lengths, targets, logits


def answer_outputs(fn, logits, w_probs, w_ce, *args, **kwargs):
    """fn's (probs, indices, ce) and the gradient of sum(w_probs probs) + sum(w_ce ce) with
    respect to the logits."""
    logits = logits.detach().requires_grad_()
    probs, indices, ce = fn(logits, *args, **kwargs)
    loss = (probs * w_probs.to(probs.dtype)).sum() + (ce * w_ce.to(ce.dtype)).sum()
    (grad,) = torch.autograd.grad(loss, logits)
    return probs.detach(), indices, ce.detach(), grad


def answer_weights(gen, logits, rows, k, n_t):
    """Random positive weights of probs [n_t, B, A, k] and ce [B, L]."""
    B, L = logits.shape[:2]
    return (torch.rand(n_t, B, rows.shape[1], k, generator=gen, dtype=torch.float64) + 0.5,
            torch.rand(B, L, generator=gen, dtype=torch.float64) + 0.5)


# ------------------------------------------------------------------ the public op


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("ranking", RANKINGS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_float64_reference(gen, case, ranking, dtype):
    """probs, indices and the logits' gradient equal a float64 evaluation of the contract."""
    B, L, V, k, temperature, std_scale, lengths, block_v = case
    logits = make_logits(gen, (B, L, V), dtype)
    check_topk_probs(gen, kernels(block_v), logits,
                     make_lengths(gen, B, L, lengths), ranking, TOL[dtype], k=k,
                     temperature=temperature, std_scale=std_scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_logits_compute_in_float32(gen, dtype):
    """float16/bfloat16 logits give the float32 result of the same values (distinct multiples of
    1/8, exact in both, so no ties); gradient in their dtype."""
    logits = torch.stack([torch.randperm(40, generator=gen) for _ in range(8)]).reshape(2, 4, 40)
    logits = ((logits - 20) / 8).to(dtype)
    lengths = torch.tensor([4, 2])
    weights = torch.rand(2, 4, 9, generator=gen) + 0.5
    for ranking in RANKINGS:
        check_half_logits(kernels(16), logits, weights, lengths, k=9, temperature=1.0,
                          std_scale=True, ranking=ranking)


@pytest.mark.parametrize("std_scale", [False, True], ids=["plain", "std"])
@pytest.mark.parametrize("ranking", RANKINGS)
def test_gradcheck(gen, ranking, std_scale):
    """The logits' gradient is the derivative of the probabilities (softmax and std scaling;
    fast-mode gradcheck: the interpreter is slow)."""
    logits = make_logits(gen, (3, 2, 19)).requires_grad_()
    lengths = torch.tensor([2, 0, 1])
    fn = lambda z: topk_probs_triton.topk_probs(z, lengths, 10, 1.5, std_scale, ranking, block_v=8)[0]
    assert torch.autograd.gradcheck(fn, (logits,), fast_mode=True)


# ------------------------------------------------------------------ the losses' op


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("ranking", RANKINGS)
@pytest.mark.parametrize("case", ANSWER_CASES, ids=ANSWER_IDS)
def test_answer_matches_float64_reference(gen, case, ranking, dtype):
    """answer_topk_probs: probs, indices (where the ranking defines them), ce and the gradient of
    a weighted sum of probs and ce equal the float64 reference; the rows not read hold NaN and
    change nothing, and their gradient is exactly 0."""
    B, L, A, V, k, temperatures, std_scale, block_v = case
    logits, rows, lengths, targets, clean = answer_problem(gen, case, dtype)
    w_probs, w_ce = answer_weights(gen, logits, rows, k, len(temperatures))
    options = dict(k=k, temperatures=temperatures, std_scale=std_scale, ranking=ranking)
    probs, indices, ce, grad = answer_outputs(topk_probs_triton.answer_topk_probs, logits, w_probs,
                                              w_ce, rows, lengths, targets, block_v=block_v,
                                              **options)
    e_probs, e_indices, e_ce, e_grad = answer_outputs(reference.answer_topk_probs, clean.double(),
                                                      w_probs, w_ce, rows, lengths, targets,
                                                      **options)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert probs.dtype == ce.dtype == compute and grad.dtype == dtype
    assert indices.dtype == torch.int64 and indices.shape == e_indices.shape
    for t in range(len(temperatures)):
        assert torch.equal(defined_indices(indices[t], lengths, ranking),
                           defined_indices(e_indices[t], lengths, ranking))
    assert_close_rel(probs, e_probs, TOL[dtype])
    assert_close_rel(ce, e_ce, TOL[dtype])
    assert_close_rel(grad, e_grad, TOL[dtype])
    read = rows_read(logits.shape, rows, lengths, targets)
    assert (grad[~read] == 0).all() and torch.isfinite(grad[read]).all()
    assert (ce[targets == -100] == 0).all()


@pytest.mark.parametrize("dtype,ranking", [(torch.bfloat16, "token"), (torch.float16, "sequence")],
                         ids=["bf16-token", "f16-sequence"])
def test_answer_half_logits_compute_in_float32(gen, dtype, ranking):
    """The losses' op on float16/bfloat16 logits gives its float32 result on the same values
    (distinct multiples of 1/8, exact in both): probs and ce in float32, the same indices, the
    gradient in the logits' dtype."""
    logits = torch.stack([torch.randperm(40, generator=gen) for _ in range(10)]).reshape(2, 5, 40)
    logits = ((logits - 20) / 8).to(dtype)
    rows, lengths = make_rows(gen, 2, 5, 3), torch.tensor([3, 2])
    targets = make_targets(gen, 2, 5, 40)
    w_probs, w_ce = answer_weights(gen, logits, rows, 9, 2)
    options = dict(k=9, temperatures=(1.0, 2.0), std_scale=True, ranking=ranking, block_v=16)
    half = answer_outputs(topk_probs_triton.answer_topk_probs, logits, w_probs, w_ce, rows, lengths,
                          targets, **options)
    full = answer_outputs(topk_probs_triton.answer_topk_probs, logits.float(), w_probs, w_ce, rows,
                          lengths, targets, **options)
    assert half[0].dtype == half[2].dtype == torch.float32 and half[3].dtype == dtype
    assert torch.equal(half[1], full[1])
    for a, e in zip(half[:3:2], full[:3:2]):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(half[3], full[3].to(dtype))


@pytest.mark.parametrize("ranking,std_scale", [("sequence", False), ("token", True)])
def test_answer_gradcheck(gen, ranking, std_scale):
    """The gradient of probs (two temperatures) and ce through answer rows is their derivative
    (fast mode: the interpreter is slow)."""
    logits = make_logits(gen, (2, 4, 9)).requires_grad_()
    rows, lengths = torch.tensor([[2, 0, 3], [1, 3, 0]]), torch.tensor([3, 1])
    targets = torch.tensor([[4, -100, 0, -100], [-100, 8, -100, 2]])

    def fn(z):
        out = topk_probs_triton.answer_topk_probs(z, rows, lengths, targets, 4, (1.0, 1.7), std_scale,
                                            ranking, block_v=8)
        return out.probs, out.ce

    assert torch.autograd.gradcheck(fn, (logits,), fast_mode=True)


@pytest.mark.parametrize("temperatures,std_scale", [((1.0,), False), ((0.6, 1.0), False),
                                                   ((1.0, 2.0), True)],
                         ids=["T1-plain", "T0.6,1-plain", "T1,2-std"])
def test_stats_and_backward_match_the_cpu_kernels(gen, temperatures, std_scale):
    """topk_probs_stats (row_stats with the CPU layout, mass, ce) and topk_probs_backward (with
    and without each of grad_probs and grad_ce) equal the CPU kernels' on the same inputs (the
    cross-entropy sharing the first or the second temperature's sum of exps, or not)."""
    B, L, A, V = 3, 6, 4, 29
    logits = make_logits(gen, (B, L, V), torch.float64)
    rows, lengths = make_rows(gen, B, L, A), torch.tensor([4, 0, 2])
    targets = make_targets(gen, B, L, V)
    temperatures = list(temperatures)
    args = (rows, lengths, targets, temperatures, std_scale, "sequence")
    for a, e in zip(topk_probs_triton.topk_probs_stats(logits, *args, block_v=8),
                    OPS.topk_probs_stats(logits, *args)):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    probs, indices, ce, stats = OPS.topk_probs_forward(logits, rows, lengths, targets, 6,
                                                       temperatures, std_scale, "sequence")
    grad_probs = torch.rand(probs.shape, generator=gen, dtype=torch.float64)
    grad_ce = torch.rand(ce.shape, generator=gen, dtype=torch.float64)
    for gp, gc in ((grad_probs, grad_ce), (None, grad_ce), (grad_probs, None), (None, None)):
        args = (gp, gc, logits, rows, lengths, targets, probs, indices, stats, temperatures,
                std_scale, "sequence")
        torch.testing.assert_close(topk_probs_triton.topk_probs_backward(*args, block_v=8),
                                   OPS.topk_probs_backward(*args), rtol=1e-12, atol=1e-12)


def test_strided_logits_are_read_in_place(gen):
    """A view with unit stride along V (logits[:, :-1]) is read in place; another (V not the
    last stride) is copied; both, and NaN in the rows never read, give the contiguous logits'
    exact result, forward and backward (rows, lengths and targets in int32 here)."""
    full = make_logits(gen, (2, 6, 23), torch.float32)
    view = full[:, :-1]
    assert topk_probs_triton._logits(view).data_ptr() == view.data_ptr()
    transposed = view.contiguous().transpose(1, 2).contiguous().transpose(1, 2)
    assert transposed.stride(2) != 1 and torch.equal(transposed, view)
    rows, lengths = make_rows(gen, 2, 5, 3).int(), torch.tensor([3, 2], dtype=torch.int32)
    targets = make_targets(gen, 2, 5, 23).int()
    args = (rows, lengths, targets, 6, [1.0, 0.5], True, "sequence")
    expected = topk_probs_triton.topk_probs_forward(view.contiguous(), *args, block_v=8)
    read = rows_read(view.shape, rows, lengths, targets)
    dirty = view.masked_fill(~read[..., None], float("nan"))
    grad_probs = torch.rand(expected[0].shape, generator=gen)
    grad_ce = torch.rand(expected[2].shape, generator=gen)
    grads = []
    for logits in (view, transposed, dirty):
        out = topk_probs_triton.topk_probs_forward(logits, *args, block_v=8)
        for a, e in zip(out, expected):
            assert torch.equal(a, e)
        grads.append(topk_probs_triton.topk_probs_backward(
            grad_probs, grad_ce, logits, rows, lengths, targets, out[0], out[1], out[3],
            *args[4:], block_v=8))
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
    assert (grads[2][~read] == 0).all() and grads[0].is_contiguous()


@pytest.fixture
def triton_kernels_on_cpu():
    """The Triton launchers (8-column chunks) registered as the ops' CPU kernels, for this test
    only."""
    with torch.library._scoped_library("mlot", "IMPL") as lib:
        for op in ("topk_probs_stats", "topk_probs_forward", "topk_probs_backward"):
            lib.impl(op, functools.partial(getattr(topk_probs_triton, op), block_v=8), "CPU")
        yield


@pytest.mark.filterwarnings("ignore:Warning only once for all operators")
@pytest.mark.parametrize("ranking", RANKINGS)
def test_opcheck(gen, triton_kernels_on_cpu, ranking):
    """opcheck (schema, autograd registration, fake kernel, AOT dispatch) on the four ops with
    the Triton kernels behind them: the public op, and the losses' ops with rows, targets and
    two temperatures."""
    logits = make_logits(gen, (2, 3, 11), torch.float32).requires_grad_()
    lengths = torch.tensor([3, 0])
    args = (lengths, 4, 1.0, True, ranking)
    torch.library.opcheck(OPS.topk_probs.default, (logits, *args))
    rows, lengths = torch.tensor([[2, 0], [1, 2]]), torch.tensor([2, 1])
    targets = torch.tensor([[3, -100, 10], [-100, 0, -100]])
    temperatures = [1.0, 2.0]
    torch.library.opcheck(OPS.topk_probs_stats.default,
                          (logits.detach(), rows, lengths, targets, temperatures, True, ranking))
    forward_args = (rows, lengths, targets, 4, temperatures, True, ranking)
    torch.library.opcheck(OPS.topk_probs_forward.default, (logits, *forward_args))
    probs, indices, ce, stats = OPS.topk_probs_forward(logits.detach(), *forward_args)
    direct = topk_probs_triton.topk_probs_forward(logits.detach(), *forward_args, block_v=8)
    for a, e in zip((probs, indices, ce, stats), direct):
        assert torch.equal(a, e)
    if ranking == "sequence":  # (the backward's schema and fake kernel: one ranking will do)
        grad_probs = torch.rand(probs.shape, generator=gen)
        grad_ce = torch.rand(ce.shape, generator=gen)
        backward_args = (logits.detach(), rows, lengths, targets, probs, indices, stats,
                         temperatures, True, ranking)
        torch.library.opcheck(OPS.topk_probs_backward.default,
                              (grad_probs, grad_ce, *backward_args))


# ------------------------------------------------------------------ numerics at the edges


def test_constant_row_with_std_scale(gen):
    """A constant row has std 0: uniform probabilities and a finite gradient, equal to the
    reference (whose std gradient is 0 there, as the kernels'). Under 'token' ranking the row's
    order is all ties (so is the choice its gradient flows to): checked for values only."""
    logits = make_logits(gen, (2, 2, 30), torch.float32)
    logits[1, 0] = 1.25
    for ranking in ("sequence", "batch"):
        probs, _, grad = check_topk_probs(gen, kernels(16), logits, None, ranking,
                                          TOL[torch.float32], k=6, temperature=1.0, std_scale=True)
        assert torch.isfinite(probs).all() and torch.isfinite(grad).all()
    weights = torch.rand(2, 2, 6, generator=gen)
    probs, _, grad = probs_indices_grad(topk_probs_triton.topk_probs, logits, weights, None, 6,
                                        std_scale=True, ranking="token", block_v=16)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(probs[1, 0], torch.full((6,), 1 / 30))


def test_minus_inf_logits_are_probability_zero(gen):
    """-inf logits are entries of probability 0 (gradient 0) while a row has a finite entry."""
    logits = make_logits(gen, (2, 3, 40), torch.float32)
    logits[:, :, 25:] = float("-inf")
    for ranking in RANKINGS:
        probs, indices, grad = check_topk_probs(gen, kernels(16), logits, None, ranking,
                                                TOL[torch.float32], k=8)
        assert torch.isfinite(probs).all() and torch.isfinite(grad).all()
        assert (indices < 25).all() and (grad[:, :, 25:] == 0).all()


def test_padding_is_never_read(gen):
    """NaN past the lengths changes nothing; probs and gradient there are exactly 0 and token
    indices -1."""
    logits = make_logits(gen, (2, 4, 20), torch.float32)
    dirty_logits = logits.clone()
    dirty_logits[0, 2:] = float("nan")
    lengths = torch.tensor([2, 4])
    weights = torch.rand(2, 4, 5, generator=gen)
    for ranking in RANKINGS:
        opts = dict(k=5, ranking=ranking, block_v=8)
        clean = probs_indices_grad(topk_probs_triton.topk_probs, logits, weights, lengths, **opts)
        dirty = probs_indices_grad(topk_probs_triton.topk_probs, dirty_logits, weights, lengths, **opts)
        for a, e in zip(dirty, clean):
            assert torch.equal(a, e)
        assert (clean[0][0, 2:] == 0).all() and (clean[2][0, 2:] == 0).all()
        if ranking == "token":
            assert (clean[1][0, 2:] == -1).all() and (clean[1][0, :2] >= 0).all()


def test_out_of_range_lengths_give_nan(gen):
    """Lengths are not checked on the host (no synchronisation): a length outside [0, L] makes
    that sequence's probs NaN and leaves the others alone."""
    logits = make_logits(gen, (3, 4, 12), torch.float32)
    lengths = torch.tensor([3, 7, -1])
    for ranking in ("token", "sequence"):
        options = (None, 5, [1.0], False, ranking)
        probs = topk_probs_triton.topk_probs_forward(logits, None, lengths, *options)[0]
        alone = topk_probs_triton.topk_probs_forward(logits[:1], None, lengths[:1], *options)[0]
        assert torch.isnan(probs[:, 1:]).all() and torch.equal(probs[:, :1], alone)


def test_bad_rows_and_lengths_give_nan(gen):
    """Answer rows outside [0, L) or repeated within a sequence's valid prefix, and lengths outside
    [0, A], are not checked on the host: that sequence's probs (topk_probs_stats: its mass) are
    NaN and the other sequences are left alone. Rows past the lengths may hold anything."""
    logits = make_logits(gen, (5, 5, 12), torch.float32)
    rows = torch.tensor([[0, 2, 99], [1, 7, 3], [2, 4, 2], [4, 1, 0], [3, 0, 1]])
    lengths = torch.tensor([2, 2, 3, 4, -1])  # 0: fine (99 past the length); 1: row 7 > L;
    targets = make_targets(gen, 5, 5, 12)     # 2: row 2 twice; 3, 4: lengths outside [0, 3]
    tidy = torch.tensor([[0, 2, -5]])  # sequence 0 with another value past its length
    for ranking in ("token", "sequence"):
        options = (5, [1.0, 2.0], True, ranking)
        probs, _, ce, _ = topk_probs_triton.topk_probs_forward(logits, rows, lengths, targets, *options)
        alone = topk_probs_triton.topk_probs_forward(logits[:1], tidy, lengths[:1], targets[:1],
                                               *options)
        assert torch.isnan(probs[:, 1:]).all() and torch.equal(probs[:, :1], alone[0])
        assert torch.isfinite(ce).all() and torch.equal(ce[:1], alone[2])
    mass = topk_probs_triton.topk_probs_stats(logits, rows, lengths, targets, [1.0], False,
                                        "sequence")[1]
    assert torch.isnan(mass[:, 1:]).all() and torch.isfinite(mass[:, 0]).all()


def test_bad_targets_give_nan(gen):
    """A target outside [0, V) other than -100 is not checked on the host: that row's ce is NaN
    and everything else is as if the row had no target."""
    logits = make_logits(gen, (2, 4, 12), torch.float32)
    rows, lengths = torch.tensor([[1, 3], [0, 2]]), torch.tensor([2, 1])
    targets = torch.tensor([[12, 3, -100, 0], [-7, -100, 5, 11]])
    fine = targets.masked_fill((targets >= 12) | ((targets < 0) & (targets != -100)), -100)
    for std_scale in (False, True):
        options = (6, [1.0], std_scale, "sequence")
        probs, indices, ce, _ = topk_probs_triton.topk_probs_forward(logits, rows, lengths, targets,
                                                               *options)
        e_probs, e_indices, e_ce, _ = topk_probs_triton.topk_probs_forward(logits, rows, lengths, fine,
                                                                     *options)
        bad = (targets != -100) & (fine == -100)
        assert bad.sum() == 2 and torch.isnan(ce[bad]).all()
        assert torch.equal(ce[~bad], e_ce[~bad])
        assert torch.equal(probs, e_probs) and torch.equal(indices, e_indices)


def test_bad_arguments_raise():
    """topk_probs and answer_topk_probs check their arguments as the ops do, and block_v is a
    power of 2."""
    with pytest.raises(RuntimeError, match=r"topk_probs: ranking must be 'token', 'sequence' or "
                                           r"'batch', got 'vocab'"):
        topk_probs_triton.topk_probs(torch.rand(2, 3, 4), ranking="vocab")
    with pytest.raises(RuntimeError, match=r"topk_probs: k must be >= 1, got 0"):
        topk_probs_triton.topk_probs(torch.rand(2, 3, 4), k=0)
    with pytest.raises(ValueError, match=r"topk_probs: block_v must be a power of 2, got 12"):
        topk_probs_triton.topk_probs(torch.rand(2, 3, 4), block_v=12)
    logits, rows = torch.rand(2, 3, 4), torch.tensor([[0, 1], [2, 0]])
    with pytest.raises(RuntimeError, match=r"topk_probs: temperatures must hold 1 to 2 "
                                           r"temperatures, got 3"):
        topk_probs_triton.answer_topk_probs(logits, rows, None, None, 2, (1.0, 2.0, 3.0))
    with pytest.raises(RuntimeError, match=r"topk_probs: temperatures\[1\] must be a finite "
                                           r"number > 0, got 0$"):
        topk_probs_triton.answer_topk_probs(logits, rows, None, None, 2, (1.0, 0.0))
    with pytest.raises(RuntimeError, match=r"topk_probs: rows must have shape \[B, A\] with B = 2, "
                                           r"got shape \[3, 2\]"):
        topk_probs_triton.answer_topk_probs(logits, torch.zeros(3, 2, dtype=torch.long), None)
    with pytest.raises(RuntimeError, match=r"topk_probs: targets must have an integer dtype"):
        topk_probs_triton.answer_topk_probs(logits, rows, None, torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match=r"topk_probs: targets must have shape \[B, L\] = "
                                           r"\[2, 3\], got shape \[2, 4\]"):
        topk_probs_triton.answer_topk_probs(logits, rows, None, torch.zeros(2, 4, dtype=torch.long))
    probs, indices, _, stats = topk_probs_triton.topk_probs_forward(logits, rows, None, None, 2, [1.0],
                                                              False, "sequence")
    with pytest.raises(RuntimeError, match=r"topk_probs_backward: probs, indices and row_stats "
                                           r"must be those topk_probs_forward gives"):
        topk_probs_triton.topk_probs_backward(torch.ones_like(probs), None, logits, rows, None, None,
                                        probs, indices, stats, [1.0], False, "token")
    # the same messages as the CPU op's
    for call in (lambda op: op(logits, rows, None, None, 2, [1.0, 0.0], False, "token"),
                 lambda op: op(logits, torch.zeros(3, 2, dtype=torch.long), None, None, 2, [1.0],
                               False, "token")):
        with pytest.raises(RuntimeError) as cpu:
            call(OPS.topk_probs_forward)
        with pytest.raises(RuntimeError) as triton:
            call(topk_probs_triton.topk_probs_forward)
        assert str(cpu.value).splitlines()[0] == str(triton.value).splitlines()[0]
