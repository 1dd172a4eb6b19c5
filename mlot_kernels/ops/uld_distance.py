r"""ULD's distance between paired rows of two models' logits: ``torch.ops.mlot.uld_forward``.

For sequence ``b`` and pair ``i < lengths[b]``, with student row ``z^S = student_logits[b,
student_rows[b, i]]``, teacher row ``z^T = teacher_logits[b, teacher_rows[b, i]]``,
:math:`q = \mathrm{softmax}(z / T)` of each and ``V = max(V_S, V_T)``:

.. math::

    \mathrm{distance}[b, i] = \sum_{l < V} \big|\mathrm{sort}(q^S)_l - \mathrm{sort}(q^T)_l\big|

(each sorted descending, the shorter zero-padded to ``V``; 0 past the lengths), and for each
student row with a target ``y = student_targets[b, l] != -100``,
:math:`\mathrm{ce}[b, l] = \log\sum_v e^{z_v} - z_y` on the raw logits. No other row is read.

The gradient of the distance with respect to ``q^S`` is the sign of
:math:`\mathrm{sort}(q^S)_l - \mathrm{sort}(q^T)_l` at each column's rank ``l`` (0 at a tie), so
with ``g = dloss/ddistance[b, i]`` and ``dot = sum_v q_v sign_v``

.. math::

    \partial_{z^S_v} = g\, q^S_v (\mathrm{sign}_v - \mathrm{dot}) / T
        + g_{\mathrm{ce}} \big(\mathrm{softmax}(z^S)_v - [v = y]\big)

(and likewise for the teacher with the opposite signs, when its logits need a gradient). The
forward keeps the signs per column as int8 ([B, A, V_S], and [B, A, V_T] for the teacher), so the
backward is one pass per row read, writing one buffer per model (0 in the other rows).

CPU kernels: ``csrc/uld_cpu.cpp`` (rows sorted by an LSD radix sort of their logits, whose order
is the softmax's). CUDA: :func:`uld_forward_chunked` and :func:`uld_backward_chunked`, torch
operations (``torch.sort``, a segmented sort) over chunks of rows, which also run on CPU
tensors (the tests compare them with the C++ kernels). Arithmetic is float32, float64 when
either model's logits are float64.
"""

import torch

from mlot_kernels.ops import _library  # noqa: F401  (registers torch.ops.mlot)

STATS = 4  # row statistics: max z, log_sum, log_sum_ce, dot
IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 24  # rows per chunk of the torch kernels: about this many logits


def _compute_dtype(student_logits, teacher_logits):
    return torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) \
        else torch.float32


def forward_outputs(batch, l_s, l_t, answers, v_s, v_t, teacher_grad, dtype, device):
    """``mlot::uld_forward``'s six outputs, zero: distance [B, A], ce [B, L_S], the student's
    row stats [B, L_S, STATS] and int8 signs [B, A, V_S], the teacher's row stats
    [B, L_T, STATS] and signs [B, A, V_T] (V_T = 0 without ``teacher_grad``)."""
    return (torch.zeros(batch, answers, dtype=dtype, device=device),
            torch.zeros(batch, l_s, dtype=dtype, device=device),
            torch.zeros(batch, l_s, STATS, dtype=dtype, device=device),
            torch.zeros(batch, answers, v_s, dtype=torch.int8, device=device),
            torch.zeros(batch, l_t, STATS, dtype=dtype, device=device),
            torch.zeros(batch, answers, v_t if teacher_grad else 0, dtype=torch.int8,
                        device=device))


@torch.library.register_fake("mlot::uld_forward")
def _uld_forward_fake(student_logits, student_rows, student_targets, teacher_logits,
                      teacher_rows, lengths, temperature, teacher_grad):
    batch, l_s, v_s = student_logits.shape
    _, l_t, v_t = teacher_logits.shape
    return forward_outputs(batch, l_s, l_t, student_rows.shape[1], v_s, v_t, teacher_grad,
                           _compute_dtype(student_logits, teacher_logits), student_logits.device)


@torch.library.register_fake("mlot::uld_backward")
def _uld_backward_fake(grad_distance, grad_ce, student_logits, student_rows, student_targets,
                       teacher_logits, teacher_rows, lengths, student_stats, student_sign,
                       teacher_stats, teacher_sign, temperature, teacher_grad):
    teacher = teacher_logits.new_empty(teacher_logits.shape if teacher_grad else (0,))
    return student_logits.new_empty(student_logits.shape), teacher


def _setup_context(ctx, inputs, output):
    (student_logits, student_rows, student_targets, teacher_logits, teacher_rows, lengths,
     temperature, teacher_grad) = inputs
    _distance, _ce, s_stats, s_sign, t_stats, t_sign = output
    ctx.mark_non_differentiable(s_stats, s_sign, t_stats, t_sign)
    ctx.set_materialize_grads(False)  # no zero gradients for the outputs not used
    ctx.save_for_backward(student_logits, student_rows, student_targets, teacher_logits,
                          teacher_rows, lengths, s_stats, s_sign, t_stats, t_sign)
    ctx.options = (temperature, teacher_grad)


def _backward(ctx, grad_distance, grad_ce, *_):
    saved = ctx.saved_tensors
    if saved[2] is None:  # no targets: no cross-entropy
        grad_ce = None
    grad_student, grad_teacher = torch.ops.mlot.uld_backward(grad_distance, grad_ce, *saved,
                                                             *ctx.options)
    return grad_student, None, None, grad_teacher if ctx.options[1] else None, None, None, None, None


torch.library.register_autograd("mlot::uld_forward", _backward, setup_context=_setup_context)


def uld_distance(student_logits, student_rows, student_targets, teacher_logits, teacher_rows,
                 lengths, temperature=1.0):
    """``torch.ops.mlot.uld_forward``: (distance [B, A], ce [B, L_S]) (module docstring).

    Args:
        student_logits: [B, L_S, V_S]; teacher_logits: [B, L_T, V_T] (any floating dtypes).
        student_rows, teacher_rows: [B, A] integer, the paired rows (distinct within a sequence).
        student_targets: [B, L_S] integer cross-entropy targets (-100: none), or None.
        lengths: [B] integer in [0, A], the pairs per sequence.
        temperature: softmax temperature, > 0.

    The teacher's logits get a gradient when they require one.
    """
    out = torch.ops.mlot.uld_forward(student_logits, student_rows, student_targets, teacher_logits,
                                     teacher_rows, lengths, float(temperature),
                                     teacher_logits.requires_grad)
    return out[0], out[1]


# ---------------------------------------------------------------- the torch kernels (CUDA)


def _row_lists(student_logits, student_rows, student_targets, teacher_logits, teacher_rows,
               lengths):
    """Host lists: the pairs' flat student and teacher rows and answer indices, and every
    student row read with its pair index (-1: none) and target (-100: none)."""
    batch, l_s, _ = student_logits.shape
    l_t = teacher_logits.shape[1]
    answers = student_rows.shape[1]
    lengths = lengths.tolist()
    s_rows, t_rows = student_rows.tolist(), teacher_rows.tolist()
    pairs = [(b * l_s + s_rows[b][i], b * l_t + t_rows[b][i], b * answers + i)
             for b in range(batch) for i in range(lengths[b])]
    read = {s: [slot, IGNORE_INDEX] for s, _, slot in pairs}
    if student_targets is not None:
        for r, y in enumerate(student_targets.reshape(-1).tolist()):
            if y != IGNORE_INDEX:
                read.setdefault(r, [-1, IGNORE_INDEX])[1] = y
    return pairs, sorted((r, slot, y) for r, (slot, y) in read.items())


def _chunks(items, vocab):
    size = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return [items[i:i + size] for i in range(0, len(items), size)]


def _flat(logits):
    return logits.reshape(-1, logits.shape[-1])


def uld_forward_chunked(student_logits, student_rows, student_targets, teacher_logits,
                        teacher_rows, lengths, temperature, teacher_grad):
    """``mlot::uld_forward`` with torch operations over chunks of rows (any device)."""
    dtype = _compute_dtype(student_logits, teacher_logits)
    batch, l_s, v_s = student_logits.shape
    l_t, v_t = teacher_logits.shape[1:]
    answers = student_rows.shape[1]
    vocab = max(v_s, v_t)
    device = student_logits.device
    zs, zt = _flat(student_logits), _flat(teacher_logits)
    outputs = forward_outputs(batch, l_s, l_t, answers, v_s, v_t, teacher_grad, dtype, device)
    distance, ce, s_stats, s_sign, t_stats, t_sign = (o.flatten(0, 1) for o in outputs)
    pairs, read = _row_lists(student_logits, student_rows, student_targets, teacher_logits,
                             teacher_rows, lengths)
    for chunk in _chunks(pairs, vocab):
        s_idx, t_idx, slot = (torch.tensor(c, device=device) for c in zip(*chunk))
        q_s, mx_s, ls_s = _softmax(zs[s_idx].to(dtype), temperature)
        q_t, mx_t, ls_t = _softmax(zt[t_idx].to(dtype), temperature)
        s_sorted, s_order = q_s.sort(-1, descending=True)
        t_sorted, t_order = q_t.sort(-1, descending=True)
        diff = (torch.nn.functional.pad(s_sorted, (0, vocab - v_s)) -
                torch.nn.functional.pad(t_sorted, (0, vocab - v_t)))
        sign = diff.sign()
        distance[slot] = diff.abs().sum(-1)
        s_sign[slot] = torch.zeros_like(s_sign[slot]).scatter_(1, s_order, sign[:, :v_s].to(torch.int8))
        s_stats[s_idx, 0], s_stats[s_idx, 1] = mx_s, ls_s
        s_stats[s_idx, 3] = (s_sorted * sign[:, :v_s]).sum(-1)
        t_stats[t_idx, 0], t_stats[t_idx, 1] = mx_t, ls_t
        if teacher_grad:
            t_sign[slot] = torch.zeros_like(t_sign[slot]).scatter_(1, t_order, (-sign[:, :v_t]).to(torch.int8))
            t_stats[t_idx, 3] = -(t_sorted * sign[:, :v_t]).sum(-1)
    ce_rows = [(r, y) for r, _, y in read if y != IGNORE_INDEX]
    for chunk in _chunks(ce_rows, v_s):
        r, y = (torch.tensor(c, device=device) for c in zip(*chunk))
        z = zs[r].to(dtype)
        mx = z.max(-1).values
        log_sum = torch.log(torch.exp(z - mx[:, None]).sum(-1))
        s_stats[r, 0], s_stats[r, 2] = mx, log_sum
        ce[r] = log_sum + mx - z.gather(1, y[:, None])[:, 0]
    return outputs


def _softmax(z, temperature):
    """softmax(z / T) of rows z [C, V], with max z and log_sum = log sum exp((z - max) / T)."""
    mx = z.max(-1).values
    e = torch.exp((z - mx[:, None]) / temperature)
    log_sum = torch.log(e.sum(-1))
    return e / torch.exp(log_sum)[:, None], mx, log_sum


def uld_backward_chunked(grad_distance, grad_ce, student_logits, student_rows, student_targets,
                         teacher_logits, teacher_rows, lengths, student_stats, student_sign,
                         teacher_stats, teacher_sign, temperature, teacher_grad):
    """``mlot::uld_backward`` with torch operations over chunks of rows (any device)."""
    batch, l_s, v_s = student_logits.shape
    dtype = student_stats.dtype
    device = student_logits.device
    pairs, read = _row_lists(student_logits, student_rows, student_targets, teacher_logits,
                             teacher_rows, lengths)
    g_dist = None if grad_distance is None else grad_distance.reshape(-1).to(dtype)
    g_ce = None if grad_ce is None else grad_ce.reshape(-1).to(dtype)

    def rows_grad(logits, stats, sign, rows):
        """The gradient of one model's logits at ``rows`` [(flat row, pair slot, target)]."""
        z_all, st = _flat(logits), stats.reshape(-1, STATS)
        grad = torch.zeros_like(z_all, memory_format=torch.contiguous_format)
        for chunk in _chunks(rows, z_all.shape[-1]):
            r, slot, y = (torch.tensor(c, device=device) for c in zip(*chunk))
            z = z_all[r].to(dtype)
            g = torch.zeros_like(z)
            paired = slot >= 0
            if g_dist is not None and bool(paired.any()):
                q = torch.exp((z - st[r, 0, None]) / temperature - st[r, 1, None])
                scale = torch.where(paired, g_dist[slot.clamp(min=0)], 0) / temperature
                signs = sign.flatten(0, 1)[slot.clamp(min=0)].to(dtype)
                g += scale[:, None] * q * (signs - st[r, 3, None])
            labelled = y != IGNORE_INDEX
            if g_ce is not None and bool(labelled.any()):
                gc = torch.where(labelled, g_ce[r], 0)
                g += gc[:, None] * torch.exp(z - st[r, 0, None] - st[r, 2, None])
                g.scatter_add_(1, y.clamp(min=0)[:, None], -gc[:, None])
            grad[r] = g.to(grad.dtype)
        return grad.view(logits.shape)

    grad_student = rows_grad(student_logits, student_stats, student_sign, read)
    grad_teacher = teacher_logits.new_empty(0)
    if teacher_grad:
        teacher_rows_read = sorted((t, slot, IGNORE_INDEX) for _, t, slot in pairs)
        grad_teacher = rows_grad(teacher_logits, teacher_stats, teacher_sign, teacher_rows_read)
    return grad_student, grad_teacher


torch.library.register_kernel("mlot::uld_forward", "cuda", uld_forward_chunked)
torch.library.register_kernel("mlot::uld_backward", "cuda", uld_backward_chunked)
