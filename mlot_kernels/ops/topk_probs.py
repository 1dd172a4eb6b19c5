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

The same kernels serve the losses through ``torch.ops.mlot.topk_probs_forward``
(:func:`answer_topk_probs`): only the answer rows ``rows[b, :lengths[b]]`` of the logits, at one
or two temperatures ``T_t`` at once, and the cross-entropy of the rows that have a target,
reading no other row:

.. math::

    \mathrm{probs}[t, b, i, j] = q^{(T_t)}_{b, \mathrm{rows}[b, i]}[\mathrm{idx}^t_j], \qquad
    \mathrm{ce}[b, l] = \log\textstyle\sum_v e^{z_v} - z_{y}, \quad y = \mathrm{targets}[b, l] \ne -100

(``ce`` on the raw logits: no std scaling, no temperature; 0 where there is no target). Each
temperature has its own column order.

The kernels never hold the [B, L, V] probabilities. Per row read, ``row_stats`` [B, L, 5 + 2 n_t]
keeps ``max z``, ``s``, mean, std, ``log_sum_ce`` and per temperature ``log_sum_t`` and
:math:`E_{q^t}[z]`, with :math:`q^t_v = \exp\big((z_v - \max z)/(sT_t) - \mathrm{log\_sum}_t\big)`
(both terms of the exponent small, so ``q`` keeps its relative precision). The ranking mass and
the gather recompute ``q`` from them, and the backward writes the logits' gradient in one pass
per row read (every other row gets 0):

.. math::

    \partial_{z_v} = \sum_t \frac{q^t_v (G^t_v - \langle p^t, G^t\rangle)}{s T_t}
        + c\,\frac{z_v - \bar z}{(V - 1)\,\mathrm{std}}
        + g_{\mathrm{ce}} \big(\mathrm{softmax}(z)_v - [v = y]\big), \qquad
    c = -\sum_t \frac{\sum_j p^t_j G^t_j z_{\mathrm{idx}^t_j} - \langle p^t, G^t\rangle E_{q^t}[z]}{T_t s^2}

with ``G^t = dloss/dprobs[t]`` scattered to the chosen columns (the ``c`` term only with
std_scale). CPU kernels: ``csrc/topk_probs_cpu.cpp``; CUDA: :mod:`mlot_kernels.ops.topk_probs_triton`.
This module registers the fake kernels and the autograd formula.
"""

from typing import NamedTuple

import torch

from mlot_kernels.ops import _library  # noqa: F401  (registers torch.ops.mlot)
from mlot_kernels.ops.sinkhorn import _compute_dtype

BASE_STATS = 5  # row_stats columns: max z, s, mean, std, log_sum_ce; then 2 per temperature
MAX_TEMPERATURES = 2


def stats_size(n_temperatures):
    """The number of row_stats columns for ``n_temperatures`` temperatures."""
    return BASE_STATS + 2 * n_temperatures


def _indices_shape(n_t, batch, answers, k, ranking):
    return {"token": (n_t, batch, answers, k), "sequence": (n_t, batch, k), "batch": (n_t, k)}[ranking]


def _answers(logits, rows):
    return logits.shape[1] if rows is None else rows.shape[1]


@torch.library.register_fake("mlot::topk_probs_stats")
def _topk_probs_stats_fake(logits, rows, lengths, targets, temperatures, std_scale, ranking):
    batch, length, vocab = logits.shape
    dtype = _compute_dtype(logits.dtype)
    n_t = len(temperatures)
    return (
        logits.new_empty(batch, length, stats_size(n_t), dtype=dtype),
        logits.new_empty(n_t, batch, 0 if ranking == "token" else vocab, dtype=dtype),
        logits.new_empty(batch, length, dtype=dtype),
    )


@torch.library.register_fake("mlot::topk_probs_forward")
def _topk_probs_forward_fake(logits, rows, lengths, targets, k, temperatures, std_scale, ranking):
    batch, length, _ = logits.shape
    dtype = _compute_dtype(logits.dtype)
    n_t, answers = len(temperatures), _answers(logits, rows)
    return (
        logits.new_empty(n_t, batch, answers, k, dtype=dtype),
        logits.new_empty(_indices_shape(n_t, batch, answers, k, ranking), dtype=torch.int64),
        logits.new_empty(batch, length, dtype=dtype),
        logits.new_empty(batch, length, stats_size(n_t), dtype=dtype),
    )


@torch.library.register_fake("mlot::topk_probs_backward")
def _topk_probs_backward_fake(grad_probs, grad_ce, logits, rows, lengths, targets, probs, indices,
                              row_stats, temperatures, std_scale, ranking):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, rows, lengths, targets, _k, temperatures, std_scale, ranking = inputs
    probs, indices, _ce, row_stats = output
    ctx.mark_non_differentiable(indices, row_stats)
    ctx.set_materialize_grads(False)  # no zero gradients for the outputs not used
    ctx.save_for_backward(logits, rows, lengths, targets, probs, indices, row_stats)
    ctx.options = (temperatures, std_scale, ranking)


def _backward(ctx, grad_probs, _grad_indices, grad_ce, _grad_row_stats):
    logits, rows, lengths, targets, probs, indices, row_stats = ctx.saved_tensors
    if targets is None:
        grad_ce = None
    grad = torch.ops.mlot.topk_probs_backward(grad_probs, grad_ce, logits, rows, lengths, targets,
                                              probs, indices, row_stats, *ctx.options)
    return grad, None, None, None, None, None, None, None


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


class AnswerProbs(NamedTuple):
    """What :func:`answer_topk_probs` gives: per temperature t, ``probs[t]`` [B, A, k] and
    ``indices[t]``, and ``ce`` [B, L], each row's cross-entropy (0 without a target)."""

    probs: torch.Tensor
    indices: torch.Tensor
    ce: torch.Tensor


def answer_topk_probs(logits, rows, lengths, targets=None, k=50, temperatures=(1.0,),
                      std_scale=False, ranking="sequence"):
    """``torch.ops.mlot.topk_probs_forward``: the top-k probabilities of the answer rows at each
    temperature and the rows' cross-entropy, reading only those rows (module docstring).

    Args:
        logits: [B, L, V] float16, bfloat16, float32 or float64 (unit stride along V is read in
            place; any strides for B and L).
        rows: [B, A] integer, the answer rows ``rows[b, :lengths[b]]`` in answer order, distinct
            within a sequence; None for every row (A = L).
        lengths: [B] integer in [0, A], or None for A everywhere.
        targets: [B, L] integer cross-entropy targets, -100 where a row has none; or None.
        k: columns kept, >= 1.
        temperatures: one or two softmax temperatures, each > 0.
        std_scale, ranking: as for :func:`topk_probs`.

    Gradients flow to the logits through ``probs`` and ``ce``, written in one [B, L, V] buffer
    (0 in the rows not read).
    """
    probs, indices, ce, _ = torch.ops.mlot.topk_probs_forward(
        logits, rows, lengths, targets, k, [float(t) for t in temperatures], std_scale, ranking)
    return AnswerProbs(probs, indices, ce)
