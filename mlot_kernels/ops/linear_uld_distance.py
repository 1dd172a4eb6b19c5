r"""ULD's distance from hidden states: ``torch.ops.mlot.linear_uld``.

The result of :func:`mlot_kernels.ops.uld_distance.uld_distance` on the logits
``hidden @ weight.T + bias`` of both models, without building them: the student's rows read
(the paired rows and those with a target) are projected a chunk at a time
(:mod:`mlot_kernels.ops.row_chunks`), with the teacher's rows paired with them, and
``torch.ops.mlot.uld_forward`` runs on each chunk's logits (ULD has no term across rows, so a
chunk may hold rows of several sequences). The backward projects each chunk again and runs
``torch.ops.mlot.uld_backward`` on it, then the matmuls of :class:`mlot_kernels.ops.row_chunks.
LinearGrads` for each model whose inputs need a gradient.
"""

from typing import List, Optional, Tuple

import torch

from mlot_kernels.ops import row_chunks
from mlot_kernels.ops.uld_distance import STATS, _compute_dtype, forward_outputs


class _Chunk:
    """One chunk of the student's rows read, and the teacher's rows paired with them."""

    def __init__(self, read, start, end, teacher_rows, teacher_length, answers):
        self.flat = read.flat[start:end]                            # student rows, b * L_S + l
        self.local, self.slots = _paired(read.slot[start:end])      # paired rows among them
        self.target = read.target[start:end]
        self.teacher_flat = ((self.slots // answers) * teacher_length +
                             teacher_rows.reshape(-1)[self.slots])  # their teacher rows

    def logits(self, student_rows, teacher, teacher_weight, teacher_bias, length, weight, bias,
               teacher_logits=True):
        """(student logits [1, C, V_S], teacher logits [1, P, V_T], teacher hidden rows) of the
        chunk; without ``teacher_logits`` (a backward with no teacher gradient, which reads
        only their shape) the teacher's are a broadcast zero, no memory."""
        z_s = row_chunks.project(student_rows, weight, bias)[None]
        t_hidden = teacher[self.teacher_flat // length, self.teacher_flat % length]
        if not teacher_logits:
            shape = (1, len(self.teacher_flat), teacher_weight.shape[0])
            return z_s, z_s.new_zeros(()).expand(shape), t_hidden
        return z_s, row_chunks.project(t_hidden, teacher_weight, teacher_bias)[None], t_hidden

    def args(self, targets):
        """The rows arguments of uld_forward/uld_backward on the chunk's logits."""
        pairs = len(self.local)
        return (self.local[None], None if targets is None else self.target[None],
                torch.arange(pairs, device=self.local.device)[None],
                self.local.new_full((1,), pairs))


def _paired(slots):
    local = (slots >= 0).nonzero()[:, 0]
    return local, slots[local]


def _plan(student_hidden, student_weight, teacher_weight, student_rows, lengths, targets):
    batch, length, size = student_hidden.shape
    read = row_chunks.read_rows(batch, length, student_rows, lengths, targets)
    vocab = student_weight.shape[0] + teacher_weight.shape[0]
    return read, row_chunks.chunks(len(read.flat), vocab, size)


@torch.library.custom_op("mlot::linear_uld", mutates_args=())
def linear_uld_forward(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                       student_bias: Optional[torch.Tensor], student_rows: torch.Tensor,
                       student_targets: Optional[torch.Tensor], teacher_hidden: torch.Tensor,
                       teacher_weight: torch.Tensor, teacher_bias: Optional[torch.Tensor],
                       teacher_rows: torch.Tensor, lengths: torch.Tensor, temperature: float,
                       teacher_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                    torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.mlot.uld_forward``'s outputs for the logits ``hidden @ weight.T + bias`` of
    both models."""
    batch, l_s, _ = student_hidden.shape
    l_t = teacher_hidden.shape[1]
    v_s, v_t = student_weight.shape[0], teacher_weight.shape[0]
    answers = student_rows.shape[1]
    dtype = _compute_dtype(student_hidden, teacher_hidden)
    device = student_hidden.device
    outputs = forward_outputs(batch, l_s, l_t, answers, v_s, v_t, teacher_grad, dtype, device)
    distance, ce, s_stats, s_sign, t_stats, t_sign = (o.flatten(0, 1) for o in outputs)
    read, plan = _plan(student_hidden, student_weight, teacher_weight, student_rows, lengths,
                       student_targets)
    h_read = student_hidden[read.flat // l_s, read.flat % l_s]
    for start, end in plan:
        chunk = _Chunk(read, start, end, teacher_rows, l_t, answers)
        z_s, z_t, _ = chunk.logits(h_read[start:end], teacher_hidden, teacher_weight,
                                   teacher_bias, l_t, student_weight, student_bias)
        rows_s, targets, rows_t, pairs = chunk.args(student_targets)
        out = torch.ops.mlot.uld_forward(z_s, rows_s, targets, z_t, rows_t, pairs, temperature,
                                         teacher_grad)
        distance[chunk.slots], ce[chunk.flat], s_stats[chunk.flat] = out[0][0], out[1][0], out[2][0]
        s_sign[chunk.slots], t_stats[chunk.teacher_flat] = out[3][0], out[4][0]
        if teacher_grad:
            t_sign[chunk.slots] = out[5][0]
    return outputs


@linear_uld_forward.register_fake
def _forward_fake(student_hidden, student_weight, student_bias, student_rows, student_targets,
                  teacher_hidden, teacher_weight, teacher_bias, teacher_rows, lengths,
                  temperature, teacher_grad):
    batch, l_s, _ = student_hidden.shape
    return forward_outputs(batch, l_s, teacher_hidden.shape[1], student_rows.shape[1],
                           student_weight.shape[0], teacher_weight.shape[0], teacher_grad,
                           _compute_dtype(student_hidden, teacher_hidden), student_hidden.device)


@torch.library.custom_op("mlot::linear_uld_backward", mutates_args=())
def linear_uld_backward(grad_distance: Optional[torch.Tensor], grad_ce: Optional[torch.Tensor],
                        student_hidden: torch.Tensor, student_weight: torch.Tensor,
                        student_bias: Optional[torch.Tensor], student_rows: torch.Tensor,
                        student_targets: Optional[torch.Tensor], teacher_hidden: torch.Tensor,
                        teacher_weight: torch.Tensor, teacher_bias: Optional[torch.Tensor],
                        teacher_rows: torch.Tensor, lengths: torch.Tensor,
                        student_stats: torch.Tensor, student_sign: torch.Tensor,
                        teacher_stats: torch.Tensor, teacher_sign: torch.Tensor,
                        temperature: float, needs: List[bool]) -> Tuple[
                            torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor, torch.Tensor]:
    """The gradients (student hidden, weight, bias, teacher hidden, weight, bias) of
    :func:`linear_uld_forward`; each is an empty tensor where ``needs`` says it is not needed."""
    l_s, l_t = student_hidden.shape[1], teacher_hidden.shape[1]
    answers = student_rows.shape[1]
    teacher_grad = any(needs[3:])
    read, plan = _plan(student_hidden, student_weight, teacher_weight, student_rows, lengths,
                       student_targets)
    h_read = student_hidden[read.flat // l_s, read.flat % l_s]
    student = row_chunks.LinearGrads(student_hidden, student_weight, student_bias, needs[:3])
    teacher = row_chunks.LinearGrads(teacher_hidden, teacher_weight, teacher_bias, needs[3:])
    s_stats, t_stats = student_stats.reshape(-1, STATS), teacher_stats.reshape(-1, STATS)
    s_sign = student_sign.flatten(0, 1)
    t_sign = teacher_sign.flatten(0, 1)
    flat_grad = None if grad_distance is None else grad_distance.reshape(-1)
    for start, end in plan:
        chunk = _Chunk(read, start, end, teacher_rows, l_t, answers)
        z_s, z_t, t_hidden = chunk.logits(h_read[start:end], teacher_hidden, teacher_weight,
                                          teacher_bias, l_t, student_weight, student_bias,
                                          teacher_logits=teacher_grad)
        rows_s, targets, rows_t, pairs = chunk.args(student_targets)
        g_s, g_t = torch.ops.mlot.uld_backward(
            None if flat_grad is None else flat_grad[chunk.slots][None],
            None if grad_ce is None or targets is None else grad_ce.reshape(-1)[chunk.flat][None],
            z_s, rows_s, targets, z_t, rows_t, pairs, s_stats[chunk.flat][None],
            s_sign[chunk.slots][None], t_stats[chunk.teacher_flat][None],
            t_sign[chunk.slots][None], temperature, teacher_grad)
        student.add(chunk.flat, g_s[0], h_read[start:end])
        if teacher_grad:
            teacher.add(chunk.teacher_flat, g_t[0], t_hidden)
    return (*student.result(), *teacher.result())


@linear_uld_backward.register_fake
def _backward_fake(grad_distance, grad_ce, student_hidden, student_weight, student_bias,
                   student_rows, student_targets, teacher_hidden, teacher_weight, teacher_bias,
                   teacher_rows, lengths, student_stats, student_sign, teacher_stats,
                   teacher_sign, temperature, needs):
    inputs = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
              teacher_bias)
    return tuple(torch.empty_like(x) if need and x is not None else student_hidden.new_empty(0)
                 for x, need in zip(inputs, needs))


def _setup_context(ctx, inputs, output):
    *tensors, temperature, _teacher_grad = inputs
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)  # no zero gradients for the outputs not used
    ctx.save_for_backward(*tensors, *output[2:])
    ctx.temperature = temperature


def _backward(ctx, grad_distance, grad_ce, *_):
    saved = ctx.saved_tensors
    needs = row_chunks.linear_needs(ctx, 0, saved[2]) + row_chunks.linear_needs(ctx, 5, saved[7])
    grads = linear_uld_backward(grad_distance, grad_ce, *saved, ctx.temperature, needs)
    s_h, s_w, s_b, t_h, t_w, t_b = (g if need else None for g, need in zip(grads, needs))
    return s_h, s_w, s_b, None, None, t_h, t_w, t_b, None, None, None, None


linear_uld_forward.register_autograd(_backward, setup_context=_setup_context)


def linear_uld_distance(student_hidden, student_weight, student_bias, student_rows,
                        student_targets, teacher_hidden, teacher_weight, teacher_bias,
                        teacher_rows, lengths, temperature=1.0):
    """``torch.ops.mlot.linear_uld``: (distance [B, A], ce [B, L_S]) of
    :func:`mlot_kernels.ops.uld_distance.uld_distance` on both models' logits
    ``hidden @ weight.T + bias``, without building them (module docstring). The teacher's
    inputs get gradients when they require them."""
    teacher_grad = any(t is not None and t.requires_grad
                       for t in (teacher_hidden, teacher_weight, teacher_bias))
    out = linear_uld_forward(student_hidden, student_weight, student_bias, student_rows,
                             student_targets, teacher_hidden, teacher_weight, teacher_bias,
                             teacher_rows, lengths, float(temperature), teacher_grad)
    return out[0], out[1]
