r"""Equal accuracy instead of equal iterations: the op against GeomLoss, which anneals epsilon.

GeomLoss cannot run a fixed number of Sinkhorn iterations (its ``scaling`` sets how fast epsilon
falls to its target, and so how many iterations it runs), so the two are compared at the same
accuracy: the n_iters that brings the op's plan within ``tol`` of its marginals, against the
GeomLoss ``scaling`` that does the same.

The criterion is the marginal error of a plan ``P`` [m, n] of a problem with probability
marginals ``α = 1/m``, ``β = 1/n`` (on its valid prefix):

.. math::

    \mathrm{err}(P) = \max\big(\|P \mathbf 1 - α\|_1, \|P^\top \mathbf 1 - β\|_1\big),

the total mass P puts in the wrong place, whatever the cost. It is computed in float64 for
every problem of the batch ([B]); a batch reaches ``tol`` when every problem does. Both sides
use probability marginals (GeomLoss has no other) at the same epsilon, but each its own cost:
the op L1, GeomLoss the Euclidean norm (benchmarks/peers.py, ``geomloss_sinkhorn``).

GeomLoss's potentials lag behind its falling epsilon, so its error shrinks roughly like
``1 - scaling`` (wobbling with where the schedule lands on epsilon); on peaked rows even 0.99
can miss 1e-3, and :func:`scaling_to_tolerance` then returns None.
"""

import torch

from benchmarks.peers import samples_loss_inputs
from mlot_kernels.ops import reference


def marginal_error(plan, alpha, beta):
    """``max(|P 1 - α|_1, |Pᵀ 1 - β|_1)`` of plans [..., m, n] with marginals [..., m], [..., n]."""
    rows = (plan.sum(-1) - alpha).abs().sum(-1)
    columns = (plan.sum(-2) - beta).abs().sum(-1)
    return torch.maximum(rows, columns)


def _costs(x, y, x_lengths, y_lengths, temperature):
    """Per problem, the op's float64 L1 cost [m_b, n_b] on its valid prefix (the reference's)."""
    return [reference.cost_matrix(reference.rows(x_b.double(), temperature),
                                  reference.rows(y_b.double(), temperature), 1)
            for x_b, y_b in reference.valid_prefixes(x, y, x_lengths, y_lengths)]


def _uniform(cost):
    """The probability marginals (1/m, 1/n) of a cost [m, n]."""
    m, n = cost.shape
    return cost.new_full((m,), 1.0 / m), cost.new_full((n,), 1.0 / n)


@torch.no_grad()
def op_marginal_error(x, y, x_lengths=None, y_lengths=None, *, epsilon, n_iters, temperature):
    """[B] float64: the marginal error of the op's plan after ``n_iters`` iterations (probability
    marginals, L1 cost, softmax at ``temperature``), from the float64 reference's plan
    (``mlot_kernels.ops.reference.transport_plan``), each problem on its valid prefix."""
    errors = []
    for cost in _costs(x, y, x_lengths, y_lengths, temperature):
        plan = reference.transport_plan(cost, epsilon, n_iters, unit_marginals=False)
        errors.append(marginal_error(plan, *_uniform(cost)))
    return torch.stack(errors)


@torch.no_grad()
def iterations_to_tolerance(x, y, x_lengths=None, y_lengths=None, *, epsilon, temperature, tol,
                            max_iters=1000):
    """The smallest n_iters (0 included) after which every problem's :func:`op_marginal_error`
    is <= ``tol``; a ValueError if none up to ``max_iters`` is.

    One run of the iterations for all problems, the error recorded after each: the reference's
    potentials (``reference.potentials``) and plan (``reference.plan_from_potentials``), as
    ``reference.transport_plan`` computes them.
    """
    costs = _costs(x, y, x_lengths, y_lengths, temperature)
    marginals = [_uniform(cost) for cost in costs]
    iterates = zip(*(reference.potentials(cost, epsilon, unit_marginals=False) for cost in costs))
    worst = None
    for n_iters, potentials in zip(range(max_iters + 1), iterates):
        worst = max(marginal_error(reference.plan_from_potentials(cost, f, g, epsilon), *ab).item()
                    for cost, (f, g), ab in zip(costs, potentials, marginals))
        if worst <= tol:
            return n_iters
    raise ValueError(f"iterations_to_tolerance: the marginal error is still {worst:.3g} > tol = "
                     f"{tol:g} after max_iters = {max_iters} iterations")


@torch.no_grad()
def geomloss_marginal_error(x, y, x_lengths=None, y_lengths=None, *, epsilon, temperature,
                            scaling, backend="tensorized"):
    """[B] float64: the marginal error of GeomLoss's plan at ``scaling``.

    ``geomloss.SamplesLoss("sinkhorn", p=1, blur=epsilon, scaling=scaling, debias=False,
    potentials=True, backend=backend)`` on the float64 inputs of ``geomloss_sinkhorn``
    (``peers.samples_loss_inputs``) returns its dual potentials f [B, M], g [B, N]; its plan is

    ``P_ij = α_i β_j exp((f_i + g_j - C_ij) / eps)``, with ``C_ij = |a_i - c_j|_2``

    (GeomLoss's p = 1 cost, temperature ``blur^p = epsilon``, potentials unscaled), the plan of
    its value ``<α, f> + <β, g>``. Padded positions have weight 0, so no mass.
    """
    import geomloss

    # detached: GeomLoss switches grad mode back on when it returns, even under no_grad
    alpha, a, beta, c = samples_loss_inputs(x.detach().double(), y.detach().double(), x_lengths,
                                            y_lengths, temperature=temperature)
    loss = geomloss.SamplesLoss("sinkhorn", p=1, blur=epsilon, scaling=scaling, debias=False,
                                potentials=True, backend=backend)
    f, g = loss(alpha, a, beta, c)
    cost = torch.cdist(a, c, compute_mode="donot_use_mm_for_euclid_dist")  # [B, M, N]
    plan = alpha[:, :, None] * beta[:, None, :] * torch.exp((f[:, :, None] + g[:, None, :] - cost)
                                                           / epsilon)
    return marginal_error(plan, alpha, beta)


def scaling_to_tolerance(x, y, x_lengths=None, y_lengths=None, *, epsilon, temperature, tol,
                         backend="tensorized", ladder=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)):
    """The first ``scaling`` of ``ladder`` whose :func:`geomloss_marginal_error` is <= ``tol``
    for every problem, or None if none is."""
    for scaling in ladder:
        errors = geomloss_marginal_error(x, y, x_lengths, y_lengths, epsilon=epsilon,
                                         temperature=temperature, scaling=scaling,
                                         backend=backend)
        if errors.max().item() <= tol:
            return scaling
    return None
