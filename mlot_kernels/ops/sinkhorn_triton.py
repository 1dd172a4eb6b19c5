r"""Triton kernels of ``sinkhorn_loss``: the CUDA implementation of ``torch.ops.mlot``.

Same contract as the op (math in :mod:`mlot_kernels.ops.sinkhorn`): for each problem ``b`` with
``m``, ``n`` valid rows, ``C_ij = sum_l |a_il - c_jl|^p`` over the (softmaxed) rows, ``n_iters``
log-domain Sinkhorn iterations from ``f = g = 0``,

.. math::

    f^t_i = \varepsilon \ell_a - \varepsilon\,\mathrm{LSE}_j\big((g^{t-1}_j - C_{ij})/\varepsilon\big),
    \qquad
    g^t_j = \varepsilon \ell_b - \varepsilon\,\mathrm{LSE}_i\big((f^t_i - C_{ij})/\varepsilon\big),

and ``loss_b = sum_ij P_ij C_ij`` with ``P_ij = exp((f_i + g_j - C_ij)/eps)``.

Every plan the backward needs is ``exp((f_i + g_j - C_ij)/eps + shift)`` for a pair of saved
potentials, so the exact gradient through every iteration is the reverse sweep

.. math::

    \bar C = \bar\ell\,P\,(1 - C/\varepsilon),\quad
    \bar f^T_i = \bar\ell \textstyle\sum_j P_{ij} C_{ij}/\varepsilon,\quad
    \bar g^T_j = \bar\ell \textstyle\sum_i P_{ij} C_{ij}/\varepsilon, \quad\text{then for } t = T..1:

    \pi^g_{ij} = e^{(f^t_i + g^t_j - C_{ij})/\varepsilon - \ell_b}:\quad
    \bar f^t \mathrel{-}= \pi^g \bar g^t,\quad \bar C \mathrel{+}= \pi^g\,\mathrm{diag}(\bar g^t)

    \pi^f_{ij} = e^{(f^t_i + g^{t-1}_j - C_{ij})/\varepsilon - \ell_a}:\quad
    \bar g^{t-1} = -(\pi^f)^\top \bar f^t,\quad \bar C \mathrel{+}= \mathrm{diag}(\bar f^t)\,\pi^f

(``detach_plan``: ``Cbar = lbar * P`` only), then
``abar_il = sum_j Cbar_ij * dC_ij/da_il`` with ``dC/da = p|a - c|^(p-1) sign(a - c)``
(sign(0) = 0), ``cbar`` likewise, and back through the softmax.

Two regimes, each one program per problem or per row tile, all ``B`` problems in one grid; each
program reads its own lengths and does no work past them:

- on-chip (``next_pow2(M) * next_pow2(N) <= ONCHIP_MAX_ENTRIES``): one program holds a whole
  problem's cost matrix in registers; the forward is one launch, the backward one launch.
- tiled (longer problems): flash-style, a program owns a tile of rows (or columns) and streams
  the other side in tiles with an online log-sum-exp, recomputing each cost tile from the K-dim
  vectors; working set O((M + N) (K + n_iters)) per problem, no M x N buffer. Each half-step
  needs every potential of the other side, so the forward is one launch per half-iteration plus
  one for the loss, the backward one per half-iteration plus two.

Arithmetic is float32 for float16/bfloat16/float32 inputs (cast at load), float64 for float64.
Lengths outside ``[0, M]`` are not checked (that would synchronise with the device): the kernels
clamp them into range and that problem's loss is NaN.

On CPU tensors the same kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` set
before ``mlot_kernels`` is imported): that is how CI checks them.
"""

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from mlot_kernels.ops import _library  # noqa: F401  (registers torch.ops.mlot)
from mlot_kernels.ops.sinkhorn import _compute_dtype

# On-chip regime up to this many (padded) cost entries: 256 x 256.
ONCHIP_MAX_ENTRIES = 256 * 256
# Tile sizes of the tiled regime (rows of the own side x rows of the other side) and its warps:
# with 64 x 64 tiles every tiled kernel spills registers at 4 warps and none does at 8, compiled
# for sm_90 (benchmarks/kernel_resources.py; chosen at compile time, not yet timed on a GPU).
TILE_OWN = 64
TILE_OTHER = 64
TILED_NUM_WARPS = 8
# Largest K chunk read at once for the softmax statistics and its backward.
MAX_BLOCK_K = 64


# ---------------------------------------------------------------- rows, cost, lengths


@triton.jit
def _length(ptr, b, full, HAS: tl.constexpr):
    """Valid length of problem b, clamped to [0, full], and whether it was in range."""
    if HAS:
        raw = tl.load(ptr + b).to(tl.int64)
        ok = (raw >= 0) & (raw <= full)
        length = tl.minimum(tl.maximum(raw, 0), full)
    else:
        ok = full >= 0
        length = full + 0 * b
    return length, ok


@triton.jit
def _softmax_stats(ptr, idx, mask, K, inv_t, SOFTMAX: tl.constexpr, BLOCK: tl.constexpr,
                   BLOCK_K: tl.constexpr, DTYPE: tl.constexpr):
    """Row max and 1/sum of softmax(z/T) for rows idx: a_il = exp((z_il - max_i)/T) * inv_sum_i."""
    mx = tl.full([BLOCK], float("-inf"), DTYPE)
    total = tl.zeros([BLOCK], DTYPE)
    if SOFTMAX:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            z = tl.load(ptr + idx[:, None] * K + ks[None, :], mask=mask[:, None] & (ks < K)[None, :],
                        other=float("-inf")).to(DTYPE)
            new = tl.maximum(mx, tl.max(z, 1))
            safe = tl.where(new == float("-inf"), 0.0, new)
            total = total * tl.exp((mx - safe) * inv_t) + tl.sum(tl.exp((z - safe[:, None]) * inv_t), 1)
            mx = new
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    live = mask & (total > 0)
    inv_sum = tl.where(live, 1.0 / tl.where(live, total, 1.0), 0.0)
    return mx, inv_sum


@triton.jit
def _column(ptr, idx, mask, l, K, mx, inv_sum, inv_t, SOFTMAX: tl.constexpr, DTYPE: tl.constexpr):
    """Entry l of the rows idx: softmax(z/T)_l, or z_l itself (0 where masked)."""
    z = tl.load(ptr + idx * K + l, mask=mask, other=0.0).to(DTYPE)
    if SOFTMAX:
        z = tl.exp((z - mx) * inv_t) * inv_sum
    return z


@triton.jit
def _cost(x_ptr, rows, rmask, xmx, xinv, y_ptr, cols, cmask, ymx, yinv, K, inv_t,
          P: tl.constexpr, SOFTMAX: tl.constexpr, DTYPE: tl.constexpr,
          BM: tl.constexpr, BN: tl.constexpr):
    """C_ij = sum_l |a_il - c_jl|^p for the rows `rows` of x and `cols` of y."""
    C = tl.zeros([BM, BN], DTYPE)
    for l in range(K):
        a = _column(x_ptr, rows, rmask, l, K, xmx, xinv, inv_t, SOFTMAX, DTYPE)
        c = _column(y_ptr, cols, cmask, l, K, ymx, yinv, inv_t, SOFTMAX, DTYPE)
        d = a[:, None] - c[None, :]
        if P == 1:
            C += tl.abs(d)
        else:
            C += d * d
    return C


@triton.jit
def _softmax_lines(h, C, mask2, inv_eps, H_AXIS: tl.constexpr):
    """The softmax along H_AXIS of S = (h - C)/eps (h indexed along H_AXIS), with its max mx and
    lt = log sum exp(S - mx): a Sinkhorn half-step's plan, lines summing to 1 to rounding."""
    S = tl.where(mask2, (tl.expand_dims(h, 1 - H_AXIS) - C) * inv_eps, float("-inf"))
    mx = tl.max(S, H_AXIS)
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # a masked line
    E = tl.exp(S - tl.expand_dims(mx, H_AXIS))
    total = tl.sum(E, H_AXIS)
    total = tl.where(total > 0, total, 1.0)
    return E / tl.expand_dims(total, H_AXIS), mx, tl.log(total)


@triton.jit
def _plan(h, mx, lt, C, mask2, inv_eps, H_AXIS: tl.constexpr):
    """exp(((h - C)/eps - mx) - lt), h indexed along H_AXIS and (mx, lt) along the other axis:
    _softmax_lines's plan rebuilt from its (mx, lt). Subtracting mx before lt keeps the large
    terms' difference exact, so the lines sum to 1 to rounding however large C/eps is."""
    S = (tl.expand_dims(h, 1 - H_AXIS) - C) * inv_eps - tl.expand_dims(mx, H_AXIS)
    return tl.where(mask2, tl.exp(S - tl.expand_dims(lt, H_AXIS)), 0.0)


@triton.jit
def _cost_grad(d, P: tl.constexpr):
    """dC/da for d = a - c: sign(d) (0 at a tie) for p = 1, 2d for p = 2."""
    if P == 1:
        return tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    else:
        return 2.0 * d


@triton.jit
def _softmax_backward(abar_ptr, z_ptr, out_ptr, idx, mask, K, mx, inv_sum, inv_t,
                      BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr):
    """out = the gradient with respect to z, from abar, the gradient with respect to
    a = softmax(z/T): a * (abar - <a, abar>) / T."""
    dot = tl.zeros([BLOCK], DTYPE)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m2 = mask[:, None] & (ks < K)[None, :]
        offs = idx[:, None] * K + ks[None, :]
        z = tl.load(z_ptr + offs, mask=m2, other=0.0).to(DTYPE)
        a = tl.where(m2, tl.exp((z - mx[:, None]) * inv_t) * inv_sum[:, None], 0.0)
        dot += tl.sum(a * tl.load(abar_ptr + offs, mask=m2, other=0.0), 1)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m2 = mask[:, None] & (ks < K)[None, :]
        offs = idx[:, None] * K + ks[None, :]
        z = tl.load(z_ptr + offs, mask=m2, other=0.0).to(DTYPE)
        a = tl.where(m2, tl.exp((z - mx[:, None]) * inv_t) * inv_sum[:, None], 0.0)
        abar = tl.load(abar_ptr + offs, mask=m2, other=0.0)
        tl.store(out_ptr + offs, a * (abar - dot[:, None]) * inv_t, mask=m2)


@triton.jit
def _options(eps_hi, eps_lo, t_hi, t_lo, SOFTMAX: tl.constexpr, DTYPE: tl.constexpr):
    """eps, 1/eps and 1/T in DTYPE; scalars arrive as float32 pairs hi + lo (float64 to ~1e-14)."""
    eps = tl.cast(eps_hi, DTYPE) + tl.cast(eps_lo, DTYPE)
    inv_t = eps * 0.0
    if SOFTMAX:
        inv_t = 1.0 / (tl.cast(t_hi, DTYPE) + tl.cast(t_lo, DTYPE))
    return eps, 1.0 / eps, inv_t


@triton.jit
def _log_marginal(length, UNIT: tl.constexpr, DTYPE: tl.constexpr):
    """0 with unit marginals, else -log(length) (0 for an empty side)."""
    if UNIT:
        return tl.zeros([], DTYPE)
    else:
        return -tl.log(tl.maximum(length, 1).to(DTYPE))


# ---------------------------------------------------------------- on-chip regime
#
# One program holds a whole problem: C [BM, BN] stays in registers. Every plan is normalised by
# its own sums (_softmax_lines): the loss P = e^{l_b} softmax_i((f^T_i - C_ij)/eps) (the last
# g-step's columns; exp(-C/eps) when n_iters = 0), and the backward's pi^g, pi^f likewise. The
# exact gradient relies on those sums being 1: its terms are C/eps times larger than the result.


@triton.jit
def _onchip_problem(x_ptr, y_ptr, m, n, K, inv_t, P: tl.constexpr, SOFTMAX: tl.constexpr,
                    UNIT: tl.constexpr, DTYPE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """A whole problem's indices and masks, softmax statistics of its rows, cost matrix C and
    log-marginals."""
    rows = tl.arange(0, BM)
    cols = tl.arange(0, BN)
    rmask = rows < m
    cmask = cols < n
    mask2 = rmask[:, None] & cmask[None, :]
    xmx, xinv = _softmax_stats(x_ptr, rows, rmask, K, inv_t, SOFTMAX, BM, BLOCK_K, DTYPE)
    ymx, yinv = _softmax_stats(y_ptr, cols, cmask, K, inv_t, SOFTMAX, BN, BLOCK_K, DTYPE)
    C = _cost(x_ptr, rows, rmask, xmx, xinv, y_ptr, cols, cmask, ymx, yinv, K, inv_t,
              P, SOFTMAX, DTYPE, BM, BN)
    return (rows, cols, rmask, cmask, mask2, xmx, xinv, ymx, yinv, C,
            _log_marginal(m, UNIT, DTYPE), _log_marginal(n, UNIT, DTYPE))


@triton.jit
def _onchip_forward_kernel(
    x_ptr, y_ptr, xl_ptr, yl_ptr, loss_ptr, f_ptr, g_ptr,
    M, N, K, n_iters, eps_hi, eps_lo, t_hi, t_lo,
    HAS_XL: tl.constexpr, HAS_YL: tl.constexpr, SOFTMAX: tl.constexpr, P: tl.constexpr,
    UNIT: tl.constexpr, DTYPE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One problem per program: cost, n_iters log-domain iterations, the loss."""
    b = tl.program_id(0).to(tl.int64)
    m, m_ok = _length(xl_ptr, b, M, HAS_XL)
    n, n_ok = _length(yl_ptr, b, N, HAS_YL)
    eps, inv_eps, inv_t = _options(eps_hi, eps_lo, t_hi, t_lo, SOFTMAX, DTYPE)
    x_ptr += b * M * K
    y_ptr += b * N * K
    f_ptr += b * (n_iters + 1) * M
    g_ptr += b * (n_iters + 1) * N

    rows, cols, rmask, cmask, mask2, xmx, xinv, ymx, yinv, C, la, lb = _onchip_problem(
        x_ptr, y_ptr, m, n, K, inv_t, P, SOFTMAX, UNIT, DTYPE, BM, BN, BLOCK_K)

    f = tl.zeros([BM], DTYPE)
    g = tl.zeros([BN], DTYPE)
    plan = _plan(f, g, g, C, mask2, inv_eps, 0)  # exp(-C/eps), the plan of 0 iterations
    for t in range(1, n_iters + 1):
        _, mx, lt = _softmax_lines(g, C, mask2, inv_eps, 1)
        f = tl.where(rmask, eps * la - eps * (mx + lt), 0.0)
        plan, mx, lt = _softmax_lines(f, C, mask2, inv_eps, 0)
        g = tl.where(cmask, eps * lb - eps * (mx + lt), 0.0)
        tl.store(f_ptr + t * M + rows, f, mask=rmask)
        tl.store(g_ptr + t * N + cols, g, mask=cmask)
    if n_iters > 0:
        plan = plan * tl.exp(lb)

    loss = tl.sum(tl.sum(plan * C, 1), 0)
    tl.store(loss_ptr + b, tl.where(m_ok & n_ok, loss, float("nan")))


@triton.jit
def _onchip_backward_kernel(
    grad_ptr, x_ptr, y_ptr, xl_ptr, yl_ptr, f_ptr, g_ptr, abar_ptr, cbar_ptr, gx_ptr, gy_ptr,
    M, N, K, n_iters, eps_hi, eps_lo, t_hi, t_lo,
    HAS_XL: tl.constexpr, HAS_YL: tl.constexpr, SOFTMAX: tl.constexpr, P: tl.constexpr,
    UNIT: tl.constexpr, DETACH: tl.constexpr, DTYPE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One problem per program: the reverse sweep with Cbar in registers, then the cost
    backward into abar, cbar (the gradients themselves when T = 0) and the softmax backward."""
    b = tl.program_id(0).to(tl.int64)
    m, m_ok = _length(xl_ptr, b, M, HAS_XL)
    n, n_ok = _length(yl_ptr, b, N, HAS_YL)
    eps, inv_eps, inv_t = _options(eps_hi, eps_lo, t_hi, t_lo, SOFTMAX, DTYPE)
    x_ptr += b * M * K
    y_ptr += b * N * K
    abar_ptr += b * M * K
    cbar_ptr += b * N * K
    gx_ptr += b * M * K
    gy_ptr += b * N * K
    f_ptr += b * (n_iters + 1) * M
    g_ptr += b * (n_iters + 1) * N
    grad = tl.load(grad_ptr + b).to(DTYPE)
    grad = tl.where(m_ok & n_ok, grad, float("nan"))

    rows, cols, rmask, cmask, mask2, xmx, xinv, ymx, yinv, C, la, lb = _onchip_problem(
        x_ptr, y_ptr, m, n, K, inv_t, P, SOFTMAX, UNIT, DTYPE, BM, BN, BLOCK_K)

    f = tl.load(f_ptr + n_iters * M + rows, mask=rmask, other=0.0)
    zeros = tl.zeros([BN], DTYPE)
    plan = _plan(f, zeros, zeros, C, mask2, inv_eps, 0)
    if n_iters > 0:
        plan, _, _ = _softmax_lines(f, C, mask2, inv_eps, 0)
        plan = plan * tl.exp(lb)
    if DETACH:
        Cbar = grad * plan
    else:
        PC = plan * C
        Cbar = grad * (plan - PC * inv_eps)
        fbar = grad * tl.sum(PC, 1) * inv_eps
        gbar = grad * tl.sum(PC, 0) * inv_eps
        for s in range(n_iters):
            t = n_iters - s
            # g^t = g-step(f^t):  fbar^t -= pi^g gbar^t,  Cbar += pi^g diag(gbar^t)
            f = tl.load(f_ptr + t * M + rows, mask=rmask, other=0.0)
            pi_g, _, _ = _softmax_lines(f, C, mask2, inv_eps, 0)
            pi_g = pi_g * gbar[None, :]
            fbar -= tl.sum(pi_g, 1)
            # f^t = f-step(g^{t-1}):  gbar^{t-1} = -(pi^f)^T fbar^t,  Cbar += diag(fbar^t) pi^f
            g_prev = tl.load(g_ptr + (t - 1) * N + cols, mask=cmask, other=0.0)
            pi_f, _, _ = _softmax_lines(g_prev, C, mask2, inv_eps, 1)
            pi_f = fbar[:, None] * pi_f
            gbar = -tl.sum(pi_f, 0)
            Cbar += pi_g + pi_f
            fbar = tl.zeros([BM], DTYPE)

    if not SOFTMAX:
        abar_ptr = gx_ptr
        cbar_ptr = gy_ptr
    for l in range(K):
        a = _column(x_ptr, rows, rmask, l, K, xmx, xinv, inv_t, SOFTMAX, DTYPE)
        c = _column(y_ptr, cols, cmask, l, K, ymx, yinv, inv_t, SOFTMAX, DTYPE)
        W = tl.where(mask2, Cbar * _cost_grad(a[:, None] - c[None, :], P), 0.0)
        tl.store(abar_ptr + rows * K + l, tl.sum(W, 1), mask=rmask)
        tl.store(cbar_ptr + cols * K + l, -tl.sum(W, 0), mask=cmask)
    if SOFTMAX:
        tl.debug_barrier()
        _softmax_backward(abar_ptr, x_ptr, gx_ptr, rows, rmask, K, xmx, xinv, inv_t, BM, BLOCK_K, DTYPE)
        _softmax_backward(cbar_ptr, y_ptr, gy_ptr, cols, cmask, K, ymx, yinv, inv_t, BN, BLOCK_K, DTYPE)


# ---------------------------------------------------------------- tiled regime
#
# The cost is symmetric in its two sides, so every tiled kernel is written for an "own" side
# (the program's tile of rows, indices i) and an "other" side streamed in tiles (indices j);
# the launcher passes x or y as either, and C_ij below is C or its transpose. Vectors are rows
# of [B, n_iters + 1, size] histories or [B, size] buffers: a pointer to the row and the batch
# stride. The plans are rebuilt from a potential and the (mx, lt) normaliser of its half-step
# (_plan), which the backward recomputes before its sweep.


@triton.jit
def _own_tile(own_ptr, tile, own_n, K, inv_t, SOFTMAX: tl.constexpr, DTYPE: tl.constexpr,
              BO: tl.constexpr, BLOCK_K: tl.constexpr):
    """The program's own rows: indices, mask and softmax statistics."""
    idx = tile * BO + tl.arange(0, BO)
    omask = idx < own_n
    omx, oinv = _softmax_stats(own_ptr, idx, omask, K, inv_t, SOFTMAX, BO, BLOCK_K, DTYPE)
    return idx, omask, omx, oinv


@triton.jit
def _other_tile(own_ptr, idx, omask, omx, oinv, oth_ptr, j0, oth_n, K, inv_t, P: tl.constexpr,
                SOFTMAX: tl.constexpr, DTYPE: tl.constexpr, BO: tl.constexpr, BT: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """The other side's tile starting at j0: indices, mask, softmax statistics and the cost
    C [BO, BT] against the own rows."""
    jdx = j0 + tl.arange(0, BT)
    tmask = jdx < oth_n
    tmx, tinv = _softmax_stats(oth_ptr, jdx, tmask, K, inv_t, SOFTMAX, BT, BLOCK_K, DTYPE)
    C = _cost(own_ptr, idx, omask, omx, oinv, oth_ptr, jdx, tmask, tmx, tinv, K, inv_t,
              P, SOFTMAX, DTYPE, BO, BT)
    return jdx, tmask, tmx, tinv, C


@triton.jit
def _tiled_half_step_kernel(
    own_ptr, oth_ptr, own_l_ptr, oth_l_ptr, h_ptr, pot_ptr, mx_ptr, lt_ptr,
    OWN, OTH, K, h_stride, pot_stride, norm_stride, eps_hi, eps_lo, t_hi, t_lo,
    HAS_OWN_L: tl.constexpr, HAS_OTH_L: tl.constexpr, SOFTMAX: tl.constexpr, P: tl.constexpr,
    UNIT: tl.constexpr, WRITE_POT: tl.constexpr, WRITE_NORM: tl.constexpr,
    DTYPE: tl.constexpr, BO: tl.constexpr, BT: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """A half-step for one tile of own rows, S_ij = (h_j - C_ij)/eps with h the other side's
    potential, by an online log-sum-exp over the other side's tiles: mx_i = max_j S_ij,
    lt_i = log sum_j exp(S_ij - mx_i), the potential pot_i = eps*l_own - eps*(mx_i + lt_i)."""
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    own_n, _ = _length(own_l_ptr, b, OWN, HAS_OWN_L)
    oth_n, _ = _length(oth_l_ptr, b, OTH, HAS_OTH_L)
    if (tile * BO < own_n) & (oth_n > 0):
        eps, inv_eps, inv_t = _options(eps_hi, eps_lo, t_hi, t_lo, SOFTMAX, DTYPE)
        own_ptr += b * OWN * K
        oth_ptr += b * OTH * K
        idx, omask, omx, oinv = _own_tile(own_ptr, tile, own_n, K, inv_t, SOFTMAX, DTYPE, BO, BLOCK_K)
        mx = tl.full([BO], float("-inf"), DTYPE)
        total = tl.zeros([BO], DTYPE)
        for j0 in range(0, oth_n, BT):
            jdx, tmask, tmx, tinv, C = _other_tile(own_ptr, idx, omask, omx, oinv, oth_ptr, j0, oth_n, K,
                                                   inv_t, P, SOFTMAX, DTYPE, BO, BT, BLOCK_K)
            h = tl.load(h_ptr + b * h_stride + jdx, mask=tmask, other=0.0)
            S = tl.where(tmask[None, :], (h[None, :] - C) * inv_eps, float("-inf"))
            new = tl.maximum(mx, tl.max(S, 1))
            safe = tl.where(new == float("-inf"), 0.0, new)
            total = total * tl.exp(mx - safe) + tl.sum(tl.exp(S - safe[:, None]), 1)
            mx = new
        lt = tl.log(tl.where(omask, total, 1.0))
        if WRITE_POT:
            pot = eps * _log_marginal(own_n, UNIT, DTYPE) - eps * (mx + lt)
            tl.store(pot_ptr + b * pot_stride + idx, pot, mask=omask)
        if WRITE_NORM:
            tl.store(mx_ptr + b * norm_stride + idx, mx, mask=omask)
            tl.store(lt_ptr + b * norm_stride + idx, lt, mask=omask)


@triton.jit
def _tiled_plan_sum_kernel(
    own_ptr, oth_ptr, own_l_ptr, oth_l_ptr, h_ptr, mx_ptr, lt_ptr, w_ptr, out_ptr,
    OWN, OTH, K, n_iters, h_stride, norm_stride, w_stride, out_stride, eps_hi, eps_lo, t_hi, t_lo,
    HAS_OWN_L: tl.constexpr, HAS_OTH_L: tl.constexpr, SOFTMAX: tl.constexpr, P: tl.constexpr,
    UNIT: tl.constexpr, H_OWN: tl.constexpr, ADJOINT: tl.constexpr, DTYPE: tl.constexpr,
    BO: tl.constexpr, BT: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Row sums of a plan over one tile of own rows: pi = _plan(h, mx, lt) with h on the own
    side and (mx, lt) on the other when H_OWN, the reverse otherwise.

    ADJOINT: out_i -= sum_j pi_ij w_j (out_i holds the adjoint's other terms);
    otherwise the loss term: out_i = sum_j P_ij C_ij, P = e^{l} pi with l the log-marginal of
    the normalised side (P = pi when n_iters = 0).
    """
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    own_n, _ = _length(own_l_ptr, b, OWN, HAS_OWN_L)
    oth_n, _ = _length(oth_l_ptr, b, OTH, HAS_OTH_L)
    if (tile * BO < own_n) & (oth_n > 0):
        eps, inv_eps, inv_t = _options(eps_hi, eps_lo, t_hi, t_lo, SOFTMAX, DTYPE)
        own_ptr += b * OWN * K
        oth_ptr += b * OTH * K
        idx, omask, omx, oinv = _own_tile(own_ptr, tile, own_n, K, inv_t, SOFTMAX, DTYPE, BO, BLOCK_K)
        if H_OWN:
            h = tl.load(h_ptr + b * h_stride + idx, mask=omask, other=0.0)
            scale = tl.exp(_log_marginal(oth_n, UNIT, DTYPE))
        else:
            mx = tl.load(mx_ptr + b * norm_stride + idx, mask=omask, other=0.0)
            lt = tl.load(lt_ptr + b * norm_stride + idx, mask=omask, other=0.0)
            scale = tl.exp(_log_marginal(own_n, UNIT, DTYPE))
        acc = tl.zeros([BO], DTYPE)
        for j0 in range(0, oth_n, BT):
            jdx, tmask, tmx, tinv, C = _other_tile(own_ptr, idx, omask, omx, oinv, oth_ptr, j0, oth_n, K,
                                                   inv_t, P, SOFTMAX, DTYPE, BO, BT, BLOCK_K)
            mask2 = omask[:, None] & tmask[None, :]
            if H_OWN:
                mx = tl.load(mx_ptr + b * norm_stride + jdx, mask=tmask, other=0.0)
                lt = tl.load(lt_ptr + b * norm_stride + jdx, mask=tmask, other=0.0)
                pi = _plan(h, mx, lt, C, mask2, inv_eps, 0)
            else:
                h = tl.load(h_ptr + b * h_stride + jdx, mask=tmask, other=0.0)
                pi = _plan(h, mx, lt, C, mask2, inv_eps, 1)
            if ADJOINT:
                w = tl.load(w_ptr + b * w_stride + jdx, mask=tmask, other=0.0)
                acc += tl.sum(pi * w[None, :], 1)
            else:
                acc += tl.sum(pi * C, 1)
        out = out_ptr + b * out_stride + idx
        if ADJOINT:
            acc = tl.load(out, mask=omask, other=0.0) - acc
        elif n_iters > 0:
            acc = acc * scale
        tl.store(out, acc, mask=omask)


@triton.jit
def _tiled_gradient_kernel(
    own_ptr, oth_ptr, own_l_ptr, oth_l_ptr, f_ptr, g_ptr, fbar_ptr, gbar_ptr, mxr_ptr, ltr_ptr,
    mxc_ptr, ltc_ptr, grad_ptr, abar_ptr, out_ptr, OWN, OTH, K, M, N, n_iters,
    eps_hi, eps_lo, t_hi, t_lo,
    HAS_OWN_L: tl.constexpr, HAS_OTH_L: tl.constexpr, SOFTMAX: tl.constexpr, P: tl.constexpr,
    UNIT: tl.constexpr, DETACH: tl.constexpr, XA: tl.constexpr, DTYPE: tl.constexpr,
    BO: tl.constexpr, BT: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Gradient of one tile of own rows: C is [x, y] when XA = 0 (own side x), [y, x] when
    XA = 1 (x's index runs along axis XA, y's along 1 - XA). Cbar rebuilt tile by tile from the saved
    potentials f, g, adjoints fbar, gbar and half-step normalisers (mxr, ltr of the f-steps on
    x's side; mxc, ltc of the g-steps on y's), contracted with dC over the other side into abar
    (out itself when T = 0), then the softmax backward into out."""
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    own_n, own_ok = _length(own_l_ptr, b, OWN, HAS_OWN_L)
    oth_n, oth_ok = _length(oth_l_ptr, b, OTH, HAS_OTH_L)
    if (tile * BO < own_n) & (oth_n > 0):
        eps, inv_eps, inv_t = _options(eps_hi, eps_lo, t_hi, t_lo, SOFTMAX, DTYPE)
        if XA == 0:
            n = oth_n
        else:
            n = own_n
        lb = _log_marginal(n, UNIT, DTYPE)
        grad = tl.load(grad_ptr + b).to(DTYPE)
        grad = tl.where(own_ok & oth_ok, grad, float("nan"))
        own_ptr += b * OWN * K
        oth_ptr += b * OTH * K
        abar_ptr += b * OWN * K
        out_ptr += b * OWN * K
        if not SOFTMAX:
            abar_ptr = out_ptr
        x_off = b * (n_iters + 1) * M
        y_off = b * (n_iters + 1) * N
        idx, omask, omx, oinv = _own_tile(own_ptr, tile, own_n, K, inv_t, SOFTMAX, DTYPE, BO, BLOCK_K)
        for j0 in range(0, oth_n, BT):
            jdx, tmask, tmx, tinv, C = _other_tile(own_ptr, idx, omask, omx, oinv, oth_ptr, j0, oth_n, K,
                                                   inv_t, P, SOFTMAX, DTYPE, BO, BT, BLOCK_K)
            mask2 = omask[:, None] & tmask[None, :]
            if XA == 0:
                xi = x_off + idx
                xm = omask
                yj = y_off + jdx
                ym = tmask
            else:
                xi = x_off + jdx
                xm = tmask
                yj = y_off + idx
                ym = omask
            T = n_iters
            f = tl.load(f_ptr + T * M + xi, mask=xm, other=0.0)
            mx = tl.load(mxc_ptr + T * N + yj, mask=ym, other=0.0)
            lt = tl.load(ltc_ptr + T * N + yj, mask=ym, other=0.0)
            plan = _plan(f, mx, lt, C, mask2, inv_eps, XA)
            if n_iters > 0:
                plan = plan * tl.exp(lb)
            if DETACH:
                Cbar = grad * plan
            else:
                Cbar = grad * (plan - plan * C * inv_eps)
                for t in range(1, n_iters + 1):
                    # (x's vectors and y's keep their own names: with BO != BT their sizes differ)
                    f = tl.load(f_ptr + t * M + xi, mask=xm, other=0.0)
                    mxc = tl.load(mxc_ptr + t * N + yj, mask=ym, other=0.0)
                    ltc = tl.load(ltc_ptr + t * N + yj, mask=ym, other=0.0)
                    gbar = tl.load(gbar_ptr + t * N + yj, mask=ym, other=0.0)
                    Cbar += _plan(f, mxc, ltc, C, mask2, inv_eps, XA) * tl.expand_dims(gbar, XA)
                    g_prev = tl.load(g_ptr + (t - 1) * N + yj, mask=ym, other=0.0)
                    mxr = tl.load(mxr_ptr + t * M + xi, mask=xm, other=0.0)
                    ltr = tl.load(ltr_ptr + t * M + xi, mask=xm, other=0.0)
                    fbar = tl.load(fbar_ptr + t * M + xi, mask=xm, other=0.0)
                    pi_f = _plan(g_prev, mxr, ltr, C, mask2, inv_eps, 1 - XA)
                    Cbar += pi_f * tl.expand_dims(fbar, 1 - XA)
            for l in range(K):
                a = _column(own_ptr, idx, omask, l, K, omx, oinv, inv_t, SOFTMAX, DTYPE)
                c = _column(oth_ptr, jdx, tmask, l, K, tmx, tinv, inv_t, SOFTMAX, DTYPE)
                W = tl.where(mask2, Cbar * _cost_grad(a[:, None] - c[None, :], P), 0.0)
                tl.atomic_add(abar_ptr + idx * K + l, tl.sum(W, 1), mask=omask)
        if SOFTMAX:
            tl.debug_barrier()
            _softmax_backward(abar_ptr, own_ptr, out_ptr, idx, omask, K, omx, oinv, inv_t, BO,
                              BLOCK_K, DTYPE)


# ---------------------------------------------------------------- launchers


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch configuration: the on-chip regime (one program per problem), or the tiled one
    with tiles of block_own x block_other cost entries; num_warps per program (the default is
    the tiled regime's; choose_config sizes the on-chip one by the problem)."""

    onchip: bool
    block_own: int = TILE_OWN
    block_other: int = TILE_OTHER
    num_warps: int = TILED_NUM_WARPS

    def __post_init__(self):
        for name in ("block_own", "block_other", "num_warps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1 and value & (value - 1) == 0):
                raise ValueError(f"Config: {name} must be a power of 2, got {value!r}")


def choose_config(M: int, N: int) -> Config:
    entries = triton.next_power_of_2(M) * triton.next_power_of_2(N)
    if entries > ONCHIP_MAX_ENTRIES:
        return Config(onchip=False)
    return Config(onchip=True, num_warps=4 if entries <= 4096 else 8 if entries <= 16384 else 16)


def _split(value: float):
    """value as float32 hi + lo, so that kernels rebuild it to ~1e-14 in float64."""
    hi = float(torch.tensor(value, dtype=torch.float32))
    return hi, float(torch.tensor(value - hi, dtype=torch.float32))


def _common(K, compute, epsilon, temperature, p, unit_marginals):
    """Kernel arguments shared by every launch."""
    eps_hi, eps_lo = _split(epsilon)
    t_hi, t_lo = _split(temperature if temperature > 0 else 1.0)
    return dict(
        eps_hi=eps_hi, eps_lo=eps_lo, t_hi=t_hi, t_lo=t_lo, SOFTMAX=temperature > 0, P=p,
        UNIT=unit_marginals, DTYPE=tl.float64 if compute == torch.float64 else tl.float32,
        BLOCK_K=min(triton.next_power_of_2(K), MAX_BLOCK_K),
    )


class _Tiled:
    """Launches of the tiled kernels for one batch, with x or y as the own side."""

    def __init__(self, x, y, x_lengths, y_lengths, config, common):
        self.side = {"x": (x, x_lengths), "y": (y, y_lengths)}
        self.config = config
        self.common = common

    def _launch(self, kernel, own, *args, **constexprs):
        (own_t, own_l), (oth_t, oth_l) = (self.side[own], self.side["y" if own == "x" else "x"])
        B, OWN, K = own_t.shape
        grid = (B, triton.cdiv(OWN, self.config.block_own))
        kernel[grid](own_t, oth_t, own_t if own_l is None else own_l,
                     own_t if oth_l is None else oth_l, *args[:-1], OWN, oth_t.shape[1], K,
                     *args[-1], HAS_OWN_L=own_l is not None, HAS_OTH_L=oth_l is not None,
                     BO=self.config.block_own, BT=self.config.block_other,
                     num_warps=self.config.num_warps, **self.common, **constexprs)

    def half_step(self, own, h, pot=None, mx=None, lt=None):
        """pot (and/or the normaliser mx, lt) of the own side from the other side's potential h."""
        write_pot, write_norm = pot is not None, mx is not None
        pot = pot if write_pot else mx  # an unused pointer stands in for an absent output
        mx, lt = (mx, lt) if write_norm else (pot, pot)
        self._launch(_tiled_half_step_kernel, own, h, pot, mx, lt,
                     (h.stride(0), pot.stride(0), mx.stride(0)), WRITE_POT=write_pot,
                     WRITE_NORM=write_norm)

    def plan_sum(self, own, h, mx, lt, out, n_iters, h_own=True, w=None):
        """out = the loss term sum_j P_ij C_ij, or out -= pi w (an adjoint step) when w is given."""
        self._launch(_tiled_plan_sum_kernel, own, h, mx, lt, out if w is None else w, out,
                     (n_iters, h.stride(0), mx.stride(0), (out if w is None else w).stride(0),
                      out.stride(0)), H_OWN=h_own, ADJOINT=w is not None)

    def gradient(self, own, hist, grad, abar, out, n_iters, detach):
        """The gradient of the own side's rows; hist = f, g, fbar, gbar, mxr, ltr, mxc, ltc."""
        M, N = hist[0].shape[2], hist[1].shape[2]
        self._launch(_tiled_gradient_kernel, own, *hist, grad, abar, out, (M, N, n_iters),
                     DETACH=detach, XA=0 if own == "x" else 1)


def _lengths_valid(x_lengths, y_lengths, M, N, B, device):
    """[B] bool: both lengths in range (computed on the device, no synchronisation)."""
    valid = torch.ones(B, dtype=torch.bool, device=device)
    for lengths, size in ((x_lengths, M), (y_lengths, N)):
        if lengths is not None:
            valid &= (lengths >= 0) & (lengths <= size)
    return valid


def sinkhorn_forward(x, y, x_lengths, y_lengths, epsilon, n_iters, temperature, p,
                     unit_marginals, detach_plan=False, config=None):
    """``mlot::sinkhorn_forward`` with the Triton kernels: (loss [B], f_hist, g_hist)."""
    B, M, K = x.shape
    N = y.shape[1]
    compute = _compute_dtype(x.dtype)
    x, y = x.contiguous(), y.contiguous()
    x_lengths = None if x_lengths is None else x_lengths.contiguous()
    y_lengths = None if y_lengths is None else y_lengths.contiguous()
    new = functools.partial(torch.zeros, dtype=compute, device=x.device)
    loss = new(B)
    f_hist = new(B, n_iters + 1, M)
    g_hist = new(B, n_iters + 1, N)
    if B == 0 or M == 0 or N == 0:
        return loss, f_hist, g_hist
    config = config or choose_config(M, N)
    common = _common(K, compute, epsilon, temperature, p, unit_marginals)
    if config.onchip:
        _onchip_forward_kernel[(B,)](
            x, y, x if x_lengths is None else x_lengths, x if y_lengths is None else y_lengths,
            loss, f_hist, g_hist, M, N, K, n_iters, HAS_XL=x_lengths is not None,
            HAS_YL=y_lengths is not None, BM=triton.next_power_of_2(M),
            BN=triton.next_power_of_2(N), num_warps=config.num_warps, **common)
        return loss, f_hist, g_hist

    tiled = _Tiled(x, y, x_lengths, y_lengths, config, common)
    mx, lt = new(B, N), new(B, N)  # the last g-step's normaliser: P's (0 when n_iters = 0)
    for t in range(1, n_iters + 1):
        tiled.half_step("x", h=g_hist[:, t - 1], pot=f_hist[:, t])
        last = t == n_iters
        tiled.half_step("y", h=f_hist[:, t], pot=g_hist[:, t], mx=mx if last else None,
                        lt=lt if last else None)
    row_terms = new(B, M)
    tiled.plan_sum("x", f_hist[:, n_iters], mx, lt, row_terms, n_iters)
    torch.sum(row_terms, 1, out=loss)
    if x_lengths is not None or y_lengths is not None:
        loss.masked_fill_(~_lengths_valid(x_lengths, y_lengths, M, N, B, x.device), float("nan"))
    return loss, f_hist, g_hist


def sinkhorn_backward(grad, x, y, x_lengths, y_lengths, f_hist, g_hist, epsilon, temperature,
                      p, unit_marginals, detach_plan, config=None):
    """``mlot::sinkhorn_backward`` with the Triton kernels: (grad_x, grad_y)."""
    B, M, K = x.shape
    N = y.shape[1]
    T = f_hist.shape[1] - 1
    compute = _compute_dtype(x.dtype)
    x, y = x.contiguous(), y.contiguous()
    x_lengths = None if x_lengths is None else x_lengths.contiguous()
    y_lengths = None if y_lengths is None else y_lengths.contiguous()
    grad = grad.to(compute).contiguous()
    f_hist, g_hist = f_hist.contiguous(), g_hist.contiguous()
    grad_x = torch.zeros(B, M, K, dtype=compute, device=x.device)
    grad_y = torch.zeros(B, N, K, dtype=compute, device=x.device)
    if B == 0 or M == 0 or N == 0:
        return grad_x.to(x.dtype), grad_y.to(y.dtype)
    config = config or choose_config(M, N)
    common = _common(K, compute, epsilon, temperature, p, unit_marginals)
    # Gradients with respect to the softmaxed rows, before the softmax backward.
    abar = torch.zeros_like(grad_x) if temperature > 0 else grad_x
    cbar = torch.zeros_like(grad_y) if temperature > 0 else grad_y
    if config.onchip:
        _onchip_backward_kernel[(B,)](
            grad, x, y, x if x_lengths is None else x_lengths, x if y_lengths is None else y_lengths,
            f_hist, g_hist, abar, cbar, grad_x, grad_y, M, N, K, T,
            HAS_XL=x_lengths is not None, HAS_YL=y_lengths is not None, DETACH=detach_plan,
            BM=triton.next_power_of_2(M), BN=triton.next_power_of_2(N),
            num_warps=config.num_warps, **common)
        return grad_x.to(x.dtype), grad_y.to(y.dtype)

    tiled = _Tiled(x, y, x_lengths, y_lengths, config, common)
    # Normalisers of the half-steps (index t; 0 at t = 0): f-steps' rows, g-steps' columns.
    mxr, ltr = torch.zeros_like(f_hist), torch.zeros_like(f_hist)
    mxc, ltc = torch.zeros_like(g_hist), torch.zeros_like(g_hist)
    if not detach_plan:
        for t in range(1, T + 1):
            tiled.half_step("x", h=g_hist[:, t - 1], mx=mxr[:, t], lt=ltr[:, t])
            tiled.half_step("y", h=f_hist[:, t], mx=mxc[:, t], lt=ltc[:, t])
    elif T > 0:  # P's only
        tiled.half_step("y", h=f_hist[:, T], mx=mxc[:, T], lt=ltc[:, T])
    fbar, gbar = torch.zeros_like(f_hist), torch.zeros_like(g_hist)
    if not detach_plan:
        scale = (grad / epsilon)[:, None]
        tiled.plan_sum("x", f_hist[:, T], mxc[:, T], ltc[:, T], fbar[:, T], T)
        tiled.plan_sum("y", f_hist[:, T], mxc[:, T], ltc[:, T], gbar[:, T], T, h_own=False)
        fbar[:, T] *= scale
        gbar[:, T] *= scale
        for t in range(T, 0, -1):
            # g^t = g-step(f^t):  fbar^t -= pi^g gbar^t
            tiled.plan_sum("x", f_hist[:, t], mxc[:, t], ltc[:, t], fbar[:, t], T, w=gbar[:, t])
            # f^t = f-step(g^{t-1}):  gbar^{t-1} = -(pi^f)^T fbar^t
            if t > 1:
                tiled.plan_sum("y", g_hist[:, t - 1], mxr[:, t], ltr[:, t], gbar[:, t - 1], T,
                               w=fbar[:, t])
    hist = (f_hist, g_hist, fbar, gbar, mxr, ltr, mxc, ltc)
    tiled.gradient("x", hist, grad, abar, grad_x, T, detach_plan)
    tiled.gradient("y", hist, grad, cbar, grad_y, T, detach_plan)
    return grad_x.to(x.dtype), grad_y.to(y.dtype)


# ---------------------------------------------------------------- autograd and registration


class _SinkhornLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, x_lengths, y_lengths, epsilon, n_iters, temperature, p,
                unit_marginals, detach_plan, config):
        loss, f_hist, g_hist = sinkhorn_forward(x, y, x_lengths, y_lengths, epsilon, n_iters,
                                                temperature, p, unit_marginals, config=config)
        ctx.save_for_backward(x, y, x_lengths, y_lengths, f_hist, g_hist)
        ctx.options = (epsilon, temperature, p, unit_marginals, detach_plan)
        ctx.config = config
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, y, x_lengths, y_lengths, f_hist, g_hist = ctx.saved_tensors
        grad_x, grad_y = sinkhorn_backward(grad_loss, x, y, x_lengths, y_lengths, f_hist, g_hist,
                                           *ctx.options, config=ctx.config)
        return grad_x, grad_y, *([None] * 9)


def sinkhorn_loss(x, y, x_lengths=None, y_lengths=None, epsilon=0.1, n_iters=20,
                  temperature=0.0, p=1, unit_marginals=False, detach_plan=False, *, config=None):
    """``sinkhorn_loss`` through the Triton kernels, on the tensors' device, with autograd.

    Same arguments and result as :func:`mlot_kernels.sinkhorn_loss`. ``config`` (a
    :class:`Config`) forces a regime and tile sizes; by default :func:`choose_config` picks them.
    """
    # The op's own argument checks (shapes, dtypes, devices, options), run on meta tensors.
    torch.ops.mlot.sinkhorn_loss(*(None if t is None else t.to("meta")
                                   for t in (x, y, x_lengths, y_lengths)),
                                 epsilon, n_iters, temperature, p, unit_marginals, detach_plan)
    return _SinkhornLoss.apply(x, y, x_lengths, y_lengths, epsilon, n_iters, temperature, p,
                               unit_marginals, detach_plan, config)


torch.library.register_kernel("mlot::sinkhorn_forward", "cuda", sinkhorn_forward)
torch.library.register_kernel("mlot::sinkhorn_backward", "cuda", sinkhorn_backward)
