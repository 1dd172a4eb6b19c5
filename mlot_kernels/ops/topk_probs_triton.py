r"""Triton kernels of ``topk_probs``: the CUDA implementation of ``torch.ops.mlot``.

Same contract as the ops (math in :mod:`mlot_kernels.ops.topk_probs`; every number as the CPU
kernels of ``csrc/topk_probs_cpu.cpp`` compute it). ``logits`` [B, L, V]; the answer rows of
sequence ``b`` are ``rows[b, i]``, ``i < lengths[b]`` (no rows: every row, A = L); a row with
``targets[b, l] != -100`` is a cross-entropy row; the other rows are never read. For each answer
row ``z`` and each of the one or two temperatures ``T_t``, with ``s = std(z, unbiased) + 1e-4``
under ``std_scale`` (else 1),

.. math::

    q^t_v = \exp\big((z_v - \max z)/(sT_t) - \mathrm{log\_sum}_t\big), \qquad
    \mathrm{log\_sum}_t = \log \textstyle\sum_v \exp\big((z_v - \max z)/(sT_t)\big),

``probs[t, b, i, j] = q^t_{b,i}[indices^t_j]`` for the top-k columns of each row (``token``), of
each sequence's column mass :math:`\sum_i q^t_i` (``sequence``) or of the batch's (``batch``),
and ``ce[b, l] = log_sum_ce + max z - z_y`` for each cross-entropy row (raw logits).

The [B, L, V] probabilities are never stored. The forward is four steps, the first two
streaming V in column chunks:

1. row statistics, one program per logits row (the rows not read exit at once), every softmax
   of the row in the same pass: with ``std_scale`` a first pass for ``max z``, the mean and the
   unbiased std (each chunk's mean and sum of squared deviations, merged with Chan's formula),
   then one pass for the sums of exps at that max and :math:`E_{q^t}[z]`; without, one online
   pass (the running sums rescaled whenever the running max grows). The cross-entropy's sum of
   exps is that of a temperature equal to 1 when there is no std scaling, else its own. They
   are kept in ``row_stats`` [B, L, 5 + 2 n_t] with the CPU kernels' layout: max z, s, mean,
   std, log_sum_ce, then (log_sum_t, E_{q^t}[z]) per temperature; the columns a row does not
   need stay 0 (mean, std and the E columns without std scaling, mean and std and the
   temperatures' columns of a cross-entropy-only row, log_sum_ce of a row without a target);
2. for ``sequence``/``batch`` ranking, the column mass ``mass[t, b, v] = sum_i q^t_iv``, one
   program per (sequence, column chunk) looping over the sequence's answer rows, both
   temperatures from one load of the chunk (``batch``: ``mass.sum(1)``);
3. the order: ``torch.topk`` of the answer rows' logits (``token``: a row's ``q`` has its
   logits' order since ``sT > 0``; the same for every temperature; with ``rows``, of a
   gathered copy [B, A, V] of the answer rows; without, of every row in place, the choice of
   the rows past the lengths discarded) or of the mass, ``min(k, V)`` columns padded with -1;
4. the gather of the k chosen ``q`` of every temperature, one program per answer slot (b, i).

The backward, with ``G^t = dloss/dprobs[t]``, ``dot_t = sum_j p_j G_j`` and ``g = dloss/dce``,
writes each row's gradient in one pass over V, one program per logits row:

.. math::

    \partial_{z_v} = \sum_t \Big(-\frac{q^t_v\,\mathrm{dot}_t}{sT_t}
        + \frac{p_j G_j}{sT_t}[v = \mathrm{idx}^t_j]\Big)
        + c\,\frac{z_v - \bar z}{(V - 1)\,\mathrm{std}}
        + g\big(\mathrm{softmax}(z)_v - [v = y]\big), \qquad
    c = -\sum_t \frac{\sum_j p_j G_j z_{\mathrm{idx}^t_j} - \mathrm{dot}_t\,E_{q^t}[z]}{T_t s^2}

(the ``c`` term only with ``std_scale`` and std > 0); the chosen columns' part is added in the
chunk that holds them (each chunk is compared with ``BLOCK_K`` chosen columns at a time), so each
element is written once. The rows not read get 0.

Arithmetic is float32 for float16/bfloat16/float32 logits (cast at load), float64 for float64;
the gradient comes back in the logits' dtype, a fresh contiguous [B, L, V] tensor. The logits
are read in place with any strides for B and L (a view such as ``logits[:, :-1]`` is not
copied) when their stride along V is 1.

The launchers never synchronise with the device, so the data the CPU kernels reject with an
error is not checked on the host. The row map (logits row -> answer slot) is built on the device
(a ``scatter_`` into B L + 1 entries, the last one a sink for the slots that are not read), and:

- lengths outside ``[0, A]`` (clamped into range), rows outside ``[0, L)`` within a sequence's
  valid prefix (not read), or the same row twice in a valid prefix make that sequence's
  ``probs`` NaN (``topk_probs_stats``: its ``mass``), leaving the other sequences alone; the
  gradient of such a sequence is not meaningful;
- a target outside ``[0, V)`` other than -100 makes that row's ``ce`` NaN (its ``z_y`` is not
  read; the other rows are left alone).

On CPU tensors the same kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` set
before ``mlot_kernels`` is imported): that is how CI checks them.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from mlot_kernels.ops.sinkhorn import _compute_dtype
from mlot_kernels.ops.topk_probs import (BASE_STATS, MAX_TEMPERATURES, AnswerProbs, _indices_shape,
                                     stats_size)
from mlot_kernels.ops.sinkhorn_triton import _length, _split

# Columns per chunk of the row statistics: their reductions along V favour long chunks. Their
# sums of exps are kept per column of the chunk (up to five of them), so float64 logits get
# chunks half as long: at 1024 that kernel takes 241 registers a thread on sm_90.
BLOCK_V = 1024
# Columns per chunk of the column mass (one program per (sequence, chunk): short chunks give
# more programs) and of the backward, which compares each chunk with BLOCK_K chosen columns at
# once: a [256, 8] tile takes 72 registers a thread on sm_90 ([256, 16]: 128).
SHORT_BLOCK_V = 256
# Chosen columns handled at once by the gather and the backward.
BLOCK_K = 8
IGNORE = -100  # the target of a row without cross-entropy

# row_stats columns: max z, s, mean, std, log_sum_ce, then (log_sum_t, E_{q^t}[z]) per temperature
_BASE = tl.constexpr(BASE_STATS)
_IGNORE = tl.constexpr(IGNORE)


# ---------------------------------------------------------------- row helpers
#
# Under the Triton interpreter every call of a @triton.jit function (a helper, and tl.sum,
# tl.max and tl.zeros too) patches triton.language anew, about a millisecond: the kernels inline
# what runs per chunk or per block of chosen columns (the row pointer, the chunk load, the
# chosen columns), call helpers at most once per program, accumulate per column and reduce
# after the loop, and build constants with tl.full.


@triton.jit
def _max_mean_std(row_ptr, V, DTYPE: tl.constexpr, BLOCK_V: tl.constexpr):
    """max z, mean and unbiased std of a row in one pass: each chunk's mean and sum of squared
    deviations, merged with Chan's formula (no cancellation, unlike sum z^2 - V mean^2)."""
    mx = tl.full([], float("-inf"), DTYPE)
    count = tl.full([], 0, DTYPE)
    mean = tl.full([], 0, DTYPE)
    m2 = tl.full([], 0, DTYPE)
    for c0 in range(0, V, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(DTYPE)
        mx = tl.maximum(mx, tl.max(tl.where(mask, z, float("-inf")), 0))
        n = tl.minimum(V - c0, BLOCK_V).to(DTYPE)
        chunk_mean = tl.sum(z, 0) / n
        d = tl.where(mask, z - chunk_mean, 0.0)
        delta = chunk_mean - mean
        total = count + n
        mean += delta * n / total
        m2 += tl.sum(d * d, 0) + delta * delta * count * n / total
        count = total
    return mx, mean, tl.sqrt(m2 / (V - 1))


# ---------------------------------------------------------------- forward
#
# Common arguments: z_ptr the logits (row b L + l at z_ptr + b stride_b + l stride_l, unit stride
# along V), 1/T_t as float32 pairs inv{t}_hi + inv{t}_lo (float64 to ~1e-14; the second is 1 with
# one temperature), N_T the number of temperatures, DTYPE the arithmetic type.


@triton.jit
def _row_stats_kernel(z_ptr, slot_ptr, tgt_ptr, stats_ptr, ce_ptr, L, V, stride_b, stride_l,
                      inv0_hi, inv0_lo, inv1_hi, inv1_lo, HAS_TGT: tl.constexpr,
                      N_T: tl.constexpr, STD_SCALE: tl.constexpr, CE_SHARES: tl.constexpr,
                      DTYPE: tl.constexpr, BLOCK_V: tl.constexpr):
    """One logits row per program: its statistics, and its cross-entropy when it has a target
    (rows neither answer nor cross-entropy rows exit; their statistics keep their zeros).
    slot_ptr: [B L] answer slot of each row (-1: none); CE_SHARES: the temperature whose sum of
    exps is the cross-entropy's (1.0 without std scaling), or -1."""
    r = tl.program_id(0).to(tl.int64)
    answer = tl.load(slot_ptr + r) >= 0
    y = tl.full([], _IGNORE, tl.int64)
    if HAS_TGT:
        y = tl.load(tgt_ptr + r).to(tl.int64)
    ce = y != _IGNORE
    if answer | ce:
        row = z_ptr + (r // L) * stride_b + (r % L) * stride_l
        # Pass 1 (std scaling): max z, mean and std.
        mx = tl.full([], float("-inf"), DTYPE)
        scale = tl.full([], 1.0, DTYPE)
        mean = tl.full([], 0, DTYPE)
        std = tl.full([], 0, DTYPE)
        if STD_SCALE:
            mx, mean, std = _max_mean_std(row, V, DTYPE, BLOCK_V)
            scale = tl.where(answer, std + 1e-4, 1.0)
        f0 = (tl.cast(inv0_hi, DTYPE) + tl.cast(inv0_lo, DTYPE)) / scale
        f1 = (tl.cast(inv1_hi, DTYPE) + tl.cast(inv1_lo, DTYPE)) / scale
        own_ce = ce
        if CE_SHARES >= 0:
            own_ce = ce & (answer == 0)
        # The sums of exps of every softmax of the row in one pass: at the max of pass 1 with
        # std scaling (and the sums of exp(...) z for E_q[z]); else online, the sums so far
        # rescaled by exp((old max - new max) f) whenever the running max grows. Per column of
        # the chunk, reduced once after the pass.
        s0 = tl.full([BLOCK_V], 0, DTYPE)
        e0 = tl.full([BLOCK_V], 0, DTYPE)
        s1 = tl.full([BLOCK_V], 0, DTYPE)
        e1 = tl.full([BLOCK_V], 0, DTYPE)
        s_ce = tl.full([BLOCK_V], 0, DTYPE)
        at = tl.where(mx == float("-inf"), 0.0, mx)  # the max the exps are taken at
        for c0 in range(0, V, BLOCK_V):
            cols = c0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = tl.load(row + cols, mask=mask, other=float("-inf")).to(DTYPE)
            old = mx
            if not STD_SCALE:
                mx = tl.maximum(mx, tl.max(z, 0))
                at = tl.where(mx == float("-inf"), 0.0, mx)  # only -inf so far: weights 0
            if answer:
                x0 = tl.exp((z - at) * f0)
                if STD_SCALE:
                    s0 += x0
                    e0 += x0 * tl.where(mask, z, 0.0)
                else:
                    s0 = s0 * tl.exp((old - at) * f0) + x0
                if N_T == 2:
                    x1 = tl.exp((z - at) * f1)
                    if STD_SCALE:
                        s1 += x1
                        e1 += x1 * tl.where(mask, z, 0.0)
                    else:
                        s1 = s1 * tl.exp((old - at) * f1) + x1
            if HAS_TGT:
                if own_ce:
                    x = tl.exp(z - at)
                    if STD_SCALE:
                        s_ce += x
                    else:
                        s_ce = s_ce * tl.exp(old - at) + x
        out = stats_ptr + r * (_BASE + 2 * N_T)
        tl.store(out, mx)
        tl.store(out + 1, scale)
        sum0 = tl.sum(s0, 0)
        log_sum0 = tl.log(sum0)
        log_sum1 = tl.full([], 0, DTYPE)
        if answer:
            if STD_SCALE:
                tl.store(out + 2, mean)
                tl.store(out + 3, std)
                tl.store(out + _BASE + 1, tl.sum(e0, 0) / sum0)
            tl.store(out + _BASE, log_sum0)
            if N_T == 2:
                sum1 = tl.sum(s1, 0)
                log_sum1 = tl.log(sum1)
                tl.store(out + _BASE + 2, log_sum1)
                if STD_SCALE:
                    tl.store(out + _BASE + 3, tl.sum(e1, 0) / sum1)
        if HAS_TGT:
            if ce:
                log_sum_ce = tl.log(tl.sum(s_ce, 0))
                if CE_SHARES == 0:
                    log_sum_ce = tl.where(own_ce, log_sum_ce, log_sum0)
                if CE_SHARES == 1:
                    log_sum_ce = tl.where(own_ce, log_sum_ce, log_sum1)
                tl.store(out + 4, log_sum_ce)
                y_ok = (y >= 0) & (y < V)  # else NaN, found on the device
                z_y = tl.load(row + y, mask=y_ok, other=0.0).to(DTYPE)
                tl.store(ce_ptr + r, tl.where(y_ok, log_sum_ce + mx - z_y, float("nan")))


@triton.jit
def _column_mass_kernel(z_ptr, ans_ptr, len_ptr, stats_ptr, mass_ptr, B, L, A, V, stride_b,
                        stride_l, inv0_hi, inv0_lo, inv1_hi, inv1_lo, HAS_LEN: tl.constexpr,
                        N_T: tl.constexpr, DTYPE: tl.constexpr, BLOCK_V: tl.constexpr):
    """One (sequence b, column chunk) per program: mass[t, b, v] = sum over the answer rows of
    q^t_v, every temperature from one load of the chunk. ans_ptr: [B, A] logits rows of the
    answer slots (-1: not read)."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    length = _length(len_ptr, b, A, HAS_LEN)[0]
    inv_t0 = tl.cast(inv0_hi, DTYPE) + tl.cast(inv0_lo, DTYPE)
    inv_t1 = tl.cast(inv1_hi, DTYPE) + tl.cast(inv1_lo, DTYPE)
    mass0 = tl.full([BLOCK_V], 0, DTYPE)
    mass1 = tl.full([BLOCK_V], 0, DTYPE)
    for i in range(0, length):
        r = tl.load(ans_ptr + b * A + i)
        if r >= 0:
            stats = stats_ptr + r * (_BASE + 2 * N_T)
            mx = tl.load(stats)
            scale = tl.load(stats + 1)
            row = z_ptr + (r // L) * stride_b + (r % L) * stride_l
            z = tl.load(row + cols, mask=mask, other=float("-inf")).to(DTYPE)
            mass0 += tl.exp((z - mx) * (inv_t0 / scale) - tl.load(stats + _BASE))
            if N_T == 2:
                mass1 += tl.exp((z - mx) * (inv_t1 / scale) - tl.load(stats + _BASE + 2))
    tl.store(mass_ptr + b * V + cols, mass0, mask=mask)
    if N_T == 2:
        tl.store(mass_ptr + (B + b) * V + cols, mass1, mask=mask)


@triton.jit
def _gather_kernel(z_ptr, ans_ptr, stats_ptr, idx_ptr, probs_ptr, B, L, A, K, stride_b,
                   stride_l, idx_st, idx_sb, idx_si, inv0_hi, inv0_lo, inv1_hi, inv1_lo,
                   N_T: tl.constexpr, DTYPE: tl.constexpr, BLOCK_K: tl.constexpr):
    """One answer slot (b, i) per program: probs[t, b, i, j] = q^t at the chosen index j (0 at
    -1); slots not read keep their zeros. Slot (b, i)'s indices of temperature t start at
    idx_ptr + t idx_st + b idx_sb + i idx_si."""
    s = tl.program_id(0).to(tl.int64)
    b = s // A
    i = s % A
    r = tl.load(ans_ptr + s)
    if r >= 0:
        row = z_ptr + (r // L) * stride_b + (r % L) * stride_l
        stats = stats_ptr + r * (_BASE + 2 * N_T)
        mx = tl.load(stats)
        scale = tl.load(stats + 1)
        for t in tl.static_range(N_T):
            if t == 0:
                inv = (tl.cast(inv0_hi, DTYPE) + tl.cast(inv0_lo, DTYPE)) / scale
            else:
                inv = (tl.cast(inv1_hi, DTYPE) + tl.cast(inv1_lo, DTYPE)) / scale
            log_sum = tl.load(stats + _BASE + 2 * t)
            for j0 in range(0, K, BLOCK_K):
                js = j0 + tl.arange(0, BLOCK_K)
                idx = tl.load(idx_ptr + t * idx_st + b * idx_sb + i * idx_si + js, mask=js < K,
                              other=-1)
                chosen = idx >= 0
                z = tl.load(row + idx, mask=chosen, other=0.0).to(DTYPE)
                p = tl.where(chosen, tl.exp((z - mx) * inv - log_sum), 0.0)
                tl.store(probs_ptr + (t * B * A + s) * K + js, p, mask=js < K)


# ---------------------------------------------------------------- backward


@triton.jit
def _backward_kernel(g_ptr, gce_ptr, z_ptr, slot_ptr, tgt_ptr, probs_ptr, idx_ptr, stats_ptr,
                     out_ptr, B, L, A, V, K, stride_b, stride_l, idx_st, idx_sb, idx_si, inv0_hi,
                     inv0_lo, inv1_hi, inv1_lo, HAS_G: tl.constexpr, HAS_CE: tl.constexpr,
                     N_T: tl.constexpr, STD_SCALE: tl.constexpr, DTYPE: tl.constexpr,
                     BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """One logits row per program: its gradient in one pass over V (0 in the rows not read).
    HAS_G: grad_probs given; HAS_CE: grad_ce and the targets given. The chosen columns of each
    temperature are compared with each chunk BLOCK_K at a time."""
    r = tl.program_id(0).to(tl.int64)
    b = r // L
    i = tl.load(slot_ptr + r)  # the row's answer slot, or -1
    y = tl.full([], _IGNORE, tl.int64)
    if HAS_CE:
        y = tl.load(tgt_ptr + r).to(tl.int64)
    out = out_ptr + r * V
    if (i < 0) & (y == _IGNORE):
        for c0 in range(0, V, BLOCK_V):
            cols = c0 + tl.arange(0, BLOCK_V)
            tl.store(out + cols, tl.full([BLOCK_V], 0, out_ptr.dtype.element_ty), mask=cols < V)
    else:
        row = z_ptr + b * stride_b + (r % L) * stride_l
        stats = stats_ptr + r * (_BASE + 2 * N_T)
        mx = tl.load(stats)
        scale = tl.load(stats + 1)
        inv_t0 = tl.cast(inv0_hi, DTYPE) + tl.cast(inv0_lo, DTYPE)
        inv_t1 = tl.cast(inv1_hi, DTYPE) + tl.cast(inv1_lo, DTYPE)
        f0 = inv_t0 / scale
        f1 = inv_t1 / scale
        log_sum0 = tl.load(stats + _BASE)
        log_sum1 = tl.full([], 0, DTYPE)
        if N_T == 2:
            log_sum1 = tl.load(stats + _BASE + 2)
        # Slot (b, i)'s chosen columns of temperature t start at idx_row + t idx_st, its probs
        # and grad_probs at p_row, g_row + t B A K (an answer row, i >= 0, only).
        idx_row = idx_ptr + b * idx_sb + i * idx_si
        p_row = probs_ptr + (b * A + i) * K
        g_row = g_ptr + (b * A + i) * K
        # dot_t = sum_j p_j G_j, zdot_t = sum_j p_j G_j z_idx_j over the chosen columns
        dot0 = tl.full([], 0, DTYPE)
        zdot0 = tl.full([], 0, DTYPE)
        dot1 = tl.full([], 0, DTYPE)
        zdot1 = tl.full([], 0, DTYPE)
        if HAS_G:
            if i >= 0:
                for t in tl.static_range(N_T):
                    dot = tl.full([BLOCK_K], 0, DTYPE)  # per column of the block, reduced after
                    zdot = tl.full([BLOCK_K], 0, DTYPE)
                    for j0 in range(0, K, BLOCK_K):
                        js = j0 + tl.arange(0, BLOCK_K)
                        jmask = js < K
                        idx = tl.load(idx_row + t * idx_st + js, mask=jmask, other=-1)
                        pg = (tl.load(p_row + t * B * A * K + js, mask=jmask, other=0.0) *
                              tl.load(g_row + t * B * A * K + js, mask=jmask, other=0.0))
                        pg = tl.where(idx >= 0, pg, 0.0)
                        z = tl.load(row + idx, mask=idx >= 0, other=0.0).to(DTYPE)
                        dot += pg
                        zdot += pg * z
                    if t == 0:
                        dot0 = tl.sum(dot, 0)
                        zdot0 = tl.sum(zdot, 0)
                    else:
                        dot1 = tl.sum(dot, 0)
                        zdot1 = tl.sum(zdot, 0)
        # c = dloss/ds, spread over z through ds/dz_v = (z_v - mean) / ((V - 1) std)
        mean = tl.full([], 0, DTYPE)
        std_coef = tl.full([], 0, DTYPE)
        if STD_SCALE:
            mean = tl.load(stats + 2)
            std = tl.load(stats + 3)
            c = -(zdot0 - dot0 * tl.load(stats + _BASE + 1)) * inv_t0 / (scale * scale)
            if N_T == 2:
                c -= (zdot1 - dot1 * tl.load(stats + _BASE + 3)) * inv_t1 / (scale * scale)
            std_coef = tl.where(std > 0, c / ((V - 1) * tl.where(std > 0, std, 1.0)), 0.0)
        g_ce = tl.full([], 0, DTYPE)
        log_sum_ce = tl.full([], 0, DTYPE)
        if HAS_CE:
            if y != _IGNORE:
                g_ce = tl.load(gce_ptr + r)
                log_sum_ce = tl.load(stats + 4)
        for c0 in range(0, V, BLOCK_V):
            cols = c0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = tl.load(row + cols, mask=mask, other=0.0).to(DTYPE)
            grad = tl.full([BLOCK_V], 0, DTYPE)
            if dot0 != 0:  # exp(...) <= 1: skipping 0 * exp is exact
                grad -= tl.exp((z - mx) * f0 - log_sum0) * (dot0 * f0)
            if N_T == 2:
                if dot1 != 0:
                    grad -= tl.exp((z - mx) * f1 - log_sum1) * (dot1 * f1)
            if STD_SCALE:
                if std_coef != 0:  # (without, a -inf logit's gradient is 0, not 0 * -inf)
                    grad += std_coef * (z - mean)
            if HAS_CE:
                if g_ce != 0:
                    grad += g_ce * tl.exp(z - mx - log_sum_ce) - tl.where(cols == y, g_ce, 0.0)
            if HAS_G:
                if i >= 0:  # + p_j G_j / (sT_t) at the chosen columns in the chunk
                    for t in tl.static_range(N_T):
                        f = f0
                        if t == 1:
                            f = f1
                        for j0 in range(0, K, BLOCK_K):
                            js = j0 + tl.arange(0, BLOCK_K)
                            jmask = js < K
                            idx = tl.load(idx_row + t * idx_st + js, mask=jmask, other=-1)
                            if tl.max(((idx >= c0) & (idx < c0 + BLOCK_V)).to(tl.int32), 0) > 0:
                                pg = (tl.load(p_row + t * B * A * K + js, mask=jmask, other=0.0) *
                                      tl.load(g_row + t * B * A * K + js, mask=jmask, other=0.0))
                                hit = cols[:, None] == idx[None, :]
                                grad += tl.sum(tl.where(hit, pg[None, :], 0.0), 1) * f
            tl.store(out + cols, grad.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- argument checks


def _integer(t):
    return not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool


def _shape(t):
    return list(t.shape)


def _check_args(logits, rows, lengths, targets, k, temperatures, std_scale, ranking):
    """The checks of check_topk_rows_args (csrc/ops.cpp), with its messages: everything that does
    not need tensor data."""
    def require(ok, message):
        if not ok:
            raise RuntimeError("topk_probs: " + message)

    require(logits.dim() == 3, f"logits must be a 3-D tensor [B, L, V], got {logits.dim()}-D "
                               f"with shape {_shape(logits)}")
    require(logits.shape[2] >= 1, f"logits must have V >= 1 columns, got shape {_shape(logits)}")
    require(logits.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64),
            f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    B, L = logits.shape[:2]
    if rows is not None:
        require(rows.dim() == 2 and rows.shape[0] == B,
                f"rows must have shape [B, A] with B = {B}, got shape {_shape(rows)}")
        require(_integer(rows), f"rows must have an integer dtype, got {rows.dtype}")
        require(rows.device == logits.device, f"rows must be on the same device as logits "
                                              f"({logits.device}), got {rows.device}")
    if lengths is not None:
        require(lengths.dim() == 1 and lengths.shape[0] == B,
                f"lengths must have shape [B] = [{B}], got shape {_shape(lengths)}")
        require(_integer(lengths), f"lengths must have an integer dtype, got {lengths.dtype}")
        require(lengths.device == logits.device, f"lengths must be on the same device as logits "
                                                 f"({logits.device}), got {lengths.device}")
    if targets is not None:
        require(targets.dim() == 2 and tuple(targets.shape) == (B, L),
                f"targets must have shape [B, L] = [{B}, {L}], got shape {_shape(targets)}")
        require(_integer(targets), f"targets must have an integer dtype, got {targets.dtype}")
        require(targets.device == logits.device, f"targets must be on the same device as logits "
                                                 f"({logits.device}), got {targets.device}")
    require(k >= 1, f"k must be >= 1, got {k}")
    require(1 <= len(temperatures) <= MAX_TEMPERATURES,
            f"temperatures must hold 1 to {MAX_TEMPERATURES} temperatures, got {len(temperatures)}")
    for t, value in enumerate(temperatures):
        name = "temperature" if len(temperatures) == 1 else f"temperatures[{t}]"
        require(value > 0 and value != float("inf"), f"{name} must be a finite number > 0, got "
                                                    f"{value:g}")
    require(not std_scale or logits.shape[2] >= 2,
            "std_scale needs V >= 2 columns (the unbiased std of one value is undefined), got "
            f"logits of shape {_shape(logits)}")
    require(ranking in ("token", "sequence", "batch"),
            f"ranking must be 'token', 'sequence' or 'batch', got '{ranking}'")


def _check_backward_args(grad_probs, grad_ce, logits, rows, targets, probs, indices, row_stats,
                         temperatures, ranking):
    """The checks of check_topk_backward_args (csrc/ops.cpp), with its messages; and the shape of
    the indices (which the kernel reads with the ranking's layout)."""
    if ranking not in ("token", "sequence", "batch"):
        raise RuntimeError("topk_probs: ranking must be 'token', 'sequence' or 'batch', got "
                           f"'{ranking}'")
    B, L = logits.shape[:2]
    A = L if rows is None else rows.shape[1]
    dtype = _compute_dtype(logits.dtype)
    n_t = len(temperatures)
    if not (probs.dim() == 4 and tuple(probs.shape[:3]) == (n_t, B, A) and probs.dtype == dtype
            and tuple(row_stats.shape) == (B, L, stats_size(n_t)) and row_stats.dtype == dtype
            and indices.dtype == torch.int64 and tuple(indices.shape) == _indices_shape(
                n_t, B, A, probs.shape[3], ranking)):
        raise RuntimeError("topk_probs_backward: probs, indices and row_stats must be those "
                           "topk_probs_forward gives for these logits, rows and temperatures")
    if grad_probs is not None and grad_probs.shape != probs.shape:
        raise RuntimeError(f"topk_probs_backward: grad_probs must have the shape of probs "
                           f"{_shape(probs)}, got {_shape(grad_probs)}")
    if grad_ce is not None and (targets is None or tuple(grad_ce.shape) != (B, L)):
        raise RuntimeError(f"topk_probs_backward: grad_ce needs targets and must have shape "
                           f"[B, L] = [{B}, {L}]")


# ---------------------------------------------------------------- launchers


def _block_v(block_v, V, default):
    """The column chunk: block_v if given (a power of 2), else min(default, next_pow2(V))."""
    if block_v is None:
        return min(default, triton.next_power_of_2(V))
    if not (isinstance(block_v, int) and block_v >= 1 and block_v & (block_v - 1) == 0):
        raise ValueError(f"topk_probs: block_v must be a power of 2, got {block_v!r}")
    return block_v


def _logits(logits):
    """The logits with unit stride along V: themselves when they have it (any strides for B and
    L), else a contiguous copy."""
    return logits if logits.stride(2) == 1 or logits.shape[2] == 1 else logits.contiguous()


def _index_strides(ranking, B, A, k):
    """(per temperature, per sequence, per slot) strides of the indices: slot (b, i) of
    temperature t reads indices[t, b, i], [t, b] or [t]."""
    return {"token": (B * A * k, A * k, k), "sequence": (B * k, k, 0), "batch": (k, 0, 0)}[ranking]


def _options(logits, temperatures):
    """Kernel arguments shared by every launch: the inverse temperatures (the second one 1 when
    there is one temperature) as float32 pairs, their number and the arithmetic dtype."""
    inverses = [1.0 / float(t) for t in temperatures]
    inv0_hi, inv0_lo = _split(inverses[0])
    inv1_hi, inv1_lo = _split(inverses[1] if len(inverses) > 1 else 1.0)
    dtype = tl.float64 if logits.dtype == torch.float64 else tl.float32
    return dict(inv0_hi=inv0_hi, inv0_lo=inv0_lo, inv1_hi=inv1_hi, inv1_lo=inv1_lo,
                N_T=len(temperatures), DTYPE=dtype)


def _ce_shares(temperatures, std_scale):
    """The temperature whose sum of exps the cross-entropy shares (1.0, no std scaling), or -1."""
    if not std_scale:
        for t, value in enumerate(temperatures):
            if float(value) == 1.0:
                return t
    return -1


class _RowMap:
    """Which logits rows take part, built on the device with no synchronisation.

    answer [B, A]: the flat logits row b L + rows[b, i] of each answer slot, -1 where the slot
    is not read (past the length, or a row outside [0, L)); slot [B L + 1]: the answer slot i of
    each logits row, -1 for the others (the last entry is the sink of the slots not read);
    bad [B]: the sequences whose data the CPU kernels reject (their probs become NaN);
    lengths: int64 or None; targets: [B, L] int64 or None."""

    def __init__(self, logits, rows, lengths, targets):
        B, L, _ = logits.shape
        device = logits.device
        A = L if rows is None else rows.shape[1]
        self.A = A
        slots = torch.arange(A, device=device).expand(B, A)
        self.lengths = None if lengths is None else lengths.to(torch.int64).contiguous()
        valid = (torch.ones(B, A, dtype=torch.bool, device=device) if lengths is None
                 else slots < self.lengths[:, None])
        if rows is None:
            pos = slots
            read = valid
        else:
            pos = rows.to(torch.int64)
            read = valid & (pos >= 0) & (pos < L)
        flat = torch.arange(B, device=device)[:, None] * L + pos
        self.answer = torch.where(read, flat, -1).contiguous()
        sink = torch.where(read, flat, B * L).reshape(-1)
        self.slot = torch.full((B * L + 1,), -1, dtype=torch.int64, device=device)
        self.slot.scatter_(0, sink, slots.reshape(-1))
        bad = torch.zeros(B, dtype=torch.bool, device=device)
        if lengths is not None:
            bad |= (self.lengths < 0) | (self.lengths > A)
        if rows is not None:
            counts = torch.zeros(B * L + 1, dtype=torch.int64, device=device)
            counts.scatter_add_(0, sink, torch.ones_like(sink))
            bad |= (valid & ~read).any(1) | (counts[:-1].view(B, L) > 1).any(1)
        self.bad = bad
        self.targets = None if targets is None else targets.to(torch.int64).contiguous()


def _stats(z, m, temperatures, std_scale, block_v):
    """row_stats [B, L, 5 + 2 n_t] and ce [B, L] of the rows read."""
    B, L, V = z.shape
    compute = _compute_dtype(z.dtype)
    stats = torch.zeros(B, L, stats_size(len(temperatures)), dtype=compute, device=z.device)
    ce = torch.zeros(B, L, dtype=compute, device=z.device)
    if B * L > 0:
        _row_stats_kernel[(B * L,)](
            z, m.slot, m.slot if m.targets is None else m.targets, stats, ce, L, V, z.stride(0),
            z.stride(1), HAS_TGT=m.targets is not None, STD_SCALE=std_scale,
            CE_SHARES=_ce_shares(temperatures, std_scale),
            BLOCK_V=_block_v(block_v, V, BLOCK_V // 2 if z.dtype == torch.float64 else BLOCK_V),
            **_options(z, temperatures))
    return stats, ce


def _mass(z, m, stats, temperatures, block_v):
    """mass [n_t, B, V]: each temperature's sum of q over each sequence's answer rows."""
    B, L, V = z.shape
    mass = torch.zeros(len(temperatures), B, V, dtype=stats.dtype, device=z.device)
    if B * m.A > 0:
        block = _block_v(block_v, V, SHORT_BLOCK_V)
        _column_mass_kernel[(B, triton.cdiv(V, block))](
            z, m.answer, m.answer if m.lengths is None else m.lengths, stats, mass, B, L, m.A, V,
            z.stride(0), z.stride(1), HAS_LEN=m.lengths is not None, BLOCK_V=block,
            **_options(z, temperatures))
    return mass


def topk_probs_stats(logits, rows, lengths, targets, temperatures, std_scale, ranking, *,
                     block_v=None):
    """``mlot::topk_probs_stats`` with the Triton kernels: (row_stats, mass, ce); a sequence
    with bad rows or length gets a NaN mass."""
    _check_args(logits, rows, lengths, targets, 1, temperatures, std_scale, ranking)
    z = _logits(logits)
    m = _RowMap(z, rows, lengths, targets)
    stats, ce = _stats(z, m, temperatures, std_scale, block_v)
    if ranking == "token":
        mass = torch.zeros(len(temperatures), z.shape[0], 0, dtype=stats.dtype, device=z.device)
    else:
        mass = _mass(z, m, stats, temperatures, block_v)
        mass.masked_fill_(m.bad[None, :, None], float("nan"))
    return stats, mass, ce


def topk_probs_forward(logits, rows, lengths, targets, k, temperatures, std_scale, ranking, *,
                       block_v=None):
    """``mlot::topk_probs_forward`` with the Triton kernels: (probs, indices, ce, row_stats)."""
    _check_args(logits, rows, lengths, targets, k, temperatures, std_scale, ranking)
    z = _logits(logits)
    B, L, V = z.shape
    m = _RowMap(z, rows, lengths, targets)
    A, n_t = m.A, len(temperatures)
    stats, ce = _stats(z, m, temperatures, std_scale, block_v)

    kk = min(k, V)
    if ranking == "token":
        if L == 0 or B * A == 0:
            indices = torch.full((B, A, kk), -1, dtype=torch.int64, device=z.device)
        else:
            answers = z if rows is None else z[torch.arange(B, device=z.device)[:, None],
                                               m.answer.clamp(min=0) % L]
            indices = torch.topk(answers, kk, dim=-1).indices
            indices.masked_fill_((m.answer < 0)[..., None], -1)  # slots not read choose nothing
        indices = indices.expand(n_t, B, A, kk)
    else:
        mass = _mass(z, m, stats, temperatures, block_v)
        indices = torch.topk(mass.sum(1) if ranking == "batch" else mass, kk, dim=-1).indices
    indices = F.pad(indices, (0, k - kk), value=-1).contiguous()

    probs = torch.zeros(n_t, B, A, k, dtype=stats.dtype, device=z.device)
    if B * A > 0:
        _gather_kernel[(B * A,)](z, m.answer, stats, indices, probs, B, L, A, k, z.stride(0),
                                 z.stride(1), *_index_strides(ranking, B, A, k), BLOCK_K=BLOCK_K,
                                 **_options(z, temperatures))
    probs.masked_fill_(m.bad[None, :, None, None], float("nan"))  # found on the device
    return probs, indices, ce, stats


def topk_probs_backward(grad_probs, grad_ce, logits, rows, lengths, targets, probs, indices,
                        row_stats, temperatures, std_scale, ranking, *, block_v=None):
    """``mlot::topk_probs_backward`` with the Triton kernels: the logits' gradient [B, L, V]."""
    _check_backward_args(grad_probs, grad_ce, logits, rows, targets, probs, indices, row_stats,
                         temperatures, ranking)
    z = _logits(logits)
    B, L, V = z.shape
    k = probs.shape[3]
    compute = _compute_dtype(z.dtype)
    m = _RowMap(z, rows, lengths, targets)
    grad = torch.empty(B, L, V, dtype=z.dtype, device=z.device)
    if B * L == 0:
        return grad
    gp = None if grad_probs is None else grad_probs.to(compute).contiguous()
    has_ce = grad_ce is not None and m.targets is not None
    gc = grad_ce.to(compute).contiguous() if has_ce else None
    _backward_kernel[(B * L,)](
        probs if gp is None else gp, row_stats if gc is None else gc, z, m.slot,
        m.targets if has_ce else m.slot, probs.contiguous(), indices.contiguous(),
        row_stats.contiguous(), grad, B, L, m.A, V, k, z.stride(0), z.stride(1),
        *_index_strides(ranking, B, m.A, k), HAS_G=gp is not None, HAS_CE=has_ce,
        STD_SCALE=std_scale, BLOCK_V=_block_v(block_v, V, SHORT_BLOCK_V), BLOCK_K=BLOCK_K,
        **_options(z, temperatures))
    return grad


# ---------------------------------------------------------------- autograd and registration


class _TopkProbs(torch.autograd.Function):
    """The public op: every row, one temperature, no targets."""

    @staticmethod
    def forward(ctx, logits, lengths, k, temperature, std_scale, ranking, block_v):
        probs, indices, _, row_stats = topk_probs_forward(
            logits, None, lengths, None, k, [temperature], std_scale, ranking, block_v=block_v)
        probs, indices = probs[0], indices[0]
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(logits, lengths, probs, indices, row_stats)
        ctx.options = ([temperature], std_scale, ranking)
        ctx.block_v = block_v
        return probs, indices

    @staticmethod
    def backward(ctx, grad_probs, _grad_indices):
        logits, lengths, probs, indices, row_stats = ctx.saved_tensors
        grad = topk_probs_backward(grad_probs[None], None, logits, None, lengths, None,
                                   probs[None], indices[None], row_stats, *ctx.options,
                                   block_v=ctx.block_v)
        return grad, *([None] * 6)


class _AnswerTopkProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, rows, lengths, targets, k, temperatures, std_scale, ranking,
                block_v):
        probs, indices, ce, row_stats = topk_probs_forward(
            logits, rows, lengths, targets, k, temperatures, std_scale, ranking, block_v=block_v)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(logits, rows, lengths, targets, probs, indices, row_stats)
        ctx.options = (temperatures, std_scale, ranking)
        ctx.block_v = block_v
        return probs, indices, ce

    @staticmethod
    def backward(ctx, grad_probs, _grad_indices, grad_ce):
        logits, rows, lengths, targets, probs, indices, row_stats = ctx.saved_tensors
        grad = topk_probs_backward(grad_probs, None if targets is None else grad_ce, logits,
                                   rows, lengths, targets, probs, indices, row_stats,
                                   *ctx.options, block_v=ctx.block_v)
        return grad, *([None] * 8)


def topk_probs(logits, lengths=None, k=50, temperature=1.0, std_scale=False, ranking="sequence",
               *, block_v=None):
    """``topk_probs`` through the Triton kernels, on the tensors' device, with autograd.

    Same arguments and result as :func:`mlot_kernels.topk_probs`. ``block_v`` (a power of 2)
    forces the column chunk of every kernel; by default 1024 for the row statistics (512 for
    float64 logits), 256 for the column mass and the backward.
    """
    # The op's own argument checks (shapes, dtypes, options), run on meta tensors.
    torch.ops.mlot.topk_probs(logits.to("meta"), None if lengths is None else lengths.to("meta"),
                              k, temperature, std_scale, ranking)
    return _TopkProbs.apply(logits, lengths, k, temperature, std_scale, ranking, block_v)


def answer_topk_probs(logits, rows, lengths, targets=None, k=50, temperatures=(1.0,),
                      std_scale=False, ranking="sequence", *, block_v=None):
    """:func:`mlot_kernels.ops.topk_probs.answer_topk_probs` through the Triton kernels, on the
    tensors' device, with autograd: :class:`~mlot_kernels.ops.topk_probs.AnswerProbs` (probs
    [n_t, B, A, k], indices, ce [B, L]). ``block_v`` as for :func:`topk_probs`."""
    temperatures = [float(t) for t in temperatures]
    _check_args(logits, rows, lengths, targets, k, temperatures, std_scale, ranking)
    probs, indices, ce = _AnswerTopkProbs.apply(logits, rows, lengths, targets, k, temperatures,
                                                std_scale, ranking, block_v)
    return AnswerProbs(probs, indices, ce)


torch.library.register_kernel("mlot::topk_probs_stats", "cuda", topk_probs_stats)
torch.library.register_kernel("mlot::topk_probs_forward", "cuda", topk_probs_forward)
torch.library.register_kernel("mlot::topk_probs_backward", "cuda", topk_probs_backward)
