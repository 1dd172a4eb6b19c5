"""The rows a hidden-state loss reads, and the chunks it projects them in.

The losses' hidden-state paths (:mod:`mlot_kernels.ops.linear_topk_probs`,
:mod:`mlot_kernels.ops.linear_uld_distance`) compute the logits ``hidden @ weight.T + bias`` only at
the rows they read, a chunk of rows at a time: no [rows, V] buffer beyond one chunk lives at
once. A chunk holds about ``max(rows * H, V * H / WEIGHT_FRACTION)`` logits: as many as the
gathered hidden states (Liger-Kernel's fused linear losses size their chunks so), but at least a
sixteenth of the output embedding's entries, and at least ``MIN_ROWS`` rows. Each chunk's matmul
streams the whole ``weight``; smaller chunks make the matmuls memory-bound (on a 2-core CPU,
25-row chunks of a [32000, 1024] embedding ran at a quarter of the float32 matmul rate, and the
demo's 128-wide student, whose sixteenth is 8 rows, ran its ``sft`` step in 0.157 s with them
against 0.086 s with 64: ``python -m benchmarks.demo_costs``). The backward holds a chunk's logits and their gradient: for H >= 1024,
at most an eighth of the weight's gradient, which it holds anyway; for narrower models, at most
``2 * MIN_ROWS * V`` entries.
"""

from typing import NamedTuple

import torch

IGNORE_INDEX = -100
WEIGHT_FRACTION = 16
MIN_ROWS = 64  # a 1024-wide model's sixteenth of a vocabulary
CHUNK_ROWS = None  # rows per chunk, when set (the tests force small chunks with it)


class ReadRows(NamedTuple):
    """The rows of a [B, L, ...] batch a loss reads, in (sequence, position) order."""

    flat: torch.Tensor    # [R] int64: b * L + l
    slot: torch.Tensor    # [R] int64: the row's answer index i (rows[b, i] = l), or -1
    target: torch.Tensor  # [R] int64: the row's cross-entropy target, or -100


def read_rows(batch, length, rows, lengths, targets=None):
    """:class:`ReadRows` of the answer rows ``rows[b, :lengths[b]]`` and the rows with a target
    (host work: one synchronisation on CUDA)."""
    device = rows.device
    answers = rows.shape[1]
    valid = torch.arange(answers, device=device)[None, :] < lengths[:, None]
    b, i = valid.nonzero(as_tuple=True)
    slot = torch.full((batch * length,), -1, dtype=torch.int64, device=device)
    slot[b * length + rows[b, i]] = b * answers + i
    read = slot >= 0
    target = torch.full_like(slot, IGNORE_INDEX)
    if targets is not None:
        target = targets.reshape(-1).to(torch.int64)
        read |= target != IGNORE_INDEX
    flat = read.nonzero()[:, 0]
    return ReadRows(flat, slot[flat], target[flat])


def chunks(n_rows, vocab, hidden_size):
    """Consecutive [start, end) ranges covering n_rows rows, of about
    max(n_rows * hidden_size, vocab * hidden_size / WEIGHT_FRACTION) logits each (``vocab``:
    the logits a row has, both models' for ULD) and at least MIN_ROWS rows."""
    budget = max(n_rows * hidden_size, vocab * hidden_size // WEIGHT_FRACTION)
    size = CHUNK_ROWS or max(MIN_ROWS, budget // max(vocab, 1))
    return [(start, min(start + size, n_rows)) for start in range(0, n_rows, size)]


def project(hidden_rows, weight, bias):
    """The logits of ``hidden_rows`` [C, H]: ``hidden_rows @ weight.T + bias`` [C, V], in their
    dtype, as ``torch.nn.functional.linear`` computes them."""
    return torch.nn.functional.linear(hidden_rows, weight, bias)


def check_linear(hidden, weight, bias, names):
    """hidden [B, L, H], weight [V, H], bias [V] or None of one model, or a ValueError naming
    the argument."""
    hidden_name, weight_name, bias_name = names
    if hidden.dim() != 3:
        raise ValueError(f"{hidden_name} must be a 3-D tensor [B, T, H], got shape "
                         f"{tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"{weight_name} must have shape [V, H] with H = {hidden.shape[2]} like "
                         f"{hidden_name}, got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{bias_name} must have shape [V] = ({weight.shape[0]},) like "
                         f"{weight_name}, got shape {tuple(bias.shape)}")
    for tensor, name in ((weight, weight_name), (bias, bias_name)):
        if tensor is not None and (tensor.dtype != hidden.dtype or tensor.device != hidden.device):
            raise ValueError(f"{name} must have the dtype and device of {hidden_name} "
                             f"({hidden.dtype}, {hidden.device}), got {tensor.dtype}, "
                             f"{tensor.device}")


class LinearGrads:
    """The gradients of ``hidden`` [B, L, H], ``weight`` and ``bias`` of one model, from the
    logits' gradients of its chunks of rows (only those in ``needs``, three booleans):
    ``dh = dz W``, ``dW += dz^T h`` and ``db += sum dz``, the last two summed in float32 (float64
    for float64 inputs)."""

    def __init__(self, hidden, weight, bias, needs):
        self.length, self.weight, self.needs = hidden.shape[1], weight, needs
        self.accumulate = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        self.hidden = torch.zeros_like(hidden) if needs[0] else None
        self.grad_weight = weight.new_zeros(weight.shape, dtype=self.accumulate) if needs[1] else None
        self.grad_bias = bias.new_zeros(bias.shape, dtype=self.accumulate) if needs[2] else None

    def add(self, flat, dz, hidden_rows):
        """The chunk of rows ``flat`` (b * L + l), their logits' gradient ``dz`` [C, V] and
        hidden states [C, H]."""
        if self.needs[0]:
            self.hidden[flat // self.length, flat % self.length] = dz @ self.weight
        if self.needs[1]:
            if dz.dtype == self.accumulate:
                self.grad_weight.addmm_(dz.T, hidden_rows)
            else:  # 16-bit: the chunk's product in its dtype, summed in float32
                self.grad_weight += dz.T @ hidden_rows
        if self.needs[2]:
            self.grad_bias += dz.sum(0, dtype=self.accumulate)

    def result(self):
        """(hidden, weight, bias) gradients in the inputs' dtypes; an empty tensor where not
        needed."""
        def empty():
            return self.weight.new_empty(0)
        return (self.hidden if self.needs[0] else empty(),
                self.grad_weight.to(self.weight.dtype) if self.needs[1] else empty(),
                self.grad_bias.to(self.weight.dtype) if self.needs[2] else empty())


def linear_needs(ctx, first, bias):
    """needs_input_grad of (hidden, weight, bias) at inputs first .. first + 2 (no bias: False)."""
    return [ctx.needs_input_grad[first], ctx.needs_input_grad[first + 1],
            bias is not None and ctx.needs_input_grad[first + 2]]
