r"""Vocabulary truncation: ``torch.ops.mlot.topk_probs``, the sorted top-k probabilities.

For logits ``z`` of shape [B, L, V] and each valid row (the first ``lengths[b]`` rows of
sequence ``b``):

.. math::

    s = \mathrm{std}(z, \text{unbiased}) + 10^{-4} \text{ if std\_scale, else } 1, \qquad
    q_v = \mathrm{softmax}_v\big(z_v / (s\,T)\big)

The columns are ordered by descending mass, and the first ``k`` are kept:

- ``ranking="token"``: each row by its own ``q``; indices [B, L, k];
- ``ranking="sequence"``: by :math:`\sum_i q_i` over the sequence's valid rows; indices [B, k];
- ``ranking="batch"``: by the sum over all valid rows of the batch; indices [k].

``probs[b, i, j] = q_{b,i}[indices_j]``: float32 (float64 for float64 logits), no
renormalisation. Rows past the lengths are 0 (their indices are -1 under ``token``
ranking); when V < k the columns past V are 0 with index -1. Ties in the order may be broken
either way. The gradient flows to the logits through the softmax and the std scaling (where
the std is 0 its gradient is 0, as for ``torch.std``); indices carry none.

The kernels never hold the [B, L, V] probabilities: a first pass per row keeps five row
statistics in ``row_stats`` [B, L, 6]: ``max z``, ``log_sum``, ``s``, mean, std and
:math:`E_q[z]`, with :math:`q_v = \exp\big((z_v - \max z)/(sT) - \mathrm{log\_sum}\big)` (both
terms of the exponent small, so ``q`` keeps its relative precision). The ranking mass and the
gather recompute ``q`` from them, and the backward writes the logits' gradient in one pass per
row:

.. math::

    \partial_{z_v} = \frac{q_v (G_v - \langle p, G\rangle)}{s T}
        + c\,\frac{z_v - \bar z}{(V - 1)\,\mathrm{std}}, \qquad
    c = -\frac{\sum_j p_j G_j z_{\mathrm{idx}_j} - \langle p, G\rangle E_q[z]}{T s^2}

with ``G = dloss/dprobs`` scattered to the chosen columns (the ``c`` term only with
std_scale). CPU kernels: ``csrc/topk_probs_cpu.cpp``; CUDA: :mod:`mlot_kernels.triton_topk`.
This module registers the fake kernels and the autograd formula.
"""

import torch

from mlot_kernels import _library  # noqa: F401  (registers torch.ops.mlot)
from mlot_kernels.sinkhorn import _compute_dtype

ROW_STATS = 6  # max z, log_sum, scale s, mean, std, E_q[z]


def _indices_shape(batch, length, k, ranking):
    return {"token": (batch, length, k), "sequence": (batch, k), "batch": (k,)}[ranking]


@torch.library.register_fake("mlot::topk_probs_forward")
def _topk_probs_forward_fake(logits, lengths, k, temperature, std_scale, ranking):
    batch, length, _ = logits.shape
    dtype = _compute_dtype(logits.dtype)
    return (
        logits.new_empty(batch, length, k, dtype=dtype),
        logits.new_empty(_indices_shape(batch, length, k, ranking), dtype=torch.int64),
        logits.new_empty(batch, length, ROW_STATS, dtype=dtype),
    )


@torch.library.register_fake("mlot::topk_probs_backward")
def _topk_probs_backward_fake(grad_probs, logits, lengths, probs, indices, row_stats,
                              temperature, std_scale, ranking):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, lengths, _k, temperature, std_scale, ranking = inputs
    probs, indices, row_stats = output
    ctx.mark_non_differentiable(indices, row_stats)
    ctx.save_for_backward(logits, lengths, probs, indices, row_stats)
    ctx.options = (temperature, std_scale, ranking)


def _backward(ctx, grad_probs, _grad_indices, _grad_row_stats):
    logits, lengths, probs, indices, row_stats = ctx.saved_tensors
    grad = torch.ops.mlot.topk_probs_backward(grad_probs, logits, lengths, probs, indices,
                                              row_stats, *ctx.options)
    return grad, None, None, None, None, None


torch.library.register_autograd("mlot::topk_probs_forward", _backward,
                                setup_context=_setup_context)


def topk_probs(logits, lengths=None, k=50, temperature=1.0, std_scale=False, ranking="sequence"):
    """``torch.ops.mlot.topk_probs``: (probs [B, L, k], indices), the top-k probabilities.

    Args:
        logits: [B, L, V] float16, bfloat16, float32 or float64.
        lengths: [B] integer valid prefix lengths, or None for all rows.
        k: columns kept, >= 1 (columns past V are 0, index -1).
        temperature: softmax temperature, > 0.
        std_scale: divide each row by its unbiased std + 1e-4 first.
        ranking: 'token', 'sequence' or 'batch' (which mass orders the columns).

    The math is in this module's docstring.
    """
    return torch.ops.mlot.topk_probs(logits, lengths, k, temperature, std_scale, ranking)
