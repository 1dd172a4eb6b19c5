r"""Triton kernels of ``topk_probs``: the CUDA implementation of ``torch.ops.mlot``.

Same contract as the op (math in :mod:`mlot_kernels.topk_probs`): for each valid row ``z`` (V
logits) of ``logits`` [B, L, V], with ``s = std(z, unbiased) + 1e-4`` under ``std_scale``
(else 1),

.. math::

    q_v = \exp\big((z_v - \max z)/(sT) - \mathrm{log\_sum}\big), \qquad
    \mathrm{log\_sum} = \log \textstyle\sum_v \exp\big((z_v - \max z)/(sT)\big),

``probs[b, i, j] = q_{b,i}[indices_j]`` for the top-k columns of each row (``token``), of each
sequence's column mass :math:`\sum_i q_i` (``sequence``) or of the batch's (``batch``).

The [B, L, V] probabilities are never stored. The forward is four steps, the first two
streaming V in column chunks:

1. row statistics, one program per row: with ``std_scale`` a pass for the mean and the unbiased
   std (each chunk's mean and sum of squared deviations, merged with Chan's formula), then one
   online pass for ``max z``, ``log_sum`` and :math:`E_q[z]`, kept in ``row_stats`` [B, L, 6]
   (max z, log_sum, s, mean, std, E_q[z]; the layout of the CPU kernels);
2. for ``sequence``/``batch`` ranking, the column mass ``mass[b, v] = sum_i q_iv``, one program
   per (sequence, column chunk) looping over the valid rows (``batch``: ``mass.sum(0)``);
3. the order: ``torch.topk`` of the logits (``token``: a row's ``q`` has its logits' order since
   ``sT > 0``) or of the mass, ``min(k, V)`` columns padded with -1;
4. the gather of the k chosen ``q``, one program per row.

The backward, with ``G = dloss/dprobs``, ``dot = sum_j p_j G_j``, writes each row's gradient in
one pass over V:

.. math::

    \partial_{z_v} = -\frac{q_v\,\mathrm{dot}}{sT} + \frac{p_j G_j}{sT}[v = \mathrm{idx}_j]
        + c\,\frac{z_v - \bar z}{(V - 1)\,\mathrm{std}}, \qquad
    c = -\frac{\sum_j p_j G_j z_{\mathrm{idx}_j} - \mathrm{dot}\,E_q[z]}{T s^2}

(the ``c`` term only with ``std_scale`` and std > 0); the chosen columns' part is added in the
chunk that holds them, so each element is written once. Rows past the lengths get 0.

Arithmetic is float32 for float16/bfloat16/float32 logits (cast at load), float64 for float64;
the gradient comes back in the logits' dtype. Lengths outside ``[0, L]`` are not checked (that
would synchronise with the device): the kernels clamp them into range and that sequence's probs
are NaN.

On CPU tensors the same kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` set
before ``mlot_kernels`` is imported): that is how CI checks them.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from mlot_kernels.sinkhorn import _compute_dtype
from mlot_kernels.topk_probs import ROW_STATS
from mlot_kernels.triton_ops import _length, _split

# Columns per chunk of the row statistics: their reductions along V favour long chunks.
BLOCK_V = 1024
# Columns per chunk of the column mass (one program per (sequence, chunk): short chunks give
# more programs) and of the backward, which compares each chunk with BLOCK_K chosen columns at
# once: a [256, 8] tile takes 72 registers a thread on sm_90 ([256, 16]: 128).
SHORT_BLOCK_V = 256
# Chosen columns handled at once by the gather and the backward.
BLOCK_K = 8

_STATS = tl.constexpr(ROW_STATS)  # row_stats columns: max z, log_sum, s, mean, std, E_q[z]


# ---------------------------------------------------------------- row helpers


@triton.jit
def _inv_temperature(t_hi, t_lo, DTYPE: tl.constexpr):
    """1/T in DTYPE; T arrives as a float32 pair hi + lo (float64 to ~1e-14)."""
    return 1.0 / (tl.cast(t_hi, DTYPE) + tl.cast(t_lo, DTYPE))


@triton.jit
def _chunk(row_ptr, c0, V, other, DTYPE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Columns c0 .. c0 + BLOCK_V of a row: their indices, mask and values (`other` past V)."""
    cols = c0 + tl.arange(0, BLOCK_V)
    mask = cols < V
    return cols, mask, tl.load(row_ptr + cols, mask=mask, other=other).to(DTYPE)


@triton.jit
def _mean_std(row_ptr, V, DTYPE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Mean and unbiased std of a row: each chunk's mean and sum of squared deviations, merged
    with Chan's formula (no cancellation, unlike sum z^2 - V mean^2)."""
    count = tl.zeros([], DTYPE)
    mean = tl.zeros([], DTYPE)
    m2 = tl.zeros([], DTYPE)
    for c0 in range(0, V, BLOCK_V):
        _, mask, z = _chunk(row_ptr, c0, V, 0.0, DTYPE, BLOCK_V)
        n = tl.sum(mask.to(DTYPE), 0)
        chunk_mean = tl.sum(z, 0) / n
        d = tl.where(mask, z - chunk_mean, 0.0)
        delta = chunk_mean - mean
        total = count + n
        mean += delta * n / total
        m2 += tl.sum(d * d, 0) + delta * delta * count * n / total
        count = total
    return mean, tl.sqrt(m2 / (V - 1))


@triton.jit
def _online_softmax(row_ptr, V, inv, E_Z: tl.constexpr, DTYPE: tl.constexpr,
                    BLOCK_V: tl.constexpr):
    """max z, log_sum = log sum_v exp((z_v - max z) inv) and (E_Z) E_q[z], in one pass: the
    running sums are rescaled whenever the running max grows."""
    mx = tl.full([], float("-inf"), DTYPE)
    total = tl.zeros([], DTYPE)
    zsum = tl.zeros([], DTYPE)
    for c0 in range(0, V, BLOCK_V):
        _, mask, z = _chunk(row_ptr, c0, V, float("-inf"), DTYPE, BLOCK_V)
        new = tl.maximum(mx, tl.max(z, 0))
        safe = tl.where(new == float("-inf"), 0.0, new)  # only -inf so far: weights 0
        rescale = tl.exp((mx - safe) * inv)
        e = tl.exp((z - safe) * inv)
        total = total * rescale + tl.sum(e, 0)
        if E_Z:
            zsum = zsum * rescale + tl.sum(tl.where(mask, e * z, 0.0), 0)
        mx = new
    e_z = tl.zeros([], DTYPE)
    if E_Z:
        e_z = zsum / total
    return mx, tl.log(total), e_z


@triton.jit
def _row_softmax(stats_ptr, inv_t):
    """A row's (max z, log_sum, 1/(sT)) from its statistics: q_v = exp((z_v - mx) inv - log_sum)."""
    return tl.load(stats_ptr), tl.load(stats_ptr + 1), inv_t / tl.load(stats_ptr + 2)


@triton.jit
def _chosen(idx_ptr, p_ptr, g_ptr, j0, K, BLOCK_K: tl.constexpr):
    """Chosen columns j0 .. j0 + BLOCK_K of a row: their indices (-1 past K) and p_j G_j (0 at
    index -1)."""
    js = j0 + tl.arange(0, BLOCK_K)
    jmask = js < K
    idx = tl.load(idx_ptr + js, mask=jmask, other=-1)
    pg = tl.load(p_ptr + js, mask=jmask, other=0.0) * tl.load(g_ptr + js, mask=jmask, other=0.0)
    return idx, tl.where(idx >= 0, pg, 0.0)


# ---------------------------------------------------------------- forward


@triton.jit
def _row_stats_kernel(z_ptr, len_ptr, stats_ptr, L, V, t_hi, t_lo, HAS_LEN: tl.constexpr,
                      STD_SCALE: tl.constexpr, DTYPE: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row per program: its statistics (rows past the length keep their zeros)."""
    r = tl.program_id(0).to(tl.int64)
    b = r // L
    length = _length(len_ptr, b, L, HAS_LEN)[0]
    if r % L < length:
        row = z_ptr + r * V
        scale = tl.full([], 1.0, DTYPE)
        mean = tl.zeros([], DTYPE)
        std = tl.zeros([], DTYPE)
        if STD_SCALE:
            mean, std = _mean_std(row, V, DTYPE, BLOCK_V)
            scale = std + 1e-4
        inv = _inv_temperature(t_hi, t_lo, DTYPE) / scale
        mx, log_sum, e_z = _online_softmax(row, V, inv, STD_SCALE, DTYPE, BLOCK_V)
        out = stats_ptr + r * _STATS
        tl.store(out, mx)
        tl.store(out + 1, log_sum)
        tl.store(out + 2, scale)
        tl.store(out + 3, mean)
        tl.store(out + 4, std)
        tl.store(out + 5, e_z)


@triton.jit
def _column_mass_kernel(z_ptr, len_ptr, stats_ptr, mass_ptr, L, V, t_hi, t_lo,
                        HAS_LEN: tl.constexpr, DTYPE: tl.constexpr, BLOCK_V: tl.constexpr):
    """One (sequence b, column chunk) per program: mass[b, v] = sum over valid rows i of q_iv."""
    b = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * BLOCK_V
    length = _length(len_ptr, b, L, HAS_LEN)[0]
    inv_t = _inv_temperature(t_hi, t_lo, DTYPE)
    mass = tl.zeros([BLOCK_V], DTYPE)
    for i in range(0, length):
        r = b * L + i
        mx, log_sum, inv = _row_softmax(stats_ptr + r * _STATS, inv_t)
        _, _, z = _chunk(z_ptr + r * V, c0, V, float("-inf"), DTYPE, BLOCK_V)
        mass += tl.exp((z - mx) * inv - log_sum)
    cols = c0 + tl.arange(0, BLOCK_V)
    tl.store(mass_ptr + b * V + cols, mass, mask=cols < V)


@triton.jit
def _gather_kernel(z_ptr, len_ptr, stats_ptr, idx_ptr, probs_ptr, L, V, K, idx_sb, idx_si,
                   t_hi, t_lo, HAS_LEN: tl.constexpr, DTYPE: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """One row per program: probs[j] = q at the chosen index j (0 at -1); rows past the length
    keep their zeros. Row (b, i)'s indices start at idx_ptr + b idx_sb + i idx_si."""
    r = tl.program_id(0).to(tl.int64)
    b = r // L
    i = r % L
    length = _length(len_ptr, b, L, HAS_LEN)[0]
    if i < length:
        mx, log_sum, inv = _row_softmax(stats_ptr + r * _STATS, _inv_temperature(t_hi, t_lo, DTYPE))
        for j0 in range(0, K, BLOCK_K):
            js = j0 + tl.arange(0, BLOCK_K)
            idx = tl.load(idx_ptr + b * idx_sb + i * idx_si + js, mask=js < K, other=-1)
            chosen = idx >= 0
            z = tl.load(z_ptr + r * V + idx, mask=chosen, other=0.0).to(DTYPE)
            p = tl.where(chosen, tl.exp((z - mx) * inv - log_sum), 0.0)
            tl.store(probs_ptr + r * K + js, p, mask=js < K)


# ---------------------------------------------------------------- backward


@triton.jit
def _backward_kernel(g_ptr, z_ptr, len_ptr, probs_ptr, idx_ptr, stats_ptr, out_ptr, L, V, K,
                     idx_sb, idx_si, t_hi, t_lo, HAS_LEN: tl.constexpr, STD_SCALE: tl.constexpr,
                     DTYPE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """One row per program: the logits' gradient in one pass over V (0 past the length)."""
    r = tl.program_id(0).to(tl.int64)
    b = r // L
    i = r % L
    length = _length(len_ptr, b, L, HAS_LEN)[0]
    row = z_ptr + r * V
    out = out_ptr + r * V
    if i >= length:
        for c0 in range(0, V, BLOCK_V):
            cols = c0 + tl.arange(0, BLOCK_V)
            tl.store(out + cols, tl.zeros([BLOCK_V], out_ptr.dtype.element_ty), mask=cols < V)
    else:
        idx_row = idx_ptr + b * idx_sb + i * idx_si
        p_row = probs_ptr + r * K
        g_row = g_ptr + r * K
        stats = stats_ptr + r * _STATS
        inv_t = _inv_temperature(t_hi, t_lo, DTYPE)
        mx, log_sum, inv = _row_softmax(stats, inv_t)
        # dot = sum_j p_j G_j and zdot = sum_j p_j G_j z_idx_j over the chosen columns
        dot = tl.zeros([], DTYPE)
        zdot = tl.zeros([], DTYPE)
        for j0 in range(0, K, BLOCK_K):
            idx, pg = _chosen(idx_row, p_row, g_row, j0, K, BLOCK_K)
            z = tl.load(row + idx, mask=idx >= 0, other=0.0).to(DTYPE)
            dot += tl.sum(pg, 0)
            zdot += tl.sum(pg * z, 0)
        # c = dloss/ds, spread over z through ds/dz_v = (z_v - mean) / ((V - 1) std)
        mean = tl.zeros([], DTYPE)
        std_coef = tl.zeros([], DTYPE)
        if STD_SCALE:
            scale = tl.load(stats + 2)
            mean = tl.load(stats + 3)
            std = tl.load(stats + 4)
            c = -(zdot - dot * tl.load(stats + 5)) * inv_t / (scale * scale)
            std_coef = tl.where(std > 0, c / ((V - 1) * tl.where(std > 0, std, 1.0)), 0.0)
        for c0 in range(0, V, BLOCK_V):
            cols, mask, z = _chunk(row, c0, V, 0.0, DTYPE, BLOCK_V)
            grad = -tl.exp((z - mx) * inv - log_sum) * dot * inv
            if STD_SCALE:  # (without, a -inf logit's gradient is 0, not 0 * -inf)
                grad += std_coef * (z - mean)
            for j0 in range(0, K, BLOCK_K):  # + p_j G_j / (sT) at the chosen columns in the chunk
                idx, pg = _chosen(idx_row, p_row, g_row, j0, K, BLOCK_K)
                if tl.max(((idx >= c0) & (idx < c0 + BLOCK_V)).to(tl.int32), 0) > 0:
                    hit = cols[:, None] == idx[None, :]
                    grad += tl.sum(tl.where(hit, pg[None, :], 0.0), 1) * inv
            tl.store(out + cols, grad.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launchers


def _block_v(block_v, V, default):
    """The column chunk: block_v if given (a power of 2), else min(default, next_pow2(V))."""
    if block_v is None:
        return min(default, triton.next_power_of_2(V))
    if not (isinstance(block_v, int) and block_v >= 1 and block_v & (block_v - 1) == 0):
        raise ValueError(f"topk_probs: block_v must be a power of 2, got {block_v!r}")
    return block_v


def _index_strides(ranking, L, k):
    """(per sequence, per row) strides of the indices: row (b, i) reads indices[b, i], [b] or []."""
    return {"token": (L * k, k), "sequence": (k, 0), "batch": (0, 0)}[ranking]


def _common(logits, lengths, temperature):
    """Kernel arguments shared by every launch."""
    t_hi, t_lo = _split(temperature)
    dtype = tl.float64 if logits.dtype == torch.float64 else tl.float32
    return dict(t_hi=t_hi, t_lo=t_lo, HAS_LEN=lengths is not None, DTYPE=dtype)


def topk_probs_forward(logits, lengths, k, temperature, std_scale, ranking, *, block_v=None):
    """``mlot::topk_probs_forward`` with the Triton kernels: (probs, indices, row_stats)."""
    B, L, V = logits.shape
    compute = _compute_dtype(logits.dtype)
    z = logits.contiguous()
    lengths = None if lengths is None else lengths.contiguous()
    len_arg = z if lengths is None else lengths  # an unused pointer stands in for no lengths
    common = _common(z, lengths, temperature)
    probs = torch.zeros(B, L, k, dtype=compute, device=z.device)
    stats = torch.zeros(B, L, ROW_STATS, dtype=compute, device=z.device)

    _row_stats_kernel[(B * L,)](z, len_arg, stats, L, V, STD_SCALE=std_scale,
                                BLOCK_V=_block_v(block_v, V, BLOCK_V), **common)

    kk = min(k, V)
    if ranking == "token":
        indices = torch.topk(z, kk, dim=-1).indices
        if lengths is not None:  # rows past the lengths choose nothing
            past = torch.arange(L, device=z.device)[None, :] >= lengths.clamp(0, L)[:, None]
            indices.masked_fill_(past[..., None], -1)
    else:
        mass = torch.zeros(B, V, dtype=compute, device=z.device)
        block = _block_v(block_v, V, SHORT_BLOCK_V)
        _column_mass_kernel[(B, triton.cdiv(V, block))](z, len_arg, stats, mass, L, V,
                                                        BLOCK_V=block, **common)
        indices = torch.topk(mass.sum(0) if ranking == "batch" else mass, kk, dim=-1).indices
    indices = F.pad(indices, (0, k - kk), value=-1).contiguous()

    _gather_kernel[(B * L,)](z, len_arg, stats, indices, probs, L, V, k,
                             *_index_strides(ranking, L, k), BLOCK_K=BLOCK_K, **common)
    if lengths is not None:  # out-of-range lengths: NaN, found on the device
        probs.masked_fill_(((lengths < 0) | (lengths > L))[:, None, None], float("nan"))
    return probs, indices, stats


def topk_probs_backward(grad_probs, logits, lengths, probs, indices, row_stats, temperature,
                        std_scale, ranking, *, block_v=None):
    """``mlot::topk_probs_backward`` with the Triton kernels: the logits' gradient."""
    B, L, V = logits.shape
    k = probs.shape[2]
    compute = _compute_dtype(logits.dtype)
    if grad_probs.shape != probs.shape or row_stats.shape != (B, L, ROW_STATS):
        raise RuntimeError("topk_probs_backward: grad_probs, probs and row_stats must have the "
                           "shapes topk_probs_forward gives for these logits")
    z = logits.contiguous()
    lengths = None if lengths is None else lengths.contiguous()
    grad = torch.empty_like(z)
    _backward_kernel[(B * L,)](
        grad_probs.to(compute).contiguous(), z, z if lengths is None else lengths,
        probs.contiguous(), indices.contiguous(), row_stats.contiguous(), grad, L, V, k,
        *_index_strides(ranking, L, k), STD_SCALE=std_scale,
        BLOCK_V=_block_v(block_v, V, SHORT_BLOCK_V), BLOCK_K=BLOCK_K,
        **_common(z, lengths, temperature))
    return grad


# ---------------------------------------------------------------- autograd and registration


class _TopkProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, lengths, k, temperature, std_scale, ranking, block_v):
        probs, indices, row_stats = topk_probs_forward(logits, lengths, k, temperature, std_scale,
                                                       ranking, block_v=block_v)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(logits, lengths, probs, indices, row_stats)
        ctx.options = (temperature, std_scale, ranking)
        ctx.block_v = block_v
        return probs, indices

    @staticmethod
    def backward(ctx, grad_probs, _grad_indices):
        logits, lengths, probs, indices, row_stats = ctx.saved_tensors
        grad = topk_probs_backward(grad_probs, logits, lengths, probs, indices, row_stats,
                                   *ctx.options, block_v=ctx.block_v)
        return grad, *([None] * 6)


def topk_probs(logits, lengths=None, k=50, temperature=1.0, std_scale=False, ranking="sequence",
               *, block_v=None):
    """``topk_probs`` through the Triton kernels, on the tensors' device, with autograd.

    Same arguments and result as :func:`mlot_kernels.topk_probs`. ``block_v`` (a power of 2)
    forces the column chunk of every kernel; by default 1024 for the row statistics, 256 for
    the column mass and the backward.
    """
    # The op's own argument checks (shapes, dtypes, options), run on meta tensors.
    torch.ops.mlot.topk_probs(logits.to("meta"), None if lengths is None else lengths.to("meta"),
                              k, temperature, std_scale, ranking)
    return _TopkProbs.apply(logits, lengths, k, temperature, std_scale, ranking, block_v)


torch.library.register_kernel("mlot::topk_probs_forward", "cuda", topk_probs_forward)
torch.library.register_kernel("mlot::topk_probs_backward", "cuda", topk_probs_backward)
