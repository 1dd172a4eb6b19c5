"""torch.ops.mlot.sinkhorn_loss on CUDA tensors (the Triton kernels, compiled) at real sizes:
both regimes (on-chip in both forms) against the float64 reference, bf16 inputs, gradcheck,
opcheck, torch.compile. Skipped without a CUDA GPU, and under the Triton interpreter."""

import functools
import os

import pytest
import torch

import mlot_kernels
from mlot_kernels.ops import reference, sinkhorn_triton
from tests.conftest import assert_close_rel, make_problem, value_and_grads

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="the Triton interpreter is on: kernels are not compiled"),
]

# (B, M, N, K, p, temperature, kind, lengths, unit_marginals, detach_plan); the first two are on-chip
CASES = [
    (8, 128, 128, 50, 1, 0.0, "probs", "random", True, False),      # the paper's size
    (4, 256, 200, 50, 2, 2.0, "logits", "random", False, True),
    (2, 700, 300, 50, 1, 2.0, "logits", "random", True, False),     # tiled
    (2, 300, 1030, 20, 2, 1.0, "logits", "zero-and-full", False, True),
]
CASE_IDS = ["B{}-M{}-N{}-K{}-p{}-T{}-{}-{}-unit{}-detach{}".format(*c) for c in CASES]


LOG_DOMAIN = functools.partial(sinkhorn_triton.choose_config, scaling=False)


@pytest.mark.parametrize("form", ["default", "logdomain"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_float64_reference(gen, case, dtype, form):
    """The op (the on-chip scaling form or the tiled kernels) and, on the on-chip cases, the
    log-domain form against the float64 reference."""
    B, M, N, K, p, temperature, kind, lengths, unit, detach = case
    if form == "logdomain" and not LOG_DOMAIN(M, N).onchip:
        pytest.skip("the log-domain form is on-chip only")
    loss_fn = (mlot_kernels.sinkhorn_loss if form == "default" else
               functools.partial(sinkhorn_triton.sinkhorn_loss, config=LOG_DOMAIN(M, N)))
    x, y, xl, yl = make_problem(gen, B, M, N, K, kind, lengths)
    weights = torch.rand(B, generator=gen, dtype=torch.float64) + 0.5
    opts = dict(epsilon=0.1, n_iters=20, temperature=temperature, p=p, unit_marginals=unit,
                detach_plan=detach)
    expected = value_and_grads(reference.sinkhorn_loss, x, y, weights, xl, yl, **opts)
    cuda = lambda t: None if t is None else t.cuda()
    actual = value_and_grads(loss_fn, x.to(dtype).cuda(), y.to(dtype).cuda(),
                             weights.cuda(), cuda(xl), cuda(yl), **opts)
    assert actual[0].dtype == dtype and actual[0].is_cuda
    for a, e in zip(actual, expected):
        assert_close_rel(a.cpu(), e, 1e-9 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("M,N", [(128, 128), (600, 500)], ids=["onchip", "tiled"])
def test_bf16_inputs_compute_in_float32(gen, M, N):
    x, y, xl, yl = make_problem(gen, 4, M, N, 50, "logits", "random", torch.bfloat16)
    x, y, xl, yl = x.cuda(), y.cuda(), xl.cuda(), yl.cuda()
    weights = torch.rand(4, generator=gen).cuda() + 0.5
    opts = dict(temperature=2.0, unit_marginals=True)
    loss, gx, gy = value_and_grads(mlot_kernels.sinkhorn_loss, x, y, weights, xl, yl, **opts)
    loss32, gx32, gy32 = value_and_grads(mlot_kernels.sinkhorn_loss, x.float(), y.float(),
                                         weights, xl, yl, **opts)
    assert loss.dtype == torch.float32 and gx.dtype == torch.bfloat16
    torch.testing.assert_close(loss, loss32, rtol=1e-6, atol=0)
    torch.testing.assert_close(gx, gx32.to(torch.bfloat16))
    torch.testing.assert_close(gy, gy32.to(torch.bfloat16))


@pytest.mark.parametrize("config", [sinkhorn_triton.Config(onchip=True),
                                    sinkhorn_triton.Config(onchip=True, scaling=False),
                                    sinkhorn_triton.Config(onchip=False, block_own=16, block_other=16)],
                         ids=["onchip", "onchip-logdomain", "tiled"])
def test_gradcheck(gen, config):
    x, y, xl, yl = make_problem(gen, 2, 9, 7, 5, "logits", "random")
    x, y, xl, yl = x.cuda(), y.cuda(), xl.cuda(), yl.cuda()
    fn = lambda a, b: sinkhorn_triton.sinkhorn_loss(a, b, xl, yl, 0.2, 6, 1.0, 1, False, config=config)
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), y.requires_grad_()))


def test_opcheck_and_compile(gen):
    x, y, xl, yl = make_problem(gen, 3, 40, 30, 16, "logits", "random", torch.float32)
    x, y, xl, yl = x.cuda().requires_grad_(), y.cuda().requires_grad_(), xl.cuda(), yl.cuda()
    options = (0.1, 10, 2.0, 1, True, False)
    torch.library.opcheck(torch.ops.mlot.sinkhorn_loss.default, (x, y, xl, yl, *options))
    torch.library.opcheck(torch.ops.mlot.sinkhorn_forward.default, (x, y, xl, yl, *options))
    weights = torch.rand(3, generator=gen).cuda()
    fn = lambda x, y, xl, yl: mlot_kernels.sinkhorn_loss(x, y, xl, yl, *options) * 2
    eager = value_and_grads(fn, x, y, weights, xl, yl)
    compiled = value_and_grads(torch.compile(fn, fullgraph=True), x, y, weights, xl, yl)
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
