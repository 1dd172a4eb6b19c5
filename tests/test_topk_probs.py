"""torch.ops.mlot.topk_probs and the fused truncation of the losses, topk_probs_forward with
answer rows, cross-entropy targets and two temperatures (CPU): values, indices and gradients
against the float64 reference, gradcheck, opcheck, torch.compile, rows never read, numerics at
the edges, and argument errors."""

import pytest
import torch

import mlot_kernels
from mlot_kernels.ops import reference
from mlot_kernels.ops.topk_probs import answer_topk_probs
from tests.conftest import (assert_close_rel, check_half_logits, check_topk_probs,
                            defined_indices, make_lengths, make_logits, probs_indices_grad)

OPS = torch.ops.mlot
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}
RANKINGS = ["token", "sequence", "batch"]

# (B, L, V, k, temperature, std_scale, lengths mode)
CASES = [
    (1, 1, 1, 1, 1.0, False, "full"),
    (2, 5, 37, 5, 1.0, False, "random"),
    (3, 7, 3, 5, 2.0, True, "zero-and-full"),  # V < k
    (2, 6, 1100, 50, 1.0, True, "random"),  # V over two column blocks
    (4, 9, 300, 300, 0.5, False, "random"),  # k = V
    (2, 16, 5000, 50, 2.0, False, "full"),
]
CASE_IDS = ["B{}-L{}-V{}-k{}-T{}-std{}-{}".format(*c) for c in CASES]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("ranking", RANKINGS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_float64_reference(gen, case, ranking, dtype):
    """probs, indices and the logits' gradient equal a float64 evaluation of the contract."""
    B, L, V, k, temperature, std_scale, lengths = case
    logits = make_logits(gen, (B, L, V), dtype)
    check_topk_probs(gen, mlot_kernels.topk_probs, logits, make_lengths(gen, B, L, lengths),
                     ranking, TOL[dtype], k=k, temperature=temperature, std_scale=std_scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("ranking", RANKINGS)
def test_half_logits_compute_in_float32(gen, ranking, dtype):
    """float16/bfloat16 logits give the float32 result of the same values; gradient in their dtype."""
    logits = make_logits(gen, (3, 6, 700), dtype)
    lengths = torch.tensor([6, 2, 4])
    weights = torch.rand(3, 6, 20, generator=gen) + 0.5
    check_half_logits(mlot_kernels.topk_probs, logits, weights, lengths, k=20, temperature=1.0,
                      std_scale=True, ranking=ranking)


@pytest.mark.parametrize("std_scale", [False, True], ids=["plain", "std"])
@pytest.mark.parametrize("ranking", RANKINGS)
def test_gradcheck(gen, ranking, std_scale):
    """The logits' gradient is the derivative of the probabilities (softmax and std scaling)."""
    logits = make_logits(gen, (3, 4, 7)).requires_grad_()
    lengths = torch.tensor([4, 0, 2])
    fn = lambda z: mlot_kernels.topk_probs(z, lengths, 5, 1.5, std_scale, ranking)[0]
    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("ranking", RANKINGS)
def test_opcheck(gen, ranking, dtype):
    """opcheck (schema, autograd registration, fake kernel, AOT dispatch) on the four ops, with
    answer rows, targets and two temperatures."""
    logits, rows, lengths, targets = answer_problem(gen, 3, 7, 11, 4, dtype)
    logits.requires_grad_()
    torch.library.opcheck(OPS.topk_probs.default, (logits, torch.tensor([7, 0, 3]), 4, 1.0, True,
                                                   ranking))
    temps = [1.0, 2.0]
    args = (rows, lengths, targets, 4, temps, True, ranking)
    torch.library.opcheck(OPS.topk_probs_forward.default, (logits, *args))
    torch.library.opcheck(OPS.topk_probs_stats.default, (logits.detach(), rows, lengths, targets,
                                                         temps, True, ranking))
    probs, indices, ce, stats = OPS.topk_probs_forward(logits.detach(), *args)
    grad_probs = torch.rand(probs.shape, generator=gen, dtype=probs.dtype)
    grad_ce = torch.rand(ce.shape, generator=gen, dtype=ce.dtype)
    torch.library.opcheck(OPS.topk_probs_backward.default,
                          (grad_probs, grad_ce, logits.detach(), rows, lengths, targets, probs,
                           indices, stats, temps, True, ranking))


@pytest.mark.parametrize("ranking", RANKINGS)
def test_compile_matches_eager(gen, ranking):
    """Under torch.compile(fullgraph=True) the op gives the eager values, indices and gradient."""
    logits = make_logits(gen, (2, 6, 90), torch.float32)
    lengths = torch.tensor([6, 3])
    weights = torch.rand(2, 6, 10, generator=gen)

    def fn(z, lengths):
        probs, indices = mlot_kernels.topk_probs(z, lengths, 10, 2.0, False, ranking)
        return probs * 2, indices

    eager = probs_indices_grad(fn, logits, weights, lengths)
    compiled = probs_indices_grad(torch.compile(fn, fullgraph=True), logits, weights, lengths)
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


def test_non_contiguous_logits(gen):
    """Strided logits give the result of their contiguous copy."""
    logits = make_logits(gen, (3, 10, 40), torch.float32)[:, ::2, 1:]
    assert not logits.is_contiguous()
    weights = torch.rand(3, 5, 8, generator=gen)
    strided = probs_indices_grad(mlot_kernels.topk_probs, logits, weights, None, 8)
    dense = probs_indices_grad(mlot_kernels.topk_probs, logits.contiguous(), weights, None, 8)
    for a, e in zip(strided, dense):
        assert torch.equal(a, e)


# ------------------------------------------------------------------ numerics at the edges

@pytest.mark.parametrize("ranking", RANKINGS)
def test_padding_is_never_read(gen, ranking):
    """NaN past the lengths changes nothing; probs and gradient there are exactly 0."""
    logits = make_logits(gen, (2, 7, 30), torch.float32)
    lengths = torch.tensor([4, 7])
    weights = torch.rand(2, 7, 6, generator=gen)
    clean = probs_indices_grad(mlot_kernels.topk_probs, logits, weights, lengths, 6, ranking=ranking)
    logits[0, 4:] = float("nan")
    dirty = probs_indices_grad(mlot_kernels.topk_probs, logits, weights, lengths, 6, ranking=ranking)
    for a, e in zip(dirty, clean):
        assert torch.equal(a, e)
    assert (clean[0][0, 4:] == 0).all() and (clean[2][0, 4:] == 0).all()
    if ranking == "token":
        assert (clean[1][0, 4:] == -1).all() and (clean[1][0, :4] >= 0).all()


@pytest.mark.parametrize("ranking", RANKINGS)
def test_columns_past_vocabulary(gen, ranking):
    """V < k: the columns past V are 0 with index -1, the first V hold the whole distribution."""
    logits = make_logits(gen, (2, 3, 4), torch.float32)
    probs, indices = mlot_kernels.topk_probs(logits, k=6, ranking=ranking)
    assert (probs[..., 4:] == 0).all() and (indices[..., 4:] == -1).all()
    assert ((indices[..., :4] >= 0) & (indices[..., :4] < 4)).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3))


@pytest.mark.parametrize("std_scale", [False, True], ids=["plain", "std"])
def test_one_hot_like_rows(gen, std_scale):
    """Rows with one logit 90 above the rest (probabilities down to e^-90) are finite and
    equal the reference."""
    logits = make_logits(gen, (2, 3, 50))
    logits[0, 0] = logits[0, 0] / 30 - 30.0
    logits[0, 0, 7] = 60.0
    for ranking in RANKINGS:
        probs, _, grad = check_topk_probs(gen, mlot_kernels.topk_probs, logits.float(), None,
                                          ranking, TOL[torch.float32], k=10, temperature=1.0,
                                          std_scale=std_scale)
        assert torch.isfinite(probs).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("std_scale", [False, True], ids=["plain", "std"])
@pytest.mark.parametrize("ranking", RANKINGS)
def test_constant_rows(gen, ranking, std_scale):
    """A constant row (std 0, every column tied) has probabilities 1/V and a finite gradient
    that sums to 0 over the row (softmax and std scaling are shift-invariant there); float32
    stays finite."""
    weights = torch.rand(1, 2, 10, generator=gen, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):  # float64 last: its gradient is checked below
        logits = torch.full((1, 2, 40), 1.25, dtype=dtype)
        probs, _, grad = probs_indices_grad(mlot_kernels.topk_probs, logits, weights, None, 10,
                                            std_scale=std_scale, ranking=ranking)
        torch.testing.assert_close(probs, torch.full_like(probs, 1 / 40))
        assert torch.isfinite(grad).all() and grad.abs().max() > 0
    # in float64 (float32 terms reach 1/s = 1e4 with std scaling, and cancel)
    torch.testing.assert_close(grad.sum(-1), torch.zeros(1, 2, dtype=torch.float64),
                               atol=1e-12 * grad.abs().max().item(), rtol=0)


def test_minus_inf_logits_are_probability_zero(gen):
    """-inf logits are entries of probability 0 while a row has a finite entry."""
    logits = make_logits(gen, (2, 4, 20), torch.float32)
    logits[:, :, 12:] = float("-inf")
    weights = torch.rand(2, 4, 8, generator=gen)
    probs, indices, grad = probs_indices_grad(mlot_kernels.topk_probs, logits, weights, None, 8)
    e_probs, e_indices, e_grad = probs_indices_grad(reference.topk_probs, logits.double(), weights,
                                                    None, 8)
    assert torch.isfinite(probs).all() and torch.isfinite(grad).all()
    assert (indices < 12).all()
    assert_close_rel(probs, e_probs, TOL[torch.float32])
    assert_close_rel(grad, e_grad, TOL[torch.float32])


def test_sequences_are_independent(gen):
    """Under 'sequence' ranking each sequence's result is the one it has alone."""
    logits = make_logits(gen, (4, 5, 60), torch.float32)
    lengths = torch.tensor([5, 2, 0, 4])
    weights = torch.rand(4, 5, 7, generator=gen)
    whole = probs_indices_grad(mlot_kernels.topk_probs, logits, weights, lengths, 7)
    for b in (0, 1, 3):
        alone = probs_indices_grad(mlot_kernels.topk_probs, logits[b:b + 1], weights[b:b + 1],
                                   lengths[b:b + 1], 7)
        for a, w in zip(alone, whole):
            assert torch.equal(a[0], w[b])


# ------------------------------------------------------------------ argument errors

BAD_ARGS = [
    ("logits-2d", dict(logits=torch.rand(3, 4)), r"logits must be a 3-D tensor \[B, L, V\], got 2-D"),
    ("V=0", dict(logits=torch.rand(2, 3, 0)), r"logits must have V >= 1 columns"),
    ("int-dtype", dict(logits=torch.ones(2, 3, 4, dtype=torch.long)),
     r"logits must be float16, bfloat16, float32 or float64, got Long"),
    ("lengths-shape", dict(lengths=torch.tensor([1, 2, 3])),
     r"lengths must have shape \[B\] = \[2\], got shape \[3\]"),
    ("lengths-dtype", dict(lengths=torch.tensor([1.0, 2.0])), r"lengths must have an integer dtype, got Float"),
    ("lengths-device", dict(lengths=torch.tensor([1, 2], device="meta")),
     r"lengths must be on the same device as logits \(cpu\), got meta"),
    ("lengths-high", dict(lengths=torch.tensor([1, 4])),
     r"lengths must lie in \[0, L\] = \[0, 3\], got lengths\[1\] = 4"),
    ("k", dict(k=0), r"k must be >= 1, got 0"),
    ("temperature", dict(temperature=0.0), r"temperature must be a finite number > 0, got 0"),
    ("temperature-inf", dict(temperature=float("inf")), r"temperature must be a finite number > 0, got inf"),
    ("std-V=1", dict(logits=torch.rand(2, 3, 1), std_scale=True), r"std_scale needs V >= 2 columns"),
    ("ranking", dict(ranking="vocab"), r"ranking must be 'token', 'sequence' or 'batch', got 'vocab'"),
]


@pytest.mark.parametrize("overrides,message", [b[1:] for b in BAD_ARGS], ids=[b[0] for b in BAD_ARGS])
def test_bad_arguments_name_the_argument(overrides, message):
    """Bad input raises an error naming the argument, what was expected and what was given."""
    args = dict(logits=torch.rand(2, 3, 4), lengths=None) | overrides
    with pytest.raises(RuntimeError, match=message) as error:
        mlot_kernels.topk_probs(**args)
    assert str(error.value).startswith("topk_probs: ")


# ------------------------------------------------------------------ answer rows, targets, temperatures

def answer_problem(gen, B, L, V, A, dtype=torch.float64):
    """Logits [B, L, V], A distinct answer rows per sequence (in random order), lengths with a 0,
    and cross-entropy targets with -100 holes."""
    logits = make_logits(gen, (B, L, V), dtype)
    rows = torch.stack([torch.randperm(L, generator=gen)[:A] for _ in range(B)])
    lengths = torch.randint(0, A + 1, (B,), generator=gen)
    lengths[0], lengths[-1] = A, 0
    targets = torch.randint(0, V, (B, L), generator=gen)
    targets[torch.rand(B, L, generator=gen) < 0.4] = -100
    return logits, rows, lengths, targets


def answer_values_and_grad(fn, logits, weights, weights_ce, *args, **kwargs):
    """fn's (probs, indices, ce) and the gradient of sum(w probs) + sum(w_ce ce)."""
    logits = logits.detach().requires_grad_()
    probs, indices, ce = fn(logits, *args, **kwargs)
    objective = (probs * weights.to(probs.dtype)).sum() + (ce * weights_ce.to(ce.dtype)).sum()
    (grad,) = torch.autograd.grad(objective, logits)
    return probs.detach(), indices, ce.detach(), grad


def check_answer_topk_probs(gen, fn, logits, rows, lengths, targets, rtol, k, temperatures,
                            std_scale, ranking):
    """fn equals the float64 reference: probs, indices where defined, ce and the gradient."""
    B, L, _ = logits.shape
    A = L if rows is None else rows.shape[1]
    weights = torch.rand(len(temperatures), B, A, k, generator=gen, dtype=torch.float64) + 0.5
    weights_ce = torch.rand(B, L, generator=gen, dtype=torch.float64) + 0.5
    args = (rows, lengths, targets, k, temperatures, std_scale, ranking)
    probs, indices, ce, grad = answer_values_and_grad(fn, logits, weights, weights_ce, *args)
    e_probs, e_indices, e_ce, e_grad = answer_values_and_grad(reference.answer_topk_probs,
                                                              logits.double(), weights,
                                                              weights_ce, *args)
    assert probs.shape == e_probs.shape and indices.shape == e_indices.shape
    assert grad.dtype == logits.dtype and ce.dtype == probs.dtype
    for t in range(len(temperatures)):
        assert torch.equal(defined_indices(indices[t], lengths, ranking),
                           defined_indices(e_indices[t], lengths, ranking))
    assert_close_rel(probs, e_probs, rtol)
    assert_close_rel(ce, e_ce, rtol)
    assert_close_rel(grad, e_grad, rtol)
    return probs, ce, grad


ANSWER_CASES = [  # (B, L, V, A, k, temperatures, std_scale)
    (3, 9, 40, 5, 4, (1.0, 2.0), False),
    (3, 9, 40, 5, 4, (1.0, 2.0), True),
    (2, 6, 1100, 4, 50, (2.0,), True),   # V over two column blocks, one temperature
    (2, 7, 6, 3, 8, (0.5, 1.0), False),  # V < k
]
ANSWER_IDS = ["B{}-L{}-V{}-A{}-k{}-T{}-std{}".format(*c) for c in ANSWER_CASES]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("ranking", RANKINGS)
@pytest.mark.parametrize("case", ANSWER_CASES, ids=ANSWER_IDS)
def test_answer_rows_match_float64_reference(gen, case, ranking, dtype):
    """The answer rows at each temperature and every target row's cross-entropy, and the
    gradient through both, equal a float64 evaluation (rows gathered, softmax, sort, gather)."""
    B, L, V, A, k, temperatures, std_scale = case
    logits, rows, lengths, targets = answer_problem(gen, B, L, V, A, dtype)
    check_answer_topk_probs(gen, answer_topk_probs, logits, rows, lengths, targets, TOL[dtype], k,
                            temperatures, std_scale, ranking)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_answer_rows_half_logits(gen, dtype):
    """16-bit logits give the float32 result of the same values; the gradient in their dtype."""
    logits, rows, lengths, targets = answer_problem(gen, 3, 8, 300, 5, dtype)
    weights = torch.rand(2, 3, 5, 10, generator=gen) + 0.5
    weights_ce = torch.rand(3, 8, generator=gen) + 0.5
    args = (rows, lengths, targets, 10, (1.0, 2.0), True, "sequence")
    half = answer_values_and_grad(answer_topk_probs, logits, weights, weights_ce, *args)
    full = answer_values_and_grad(answer_topk_probs, logits.float(), weights, weights_ce, *args)
    assert half[3].dtype == dtype
    assert torch.equal(half[1], full[1])
    for a, e in ((half[0], full[0]), (half[2], full[2])):  # probs, ce
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(half[3], full[3].to(dtype))


@pytest.mark.parametrize("std_scale", [False, True], ids=["plain", "std"])
@pytest.mark.parametrize("ranking", RANKINGS)
def test_answer_rows_gradcheck(gen, ranking, std_scale):
    """The gradient through probs at two temperatures and the cross-entropy, in float64."""
    logits, rows, lengths, targets = answer_problem(gen, 3, 6, 7, 3)
    weights = torch.rand(3, 6, generator=gen, dtype=torch.float64)

    def fn(z):
        probs, _, ce = answer_topk_probs(z, rows, lengths, targets, 5, (1.5, 0.7), std_scale, ranking)
        return probs, ce * weights

    assert torch.autograd.gradcheck(fn, (logits.requires_grad_(),))


@pytest.mark.parametrize("ranking", RANKINGS)
def test_answer_rows_compile_matches_eager(gen, ranking):
    """Under torch.compile(fullgraph=True) the fused truncation gives the eager results."""
    logits, rows, lengths, targets = answer_problem(gen, 2, 8, 90, 4, torch.float32)
    weights = torch.rand(2, 2, 4, 10, generator=gen)
    weights_ce = torch.rand(2, 8, generator=gen)

    def fn(z, rows, lengths, targets):
        probs, indices, ce = answer_topk_probs(z, rows, lengths, targets, 10, (1.0, 2.0), False,
                                               ranking)
        return probs * 2, indices, ce

    args = (weights, weights_ce, rows, lengths, targets)
    eager = answer_values_and_grad(fn, logits, *args)
    compiled = answer_values_and_grad(torch.compile(fn, fullgraph=True), logits, *args)
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ranking", RANKINGS)
def test_rows_not_read(gen, ranking):
    """Rows that are neither answer rows nor target rows are never read: NaN there changes
    nothing, and their gradient is exactly 0; a strided view is read in place."""
    logits, rows, lengths, targets = answer_problem(gen, 3, 9, 30, 4, torch.float32)
    weights = torch.rand(2, 3, 4, 6, generator=gen)
    weights_ce = torch.rand(3, 9, generator=gen)
    args = (weights, weights_ce, rows, lengths, targets, 6, (1.0, 2.0), True, ranking)
    clean = answer_values_and_grad(answer_topk_probs, logits, *args)
    read = torch.zeros(3, 9, dtype=torch.bool)
    read[targets != -100] = True
    for b in range(3):
        read[b, rows[b, :lengths[b]]] = True
    dirty = logits.clone()
    dirty[~read] = float("nan")
    for a, e in zip(answer_values_and_grad(answer_topk_probs, dirty, *args), clean):
        assert torch.equal(a, e)
    assert (clean[3][~read] == 0).all() and (clean[3][read] != 0).any(-1).all()
    wide = torch.zeros(3, 9, 2, 30).copy_(logits[:, :, None])[:, :, 1]  # strides (540, 60, 1)
    assert not wide.is_contiguous()
    for a, e in zip(answer_values_and_grad(answer_topk_probs, wide, *args), clean):
        assert torch.equal(a, e)


def test_cross_entropy_alone_equals_torch(gen):
    """With no answer rows the op is the cross-entropy of the target rows: torch's."""
    logits = make_logits(gen, (3, 10, 500), torch.float32)
    targets = torch.randint(0, 500, (3, 10), generator=gen)
    targets[:, ::3] = -100
    rows = torch.zeros(3, 0, dtype=torch.long)
    _, _, ce = answer_topk_probs(logits, rows, torch.zeros(3, dtype=torch.long), targets, 5)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 500), targets.reshape(-1),
                                                 reduction="none").reshape(3, 10)
    torch.testing.assert_close(ce, expected, rtol=1e-6, atol=1e-6)


def test_empty_batch(gen):
    """B = 0: empty results and an empty gradient."""
    logits = make_logits(gen, (0, 4, 20), torch.float32).requires_grad_()
    probs, indices, ce = answer_topk_probs(logits, torch.zeros(0, 3, dtype=torch.long),
                                           torch.zeros(0, dtype=torch.long),
                                           torch.zeros(0, 4, dtype=torch.long), 5, (1.0, 2.0))
    assert probs.shape == (2, 0, 3, 5) and ce.shape == (0, 4)
    (grad,) = torch.autograd.grad(probs.sum() + ce.sum(), logits)
    assert grad.shape == logits.shape


def answer_args(**overrides):
    args = dict(logits=torch.rand(2, 5, 8), rows=torch.tensor([[1, 3], [0, 2]]),
                lengths=torch.tensor([2, 1]), targets=torch.full((2, 5), -100), k=3,
                temperatures=(1.0, 2.0))
    return args | overrides


BAD_ANSWER_ARGS = [
    ("rows-shape", dict(rows=torch.tensor([1, 2])), r"rows must have shape \[B, A\] with B = 2, got shape \[2\]"),
    ("rows-dtype", dict(rows=torch.tensor([[1.0], [2.0]])), r"rows must have an integer dtype, got Float"),
    ("rows-range", dict(rows=torch.tensor([[1, 5], [0, 2]])), r"rows must lie in \[0, L\) = \[0, 5\), got rows\[0, 1\] = 5"),
    ("rows-duplicate", dict(rows=torch.tensor([[1, 1], [0, 2]])),
     r"the answer rows of a sequence must be distinct, got rows\[0, 0\] = rows\[0, 1\] = 1"),
    ("lengths-high", dict(lengths=torch.tensor([3, 1])), r"lengths must lie in \[0, A\] = \[0, 2\], got lengths\[0\] = 3"),
    ("targets-shape", dict(targets=torch.zeros(2, 4, dtype=torch.long)), r"targets must have shape \[B, L\] = \[2, 5\], got shape \[2, 4\]"),
    ("targets-range", dict(targets=torch.full((2, 5), 8)), r"targets must be -100 or lie in \[0, V\) = \[0, 8\), got targets\[0, 0\] = 8"),
    ("temperatures-none", dict(temperatures=()), r"temperatures must hold 1 to 2 temperatures, got 0"),
    ("temperatures-three", dict(temperatures=(1.0, 2.0, 3.0)), r"temperatures must hold 1 to 2 temperatures, got 3"),
    ("temperature-zero", dict(temperatures=(1.0, 0.0)), r"temperatures\[1\] must be a finite number > 0, got 0"),
]


@pytest.mark.parametrize("overrides,message", [b[1:] for b in BAD_ANSWER_ARGS], ids=[b[0] for b in BAD_ANSWER_ARGS])
def test_bad_answer_arguments_name_the_argument(overrides, message):
    """Bad rows, lengths, targets or temperatures raise an error naming them."""
    with pytest.raises(RuntimeError, match=message) as error:
        answer_topk_probs(**answer_args(**overrides))
    assert str(error.value).startswith("topk_probs: ")
