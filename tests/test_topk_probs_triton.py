"""The Triton kernels of topk_probs (mlot_kernels.triton_topk) under the Triton interpreter on CPU
tensors: values, indices and gradients against the float64 reference with small column chunks,
half-precision logits, gradcheck, opcheck through the ops' schemas, numerics at the edges. CUDA
runs are in test_topk_probs_cuda.py."""

import functools
import os

import pytest
import torch

from mlot_kernels import triton_topk
from tests.conftest import (check_half_logits, check_topk_probs, make_lengths, make_logits,
                            probs_indices_grad)

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


def kernels(block_v):
    """topk_probs through the Triton kernels with column chunks of block_v."""
    return functools.partial(triton_topk.topk_probs, block_v=block_v)


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
    fn = lambda z: triton_topk.topk_probs(z, lengths, 10, 1.5, std_scale, ranking, block_v=8)[0]
    assert torch.autograd.gradcheck(fn, (logits,), fast_mode=True)


@pytest.fixture
def triton_kernels_on_cpu():
    """The Triton launchers (8-column chunks) registered as the ops' CPU kernels, for this test
    only."""
    with torch.library._scoped_library("mlot", "IMPL") as lib:
        for op in ("topk_probs_forward", "topk_probs_backward"):
            lib.impl(op, functools.partial(getattr(triton_topk, op), block_v=8), "CPU")
        yield


@pytest.mark.filterwarnings("ignore:Warning only once for all operators")
@pytest.mark.parametrize("ranking", RANKINGS)
def test_opcheck(gen, triton_kernels_on_cpu, ranking):
    """opcheck (schema, autograd registration, fake kernel, AOT dispatch) on the three ops with
    the Triton kernels behind them."""
    logits = make_logits(gen, (2, 3, 11), torch.float32).requires_grad_()
    lengths = torch.tensor([3, 0])
    args = (lengths, 4, 1.0, True, ranking)
    torch.library.opcheck(OPS.topk_probs.default, (logits, *args))
    torch.library.opcheck(OPS.topk_probs_forward.default, (logits, *args))
    probs, indices, stats = OPS.topk_probs_forward(logits.detach(), *args)
    direct = triton_topk.topk_probs_forward(logits.detach(), *args, block_v=8)
    for a, e in zip((probs, indices, stats), direct):
        assert torch.equal(a, e)
    grad = torch.rand(probs.shape, generator=gen)
    backward_args = (lengths, probs, indices, stats, 1.0, True, ranking)
    torch.library.opcheck(OPS.topk_probs_backward.default, (grad, logits.detach(), *backward_args))


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
    probs, _, grad = probs_indices_grad(triton_topk.topk_probs, logits, weights, None, 6,
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
        clean = probs_indices_grad(triton_topk.topk_probs, logits, weights, lengths, **opts)
        dirty = probs_indices_grad(triton_topk.topk_probs, dirty_logits, weights, lengths, **opts)
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
        options = (5, 1.0, False, ranking)
        probs = triton_topk.topk_probs_forward(logits, lengths, *options)[0]
        alone = triton_topk.topk_probs_forward(logits[:1], lengths[:1], *options)[0]
        assert torch.isnan(probs[1:]).all() and torch.equal(probs[:1], alone)


def test_bad_arguments_raise():
    """topk_probs checks its arguments as the op does, and block_v is a power of 2."""
    with pytest.raises(RuntimeError, match=r"topk_probs: ranking must be 'token', 'sequence' or "
                                           r"'batch', got 'vocab'"):
        triton_topk.topk_probs(torch.rand(2, 3, 4), ranking="vocab")
    with pytest.raises(RuntimeError, match=r"topk_probs: k must be >= 1, got 0"):
        triton_topk.topk_probs(torch.rand(2, 3, 4), k=0)
    with pytest.raises(ValueError, match=r"topk_probs: block_v must be a power of 2, got 12"):
        triton_topk.topk_probs(torch.rand(2, 3, 4), block_v=12)
