r"""The fused truncation from hidden states: ``torch.ops.mlot.linear_topk_probs``.

The result of :func:`mlot_kernels.ops.topk_probs.answer_topk_probs` on the logits
``z = hidden @ weight.T + bias`` ([B, L, V]), without ever building them: only the rows read
(the answer rows ``rows[b, :lengths[b]]`` and the rows with a target) are projected, a chunk of
rows at a time (:mod:`mlot_kernels.ops.row_chunks`), each chunk's logits computed by
``torch.nn.functional.linear`` in the inputs' dtype, as the model's output layer computes them.

Forward, per chunk: the logits, then ``torch.ops.mlot.topk_probs_stats`` on them (the row
statistics, the cross-entropy and each sequence's share of the ranking mass; ``token`` ranking
takes each row's top k of the chunk). Once every chunk is done, the column order (the top k of
the mass), and the chosen probabilities from the chosen logits
``hidden[b, rows[b, i]] . weight[idx] + bias[idx]``: k columns a row, one small matmul.

Backward, per chunk: the logits again, ``torch.ops.mlot.topk_probs_backward`` on them (the
logits' gradient ``dz`` of the chunk, in its dtype), then :math:`\partial h = dz\,W`,
:math:`\partial W \mathrel{+}= dz^\top h`, :math:`\partial b \mathrel{+}= \sum dz`; the weight's
and bias's gradients accumulate in float32 (float64 for float64 inputs), and only the gradients
that are needed are computed. Each projected row costs one matmul in the forward and three in
the backward, against one and two for every row of [B, L] with the logits built.
"""

from typing import List, Optional, Tuple

import torch

from mlot_kernels.ops import row_chunks
from mlot_kernels.ops.sinkhorn import _compute_dtype
from mlot_kernels.ops.topk_probs import BASE_STATS, AnswerProbs, _indices_shape, stats_size

_MAX, _SCALE = 0, 1  # row_stats columns (mlot_kernels.ops.topk_probs); log_sum_t at BASE_STATS + 2 t

def _segments(sequence):
    """[(start, end, b)]: the runs of equal values of ``sequence`` (host)."""
    values, counts = torch.unique_consecutive(sequence, return_counts=True)
    out, start = [], 0
    for value, count in zip(values.tolist(), counts.tolist()):
        out.append((start, start + count, value))
        start += count
    return out


def _local(slots):
    """The positions of the answer rows (slot >= 0) among a chunk's rows, and their slots."""
    local = (slots >= 0).nonzero()[:, 0]
    return local, slots[local]


@torch.library.custom_op("mlot::linear_topk_probs", mutates_args=())
def linear_topk_probs_forward(hidden: torch.Tensor, weight: torch.Tensor,
                              bias: Optional[torch.Tensor], rows: torch.Tensor,
                              lengths: torch.Tensor, targets: Optional[torch.Tensor], k: int,
                              temperatures: List[float], std_scale: bool,
                              ranking: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor]:
    """(probs [n_t, B, A, k], indices, ce [B, L], row_stats [B, L, 5 + 2 n_t]), as
    ``torch.ops.mlot.topk_probs_forward`` gives them for the logits ``hidden @ weight.T + bias``."""
    batch, length, size = hidden.shape
    vocab, answers = weight.shape[0], rows.shape[1]
    n_t, dtype, device = len(temperatures), _compute_dtype(hidden.dtype), hidden.device
    read = row_chunks.read_rows(batch, length, rows, lengths, targets)
    h_read = hidden[read.flat // length, read.flat % length]
    row_stats = torch.zeros(batch * length, stats_size(n_t), dtype=dtype, device=device)
    ce = torch.zeros(batch * length, dtype=dtype, device=device)
    mass = torch.zeros(n_t, batch if ranking == "sequence" else 1, vocab, dtype=dtype,
                       device=device)
    kk = min(k, vocab)
    token_idx = torch.full((batch * answers, k), -1, dtype=torch.int64, device=device)
    token_z = torch.zeros(batch * answers, k, dtype=hidden.dtype, device=device)
    for start, end in row_chunks.chunks(len(read.flat), vocab, size):
        z = row_chunks.project(h_read[start:end], weight, bias)
        seq = read.flat[start:end] // length
        groups = _segments(seq) if ranking == "sequence" else [(0, end - start, 0)]
        for a, b_end, group in groups:
            local, slots = _local(read.slot[start + a:start + b_end])
            target = read.target[start + a:start + b_end][None] if targets is not None else None
            stats, part, row_ce = torch.ops.mlot.topk_probs_stats(
                z[a:b_end][None], local[None], local.new_full((1,), len(local)), target,
                temperatures, std_scale, ranking)
            flat = read.flat[start + a:start + b_end]
            row_stats[flat], ce[flat] = stats[0], row_ce[0]
            if ranking == "token":
                values, idx = torch.topk(z[a:b_end][local], kk, dim=-1)
                token_idx[slots, :kk], token_z[slots, :kk] = idx, values
            else:
                mass[:, group] += part[:, 0]
    # the column order, and the chosen logits of the answer rows
    valid = torch.arange(answers, device=device)[None, :] < lengths[:, None]
    h_answer = torch.where(valid[..., None], hidden[torch.arange(batch, device=device)[:, None],
                                                    rows.clamp(0, length - 1)], 0)
    if ranking == "token":
        indices = token_idx.view(1, batch, answers, k).expand(n_t, -1, -1, -1).contiguous()
        chosen = token_z.view(1, batch, answers, k).expand(n_t, -1, -1, -1)
        columns_kept = indices >= 0
    else:
        order = torch.topk(mass, kk, dim=-1).indices
        order = torch.nn.functional.pad(order, (0, k - kk), value=-1)  # [n_t, B or 1, k]
        columns = order.clamp(min=0)
        # F.linear at the chosen columns: the chunks' arithmetic, so the same logits
        chosen = torch.stack([torch.stack([
            torch.nn.functional.linear(h_answer[b] if ranking == "sequence" else h_answer,
                                       weight[columns[t, b]],
                                       None if bias is None else bias[columns[t, b]])
            for b in range(columns.shape[1])]) for t in range(n_t)])
        if ranking == "batch":
            chosen = chosen[:, 0]
        indices = order if ranking == "sequence" else order[:, 0]
        columns_kept = (order >= 0)[:, :, None, :]
    # probs = exp((z - max) f_t - log_sum_t) at the chosen columns
    stats = row_stats.view(batch, length, -1)[torch.arange(batch, device=device)[:, None],
                                             rows.clamp(0, length - 1)]  # [B, A, S]
    inv_tau = torch.tensor(temperatures, dtype=dtype, device=device).reciprocal()
    f = inv_tau[:, None, None, None] / stats[None, ..., _SCALE, None]
    log_sum = torch.stack([stats[..., BASE_STATS + 2 * t] for t in range(n_t)])[..., None]
    probs = torch.exp((chosen.to(dtype) - stats[None, ..., _MAX, None]) * f - log_sum)
    probs = torch.where(valid[None, ..., None] & columns_kept, probs, 0)
    return probs, indices, ce.view(batch, length), row_stats.view(batch, length, -1)


@linear_topk_probs_forward.register_fake
def _forward_fake(hidden, weight, bias, rows, lengths, targets, k, temperatures, std_scale,
                  ranking):
    batch, length, _ = hidden.shape
    dtype = _compute_dtype(hidden.dtype)
    n_t, answers = len(temperatures), rows.shape[1]
    return (hidden.new_empty(n_t, batch, answers, k, dtype=dtype),
            hidden.new_empty(_indices_shape(n_t, batch, answers, k, ranking), dtype=torch.int64),
            hidden.new_empty(batch, length, dtype=dtype),
            hidden.new_empty(batch, length, stats_size(n_t), dtype=dtype))


@torch.library.custom_op("mlot::linear_topk_probs_backward", mutates_args=())
def linear_topk_probs_backward(grad_probs: Optional[torch.Tensor],
                               grad_ce: Optional[torch.Tensor], hidden: torch.Tensor,
                               weight: torch.Tensor, bias: Optional[torch.Tensor],
                               rows: torch.Tensor, lengths: torch.Tensor,
                               targets: Optional[torch.Tensor], probs: torch.Tensor,
                               indices: torch.Tensor, row_stats: torch.Tensor,
                               temperatures: List[float], std_scale: bool, ranking: str,
                               needs: List[bool]) -> Tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
    """The gradients (hidden, weight, bias) of :func:`linear_topk_probs_forward`; each is an
    empty tensor where ``needs`` says it is not needed."""
    batch, length, size = hidden.shape
    vocab, answers = weight.shape[0], rows.shape[1]
    n_t, k = probs.shape[0], probs.shape[-1]
    read = row_chunks.read_rows(batch, length, rows, lengths, targets)
    h_read = hidden[read.flat // length, read.flat % length]
    grads = row_chunks.LinearGrads(hidden, weight, bias, needs)
    flat_probs = probs.reshape(n_t, batch * answers, k)
    flat_grad = None if grad_probs is None else grad_probs.reshape(n_t, batch * answers, k)
    stats = row_stats.reshape(batch * length, -1)
    for start, end in row_chunks.chunks(len(read.flat), vocab, size):
        z = row_chunks.project(h_read[start:end], weight, bias)
        local, slots = _local(read.slot[start:end])
        if ranking == "token":
            idx = indices.reshape(n_t, batch * answers, k)[:, slots]
        elif ranking == "sequence":
            idx = indices[:, slots // answers]
        else:
            idx = indices[:, None, :].expand(n_t, len(slots), k)
        flat = read.flat[start:end]
        dz = torch.ops.mlot.topk_probs_backward(
            None if flat_grad is None else flat_grad[:, slots][:, None],
            None if grad_ce is None or targets is None else grad_ce.reshape(-1)[flat][None],
            z[None], local[None], local.new_full((1,), len(local)),
            None if targets is None else read.target[start:end][None],
            flat_probs[:, slots][:, None], idx[:, None].contiguous(), stats[flat][None],
            temperatures, std_scale, "token")[0]
        grads.add(flat, dz, h_read[start:end])
    return grads.result()


@linear_topk_probs_backward.register_fake
def _backward_fake(grad_probs, grad_ce, hidden, weight, bias, rows, lengths, targets, probs,
                   indices, row_stats, temperatures, std_scale, ranking, needs):
    return (torch.empty_like(hidden) if needs[0] else hidden.new_empty(0),
            torch.empty_like(weight) if needs[1] else hidden.new_empty(0),
            torch.empty_like(bias) if needs[2] and bias is not None else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, rows, lengths, targets, _k, temperatures, std_scale, ranking = inputs
    probs, indices, _ce, row_stats = output
    ctx.mark_non_differentiable(indices, row_stats)
    ctx.set_materialize_grads(False)  # no zero gradients for the outputs not used
    ctx.save_for_backward(hidden, weight, bias, rows, lengths, targets, probs, indices, row_stats)
    ctx.options = (temperatures, std_scale, ranking)


def _backward(ctx, grad_probs, _grad_indices, grad_ce, _grad_row_stats):
    hidden, weight, bias, rows, lengths, targets, probs, indices, row_stats = ctx.saved_tensors
    needs = row_chunks.linear_needs(ctx, 0, bias)
    grads = linear_topk_probs_backward(grad_probs, grad_ce, hidden, weight, bias, rows, lengths,
                                       targets, probs, indices, row_stats, *ctx.options, needs)
    return (*(g if need else None for g, need in zip(grads, needs)),
            None, None, None, None, None, None, None)


linear_topk_probs_forward.register_autograd(_backward, setup_context=_setup_context)


def linear_topk_probs(hidden, weight, bias, rows, lengths, targets=None, k=50,
                      temperatures=(1.0,), std_scale=False, ranking="sequence"):
    """``torch.ops.mlot.linear_topk_probs``: :func:`mlot_kernels.ops.topk_probs.answer_topk_probs`
    of the logits ``hidden @ weight.T + bias`` without building them (module docstring).

    Args:
        hidden: [B, L, H] float16, bfloat16, float32 or float64 (a model's last hidden state,
            after its final norm).
        weight: [V, H], its output embedding; bias: [V] or None; both of hidden's dtype.
        rows, lengths, targets, k, temperatures, std_scale, ranking: as for ``answer_topk_probs``
            (``lengths`` required).

    Returns an :class:`mlot_kernels.ops.topk_probs.AnswerProbs`; gradients reach ``hidden``,
    ``weight`` and ``bias``.
    """
    probs, indices, ce, _ = linear_topk_probs_forward(hidden, weight, bias, rows, lengths, targets,
                                                      k, [float(t) for t in temperatures],
                                                      std_scale, ranking)
    return AnswerProbs(probs, indices, ce)
