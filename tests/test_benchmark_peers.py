"""The benchmark peers (benchmarks/peers.py) compute what the op computes, so timings compare equal work."""

import pytest
import torch

import mlot_kernels
from benchmarks.peers import batched_log_domain, eager_topk_probs, released_loop
from tests.conftest import value_and_grads

EPSILON = 0.1
TEMPERATURE = 2.0


def _inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 11, 9, generator=gen, dtype=torch.float64)
    y = torch.randn(3, 8, 9, generator=gen, dtype=torch.float64)
    return x, y


def _assert_same(peer, op, seed):
    x, y = _inputs(seed)
    # random weights, so that each problem's gradient is checked on its own
    weights = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    for got, want in zip(value_and_grads(peer, x, y, weights), value_and_grads(op, x, y, weights)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n_iters", [0, 1, 20])
def test_released_loop_matches_op_with_unit_marginals(n_iters):
    """released_loop's value and gradients equal the op's with p=1 and unit marginals."""
    _assert_same(
        lambda x, y: released_loop(x, y, EPSILON, n_iters, temperature=TEMPERATURE),
        lambda x, y: mlot_kernels.sinkhorn_loss(x, y, epsilon=EPSILON, n_iters=n_iters,
                                                temperature=TEMPERATURE, p=1, unit_marginals=True),
        seed=n_iters,
    )


@pytest.mark.parametrize("unit_marginals", [True, False])
@pytest.mark.parametrize("n_iters", [0, 1, 20])
def test_batched_log_domain_matches_op(n_iters, unit_marginals):
    """batched_log_domain's value and gradients equal the op's with p=1 and the same marginals."""
    _assert_same(
        lambda x, y: batched_log_domain(x, y, EPSILON, n_iters, temperature=TEMPERATURE,
                                        unit_marginals=unit_marginals),
        lambda x, y: mlot_kernels.sinkhorn_loss(x, y, epsilon=EPSILON, n_iters=n_iters,
                                                temperature=TEMPERATURE, p=1,
                                                unit_marginals=unit_marginals),
        seed=100 + n_iters + 10 * unit_marginals,
    )


@pytest.mark.parametrize("std_scale", [False, True])
@pytest.mark.parametrize("ranking", ["sequence", "token", "batch"])
def test_eager_topk_probs_matches_op(gen, ranking, std_scale):
    """eager_topk_probs' probabilities, indices and logits' gradient equal the op's (no lengths,
    V > k, float64 logits without ties)."""
    k, temperature = 50, 0.7
    logits = 3 * torch.randn(3, 7, 300, generator=gen, dtype=torch.float64)
    weights = torch.rand(3, 7, k, generator=gen, dtype=torch.float64) + 0.5
    results = []
    for fn in (eager_topk_probs, mlot_kernels.topk_probs):
        z = logits.clone().requires_grad_()
        probs, indices = fn(z, k=k, temperature=temperature, std_scale=std_scale, ranking=ranking)
        (grad,) = torch.autograd.grad((probs * weights).sum(), z)
        results.append((probs.detach(), indices, grad))
    (probs, indices, grad), (e_probs, e_indices, e_grad) = results
    assert torch.equal(indices, e_indices)
    torch.testing.assert_close(probs, e_probs, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, e_grad, rtol=1e-9, atol=1e-12)
