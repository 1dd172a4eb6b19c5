"""torch.ops.mlot.topk_probs (CPU): values, indices and gradients against the float64
reference, gradcheck, opcheck, torch.compile, numerics at the edges, and argument errors."""

import pytest
import torch

import mlot_kernels
from mlot_kernels import reference
from tests.conftest import (assert_close_rel, check_half_logits, check_topk_probs, make_lengths,
                            make_logits, probs_indices_grad)

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
    """opcheck (schema, autograd registration, fake kernel, AOT dispatch) on the three ops."""
    logits = make_logits(gen, (3, 5, 11), dtype).requires_grad_()
    lengths = torch.tensor([5, 0, 3])
    args = (lengths, 4, 1.0, True, ranking)
    torch.library.opcheck(OPS.topk_probs.default, (logits, *args))
    torch.library.opcheck(OPS.topk_probs_forward.default, (logits, *args))
    probs, indices, stats = OPS.topk_probs_forward(logits.detach(), *args)
    grad = torch.rand(probs.shape, generator=gen, dtype=probs.dtype)
    torch.library.opcheck(OPS.topk_probs_backward.default,
                          (grad, logits.detach(), lengths, probs, indices, stats, 1.0, True, ranking))


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
