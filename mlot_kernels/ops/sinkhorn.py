r"""Entropic optimal transport between two sets of K-dim vectors: ``torch.ops.mlot.sinkhorn_loss``.

For each problem ``b`` with ``m = x_lengths[b]`` rows of ``x[b]`` (teacher side) and
``n = y_lengths[b]`` rows of ``y[b]`` (student side):

.. math::

    a_i = \mathrm{softmax}(x_i / T) \;(x_i \text{ if } T = 0), \qquad
    c_j = \mathrm{softmax}(y_j / T) \;(y_j \text{ if } T = 0)

    C_{ij} = \sum_l |a_{il} - c_{jl}|^p, \qquad p \in \{1, 2\}

    \ell_a = \ell_b = 0 \text{ (unit marginals)}, \text{ else } \ell_a = -\log m,\ \ell_b = -\log n

    f = g = 0; \text{ repeated } n_\text{iters} \text{ times:}\quad
    f_i = \varepsilon \ell_a - \varepsilon\, \mathrm{LSE}_j\big((g_j - C_{ij})/\varepsilon\big),\quad
    g_j = \varepsilon \ell_b - \varepsilon\, \mathrm{LSE}_i\big((f_i - C_{ij})/\varepsilon\big)

    P_{ij} = \exp\big((f_i + g_j - C_{ij})/\varepsilon\big), \qquad
    \mathrm{loss}_b = \sum_{ij} P_{ij} C_{ij} \quad (0 \text{ when } m = 0 \text{ or } n = 0)

Gradients are the exact derivative of that value through every iteration, or, with
``detach_plan=True``, :math:`\sum_{ij} P_{ij}\, \partial C_{ij}` with the plan held constant.
The L1 subgradient at a tie is 0. Positions past the lengths take no part at all (they are
never read; their gradient is 0).

Non-finite values in valid positions are not checked for: they propagate as NaN into that
problem's loss and gradient, and leave the other problems alone. With ``temperature > 0``,
``-inf`` entries are ordinary (probability 0) as long as a row has a finite entry.

The CPU kernel is C++ (``csrc/sinkhorn_cpu.cpp``); arithmetic is float32 for float16,
bfloat16 and float32 inputs, float64 for float64 inputs, and the loss comes back in that
dtype. This module registers the op's fake kernels and autograd formula.
"""

import torch

from mlot_kernels.ops import _library  # noqa: F401  (registers torch.ops.mlot)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("mlot::sinkhorn_forward")
def _sinkhorn_forward_fake(x, y, x_lengths, y_lengths, epsilon, n_iters, temperature, p,
                           unit_marginals, detach_plan):
    batch, m, _ = x.shape
    n = y.shape[1]
    dtype = _compute_dtype(x.dtype)
    return (
        x.new_empty(batch, dtype=dtype),
        x.new_empty(batch, n_iters + 1, m, dtype=dtype),
        x.new_empty(batch, n_iters + 1, n, dtype=dtype),
    )


@torch.library.register_fake("mlot::sinkhorn_backward")
def _sinkhorn_backward_fake(grad, x, y, x_lengths, y_lengths, f_hist, g_hist, epsilon,
                            temperature, p, unit_marginals, detach_plan):
    return torch.empty_like(x), torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    x, y, x_lengths, y_lengths, epsilon, _n_iters, temperature, p, unit_marginals, detach_plan = inputs
    _loss, f_hist, g_hist = output
    ctx.mark_non_differentiable(f_hist, g_hist)
    ctx.set_materialize_grads(False)  # no zero gradients for the outputs not used
    ctx.save_for_backward(x, y, x_lengths, y_lengths, f_hist, g_hist)
    ctx.options = (epsilon, temperature, p, unit_marginals, detach_plan)


def _backward(ctx, grad_loss, _grad_f_hist, _grad_g_hist):
    if grad_loss is None:
        return (None,) * 10
    x, y, x_lengths, y_lengths, f_hist, g_hist = ctx.saved_tensors
    grad_x, grad_y = torch.ops.mlot.sinkhorn_backward(
        grad_loss, x, y, x_lengths, y_lengths, f_hist, g_hist, *ctx.options
    )
    return grad_x, grad_y, None, None, None, None, None, None, None, None


torch.library.register_autograd("mlot::sinkhorn_forward", _backward, setup_context=_setup_context)


def sinkhorn_loss(x, y, x_lengths=None, y_lengths=None, epsilon=0.1, n_iters=20,
                  temperature=0.0, p=1, unit_marginals=False, detach_plan=False):
    """``torch.ops.mlot.sinkhorn_loss``: the per-problem entropic OT loss, shape [B].

    Args:
        x: [B, M, K] teacher-side vectors (float16, bfloat16, float32 or float64).
        y: [B, N, K] student-side vectors, same dtype and device.
        x_lengths, y_lengths: [B] integer valid prefix lengths, or None for all rows.
        epsilon: entropic regularisation, > 0.
        n_iters: Sinkhorn iterations (one f- and one g-update each), >= 0.
        temperature: softmax temperature applied to every row first; 0 uses rows as given.
        p: cost exponent, 1 (L1) or 2 (squared Euclidean).
        unit_marginals: every position carries mass 1 instead of 1/m and 1/n.
        detach_plan: differentiate with the transport plan held constant.

    The math is in this module's docstring.
    """
    return torch.ops.mlot.sinkhorn_loss(x, y, x_lengths, y_lengths, epsilon, n_iters,
                                        temperature, p, unit_marginals, detach_plan)


class SinkhornLoss(torch.nn.Module):
    """Module form of :func:`sinkhorn_loss`, with ``reduction`` 'none' ([B]), 'mean' or 'sum'."""

    def __init__(self, epsilon=0.1, n_iters=20, temperature=0.0, p=1, unit_marginals=False,
                 detach_plan=False, reduction="mean"):
        super().__init__()
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"SinkhornLoss: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        self.options = dict(epsilon=epsilon, n_iters=n_iters, temperature=temperature, p=p,
                            unit_marginals=unit_marginals, detach_plan=detach_plan)
        self.reduction = reduction

    def forward(self, x, y, x_lengths=None, y_lengths=None):
        loss = sinkhorn_loss(x, y, x_lengths, y_lengths, **self.options)
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items()) + f", reduction={self.reduction!r}"
