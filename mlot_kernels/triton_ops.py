r"""Triton kernels of ``sinkhorn_loss``: the CUDA implementation of ``torch.ops.mlot``.

Same contract as the op (math in :mod:`mlot_kernels.sinkhorn`): for each problem ``b`` with
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
import math

import torch
import triton
import triton.language as tl

from mlot_kernels import _library  # noqa: F401  (registers torch.ops.mlot)

# On-chip regime up to this many (padded) cost entries: 256 x 256.
ONCHIP_MAX_ENTRIES = 256 * 256
# Tile sizes of the tiled regime (rows of the own side x rows of the other side).
TILE_OWN = 64
TILE_OTHER = 64
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
def _plan(u, v, C, mask2, shift, inv_eps):
    """exp((u_i + v_j - C_ij)/eps + shift), 0 outside mask2."""
    return tl.where(mask2, tl.exp((u[:, None] + v[None, :] - C) * inv_eps + shift), 0.0)


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
def _neg_eps_lse(h, C, mask2, inv_eps, eps, AXIS: tl.constexpr):
    """-eps * LSE over AXIS of (h - C)/eps, h broadcast along the other axis."""
    S = tl.where(mask2, (tl.expand_dims(h, 1 - AXIS) - C) * inv_eps, float("-inf"))
    mx = tl.max(S, AXIS)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.sum(tl.exp(S - tl.expand_dims(mx, AXIS)), AXIS)
    return -eps * (mx + tl.log(tl.where(total > 0, total, 1.0)))  # total = 0: a masked line


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


@triton.jit
def _onchip_forward_kernel(
    x_ptr, y_ptr, xl_ptr, yl_ptr, loss_ptr, f_ptr, g_ptr,
    M, N, K, n_iters, eps_hi, eps_lo, t_hi, t_lo,
    HAS_XL: tl.constexpr, HAS_YL: tl.constexpr, SOFTMAX: tl.constexpr, P: tl.constexpr,
    UNIT: tl.constexpr, DTYPE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One problem per program: cost in registers, n_iters log-domain iterations, the loss."""
    b = tl.program_id(0).to(tl.int64)
    m, m_ok = _length(xl_ptr, b, M, HAS_XL)
    n, n_ok = _length(yl_ptr, b, N, HAS_YL)
    eps, inv_eps, inv_t = _options(eps_hi, eps_lo, t_hi, t_lo, SOFTMAX, DTYPE)
    x_ptr += b * M * K
    y_ptr += b * N * K
    f_ptr += b * (n_iters + 1) * M
    g_ptr += b * (n_iters + 1) * N

    rows = tl.arange(0, BM)
    cols = tl.arange(0, BN)
    rmask = rows < m
    cmask = cols < n
    mask2 = rmask[:, None] & cmask[None, :]
    xmx, xinv = _softmax_stats(x_ptr, rows, rmask, K, inv_t, SOFTMAX, BM, BLOCK_K, DTYPE)
    ymx, yinv = _softmax_stats(y_ptr, cols, cmask, K, inv_t, SOFTMAX, BN, BLOCK_K, DTYPE)
    C = _cost(x_ptr, rows, rmask, xmx, xinv, y_ptr, cols, cmask, ymx, yinv, K, inv_t,
              P, SOFTMAX, DTYPE, BM, BN)
    la = _log_marginal(m, UNIT, DTYPE)
    lb = _log_marginal(n, UNIT, DTYPE)

    f = tl.zeros([BM], DTYPE)
    g = tl.zeros([BN], DTYPE)
    for t in range(1, n_iters + 1):
        f = tl.where(rmask, eps * la + _neg_eps_lse(g, C, mask2, inv_eps, eps, 1), 0.0)
        g = tl.where(cmask, eps * lb + _neg_eps_lse(f, C, mask2, inv_eps, eps, 0), 0.0)
        tl.store(f_ptr + t * M + rows, f, mask=rmask)
        tl.store(g_ptr + t * N + cols, g, mask=cmask)

    loss = tl.sum(tl.sum(_plan(f, g, C, mask2, 0.0, inv_eps) * C, 1), 0)
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

    rows = tl.arange(0, BM)
    cols = tl.arange(0, BN)
    rmask = rows < m
    cmask = cols < n
    mask2 = rmask[:, None] & cmask[None, :]
    xmx, xinv = _softmax_stats(x_ptr, rows, rmask, K, inv_t, SOFTMAX, BM, BLOCK_K, DTYPE)
    ymx, yinv = _softmax_stats(y_ptr, cols, cmask, K, inv_t, SOFTMAX, BN, BLOCK_K, DTYPE)
    C = _cost(x_ptr, rows, rmask, xmx, xinv, y_ptr, cols, cmask, ymx, yinv, K, inv_t,
              P, SOFTMAX, DTYPE, BM, BN)
    la = _log_marginal(m, UNIT, DTYPE)
    lb = _log_marginal(n, UNIT, DTYPE)

    f = tl.load(f_ptr + n_iters * M + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr + n_iters * N + cols, mask=cmask, other=0.0)
    plan = _plan(f, g, C, mask2, 0.0, inv_eps)
    if DETACH:
        Cbar = grad * plan
    else:
        PC = plan * C
        Cbar = grad * (plan - PC * inv_eps)
        fbar = grad * tl.sum(PC, 1) * inv_eps
        gbar = grad * tl.sum(PC, 0) * inv_eps
        for s in range(n_iters):
            t = n_iters - s
            f = tl.load(f_ptr + t * M + rows, mask=rmask, other=0.0)
            g = tl.load(g_ptr + t * N + cols, mask=cmask, other=0.0)
            g_prev = tl.load(g_ptr + (t - 1) * N + cols, mask=cmask, other=0.0)
            pi_g = _plan(f, g, C, mask2, -lb, inv_eps) * gbar[None, :]
            fbar -= tl.sum(pi_g, 1)
            pi_f = fbar[:, None] * _plan(f, g_prev, C, mask2, -la, inv_eps)
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
# the launcher passes x or y as either, and C_ij below is C or its transpose. Potentials and
# adjoints are read from rows of the [B, n_iters + 1, size] histories (pointer to row t,
# batch stride given).


@triton.jit
def _tiled_half_step_kernel(
    own_ptr, oth_ptr, own_l_ptr, oth_l_ptr, oth_pot_ptr, out_pot_ptr,
    OWN, OTH, K, own_pot_stride, oth_pot_stride, eps_hi, eps_lo, t_hi, t_lo,
    HAS_OWN_L: tl.constexpr, HAS_OTH_L: tl.constexpr, SOFTMAX: tl.constexpr, P: tl.constexpr,
    UNIT: tl.constexpr, DTYPE: tl.constexpr, BO: tl.constexpr, BT: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out_i = eps*l_own - eps*LSE_j((h_j - C_ij)/eps) for one tile of own rows (h: the other
    side's potentials), with an online LSE over the other side's tiles."""
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    own_n, _ = _length(own_l_ptr, b, OWN, HAS_OWN_L)
    oth_n, _ = _length(oth_l_ptr, b, OTH, HAS_OTH_L)
    if (tile * BO < own_n) & (oth_n > 0):
        eps, inv_eps, inv_t = _options(eps_hi, eps_lo, t_hi, t_lo, SOFTMAX, DTYPE)
        own_ptr += b * OWN * K
        oth_ptr += b * OTH * K
        idx = tile * BO + tl.arange(0, BO)
        omask = idx < own_n
        omx, oinv = _softmax_stats(own_ptr, idx, omask, K, inv_t, SOFTMAX, BO, BLOCK_K, DTYPE)
        mx = tl.full([BO], float("-inf"), DTYPE)
        total = tl.zeros([BO], DTYPE)
        for j0 in range(0, oth_n, BT):
            jdx = j0 + tl.arange(0, BT)
            tmask = jdx < oth_n
            tmx, tinv = _softmax_stats(oth_ptr, jdx, tmask, K, inv_t, SOFTMAX, BT, BLOCK_K, DTYPE)
            C = _cost(own_ptr, idx, omask, omx, oinv, oth_ptr, jdx, tmask, tmx, tinv, K, inv_t,
                      P, SOFTMAX, DTYPE, BO, BT)
            h = tl.load(oth_pot_ptr + b * oth_pot_stride + jdx, mask=tmask, other=0.0)
            S = tl.where(tmask[None, :], (h[None, :] - C) * inv_eps, float("-inf"))
            new = tl.maximum(mx, tl.max(S, 1))
            safe = tl.where(new == float("-inf"), 0.0, new)
            total = total * tl.exp(mx - safe) + tl.sum(tl.exp(S - safe[:, None]), 1)
            mx = new
        total = tl.where(omask, total, 1.0)
        pot = eps * _log_marginal(own_n, UNIT, DTYPE) - eps * (mx + tl.log(total))
        tl.store(out_pot_ptr + b * own_pot_stride + idx, pot, mask=omask)


@triton.jit
def _tiled_plan_sum_kernel(
    own_ptr, oth_ptr, own_l_ptr, oth_l_ptr, own_pot_ptr, oth_pot_ptr, oth_w_ptr, out_ptr,
    OWN, OTH, K, own_stride, oth_stride, out_stride, eps_hi, eps_lo, t_hi, t_lo,
    HAS_OWN_L: tl.constexpr, HAS_OTH_L: tl.constexpr, SOFTMAX: tl.constexpr, P: tl.constexpr,
    UNIT: tl.constexpr, ADJOINT: tl.constexpr, DTYPE: tl.constexpr, BO: tl.constexpr,
    BT: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Row sums of a plan for one tile of own rows, u and v the own and other potentials:

    ADJOINT: pi_ij = exp((u_i + v_j - C_ij)/eps - l_oth) (rows or columns of a Sinkhorn step's
    softmax), out_i -= sum_j pi_ij w_j, out_i holding the adjoint's other terms;
    otherwise: the loss term, out_i = sum_j P_ij C_ij with P_ij = exp((u_i + v_j - C_ij)/eps).
    """
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    own_n, _ = _length(own_l_ptr, b, OWN, HAS_OWN_L)
    oth_n, _ = _length(oth_l_ptr, b, OTH, HAS_OTH_L)
    if (tile * BO < own_n) & (oth_n > 0):
        eps, inv_eps, inv_t = _options(eps_hi, eps_lo, t_hi, t_lo, SOFTMAX, DTYPE)
        shift = tl.zeros([], DTYPE)
        if ADJOINT:
            shift = -_log_marginal(oth_n, UNIT, DTYPE)
        own_ptr += b * OWN * K
        oth_ptr += b * OTH * K
        idx = tile * BO + tl.arange(0, BO)
        omask = idx < own_n
        omx, oinv = _softmax_stats(own_ptr, idx, omask, K, inv_t, SOFTMAX, BO, BLOCK_K, DTYPE)
        u = tl.load(own_pot_ptr + b * own_stride + idx, mask=omask, other=0.0)
        acc = tl.zeros([BO], DTYPE)
        for j0 in range(0, oth_n, BT):
            jdx = j0 + tl.arange(0, BT)
            tmask = jdx < oth_n
            tmx, tinv = _softmax_stats(oth_ptr, jdx, tmask, K, inv_t, SOFTMAX, BT, BLOCK_K, DTYPE)
            C = _cost(own_ptr, idx, omask, omx, oinv, oth_ptr, jdx, tmask, tmx, tinv, K, inv_t,
                      P, SOFTMAX, DTYPE, BO, BT)
            v = tl.load(oth_pot_ptr + b * oth_stride + jdx, mask=tmask, other=0.0)
            pi = _plan(u, v, C, omask[:, None] & tmask[None, :], shift, inv_eps)
            if ADJOINT:
                w = tl.load(oth_w_ptr + b * oth_stride + jdx, mask=tmask, other=0.0)
                acc += tl.sum(pi * w[None, :], 1)
            else:
                acc += tl.sum(pi * C, 1)
        out = out_ptr + b * out_stride + idx
        if ADJOINT:
            acc = tl.load(out, mask=omask, other=0.0) - acc
        tl.store(out, acc, mask=omask)


@triton.jit
def _plan_xy(f, g, C, mask2, shift, inv_eps, XAX: tl.constexpr):
    """exp((f_i + g_j - C)/eps + shift) with x's index i along axis 1 - XAX of C (XAX = 1:
    C is [x, y]; XAX = 0: C is [y, x])."""
    S = tl.expand_dims(f, XAX) + tl.expand_dims(g, 1 - XAX) - C
    return tl.where(mask2, tl.exp(S * inv_eps + shift), 0.0)


@triton.jit
def _tiled_gradient_kernel(
    own_ptr, oth_ptr, own_l_ptr, oth_l_ptr, f_ptr, g_ptr, fbar_ptr, gbar_ptr, grad_ptr,
    abar_ptr, out_ptr, OWN, OTH, M, N, K, n_iters, eps_hi, eps_lo, t_hi, t_lo,
    HAS_OWN_L: tl.constexpr, HAS_OTH_L: tl.constexpr, SOFTMAX: tl.constexpr, P: tl.constexpr,
    UNIT: tl.constexpr, DETACH: tl.constexpr, XAX: tl.constexpr, DTYPE: tl.constexpr,
    BO: tl.constexpr, BT: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Gradient of one tile of own rows (x's when XAX = 1, y's when XAX = 0): Cbar rebuilt tile
    by tile from the saved potentials f, g and adjoints fbar, gbar, contracted with dC over the
    other side into abar (out itself when T = 0), then the softmax backward into out."""
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    own_n, own_ok = _length(own_l_ptr, b, OWN, HAS_OWN_L)
    oth_n, oth_ok = _length(oth_l_ptr, b, OTH, HAS_OTH_L)
    if (tile * BO < own_n) & (oth_n > 0):
        eps, inv_eps, inv_t = _options(eps_hi, eps_lo, t_hi, t_lo, SOFTMAX, DTYPE)
        if XAX == 1:
            m = own_n
            n = oth_n
        else:
            m = oth_n
            n = own_n
        la = _log_marginal(m, UNIT, DTYPE)
        lb = _log_marginal(n, UNIT, DTYPE)
        grad = tl.load(grad_ptr + b).to(DTYPE)
        grad = tl.where(own_ok & oth_ok, grad, float("nan"))
        own_ptr += b * OWN * K
        oth_ptr += b * OTH * K
        abar_ptr += b * OWN * K
        out_ptr += b * OWN * K
        if not SOFTMAX:
            abar_ptr = out_ptr
        f_ptr += b * (n_iters + 1) * M
        fbar_ptr += b * (n_iters + 1) * M
        g_ptr += b * (n_iters + 1) * N
        gbar_ptr += b * (n_iters + 1) * N
        idx = tile * BO + tl.arange(0, BO)
        omask = idx < own_n
        omx, oinv = _softmax_stats(own_ptr, idx, omask, K, inv_t, SOFTMAX, BO, BLOCK_K, DTYPE)
        for j0 in range(0, oth_n, BT):
            jdx = j0 + tl.arange(0, BT)
            tmask = jdx < oth_n
            mask2 = omask[:, None] & tmask[None, :]
            tmx, tinv = _softmax_stats(oth_ptr, jdx, tmask, K, inv_t, SOFTMAX, BT, BLOCK_K, DTYPE)
            C = _cost(own_ptr, idx, omask, omx, oinv, oth_ptr, jdx, tmask, tmx, tinv, K, inv_t,
                      P, SOFTMAX, DTYPE, BO, BT)
            if XAX == 1:
                xi = idx
                xm = omask
                yj = jdx
                ym = tmask
            else:
                xi = jdx
                xm = tmask
                yj = idx
                ym = omask
            f = tl.load(f_ptr + n_iters * M + xi, mask=xm, other=0.0)
            g = tl.load(g_ptr + n_iters * N + yj, mask=ym, other=0.0)
            plan = _plan_xy(f, g, C, mask2, 0.0, inv_eps, XAX)
            if DETACH:
                Cbar = grad * plan
            else:
                Cbar = grad * (plan - plan * C * inv_eps)
                for t in range(1, n_iters + 1):
                    f = tl.load(f_ptr + t * M + xi, mask=xm, other=0.0)
                    fbar = tl.load(fbar_ptr + t * M + xi, mask=xm, other=0.0)
                    g = tl.load(g_ptr + t * N + yj, mask=ym, other=0.0)
                    gbar = tl.load(gbar_ptr + t * N + yj, mask=ym, other=0.0)
                    g_prev = tl.load(g_ptr + (t - 1) * N + yj, mask=ym, other=0.0)
                    Cbar += _plan_xy(f, g, C, mask2, -lb, inv_eps, XAX) * tl.expand_dims(gbar, 1 - XAX)
                    Cbar += _plan_xy(f, g_prev, C, mask2, -la, inv_eps, XAX) * tl.expand_dims(fbar, XAX)
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
    with tiles of block_own x block_other cost entries."""

    onchip: bool
    block_own: int = TILE_OWN
    block_other: int = TILE_OTHER
    num_warps: int = 4


def choose_config(M: int, N: int) -> Config:
    entries = triton.next_power_of_2(M) * triton.next_power_of_2(N)
    if entries > ONCHIP_MAX_ENTRIES:
        return Config(onchip=False)
    return Config(onchip=True, num_warps=4 if entries <= 4096 else 8 if entries <= 16384 else 16)


def _split(value: float):
    """value as float32 hi + lo, so that kernels rebuild it to ~1e-14 in float64."""
    hi = float(torch.tensor(value, dtype=torch.float32))
    return hi, float(torch.tensor(value - hi, dtype=torch.float32))


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _common(x, y, x_lengths, y_lengths, epsilon, temperature, p, unit_marginals):
    """Kernel arguments shared by every launch."""
    eps_hi, eps_lo = _split(epsilon)
    t_hi, t_lo = _split(temperature if temperature > 0 else 1.0)
    compute = _compute_dtype(x.dtype)
    return dict(
        eps_hi=eps_hi, eps_lo=eps_lo, t_hi=t_hi, t_lo=t_lo, SOFTMAX=temperature > 0, P=p,
        UNIT=unit_marginals, DTYPE=tl.float64 if compute == torch.float64 else tl.float32,
        BLOCK_K=min(triton.next_power_of_2(x.shape[2]), MAX_BLOCK_K),
    )


def _lengths(lengths, like):
    """(pointer argument, present?): a contiguous lengths tensor, or any tensor when absent."""
    return (like, False) if lengths is None else (lengths.contiguous(), True)


def sinkhorn_forward(x, y, x_lengths, y_lengths, epsilon, n_iters, temperature, p,
                     unit_marginals, detach_plan=False, config=None):
    """``mlot::sinkhorn_forward`` with the Triton kernels: (loss [B], f_hist, g_hist)."""
    B, M, K = x.shape
    N = y.shape[1]
    compute = _compute_dtype(x.dtype)
    x, y = x.contiguous(), y.contiguous()
    loss = torch.zeros(B, dtype=compute, device=x.device)
    f_hist = torch.zeros(B, n_iters + 1, M, dtype=compute, device=x.device)
    g_hist = torch.zeros(B, n_iters + 1, N, dtype=compute, device=x.device)
    if B == 0 or M == 0 or N == 0:
        return loss, f_hist, g_hist
    config = config or choose_config(M, N)
    xl, has_xl = _lengths(x_lengths, x)
    yl, has_yl = _lengths(y_lengths, x)
    common = _common(x, y, x_lengths, y_lengths, epsilon, temperature, p, unit_marginals)
    if config.onchip:
        _onchip_forward_kernel[(B,)](
            x, y, xl, yl, loss, f_hist, g_hist, M, N, K, n_iters, HAS_XL=has_xl, HAS_YL=has_yl,
            BM=triton.next_power_of_2(M), BN=triton.next_power_of_2(N),
            num_warps=config.num_warps, **common)
        return loss, f_hist, g_hist

    sides = _Sides(x, y, xl, yl, has_xl, has_yl, config, common)
    for t in range(1, n_iters + 1):
        sides.half_step(own="x", oth_pot=g_hist[:, t - 1], out_pot=f_hist[:, t])
        sides.half_step(own="y", oth_pot=f_hist[:, t], out_pot=g_hist[:, t])
    row_terms = torch.zeros(B, M, dtype=compute, device=x.device)
    sides.plan_sum(own="x", own_pot=f_hist[:, n_iters], oth_pot=g_hist[:, n_iters], out=row_terms)
    loss.copy_(row_terms.sum(1))
    if has_xl or has_yl:
        valid = torch.ones(B, dtype=torch.bool, device=x.device)
        for lengths, size in ((x_lengths, M), (y_lengths, N)):
            if lengths is not None:
                valid &= (lengths >= 0) & (lengths <= size)
        loss.masked_fill_(~valid, float("nan"))
    return loss, f_hist, g_hist


class _Sides:
    """Launches of the tiled kernels with x or y as the own side."""

    def __init__(self, x, y, xl, yl, has_xl, has_yl, config, common):
        self.side = {"x": (x, xl, has_xl), "y": (y, yl, has_yl)}
        self.config = config
        self.common = common

    def _args(self, own):
        (own_t, own_l, has_own), (oth_t, oth_l, has_oth) = (
            (self.side["x"], self.side["y"]) if own == "x" else (self.side["y"], self.side["x"]))
        B, OWN, K = own_t.shape
        grid = (B, triton.cdiv(OWN, self.config.block_own))
        launch = dict(HAS_OWN_L=has_own, HAS_OTH_L=has_oth, BO=self.config.block_own,
                      BT=self.config.block_other, num_warps=self.config.num_warps, **self.common)
        return grid, (own_t, oth_t, own_l, oth_l), (OWN, oth_t.shape[1], K), launch

    def half_step(self, own, oth_pot, out_pot):
        grid, tensors, sizes, launch = self._args(own)
        _tiled_half_step_kernel[grid](*tensors, oth_pot, out_pot, *sizes, out_pot.stride(0),
                                      oth_pot.stride(0), **launch)

    def plan_sum(self, own, own_pot, oth_pot, out, oth_w=None):
        grid, tensors, sizes, launch = self._args(own)
        _tiled_plan_sum_kernel[grid](*tensors, own_pot, oth_pot, oth_pot if oth_w is None else oth_w,
                                     out, *sizes, own_pot.stride(0), oth_pot.stride(0), out.stride(0),
                                     ADJOINT=oth_w is not None, **launch)

    def gradient(self, own, f_hist, g_hist, fbar, gbar, grad, abar, out, n_iters, detach):
        grid, tensors, sizes, launch = self._args(own)
        M, N = f_hist.shape[2], g_hist.shape[2]
        _tiled_gradient_kernel[grid](*tensors, f_hist, g_hist, fbar, gbar, grad, abar, out,
                                     *sizes[:2], M, N, sizes[2], n_iters, DETACH=detach,
                                     XAX=1 if own == "x" else 0, **launch)


def sinkhorn_backward(grad, x, y, x_lengths, y_lengths, f_hist, g_hist, epsilon, temperature,
                      p, unit_marginals, detach_plan, config=None):
    """``mlot::sinkhorn_backward`` with the Triton kernels: (grad_x, grad_y)."""
    B, M, K = x.shape
    N = y.shape[1]
    n_iters = f_hist.shape[1] - 1
    compute = _compute_dtype(x.dtype)
    x, y = x.contiguous(), y.contiguous()
    grad = grad.to(compute).contiguous()
    f_hist, g_hist = f_hist.contiguous(), g_hist.contiguous()
    grad_x = torch.zeros(B, M, K, dtype=compute, device=x.device)
    grad_y = torch.zeros(B, N, K, dtype=compute, device=x.device)
    if B == 0 or M == 0 or N == 0:
        return grad_x.to(x.dtype), grad_y.to(y.dtype)
    config = config or choose_config(M, N)
    xl, has_xl = _lengths(x_lengths, x)
    yl, has_yl = _lengths(y_lengths, x)
    common = _common(x, y, x_lengths, y_lengths, epsilon, temperature, p, unit_marginals)
    softmax = temperature > 0
    # Gradients with respect to the softmaxed rows, before the softmax backward.
    abar = torch.zeros_like(grad_x) if softmax else grad_x
    cbar = torch.zeros_like(grad_y) if softmax else grad_y
    if config.onchip:
        _onchip_backward_kernel[(B,)](
            grad, x, y, xl, yl, f_hist, g_hist, abar, cbar, grad_x, grad_y, M, N, K, n_iters,
            HAS_XL=has_xl, HAS_YL=has_yl, DETACH=detach_plan, BM=triton.next_power_of_2(M),
            BN=triton.next_power_of_2(N), num_warps=config.num_warps, **common)
        return grad_x.to(x.dtype), grad_y.to(y.dtype)

    sides = _Sides(x, y, xl, yl, has_xl, has_yl, config, common)
    fbar = torch.zeros_like(f_hist)
    gbar = torch.zeros_like(g_hist)
    if not detach_plan:
        T = n_iters
        sides.plan_sum(own="x", own_pot=f_hist[:, T], oth_pot=g_hist[:, T], out=fbar[:, T])
        sides.plan_sum(own="y", own_pot=g_hist[:, T], oth_pot=f_hist[:, T], out=gbar[:, T])
        fbar[:, T] *= grad[:, None] / epsilon
        gbar[:, T] *= grad[:, None] / epsilon
        for t in range(T, 0, -1):
            # g^t = g-step(f^t):  fbar^t -= pi^g gbar^t
            sides.plan_sum(own="x", own_pot=f_hist[:, t], oth_pot=g_hist[:, t],
                           oth_w=gbar[:, t], out=fbar[:, t])
            # f^t = f-step(g^{t-1}):  gbar^{t-1} = -(pi^f)^T fbar^t
            if t > 1:
                sides.plan_sum(own="y", own_pot=g_hist[:, t - 1], oth_pot=f_hist[:, t],
                               oth_w=fbar[:, t], out=gbar[:, t - 1])
    sides.gradient("x", f_hist, g_hist, fbar, gbar, grad, abar, grad_x, n_iters, detach_plan)
    sides.gradient("y", f_hist, g_hist, fbar, gbar, grad, cbar, grad_y, n_iters, detach_plan)
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
