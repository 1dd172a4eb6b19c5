"""torch.ops.mlot.sinkhorn_loss: values and gradients against the float64 reference, gradcheck,
opcheck, torch.compile, numerics at the edges, and argument errors."""

import os
import subprocess
import sys

import pytest
import torch

import mlot_kernels
from mlot_kernels.ops import reference
from tests.conftest import assert_close_rel, make_problem, make_vectors, value_and_grads

OPS = torch.ops.mlot

# (B, M, N, K, p, temperature, input kind, lengths mode)
CASES = [
    (1, 1, 1, 1, 1, 0.0, "probs", "full"),
    (2, 5, 3, 4, 2, 1.0, "logits", "random"),
    (4, 17, 33, 50, 1, 2.0, "logits", "random"),
    (3, 64, 64, 128, 1, 2.0, "logits", "random"),
    (8, 24, 9, 7, 2, 0.0, "probs", "zero-and-full"),
    (64, 4, 6, 3, 1, 0.5, "logits", "random"),
    (5, 40, 1, 16, 2, 2.0, "logits", "full"),
    (2, 1, 40, 50, 1, 0.0, "probs", "full"),
    (6, 31, 29, 65, 1, 1.0, "logits", "random"),
    (3, 20, 18, 10, 1, 0.0, "raw", "random"),
    (2, 13, 11, 6, 2, 0.0, "raw", "full"),
]
CASE_IDS = ["B{}-M{}-N{}-K{}-p{}-T{}-{}-{}".format(*c) for c in CASES]

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("unit_marginals", [False, True], ids=["uniform", "unit"])
@pytest.mark.parametrize("detach_plan", [False, True], ids=["exact", "detached"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_float64_reference(gen, case, detach_plan, unit_marginals, dtype):
    """Loss and both gradients equal a float64 evaluation of the contract."""
    B, M, N, K, p, temperature, kind, lengths = case
    x, y, xl, yl = make_problem(gen, B, M, N, K, kind, lengths)
    weights = torch.rand(B, generator=gen, dtype=torch.float64) + 0.5
    opts = dict(epsilon=0.1, n_iters=20, temperature=temperature, p=p,
                unit_marginals=unit_marginals, detach_plan=detach_plan)
    expected = value_and_grads(reference.sinkhorn_loss, x, y, weights, xl, yl, **opts)
    actual = value_and_grads(mlot_kernels.sinkhorn_loss, x.to(dtype), y.to(dtype), weights,
                             xl, yl, **opts)
    assert actual[0].dtype == dtype
    for a, e in zip(actual, expected):
        assert_close_rel(a, e, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_inputs_compute_in_float32(gen, dtype):
    """float16/bfloat16 inputs give the float32 result of the same values; gradients in the input dtype."""
    x, y, xl, yl = make_problem(gen, 4, 19, 23, 50, "logits", "random", dtype)
    weights = torch.rand(4, generator=gen) + 0.5
    opts = dict(temperature=2.0, unit_marginals=True)
    loss, gx, gy = value_and_grads(mlot_kernels.sinkhorn_loss, x, y, weights, xl, yl, **opts)
    loss32, gx32, gy32 = value_and_grads(mlot_kernels.sinkhorn_loss, x.float(), y.float(), weights,
                                         xl, yl, **opts)
    assert loss.dtype == torch.float32 and gx.dtype == dtype and gy.dtype == dtype
    torch.testing.assert_close(loss, loss32, rtol=1e-6, atol=0)
    torch.testing.assert_close(gx, gx32.to(dtype))
    torch.testing.assert_close(gy, gy32.to(dtype))


GRADCHECK_CASES = [
    (2, 5, 4, 3, 1, 1.0, "logits", "random", False),
    (3, 4, 6, 5, 2, 0.0, "probs", "zero-and-full", True),
    (2, 6, 3, 4, 1, 0.0, "raw", "full", True),
    (2, 3, 5, 7, 2, 2.0, "logits", "random", False),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gradcheck_exact(gen, case):
    """The exact-mode gradient is the derivative of the loss through every iteration."""
    B, M, N, K, p, temperature, kind, lengths, unit = case
    x, y, xl, yl = make_problem(gen, B, M, N, K, kind, lengths)
    fn = lambda a, b: mlot_kernels.sinkhorn_loss(a, b, xl, yl, 0.2, 7, temperature, p, unit)
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), y.requires_grad_()))


@pytest.mark.parametrize("p,temperature,kind", [(1, 1.0, "logits"), (2, 0.0, "probs")])
def test_gradcheck_detached_plan(gen, p, temperature, kind):
    """The detached-plan gradient is the exact gradient of sum_ij P_ij C_ij with P frozen."""
    x, y, _, _ = make_problem(gen, 1, 5, 4, 6, kind, "full")
    opts = dict(epsilon=0.2, n_iters=7, temperature=temperature, p=p)

    def cost(x, y):
        return reference.cost_matrix(reference.rows(x[0], temperature), reference.rows(y[0], temperature), p)

    with torch.no_grad():  # the plan at the base point
        plan = reference.transport_plan(cost(x, y), opts["epsilon"], opts["n_iters"],
                                       unit_marginals=False)

    def fn(x, y):  # value: the frozen-plan loss; gradient: the op's detached-plan gradient
        op = mlot_kernels.sinkhorn_loss(x, y, detach_plan=True, **opts).sum()
        return op + ((plan * cost(x, y)).sum() - op).detach()

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), y.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", [
    (3, 6, 5, 4, 1, 1.0, "logits", "random", False, False),
    (2, 4, 7, 3, 2, 0.0, "probs", "zero-and-full", True, True),
    (2, 5, 5, 8, 1, 2.0, "logits", "full", True, False),
], ids=["uniform-lengths", "unit-detached-p2", "unit-full"])
def test_opcheck(gen, case, dtype):
    """opcheck (schema, autograd registration, fake kernel, AOT dispatch) on the public and internal ops."""
    B, M, N, K, p, temperature, kind, lengths, unit, detach = case
    x, y, xl, yl = make_problem(gen, B, M, N, K, kind, lengths, dtype)
    x.requires_grad_()
    y.requires_grad_()
    kwargs = dict(epsilon=0.1, n_iters=6, temperature=temperature, p=p, unit_marginals=unit,
                  detach_plan=detach)
    torch.library.opcheck(OPS.sinkhorn_loss.default, (x, y, xl, yl), kwargs)
    torch.library.opcheck(OPS.sinkhorn_forward.default, (x, y, xl, yl, *kwargs.values()))
    _, f_hist, g_hist = OPS.sinkhorn_forward(x.detach(), y.detach(), xl, yl, *kwargs.values())
    grad = torch.rand(B, generator=gen, dtype=f_hist.dtype)
    del kwargs["n_iters"]
    torch.library.opcheck(OPS.sinkhorn_backward.default,
                          (grad, x.detach(), y.detach(), xl, yl, f_hist, g_hist, *kwargs.values()))


@pytest.mark.parametrize("detach_plan", [False, True], ids=["exact", "detached"])
def test_compile_matches_eager(gen, detach_plan):
    """A function calling the op under torch.compile(fullgraph=True) gives the eager values and gradients."""
    x, y, xl, yl = make_problem(gen, 3, 9, 7, 6, "logits", "random", torch.float32)
    weights = torch.rand(3, generator=gen)

    def fn(x, y, xl, yl):
        return mlot_kernels.sinkhorn_loss(x, y, xl, yl, 0.1, 10, 2.0, 1, True, detach_plan) * 2

    compiled = torch.compile(fn, fullgraph=True)
    eager = value_and_grads(fn, x, y, weights, xl, yl)
    got = value_and_grads(compiled, x, y, weights, xl, yl)
    for a, e in zip(got, eager):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


def test_batch_problems_are_independent(gen):
    """Each problem's loss and gradient are those it has alone (no cross-talk between threads)."""
    x, y, xl, yl = make_problem(gen, 6, 21, 17, 12, "logits", "random", torch.float32)
    weights = torch.ones(6)
    loss, gx, gy = value_and_grads(mlot_kernels.sinkhorn_loss, x, y, weights, xl, yl, temperature=1.0)
    for b in range(6):
        sl = slice(b, b + 1)
        lb, gxb, gyb = value_and_grads(mlot_kernels.sinkhorn_loss, x[sl], y[sl], weights[sl],
                                       xl[sl], yl[sl], temperature=1.0)
        assert torch.equal(lb, loss[sl]) and torch.equal(gxb, gx[sl]) and torch.equal(gyb, gy[sl])


def test_non_contiguous_inputs(gen):
    """Strided views give the result of their contiguous copies."""
    x, y, xl, yl = make_problem(gen, 3, 18, 10, 12, "logits", "random", torch.float32)
    xs, ys = x[:, ::2], y.transpose(1, 2).contiguous().transpose(1, 2)
    assert not xs.is_contiguous() and not ys.is_contiguous()
    weights = torch.rand(3, generator=gen)
    xl = xl.clamp(max=9)
    strided = value_and_grads(mlot_kernels.sinkhorn_loss, xs, ys, weights, xl, yl, temperature=1.0)
    dense = value_and_grads(mlot_kernels.sinkhorn_loss, xs.contiguous(), ys.contiguous(), weights,
                            xl, yl, temperature=1.0)
    for a, e in zip(strided, dense):
        assert torch.equal(a, e)


# ------------------------------------------------------------------ numerics at the edges

def assert_finite_and_matches(gen, x, y, rtol, xl=None, yl=None, **opts):
    weights = torch.rand(x.shape[0], generator=gen, dtype=torch.float64) + 0.5
    actual = value_and_grads(mlot_kernels.sinkhorn_loss, x, y, weights, xl, yl, **opts)
    expected = value_and_grads(reference.sinkhorn_loss, x.double(), y.double(), weights, xl, yl, **opts)
    for a, e in zip(actual, expected):
        assert torch.isfinite(a).all()
        assert_close_rel(a, e, rtol)
    return actual


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_one_hot_vectors(gen, dtype):
    """One-hot rows (costs exactly 0 or 2, ties in every L1 term) stay finite and exact."""
    x = torch.nn.functional.one_hot(torch.randint(0, 5, (3, 8), generator=gen), 5).to(dtype)
    y = torch.nn.functional.one_hot(torch.randint(0, 5, (3, 6), generator=gen), 5).to(dtype)
    for unit in (False, True):
        assert_finite_and_matches(gen, x, y, TOL[dtype], unit_marginals=unit)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_identical_vectors(gen, dtype):
    """x == y (zero cost on the diagonal, every L1 term a tie there) stays finite and exact."""
    x = make_vectors(gen, (2, 10, 7), "probs", dtype)
    for temperature in (0.0, 1.0):
        _, gx, gy = assert_finite_and_matches(gen, x, x.clone(), TOL[dtype], temperature=temperature)


def max_rel_error(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("detach_plan", [False, True], ids=["exact", "detached"])
@pytest.mark.parametrize("unit_marginals", [False, True], ids=["uniform", "unit"])
def test_small_epsilon_costs_near_two(gen, unit_marginals, detach_plan):
    """epsilon = 1e-3 in float32 with costs near 2 (exp(-C/eps) underflows): finite, the loss to
    1e-4, gradients as accurate as a float32 evaluation of the contract. (float32 potentials
    near 2 resolve to ulp(2)/eps ~ 2.4e-4 relative in P here, whatever the algorithm.)"""
    def peaked(shape, first_column):  # rows peaked on a random column of [first, first + 15)
        logits = torch.randn(shape, generator=gen)
        peak = first_column + torch.randint(0, 15, shape[:-1], generator=gen)
        return torch.softmax(logits.scatter(-1, peak[..., None], 12.0), -1)

    x, y = peaked((3, 12, 30), 0), peaked((3, 10, 30), 15)
    cost = (x[:, :, None] - y[:, None]).abs().sum(-1)
    assert cost.min() > 1.9  # the regime this test is about
    weights = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    opts = dict(epsilon=1e-3, n_iters=20, unit_marginals=unit_marginals, detach_plan=detach_plan)
    actual = value_and_grads(mlot_kernels.sinkhorn_loss, x, y, weights, **opts)
    float32_reference = value_and_grads(reference.sinkhorn_loss, x, y, weights, **opts)
    expected = value_and_grads(reference.sinkhorn_loss, x.double(), y.double(), weights, **opts)
    assert all(torch.isfinite(t).all() for t in actual)
    assert (actual[0] > 0).all()
    assert_close_rel(actual[0], expected[0], TOL[torch.float32])
    for a, r, e in zip(actual[1:], float32_reference[1:], expected[1:]):
        assert max_rel_error(a, e) <= 2 * max_rel_error(r, e)


@pytest.mark.parametrize("detach_plan", [False, True], ids=["exact", "detached"])
def test_zero_iterations(gen, detach_plan):
    """n_iters = 0 is the loss of the plan exp(-C/eps), finite and exact."""
    x, y, xl, yl = make_problem(gen, 3, 9, 8, 5, "logits", "random", torch.float32)
    assert_finite_and_matches(gen, x, y, TOL[torch.float32], xl, yl, n_iters=0, temperature=1.0,
                              detach_plan=detach_plan)


def test_zero_lengths_give_zero_loss_and_gradient(gen):
    """A problem with m = 0 or n = 0 has loss 0 and gradient 0; the others are unaffected."""
    x, y, _, _ = make_problem(gen, 3, 7, 6, 5, "logits", "full", torch.float32)
    xl, yl = torch.tensor([0, 7, 4]), torch.tensor([6, 0, 5])
    loss, gx, gy = value_and_grads(mlot_kernels.sinkhorn_loss, x, y, torch.ones(3), xl, yl,
                                   temperature=1.0)
    assert loss[0] == 0 and loss[1] == 0 and loss[2] > 0
    assert (gx[:2] == 0).all() and (gy[:2] == 0).all()
    assert gx[2].abs().sum() > 0 and gy[2].abs().sum() > 0
    empty = make_vectors(gen, (2, 0, 5), "logits", torch.float32)
    assert torch.equal(mlot_kernels.sinkhorn_loss(empty, y[:2], temperature=1.0), torch.zeros(2))


def test_padding_is_never_read(gen):
    """NaN past the lengths changes nothing, and the gradient there is exactly 0."""
    x, y, _, _ = make_problem(gen, 2, 8, 7, 5, "logits", "full", torch.float32)
    xl, yl = torch.tensor([5, 8]), torch.tensor([7, 3])
    clean = value_and_grads(mlot_kernels.sinkhorn_loss, x, y, torch.ones(2), xl, yl, temperature=1.0)
    x[0, 5:] = float("nan")
    y[1, 3:] = float("nan")
    dirty = value_and_grads(mlot_kernels.sinkhorn_loss, x, y, torch.ones(2), xl, yl, temperature=1.0)
    for a, e in zip(dirty, clean):
        assert torch.equal(a, e)
    assert (clean[1][0, 5:] == 0).all() and (clean[2][1, 3:] == 0).all()


def test_nan_in_valid_position_poisons_only_its_problem(gen):
    """A NaN inside the lengths makes that problem's loss NaN and leaves the others unchanged."""
    x, y, _, _ = make_problem(gen, 3, 6, 5, 4, "logits", "full", torch.float32)
    clean = mlot_kernels.sinkhorn_loss(x, y, temperature=1.0)
    x[1, 2, 3] = float("nan")
    dirty = mlot_kernels.sinkhorn_loss(x, y, temperature=1.0)
    assert torch.isnan(dirty[1])
    assert torch.equal(dirty[[0, 2]], clean[[0, 2]])


def test_minus_inf_logits_are_probability_zero(gen):
    """With temperature > 0, -inf logits are ordinary entries of probability 0."""
    x, y, _, _ = make_problem(gen, 2, 6, 5, 8, "logits", "full", torch.float32)
    x[:, :, 5:] = float("-inf")
    y[0, :, 0] = float("-inf")
    assert_finite_and_matches(gen, x, y, TOL[torch.float32], temperature=1.0)


# ------------------------------------------------------------------ argument errors

def good_args():
    return dict(x=torch.rand(2, 3, 4), y=torch.rand(2, 5, 4), x_lengths=None, y_lengths=None)


BAD_ARGS = [
    ("x-2d", dict(x=torch.rand(3, 4)), {}, r"x must be a 3-D tensor \[B, M, K\], got 2-D"),
    ("y-4d", dict(y=torch.rand(2, 5, 4, 1)), {}, r"y must be a 3-D tensor \[B, N, K\], got 4-D"),
    ("batch", dict(y=torch.rand(3, 5, 4)), {}, r"same batch size B, got x \[2, 3, 4\] and y \[3, 5, 4\]"),
    ("vector-size", dict(y=torch.rand(2, 5, 6)), {}, r"same vector size K"),
    ("K=0", dict(x=torch.rand(2, 3, 0), y=torch.rand(2, 5, 0)), {}, r"K >= 1"),
    ("int-dtype", dict(x=torch.ones(2, 3, 4, dtype=torch.long)), {},
     r"x must be float16, bfloat16, float32 or float64, got Long"),
    ("dtype-mismatch", dict(y=torch.rand(2, 5, 4, dtype=torch.float64)), {},
     r"same dtype, got x Float and y Double"),
    ("device", dict(y=torch.rand(2, 5, 4, device="meta")), {}, r"same device, got x on cpu and y on meta"),
    ("lengths-shape", dict(x_lengths=torch.tensor([1, 2, 3])), {}, r"x_lengths must have shape \[B\] = \[2\], got shape \[3\]"),
    ("lengths-dtype", dict(y_lengths=torch.tensor([1.0, 2.0])), {}, r"y_lengths must have an integer dtype, got Float"),
    ("lengths-device", dict(x_lengths=torch.tensor([1, 2], device="meta")), {},
     r"x_lengths must be on the same device as x \(cpu\), got meta"),
    ("lengths-high", dict(x_lengths=torch.tensor([1, 4])), {}, r"x_lengths must lie in \[0, M\] = \[0, 3\], got x_lengths\[1\] = 4"),
    ("lengths-negative", dict(y_lengths=torch.tensor([-1, 2])), {}, r"y_lengths must lie in \[0, N\] = \[0, 5\], got y_lengths\[0\] = -1"),
    ("epsilon-zero", {}, dict(epsilon=0.0), r"epsilon must be a finite number > 0, got 0"),
    ("epsilon-nan", {}, dict(epsilon=float("nan")), r"epsilon must be a finite number > 0, got nan"),
    ("n_iters", {}, dict(n_iters=-1), r"n_iters must be >= 0, got -1"),
    ("temperature", {}, dict(temperature=-0.5), r"temperature must be a finite number >= 0 .*got -0.5"),
    ("p", {}, dict(p=3), r"p must be 1 or 2, got 3"),
]


@pytest.mark.parametrize("tensors,options,message", [b[1:] for b in BAD_ARGS], ids=[b[0] for b in BAD_ARGS])
def test_bad_arguments_name_the_argument(tensors, options, message):
    """Bad input raises an error naming the argument, what was expected and what was given."""
    args = good_args() | tensors
    with pytest.raises(RuntimeError, match=message) as error:
        mlot_kernels.sinkhorn_loss(**args, **options)
    assert str(error.value).startswith("sinkhorn_loss: ")


# ------------------------------------------------------------------ wrappers and loading

def test_module_reductions(gen):
    """SinkhornLoss returns the functional loss, reduced as asked."""
    x, y, xl, yl = make_problem(gen, 3, 6, 5, 4, "logits", "random", torch.float32)
    opts = dict(epsilon=0.2, n_iters=5, temperature=1.0, p=2, unit_marginals=True)
    per_problem = mlot_kernels.sinkhorn_loss(x, y, xl, yl, **opts)
    assert torch.equal(mlot_kernels.SinkhornLoss(**opts, reduction="none")(x, y, xl, yl), per_problem)
    assert torch.equal(mlot_kernels.SinkhornLoss(**opts, reduction="sum")(x, y, xl, yl), per_problem.sum())
    assert torch.equal(mlot_kernels.SinkhornLoss(**opts)(x, y, xl, yl), per_problem.mean())
    with pytest.raises(ValueError, match="reduction must be 'none', 'mean' or 'sum', got 'avg'"):
        mlot_kernels.SinkhornLoss(reduction="avg")


def test_missing_library_override_is_an_import_error(tmp_path):
    """MLOT_KERNELS_LIBRARY naming no file fails at import with the variable's name."""
    env = dict(os.environ, MLOT_KERNELS_LIBRARY=str(tmp_path / "missing.so"))
    result = subprocess.run([sys.executable, "-c", "import mlot_kernels"], env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "MLOT_KERNELS_LIBRARY=" in result.stderr and "is not a file" in result.stderr
