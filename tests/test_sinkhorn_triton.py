"""The Triton kernels of sinkhorn_loss (mlot_kernels.ops.sinkhorn_triton) under the Triton interpreter on
CPU tensors: both regimes (on-chip in the scaling form, streamed in several row chunks, and in
the log domain; tiled, forced with small tiles) against the float64 reference; gradcheck;
opcheck through the op's schema; numerics at the edges, and the scaling form's absorptions and
log-domain fallback forced. CUDA runs are in test_sinkhorn_cuda.py."""

import functools
import os

import pytest
import torch

from mlot_kernels.ops import reference, sinkhorn_triton
from tests.conftest import assert_close_rel, make_problem, make_vectors, value_and_grads

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the Triton interpreter is off (TRITON_INTERPRET=1)")

CONFIGS = {
    "scaling": sinkhorn_triton.Config(onchip=True, chunk_rows=4),
    "logdomain": sinkhorn_triton.Config(onchip=True, scaling=False),
    "tiled": sinkhorn_triton.Config(onchip=False, block_own=4, block_other=8),
}
# The scaling form with its stability rules forced: tau = 30 (float32) absorbs on its own at
# epsilon = 1e-3 with costs near 2; tau = 0.5 absorbs at most steps; sum_floor = inf trusts
# no sum, so every row and column runs in the log domain and the backward re-bases each step.
STABILITY_CONFIGS = {
    "dtype-thresholds": sinkhorn_triton.Config(onchip=True, chunk_rows=2),
    "tau0.5": sinkhorn_triton.Config(onchip=True, chunk_rows=2, tau=0.5),
    "no-sum-trusted": sinkhorn_triton.Config(onchip=True, chunk_rows=2, sum_floor=float("inf")),
}
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def triton_loss(config):
    return functools.partial(sinkhorn_triton.sinkhorn_loss, config=config)


# (B, M, N, K, p, temperature, kind, lengths, unit_marginals, detach_plan)
CASES = [
    (2, 5, 3, 4, 2, 1.0, "logits", "random", False, False),
    (3, 9, 13, 6, 1, 2.0, "logits", "random", True, False),
    (2, 1, 11, 5, 1, 0.0, "probs", "full", False, True),
    (2, 6, 5, 66, 1, 0.5, "logits", "zero-and-full", True, True),
    (2, 8, 8, 3, 2, 0.0, "raw", "random", False, False),
]
CASE_IDS = ["B{}-M{}-N{}-K{}-p{}-T{}-{}-{}-unit{}-detach{}".format(*c) for c in CASES]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_matches_float64_reference(gen, config, case, dtype):
    """Loss and both gradients equal a float64 evaluation of the contract."""
    B, M, N, K, p, temperature, kind, lengths, unit, detach = case
    x, y, xl, yl = make_problem(gen, B, M, N, K, kind, lengths)
    weights = torch.rand(B, generator=gen, dtype=torch.float64) + 0.5
    opts = dict(epsilon=0.1, n_iters=8, temperature=temperature, p=p, unit_marginals=unit,
                detach_plan=detach)
    expected = value_and_grads(reference.sinkhorn_loss, x, y, weights, xl, yl, **opts)
    actual = value_and_grads(triton_loss(config), x.to(dtype), y.to(dtype), weights, xl, yl, **opts)
    assert actual[0].dtype == dtype
    for a, e in zip(actual, expected):
        assert_close_rel(a, e, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_half_inputs_compute_in_float32(gen, config, dtype):
    """float16/bfloat16 inputs give the float32 result of the same values, gradients in the
    input dtype."""
    x, y, xl, yl = make_problem(gen, 2, 7, 9, 10, "logits", "random", dtype)
    weights = torch.rand(2, generator=gen) + 0.5
    opts = dict(n_iters=4, temperature=2.0, unit_marginals=True)
    loss, gx, gy = value_and_grads(triton_loss(config), x, y, weights, xl, yl, **opts)
    loss32, gx32, gy32 = value_and_grads(triton_loss(config), x.float(), y.float(), weights, xl,
                                         yl, **opts)
    assert loss.dtype == torch.float32 and gx.dtype == dtype and gy.dtype == dtype
    torch.testing.assert_close(loss, loss32, rtol=1e-6, atol=0)
    torch.testing.assert_close(gx, gx32.to(dtype))
    torch.testing.assert_close(gy, gy32.to(dtype))


@pytest.mark.parametrize("case", [
    (2, 4, 3, 3, 1, 1.0, "logits", "random", False),
    (2, 3, 4, 4, 2, 0.0, "probs", "zero-and-full", True),
], ids=["p1-softmax-lengths", "p2-unit-empty"])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_gradcheck_exact(gen, config, case):
    """The exact-mode gradient is the derivative of the loss through every iteration
    (fast-mode gradcheck: the interpreter is slow)."""
    B, M, N, K, p, temperature, kind, lengths, unit = case
    x, y, xl, yl = make_problem(gen, B, M, N, K, kind, lengths)
    fn = lambda a, b: sinkhorn_triton.sinkhorn_loss(a, b, xl, yl, 0.2, 5, temperature, p, unit,
                                               config=config)
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), y.requires_grad_()), fast_mode=True)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_gradcheck_detached_plan(gen, config):
    """The detached-plan gradient is the exact gradient of sum_ij P_ij C_ij with P frozen."""
    x, y, _, _ = make_problem(gen, 1, 5, 4, 6, "logits", "full")
    opts = dict(epsilon=0.2, n_iters=5, temperature=1.0, p=1)

    def cost(x, y):
        return reference.cost_matrix(reference.rows(x[0], 1.0), reference.rows(y[0], 1.0), 1)

    with torch.no_grad():
        plan = reference.transport_plan(cost(x, y), 0.2, 5, unit_marginals=False)

    def fn(x, y):  # value: the frozen-plan loss; gradient: the kernels' detached-plan gradient
        op = sinkhorn_triton.sinkhorn_loss(x, y, detach_plan=True, config=config, **opts).sum()
        return op + ((plan * cost(x, y)).sum() - op).detach()

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), y.requires_grad_()), fast_mode=True)


@pytest.fixture
def triton_kernels_on_cpu(request):
    """The Triton launchers registered as the ops' CPU kernels, for this test only."""
    config = request.param
    with torch.library._scoped_library("mlot", "IMPL") as lib:
        lib.impl("sinkhorn_forward", functools.partial(sinkhorn_triton.sinkhorn_forward, config=config), "CPU")
        lib.impl("sinkhorn_backward", functools.partial(sinkhorn_triton.sinkhorn_backward, config=config), "CPU")
        yield config


@pytest.mark.filterwarnings("ignore:Warning only once for all operators")
@pytest.mark.parametrize("triton_kernels_on_cpu", CONFIGS.values(), ids=CONFIGS.keys(), indirect=True)
def test_opcheck(gen, triton_kernels_on_cpu):
    """opcheck (schema, autograd registration, fake kernel, AOT dispatch) with the Triton
    kernels behind the ops."""
    x, y, xl, yl = make_problem(gen, 2, 6, 5, 4, "logits", "random", torch.float32)
    x.requires_grad_()
    y.requires_grad_()
    options = (0.1, 4, 1.0, 1, True, False)
    torch.library.opcheck(torch.ops.mlot.sinkhorn_loss.default, (x, y, xl, yl, *options))
    torch.library.opcheck(torch.ops.mlot.sinkhorn_forward.default, (x, y, xl, yl, *options))
    loss, f_hist, g_hist = torch.ops.mlot.sinkhorn_forward(x.detach(), y.detach(), xl, yl, *options)
    assert_close_rel(loss, sinkhorn_triton.sinkhorn_forward(x.detach(), y.detach(), xl, yl, *options,
                                                       config=triton_kernels_on_cpu)[0], 0)
    grad = torch.rand(2, generator=gen)
    backward_options = options[:1] + options[2:]
    torch.library.opcheck(torch.ops.mlot.sinkhorn_backward.default,
                          (grad, x.detach(), y.detach(), xl, yl, f_hist, g_hist, *backward_options))


def test_batch_and_strides(gen):
    """Each problem's result is the one it has alone, and strided inputs give their contiguous
    copies' result."""
    x, y, xl, yl = make_problem(gen, 3, 10, 5, 6, "logits", "random", torch.float32)
    xs = x[:, ::2]
    xl = xl.clamp(max=5)
    loss = sinkhorn_triton.sinkhorn_loss(xs, y, xl, yl, temperature=1.0, n_iters=5)
    for b in range(3):
        alone = sinkhorn_triton.sinkhorn_loss(xs[b:b + 1].contiguous(), y[b:b + 1], xl[b:b + 1],
                                         yl[b:b + 1], temperature=1.0, n_iters=5)
        assert torch.equal(alone, loss[b:b + 1])


# ------------------------------------------------------------------ numerics at the edges


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_edges_stay_finite_and_exact(gen, config):
    """One-hot rows, identical rows, epsilon = 1e-3, n_iters = 0 and -inf logits: finite, and
    equal to the float64 reference (float32 kernels)."""
    weights = torch.rand(2, generator=gen, dtype=torch.float64) + 0.5
    one_hot = torch.nn.functional.one_hot(torch.randint(0, 5, (2, 6), generator=gen), 5).float()
    probs = make_vectors(gen, (2, 6, 5), "probs", torch.float32)
    logits = make_vectors(gen, (2, 6, 8), "logits", torch.float32)
    logits[:, :, 5:] = float("-inf")
    cases = [
        (one_hot, one_hot.flip(1), dict(n_iters=5, unit_marginals=True), 1e-4),
        (probs, probs.clone(), dict(n_iters=5, temperature=1.0), 1e-4),
        (probs, probs.flip(1), dict(epsilon=1e-3, n_iters=5), 1e-3),
        (logits, logits.flip(1), dict(n_iters=0, temperature=1.0), 1e-4),
        (logits, logits.flip(1), dict(n_iters=4, temperature=1.0), 1e-4),
    ]
    for x, y, opts, rtol in cases:
        actual = value_and_grads(triton_loss(config), x, y, weights, **opts)
        expected = value_and_grads(reference.sinkhorn_loss, x.double(), y.double(), weights, **opts)
        for a, e in zip(actual, expected):
            assert torch.isfinite(a).all()
            assert_close_rel(a, e, rtol)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_lengths_zero_padding_and_nan(gen, config):
    """Empty problems give loss and gradient 0; padding is never read (NaN there changes
    nothing); a NaN in a valid position poisons only its problem."""
    x, y, _, _ = make_problem(gen, 3, 7, 6, 5, "logits", "full", torch.float32)
    xl, yl = torch.tensor([0, 7, 4]), torch.tensor([6, 0, 5])
    fn = triton_loss(config)
    clean = value_and_grads(fn, x, y, torch.ones(3), xl, yl, temperature=1.0, n_iters=5)
    assert clean[0][0] == 0 and clean[0][1] == 0 and clean[0][2] > 0
    assert (clean[1][:2] == 0).all() and (clean[2][:2] == 0).all()
    assert (clean[1][2, 4:] == 0).all() and clean[1][2].abs().sum() > 0
    x[2, 4:] = float("nan")
    y[2, 5:] = float("nan")
    dirty = value_and_grads(fn, x, y, torch.ones(3), xl, yl, temperature=1.0, n_iters=5)
    for a, e in zip(dirty, clean):
        assert torch.equal(a, e)
    x[2, 1, 0] = float("nan")
    poisoned = fn(x, y, xl, yl, temperature=1.0, n_iters=5)
    assert torch.isnan(poisoned[2]) and torch.equal(poisoned[:2], clean[0][:2])
    empty = make_vectors(gen, (2, 0, 5), "logits", torch.float32)
    assert torch.equal(fn(empty, y[:2], temperature=1.0), torch.zeros(2))


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_out_of_range_lengths_give_nan(gen, config):
    """Lengths are not checked on the host (no synchronisation): a length outside [0, M] makes
    that problem's loss NaN and leaves the others alone."""
    x, y, _, _ = make_problem(gen, 3, 6, 5, 4, "probs", "full", torch.float32)
    xl, yl = torch.tensor([6, 9, 3]), torch.tensor([5, 5, -1])
    loss = sinkhorn_triton.sinkhorn_forward(x, y, xl, yl, 0.1, 5, 0.0, 1, False, config=config)[0]
    good = sinkhorn_triton.sinkhorn_forward(x[:1], y[:1], xl[:1], yl[:1], 0.1, 5, 0.0, 1, False,
                                       config=config)[0]
    assert torch.isnan(loss[1:]).all() and torch.equal(loss[:1], good)


def nearly_disjoint(gen, shape, first_half):
    """Probability rows with almost all their mass on one half of the K entries (the first or
    the second): with p = 1 the costs between the two kinds are all near 2."""
    z = 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    half = shape[-1] // 2
    if first_half:
        z[..., half:] -= 6
    else:
        z[..., :half] -= 6
    return torch.softmax(z, dim=-1)


@pytest.mark.parametrize("detach", [False, True], ids=["exact", "detached"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("config", STABILITY_CONFIGS.values(), ids=STABILITY_CONFIGS.keys())
def test_scaling_form_absorptions_and_fallback(gen, config, dtype, detach):
    """epsilon = 1e-3 with costs near 2 (C/eps ~ 2000), absorptions and the log-domain
    fallback forced: loss and both gradients equal the float64 reference. float32 exact
    gradients to 3e-3: their terms are C/eps times the result, and the float32 reference
    itself is 1e-3 off there."""
    x = nearly_disjoint(gen, (2, 7, 6), first_half=True)
    y = nearly_disjoint(gen, (2, 5, 6), first_half=False)
    xl, yl = torch.tensor([7, 4]), torch.tensor([5, 3])
    weights = torch.rand(2, generator=gen, dtype=torch.float64) + 0.5
    opts = dict(epsilon=1e-3, n_iters=5, p=1, detach_plan=detach)
    expected = value_and_grads(reference.sinkhorn_loss, x, y, weights, xl, yl, **opts)
    actual = value_and_grads(triton_loss(config), x.to(dtype), y.to(dtype), weights, xl, yl, **opts)
    loss_tol = TOL[dtype]
    grad_tol = TOL[dtype] if dtype == torch.float64 or detach else 3e-3
    for a, e, rtol in zip(actual, expected, (loss_tol, grad_tol, grad_tol)):
        assert torch.isfinite(a).all()
        assert_close_rel(a, e, rtol)


def test_gradcheck_scaling_form_absorbing(gen):
    """The exact gradient through absorptions and re-bases (tau = 0.5) is the derivative of
    the loss (float64, fast-mode gradcheck)."""
    x, y, xl, yl = make_problem(gen, 2, 5, 4, 3, "logits", "random")
    fn = lambda a, b: sinkhorn_triton.sinkhorn_loss(a, b, xl, yl, 0.05, 4, 1.0, 1, False,
                                                    config=STABILITY_CONFIGS["tau0.5"])
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), y.requires_grad_()), fast_mode=True)


def test_bad_arguments_raise_the_ops_errors():
    """sinkhorn_loss checks its arguments as the op does; Config its tile sizes, chunk rows and
    the scaling form's thresholds."""
    with pytest.raises(RuntimeError, match=r"sinkhorn_loss: p must be 1 or 2, got 3"):
        sinkhorn_triton.sinkhorn_loss(torch.rand(2, 3, 4), torch.rand(2, 5, 4), p=3)
    with pytest.raises(RuntimeError, match=r"same vector size K"):
        sinkhorn_triton.sinkhorn_loss(torch.rand(2, 3, 4), torch.rand(2, 5, 6))
    Config = sinkhorn_triton.Config
    with pytest.raises(ValueError, match=r"Config: block_other must be a power of 2, got 12"):
        Config(onchip=False, block_other=12)
    with pytest.raises(ValueError, match=r"Config: chunk_rows must be a power of 2, got 3"):
        Config(onchip=True, chunk_rows=3)
    with pytest.raises(ValueError, match=r"Config: scaling must be a bool, got 1"):
        Config(onchip=True, scaling=1)
    for tau in (0, -1.0, float("inf"), float("nan"), "30", True):
        with pytest.raises(ValueError, match=r"Config: tau must be a finite number > 0 .*, got "):
            Config(onchip=True, tau=tau)
    for floor in (0.0, -1e-12, float("nan"), "1e-12"):
        with pytest.raises(ValueError, match=r"Config: sum_floor must be a number > 0, inf "
                                             r"allowed .*, got "):
            Config(onchip=True, sum_floor=floor)
    Config(onchip=True, tau=0.5, sum_floor=float("inf"), chunk_rows=1)


def test_regime_choice():
    """On-chip (the scaling form unless the log-domain one is asked for) up to 256 x 256
    padded entries, tiled beyond."""
    assert sinkhorn_triton.choose_config(128, 128).onchip
    assert sinkhorn_triton.choose_config(128, 128).scaling
    assert not sinkhorn_triton.choose_config(128, 128, scaling=False).scaling
    assert not sinkhorn_triton.choose_config(257, 256, scaling=False).onchip
    assert sinkhorn_triton.choose_config(256, 200).onchip
    assert not sinkhorn_triton.choose_config(257, 256).onchip
    assert not sinkhorn_triton.choose_config(16, 8192).onchip
