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

- on-chip (``next_pow2(M) * next_pow2(N) <= ONCHIP_MAX_ENTRIES``): one program per problem; the
  forward is one launch, the backward one launch. Two forms (``Config.scaling``):

  - the scaling form (the default; the CPU kernel's algorithm, csrc/sinkhorn_cpu.cpp) computes
    the same numbers as ``f = alpha + eps log u``, ``g = beta + eps log v`` with the Gibbs kernel
    ``G_ij = exp((alpha_i + beta_j - C_ij)/eps)``: the f-step is ``r = G v``,
    ``log u = l_a - log r``, the g-step ``s = G^T u``, ``log v = l_b - log s``, and
    ``loss = sum_ij u_i G_ij v_j C_ij`` (``sum exp(-C/eps) C`` when ``n_iters = 0``). A sum that
    is not finite or below ``sum_floor`` is not trusted: that row (column) is computed exactly
    in the log domain instead. When some ``|log u_i|`` or ``|log v_j|`` exceeds ``tau`` the
    scalings are absorbed: ``alpha = f``, ``beta = g``, ``u = v = 1``, ``G`` recomputed. The
    thresholds are the CPU's (:data:`STABILITY`: tau = 30 and sum_floor = 1e-12 in float32, 200
    and 1e-180 in float64; ``Config.tau``, ``Config.sum_floor`` override them). The backward
    rebuilds each plan as ``diag(U) G diag(V)``: one scaling from the saved potential, the other
    normalising the plan by its own sums (columns for pi^g, rows for pi^f), so that they sum to
    1 to rounding as the softmax's do; the reference is re-based onto the step's own potentials
    when a scaling leaves ``[e^-tau, e^tau]`` or a sum is not trusted (for pi^f the chunks to
    re-base, all when V leaves the range, else those whose row sums are not trusted, take their
    rows from ``(f^t, g^{t-1})`` directly, and G is re-based after the pass). The common path
    of an iteration does no exp per entry: the forward reads G twice (the f-step's pass, the
    g-step's), the backward reads G and Cbar and writes Cbar once.
    Layout: C, G (and the backward's Cbar) live in a per-problem global scratch [BM, BN]
    (BM, BN = next_pow2(M), next_pow2(N); it stays in L1/L2), streamed in row chunks of BR
    whole rows by BN columns (:func:`chunk_rows`: ``BR * BN <= chunk_budget``, 32 float32 or 16
    float64 entries per thread), so a pass has each chunk's row sums whole and accumulates its
    column sums; row vectors (the saved potentials, ``log u``, ``fbar^T``) are read per chunk
    from global memory, column vectors stay in registers, and the softmaxed rows are written
    once by columns (aT [K, BM], cT [K, BN]) for the cost and its gradient.
  - the log-domain form (``Config(onchip=True, scaling=False)``) holds a whole problem's cost
    matrix in registers and runs every half-step as a log-sum-exp, one exp per entry per
    half-iteration. It spills (ptxas, sm_90: 1.1 KB per thread in the 128 x 128 float32
    forward, 20 KB in the 256 x 256 exact backward) where the scaling form spills nothing; the
    compile-time model (benchmarks/kernel_resources.py) has neither ahead everywhere, so a GPU
    run of both decides.
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
import math

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
# Scaling form: its warps, and the 32-bit registers per thread of a streamed chunk (32 float32
# or 16 float64 entries; see chunk_budget). 4 warps with 32-register chunks (32 rows at
# 128 x 128, 16 at 256 x 256) compile without spills at both sizes, and the compile-time model
# (benchmarks/kernel_resources.py --sweep) gives them the least forward + exact backward time
# of the warps and chunk sizes it compares, at both (benchmarks/results/sm90-scaling-sweep.md).
SCALING_NUM_WARPS = 4
CHUNK_REGISTERS_PER_THREAD = 32
# ... and of its [BV, BLOCK_K] blocks of softmaxed rows (the softmax and the cost's gradient):
# 16, spill-free at both sizes for float32 and bfloat16 inputs, where 32 spills in every
# backward and 4 and 8 each in one plan-detached backward (256 x 256 float32; 128 x 128 bfloat16).
BLOCK_REGISTERS_PER_THREAD = 16
# Scaling form: the absorption threshold tau and the trusted-sum floor per compute dtype.
STABILITY = {torch.float32: (30.0, 1e-12), torch.float64: (200.0, 1e-180)}


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
        C += _cost_term(a[:, None] - c[None, :], P)
    return C


@triton.jit
def _cost_term(d, P: tl.constexpr):
    """|d|^p for d = a - c."""
    if P == 1:
        return tl.abs(d)
    else:
        return d * d


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


# ---------------------------------------------------------------- on-chip regime, log domain
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
def _backward_pointers(b, M, N, K, n_iters, x_ptr, y_ptr, abar_ptr, cbar_ptr, gx_ptr, gy_ptr,
                       f_ptr, g_ptr):
    """A backward program's pointers moved to problem b: its rows of x, y, their gradients
    (before and after the softmax backward) and its saved potentials."""
    return (x_ptr + b * M * K, y_ptr + b * N * K, abar_ptr + b * M * K, cbar_ptr + b * N * K,
            gx_ptr + b * M * K, gy_ptr + b * N * K, f_ptr + b * (n_iters + 1) * M,
            g_ptr + b * (n_iters + 1) * N)


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
    x_ptr, y_ptr, abar_ptr, cbar_ptr, gx_ptr, gy_ptr, f_ptr, g_ptr = _backward_pointers(
        b, M, N, K, n_iters, x_ptr, y_ptr, abar_ptr, cbar_ptr, gx_ptr, gy_ptr, f_ptr, g_ptr)
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


# ---------------------------------------------------------------- on-chip regime, scaling form
#
# One program per problem, as above, but C, G and (backward) Cbar live in a per-problem global
# scratch [BM, BN] (it stays in L1/L2), streamed in row chunks of BR whole rows x BN columns:
# a chunk is a few registers per thread, its row sums are complete, its column sums accumulate
# across chunks. Row vectors live in global memory (f_hist, g_hist, log u, fbar^T) and are
# loaded per chunk; column vectors stay in registers. The reference potentials are always saved
# ones, alpha = f^{a_idx} and beta = g^{b_idx} (f^0 = g^0 = 0), so they are held as two indices.
# Both sides' softmaxed rows are written once, by columns, into aT [K, BM] and cT [K, BN]. A
# debug_barrier separates a pass that writes the scratch from one that reads it, and guards the
# few places where a chunk reads what the same pass wrote or overwrites what it read.


@triton.jit
def _any(mask):
    """1 when some entry of the 1-D mask is set, else 0 (the same scalar in every thread)."""
    return tl.max(tl.where(mask, 1, 0), 0)


@triton.jit
def _trusted(sums, floor):
    """A kernel-scaling sum is trusted when finite and >= floor (NaN is not)."""
    return (sums >= floor) & (sums < float("inf"))


@triton.jit
def _out_of_range(log_scale, mask, tau):
    """1 when some |log_scale| on mask exceeds tau or is NaN, else 0."""
    return _any(mask & ~(tl.abs(log_scale) <= tau))


@triton.jit
def _gibbs(alpha, beta, C, mask2, inv_eps):
    """G_ij = exp((alpha_i + beta_j - C_ij)/eps) on mask2, 0 elsewhere."""
    return tl.where(mask2, tl.exp((alpha[:, None] + beta[None, :] - C) * inv_eps), 0.0)


@triton.jit
def _scaled(sums, ref, lmarg, eps, floor):
    """The potential ref + eps*(lmarg - log sums), its log-scaling lmarg - log sums, and
    whether each sum is trusted."""
    log_scale = lmarg - tl.log(sums)
    return ref + eps * log_scale, log_scale, _trusted(sums, floor)


@triton.jit
def _row_potential(h, C, cmask, lmarg, eps, inv_eps):
    """eps*lmarg - eps*LSE_j((h_j - C_ij)/eps) for each row of C: the exact log-domain step."""
    S = tl.where(cmask[None, :], h[None, :] - C, float("-inf"))
    mx = tl.max(S, 1)
    return eps * lmarg - mx - eps * tl.log(tl.sum(tl.exp((S - mx[:, None]) * inv_eps), 1))


@triton.jit
def _rows_by_columns(z_ptr, out_ptr, length, K, inv_t, SOFTMAX: tl.constexpr,
                     DTYPE: tl.constexpr, WIDTH: tl.constexpr, BV: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """out[l, i] = softmax(z_i/T)_l (z_il itself when T = 0) for the `length` valid rows i of
    z [*, K], BV rows at once: the rows by columns, out [K, WIDTH]."""
    for i0 in range(0, length, BV):
        idx = i0 + tl.arange(0, BV)
        mask = idx < length
        mx, inv_sum = _softmax_stats(z_ptr, idx, mask, K, inv_t, SOFTMAX, BV, BLOCK_K, DTYPE)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            m2 = mask[:, None] & (ks < K)[None, :]
            z = tl.load(z_ptr + idx[:, None] * K + ks[None, :], mask=m2, other=0.0).to(DTYPE)
            if SOFTMAX:
                z = tl.exp((z - mx[:, None]) * inv_t) * inv_sum[:, None]
            tl.store(out_ptr + ks[None, :] * WIDTH + idx[:, None], z, mask=m2)


@triton.jit
def _chunk_cost(at_ptr, rows, rmask, ct_ptr, cols, cmask, K, P: tl.constexpr,
                DTYPE: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """C_ij = sum_l |a_il - c_jl|^p for the chunk's rows and every column (from aT, cT)."""
    C = tl.zeros([BR, BN], DTYPE)
    for l in range(K):
        a = tl.load(at_ptr + l * BM + rows, mask=rmask, other=0.0)
        c = tl.load(ct_ptr + l * BN + cols, mask=cmask, other=0.0)
        C += _cost_term(a[:, None] - c[None, :], P)
    return C


@triton.jit
def _scaling_forward_kernel(
    x_ptr, y_ptr, xl_ptr, yl_ptr, loss_ptr, f_ptr, g_ptr, work_ptr, lu_ptr, at_ptr, ct_ptr,
    M, N, K, n_iters, eps_hi, eps_lo, t_hi, t_lo, tau, log_floor,
    HAS_XL: tl.constexpr, HAS_YL: tl.constexpr, SOFTMAX: tl.constexpr, P: tl.constexpr,
    UNIT: tl.constexpr, DTYPE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BR: tl.constexpr, BV: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One problem per program: n_iters scaling-form iterations and the loss.

    Passes over the scratch (C at work, G after it): the first builds C and G = exp(-C/eps)
    chunk by chunk; then per iteration an f-step pass (reads G: r = G v, log u and f per row,
    stored) and a g-step pass (reads G: s = G^T u, then log v and g). An absorption makes the
    next pass rebuild its chunks of G from C instead of reading them; a sum that is not trusted
    runs that row (in its chunk) or column (one more pass) exactly in the log domain. The loss
    pass reads G and C.
    """
    b = tl.program_id(0).to(tl.int64)
    m, m_ok = _length(xl_ptr, b, M, HAS_XL)
    n, n_ok = _length(yl_ptr, b, N, HAS_YL)
    m, n = m.to(tl.int32), n.to(tl.int32)  # 32-bit row and column offsets
    eps, inv_eps, inv_t = _options(eps_hi, eps_lo, t_hi, t_lo, SOFTMAX, DTYPE)
    x_ptr += b * M * K
    y_ptr += b * N * K
    f_ptr += b * (n_iters + 1) * M
    g_ptr += b * (n_iters + 1) * N
    c_ptr = work_ptr + b * 2 * BM * BN
    G_ptr = c_ptr + BM * BN
    lu_ptr += b * BM
    at_ptr += b * K * BM
    ct_ptr += b * K * BN

    tau = tl.cast(tau, DTYPE)
    floor = tl.exp(tl.cast(log_floor, DTYPE))
    loss = tl.zeros([], DTYPE)
    if (m > 0) & (n > 0):
        _rows_by_columns(x_ptr, at_ptr, m, K, inv_t, SOFTMAX, DTYPE, BM, BV, BLOCK_K)
        _rows_by_columns(y_ptr, ct_ptr, n, K, inv_t, SOFTMAX, DTYPE, BN, BV, BLOCK_K)
        la = _log_marginal(m, UNIT, DTYPE)
        lb = _log_marginal(n, UNIT, DTYPE)
        cols = tl.arange(0, BN)
        cmask = cols < n
        tile = tl.arange(0, BR)[:, None] * BN + cols[None, :]
        # C, and G = exp(-C/eps) at alpha = beta = 0
        tl.debug_barrier()
        for r0 in range(0, m, BR):
            rows = r0 + tl.arange(0, BR)
            rmask = rows < m
            C = _chunk_cost(at_ptr, rows, rmask, ct_ptr, cols, cmask, K, P, DTYPE, BR, BM, BN)
            tl.store(c_ptr + (r0 * BN + tile), C)
            G = tl.where(rmask[:, None] & cmask[None, :], tl.exp(-C * inv_eps), 0.0)
            tl.store(G_ptr + (r0 * BN + tile), G)
        v = cmask.to(DTYPE)
        a_idx = tl.zeros([], tl.int32)  # alpha = f^{a_idx}
        b_idx = tl.zeros([], tl.int32)  # beta = g^{b_idx}
        absorbed = tl.zeros([], tl.int32)  # 1: this pass re-bases (alpha, beta), u = v = 1
        u_unit = tl.full([], 1, tl.int32)  # 1: u = 1 (no f-step yet, or the last g-step re-based)
        for t in range(1, n_iters + 1):
            # f-step: r = G v, log u = la - log r, f = alpha + eps log u
            tl.debug_barrier()
            if absorbed > 0:  # onto (f^{t-1}, g^{t-1})
                a_idx = t - 1
                b_idx = t - 1
            big = tl.zeros([], tl.int32)
            for r0 in range(0, m, BR):
                rows = r0 + tl.arange(0, BR)
                rmask = rows < m
                alpha = tl.load(f_ptr + a_idx * M + rows, mask=rmask, other=0.0)
                if absorbed > 0:
                    beta = tl.load(g_ptr + b_idx * N + cols, mask=cmask, other=0.0)
                    G = _gibbs(alpha, beta, tl.load(c_ptr + (r0 * BN + tile)),
                               rmask[:, None] & cmask[None, :], inv_eps)
                    tl.store(G_ptr + (r0 * BN + tile), G)
                else:
                    G = tl.load(G_ptr + (r0 * BN + tile))
                f, log_u, ok = _scaled(tl.sum(G * v[None, :], 1), alpha, la, eps, floor)
                if _any(rmask & ~ok) > 0:
                    g = tl.load(g_ptr + (t - 1) * N + cols, mask=cmask, other=0.0)
                    exact = _row_potential(g, tl.load(c_ptr + (r0 * BN + tile)), cmask, la, eps,
                                           inv_eps)
                    f = tl.where(ok, f, exact)
                    log_u = tl.where(ok, log_u, (exact - alpha) * inv_eps)
                tl.store(f_ptr + t * M + rows, f, mask=rmask)
                tl.store(lu_ptr + rows, log_u, mask=rmask)
                big = tl.maximum(big, _out_of_range(log_u, rmask, tau))
            absorbed = big

            # g-step: s = G^T u, log v = lb - log s, g = beta + eps log v
            tl.debug_barrier()
            if absorbed > 0:  # onto (f^t, g^{t-1})
                a_idx = t
                b_idx = t - 1
            s = tl.zeros([BN], DTYPE)
            for r0 in range(0, m, BR):
                rows = r0 + tl.arange(0, BR)
                rmask = rows < m
                if absorbed > 0:
                    alpha = tl.load(f_ptr + t * M + rows, mask=rmask, other=0.0)
                    beta = tl.load(g_ptr + b_idx * N + cols, mask=cmask, other=0.0)
                    G = _gibbs(alpha, beta, tl.load(c_ptr + (r0 * BN + tile)),
                               rmask[:, None] & cmask[None, :], inv_eps)
                    tl.store(G_ptr + (r0 * BN + tile), G)
                    u = rmask.to(DTYPE)
                else:
                    G = tl.load(G_ptr + (r0 * BN + tile))
                    u = tl.where(rmask, tl.exp(tl.load(lu_ptr + rows, mask=rmask, other=0.0)), 0.0)
                s += tl.sum(G * u[:, None], 0)
            beta = tl.load(g_ptr + b_idx * N + cols, mask=cmask, other=0.0)
            g, log_v, ok = _scaled(s, beta, lb, eps, floor)
            if _any(cmask & ~ok) > 0:  # those columns exactly: an online LSE over the chunks
                mx = tl.full([BN], float("-inf"), DTYPE)
                total = tl.zeros([BN], DTYPE)
                for r0 in range(0, m, BR):
                    rows = r0 + tl.arange(0, BR)
                    rmask = rows < m
                    f = tl.load(f_ptr + t * M + rows, mask=rmask, other=0.0)
                    S = tl.where(rmask[:, None], f[:, None] - tl.load(c_ptr + (r0 * BN + tile)),
                                 float("-inf"))
                    new = tl.maximum(mx, tl.max(S, 0))
                    safe = tl.where(new == float("-inf"), 0.0, new)
                    total = (total * tl.exp((mx - safe) * inv_eps)
                             + tl.sum(tl.exp((S - safe[None, :]) * inv_eps), 0))
                    mx = new
                exact = eps * lb - mx - eps * tl.log(total)
                g = tl.where(ok, g, exact)
                log_v = tl.where(ok, log_v, (exact - beta) * inv_eps)
            log_v = tl.where(cmask, log_v, 0.0)
            tl.store(g_ptr + t * N + cols, g, mask=cmask)
            u_unit = absorbed
            absorbed = _out_of_range(log_v, cmask, tau)
            if absorbed > 0:
                v = cmask.to(DTYPE)
            else:
                v = tl.where(cmask, tl.exp(log_v), 0.0)

        # loss = sum_ij u_i G_ij v_j C_ij
        tl.debug_barrier()
        if absorbed > 0:  # onto (f^T, g^T)
            a_idx = n_iters
            b_idx = n_iters
        for r0 in range(0, m, BR):
            rows = r0 + tl.arange(0, BR)
            rmask = rows < m
            C = tl.load(c_ptr + (r0 * BN + tile))
            if absorbed > 0:
                alpha = tl.load(f_ptr + a_idx * M + rows, mask=rmask, other=0.0)
                beta = tl.load(g_ptr + b_idx * N + cols, mask=cmask, other=0.0)
                G = _gibbs(alpha, beta, C, rmask[:, None] & cmask[None, :], inv_eps)
                u = rmask.to(DTYPE)
            else:
                G = tl.load(G_ptr + (r0 * BN + tile))
                if u_unit > 0:
                    u = rmask.to(DTYPE)
                else:
                    u = tl.where(rmask, tl.exp(tl.load(lu_ptr + rows, mask=rmask, other=0.0)), 0.0)
            loss += tl.sum(u * tl.sum(G * v[None, :] * C, 1), 0)
    tl.store(loss_ptr + b, tl.where(m_ok & n_ok, loss, float("nan")))


@triton.jit
def _scaling_backward_kernel(
    grad_ptr, x_ptr, y_ptr, xl_ptr, yl_ptr, f_ptr, g_ptr, abar_ptr, cbar_ptr, gx_ptr, gy_ptr,
    work_ptr, fbar_ptr, at_ptr, ct_ptr,
    M, N, K, n_iters, eps_hi, eps_lo, t_hi, t_lo, tau, log_floor,
    HAS_XL: tl.constexpr, HAS_YL: tl.constexpr, SOFTMAX: tl.constexpr, P: tl.constexpr,
    UNIT: tl.constexpr, DETACH: tl.constexpr, DTYPE: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One problem per program: the reverse sweep in the scaling form, then the cost backward
    into abar, cbar (the gradients themselves when T = 0) and the softmax backward.

    Passes over the scratch (C, G, Cbar): the loss term's two (build C and G at (f^T, g^T)
    with its column sums; then Cbar, fbar^T, gbar^T; detach_plan: neither the second nor the
    sweep, Cbar = grad P is formed in the cost backward), then one pass per iteration t
    (reads G and Cbar, writes Cbar): the g-step's fbar^t -= pi^g gbar^t and its Cbar term, the
    f-step's row sums, gbar^{t-1} and its Cbar term, and the next g-step's column sums. A
    re-base (a scaling out of [e^-tau, e^tau], a sum not trusted) adds a pass that rebuilds G
    from C; where it is the f-step's, the iteration's pass first takes the chunks' rows of
    pi^f from C.
    """
    b = tl.program_id(0).to(tl.int64)
    m, m_ok = _length(xl_ptr, b, M, HAS_XL)
    n, n_ok = _length(yl_ptr, b, N, HAS_YL)
    m, n = m.to(tl.int32), n.to(tl.int32)  # 32-bit row and column offsets
    eps, inv_eps, inv_t = _options(eps_hi, eps_lo, t_hi, t_lo, SOFTMAX, DTYPE)
    x_ptr, y_ptr, abar_ptr, cbar_ptr, gx_ptr, gy_ptr, f_ptr, g_ptr = _backward_pointers(
        b, M, N, K, n_iters, x_ptr, y_ptr, abar_ptr, cbar_ptr, gx_ptr, gy_ptr, f_ptr, g_ptr)
    c_ptr = work_ptr + b * 3 * BM * BN
    G_ptr = c_ptr + BM * BN
    cb_ptr = G_ptr + BM * BN
    fbar_ptr += b * BM
    at_ptr += b * K * BM
    ct_ptr += b * K * BN
    grad = tl.load(grad_ptr + b).to(DTYPE)
    grad = tl.where(m_ok & n_ok, grad, float("nan"))
    tau = tl.cast(tau, DTYPE)
    floor = tl.exp(tl.cast(log_floor, DTYPE))

    if (m > 0) & (n > 0):
        _rows_by_columns(x_ptr, at_ptr, m, K, inv_t, SOFTMAX, DTYPE, BM, BV, BLOCK_K)
        _rows_by_columns(y_ptr, ct_ptr, n, K, inv_t, SOFTMAX, DTYPE, BN, BV, BLOCK_K)
        tl.debug_barrier()
        lb = _log_marginal(n, UNIT, DTYPE)
        cols = tl.arange(0, BN)
        cmask = cols < n
        tile = tl.arange(0, BR)[:, None] * BN + cols[None, :]

        # Loss term: G at (f^T, g^T), P = G diag(V) with V = e^{lb} / (column sums) (T >= 1)
        a_idx = n_iters  # alpha = f^{a_idx}
        b_idx = n_iters  # beta = g^{b_idx}
        g_T = tl.load(g_ptr + n_iters * N + cols, mask=cmask, other=0.0)
        colsum = tl.zeros([BN], DTYPE)
        for r0 in range(0, m, BR):
            rows = r0 + tl.arange(0, BR)
            rmask = rows < m
            C = _chunk_cost(at_ptr, rows, rmask, ct_ptr, cols, cmask, K, P, DTYPE, BR, BM, BN)
            if not DETACH:
                tl.store(c_ptr + (r0 * BN + tile), C)
            f_T = tl.load(f_ptr + n_iters * M + rows, mask=rmask, other=0.0)
            G = _gibbs(f_T, g_T, C, rmask[:, None] & cmask[None, :], inv_eps)
            tl.store(G_ptr + (r0 * BN + tile), G)
            colsum += tl.sum(G, 0)
        if n_iters > 0:
            V_loss = tl.where(cmask, tl.exp(lb) / colsum, 0.0)
        else:
            V_loss = cmask.to(DTYPE)
        tl.debug_barrier()

        if not DETACH:
            # Cbar = grad P (1 - C/eps), fbar^T = grad (P C) 1 / eps, gbar^T = grad (P C)^T 1 / eps
            gbar = tl.zeros([BN], DTYPE)
            for r0 in range(0, m, BR):
                rows = r0 + tl.arange(0, BR)
                plan = tl.load(G_ptr + (r0 * BN + tile)) * V_loss[None, :]
                PC = plan * tl.load(c_ptr + (r0 * BN + tile))
                tl.store(cb_ptr + (r0 * BN + tile), grad * (plan - PC * inv_eps))
                tl.store(fbar_ptr + rows, grad * tl.sum(PC, 1) * inv_eps, mask=rows < m)
                gbar += grad * tl.sum(PC, 0) * inv_eps
            u_ok = tl.full([], 1, tl.int32)  # U^T = exp((f^T - alpha)/eps) = 1
            for s in range(n_iters):
                t = n_iters - s
                tl.debug_barrier()
                # g^t = g-step(f^t): pi^g = diag(U) G diag(V), U from f^t, V normalises columns
                if (u_ok == 0) | (_any(cmask & ~_trusted(colsum, floor)) > 0):
                    a_idx = t  # re-base onto (f^t, g^t): U = 1
                    b_idx = t
                    g_t = tl.load(g_ptr + t * N + cols, mask=cmask, other=0.0)
                    colsum = tl.zeros([BN], DTYPE)
                    for r0 in range(0, m, BR):
                        rows = r0 + tl.arange(0, BR)
                        rmask = rows < m
                        f_t = tl.load(f_ptr + t * M + rows, mask=rmask, other=0.0)
                        G = _gibbs(f_t, g_t, tl.load(c_ptr + (r0 * BN + tile)),
                                   rmask[:, None] & cmask[None, :], inv_eps)
                        tl.store(G_ptr + (r0 * BN + tile), G)
                        colsum += tl.sum(G, 0)
                    tl.debug_barrier()
                w = tl.where(cmask, gbar / colsum, 0.0)  # V gbar^t
                # f^t = f-step(g^{t-1}): pi^f = diag(U') G diag(V'), V' from g^{t-1}, U'
                # normalises rows. V' out of range, or a chunk's row sums not trusted: that
                # chunk's rows of pi^f from (f^t, g^{t-1}) itself, and G re-based after the pass
                log_v = (tl.load(g_ptr + (t - 1) * N + cols, mask=cmask, other=0.0)
                         - tl.load(g_ptr + b_idx * N + cols, mask=cmask, other=0.0)) * inv_eps
                rebase = _out_of_range(log_v, cmask, tau)
                V_f = tl.where(cmask, tl.exp(log_v), 0.0)
                gsum = tl.zeros([BN], DTYPE)  # -gbar^{t-1}
                next_sum = tl.zeros([BN], DTYPE)  # the next g-step's column sums
                next_big = tl.zeros([], tl.int32)
                fell_back = tl.zeros([], tl.int32)
                for r0 in range(0, m, BR):
                    rows = r0 + tl.arange(0, BR)
                    rmask = rows < m
                    G = tl.load(G_ptr + (r0 * BN + tile))
                    f_t = tl.load(f_ptr + t * M + rows, mask=rmask, other=0.0)
                    alpha = tl.load(f_ptr + a_idx * M + rows, mask=rmask, other=0.0)
                    U = tl.where(rmask, tl.exp((f_t - alpha) * inv_eps), 0.0)
                    # fbar^t = (loss term at t = T) - U (G w);  Cbar += diag(U) G diag(w)
                    if t == n_iters:
                        fbar = tl.load(fbar_ptr + rows, mask=rmask, other=0.0)
                    else:
                        fbar = tl.zeros([BR], DTYPE)
                    fbar -= U * tl.sum(G * w[None, :], 1)
                    Cb = tl.load(cb_ptr + (r0 * BN + tile)) + G * (U[:, None] * w[None, :])
                    G_f = G
                    V_chunk = V_f
                    row_sum = tl.sum(G * V_f[None, :], 1)
                    own = tl.maximum(rebase, _any(rmask & ~_trusted(row_sum, floor)))
                    if own > 0:
                        g_prev = tl.load(g_ptr + (t - 1) * N + cols, mask=cmask, other=0.0)
                        G_f = _gibbs(f_t, g_prev, tl.load(c_ptr + (r0 * BN + tile)),
                                     rmask[:, None] & cmask[None, :], inv_eps)
                        V_chunk = cmask.to(DTYPE)
                        row_sum = tl.sum(G_f, 1)
                    fell_back = tl.maximum(fell_back, own)
                    # gbar^{t-1} = -pi^f^T fbar^t;  Cbar += diag(fbar^t) pi^f
                    w_f = tl.where(rmask, fbar / row_sum, 0.0)
                    term = G_f * (w_f[:, None] * V_chunk[None, :])
                    tl.store(cb_ptr + (r0 * BN + tile), Cb + term)
                    gsum += tl.sum(term, 0)
                    # the next g-step's U = exp((f^{t-1} - alpha)/eps) at this pass's reference
                    f_prev = tl.load(f_ptr + (t - 1) * M + rows, mask=rmask, other=0.0)
                    log_u = (f_prev - alpha) * inv_eps
                    next_big = tl.maximum(next_big, _out_of_range(log_u, rmask, tau))
                    next_sum += tl.sum(G * tl.where(rmask, tl.exp(log_u), 0.0)[:, None], 0)
                if fell_back > 0:
                    a_idx = t
                    b_idx = t - 1
                if (fell_back > 0) & (t > 1):
                    # re-base onto (f^t, g^{t-1}), as the chunks that fell back did, with the
                    # next g-step's column sums
                    tl.debug_barrier()
                    g_prev = tl.load(g_ptr + (t - 1) * N + cols, mask=cmask, other=0.0)
                    next_sum = tl.zeros([BN], DTYPE)
                    next_big = tl.zeros([], tl.int32)
                    for r0 in range(0, m, BR):
                        rows = r0 + tl.arange(0, BR)
                        rmask = rows < m
                        f_t = tl.load(f_ptr + t * M + rows, mask=rmask, other=0.0)
                        G = _gibbs(f_t, g_prev, tl.load(c_ptr + (r0 * BN + tile)),
                                   rmask[:, None] & cmask[None, :], inv_eps)
                        tl.store(G_ptr + (r0 * BN + tile), G)
                        f_prev = tl.load(f_ptr + (t - 1) * M + rows, mask=rmask, other=0.0)
                        log_u = (f_prev - f_t) * inv_eps
                        next_big = tl.maximum(next_big, _out_of_range(log_u, rmask, tau))
                        next_sum += tl.sum(G * tl.where(rmask, tl.exp(log_u), 0.0)[:, None], 0)
                gbar = -gsum
                colsum = next_sum
                u_ok = 1 - next_big

        # Cost backward: abar_il = sum_j Cbar_ij dC_ij/da_il, cbar_jl = -sum_i Cbar_ij dC_ij/da_il
        tl.debug_barrier()
        if not SOFTMAX:
            abar_ptr = gx_ptr
            cbar_ptr = gy_ptr
        for r0 in range(0, m, BR):
            rows = r0 + tl.arange(0, BR)
            rmask = rows < m
            if DETACH:
                Cb = grad * tl.load(G_ptr + (r0 * BN + tile)) * V_loss[None, :]
            else:
                Cb = tl.load(cb_ptr + (r0 * BN + tile))
            Cb = tl.where(rmask[:, None] & cmask[None, :], Cb, 0.0)
            for l in range(K):
                a = tl.load(at_ptr + l * BM + rows, mask=rmask, other=0.0)
                c = tl.load(ct_ptr + l * BN + cols, mask=cmask, other=0.0)
                W = Cb * _cost_grad(a[:, None] - c[None, :], P)
                tl.store(abar_ptr + rows * K + l, tl.sum(W, 1), mask=rmask)
                acc = tl.load(cbar_ptr + cols * K + l, mask=cmask, other=0.0)
                tl.store(cbar_ptr + cols * K + l, acc - tl.sum(W, 0), mask=cmask)
            tl.debug_barrier()  # the next chunk reads this one's cbar
        if SOFTMAX:
            for r0 in range(0, m, BV):
                idx = r0 + tl.arange(0, BV)
                mask = idx < m
                mx, inv_sum = _softmax_stats(x_ptr, idx, mask, K, inv_t, SOFTMAX, BV, BLOCK_K,
                                             DTYPE)
                _softmax_backward(abar_ptr, x_ptr, gx_ptr, idx, mask, K, mx, inv_sum, inv_t, BV,
                                  BLOCK_K, DTYPE)
            for j0 in range(0, n, BV):
                idx = j0 + tl.arange(0, BV)
                mask = idx < n
                mx, inv_sum = _softmax_stats(y_ptr, idx, mask, K, inv_t, SOFTMAX, BV, BLOCK_K,
                                             DTYPE)
                _softmax_backward(cbar_ptr, y_ptr, gy_ptr, idx, mask, K, mx, inv_sum, inv_t, BV,
                                  BLOCK_K, DTYPE)


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
    the tiled regime's; choose_config sizes the on-chip one by the problem).

    On-chip only: ``scaling`` selects the scaling-form kernels (True) or the log-domain ones
    (False); ``tau`` and ``sum_floor`` override the dtype's absorption threshold and trusted-sum
    floor (:data:`STABILITY`; ``sum_floor=float('inf')`` trusts no sum, so every half-step runs
    in the log domain); ``chunk_rows`` overrides the rows per streamed chunk (a power of 2;
    default :func:`chunk_rows`). The tiled regime ignores them.
    """

    onchip: bool
    block_own: int = TILE_OWN
    block_other: int = TILE_OTHER
    num_warps: int = TILED_NUM_WARPS
    scaling: bool = True
    tau: float | None = None
    sum_floor: float | None = None
    chunk_rows: int | None = None

    def __post_init__(self):
        for name in ("block_own", "block_other", "num_warps", "chunk_rows"):
            value = getattr(self, name)
            if name == "chunk_rows" and value is None:
                continue
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1
                    and value & (value - 1) == 0):
                raise ValueError(f"Config: {name} must be a power of 2, got {value!r}")
        if not isinstance(self.scaling, bool):
            raise ValueError(f"Config: scaling must be a bool, got {self.scaling!r}")
        if self.tau is not None and not (_is_real(self.tau) and 0 < self.tau < math.inf):
            raise ValueError("Config: tau must be a finite number > 0 (None: the dtype's "
                             f"threshold), got {self.tau!r}")
        if self.sum_floor is not None and not (_is_real(self.sum_floor) and self.sum_floor > 0):
            raise ValueError("Config: sum_floor must be a number > 0, inf allowed (None: the "
                             f"dtype's floor), got {self.sum_floor!r}")


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def choose_config(M: int, N: int, scaling: bool = True) -> Config:
    """The tiled regime past ONCHIP_MAX_ENTRIES padded entries, else the on-chip scaling form
    with SCALING_NUM_WARPS warps (``scaling=False``: the log-domain form, with 4, 8 or 16 by
    size)."""
    entries = triton.next_power_of_2(M) * triton.next_power_of_2(N)
    if entries > ONCHIP_MAX_ENTRIES:
        return Config(onchip=False)
    if scaling:
        return Config(onchip=True, num_warps=SCALING_NUM_WARPS)
    return Config(onchip=True, scaling=False,
                  num_warps=4 if entries <= 4096 else 8 if entries <= 16384 else 16)


def chunk_budget(num_warps: int, compute: torch.dtype,
                 registers: int = CHUNK_REGISTERS_PER_THREAD) -> int:
    """Entries of a streamed block of the scaling form: ``registers`` 32-bit registers per
    thread, 32 * num_warps threads."""
    per_thread = registers * 4 // compute.itemsize
    return per_thread * 32 * num_warps


def chunk_rows(BM: int, BN: int, num_warps: int, compute: torch.dtype) -> int:
    """Rows BR per streamed chunk [BR, BN] of the scaling form: BR * BN <= chunk_budget, at
    least one row (a whole row is a chunk's least) and at most BM."""
    return max(1, min(BM, chunk_budget(num_warps, compute) // BN))


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


def _scaling_args(x, y, compute, config, common, matrices):
    """Scratch and arguments of a scaling-form launch: work [B, matrices, BM, BN] (C, G and
    the backward's Cbar), a row vector [B, BM] (log u, or fbar^T), the softmaxed rows by
    columns aT [B, K, BM] and cT [B, K, BN]; the thresholds (tau, log of the sum floor) and
    the chunk sizes."""
    B, M, K = x.shape
    BM, BN = triton.next_power_of_2(M), triton.next_power_of_2(y.shape[1])
    tau, floor = STABILITY[compute]
    tau = tau if config.tau is None else config.tau
    floor = floor if config.sum_floor is None else config.sum_floor
    BR = config.chunk_rows or chunk_rows(BM, BN, config.num_warps, compute)
    budget = chunk_budget(config.num_warps, compute, BLOCK_REGISTERS_PER_THREAD)
    new = functools.partial(torch.empty, dtype=compute, device=x.device)
    scratch = (new(B, matrices, BM, BN), new(B, BM), new(B, K, BM), new(B, K, BN))
    sizes = dict(BM=BM, BN=BN, BR=min(BR, BM),
                 BV=max(1, min(max(BM, BN), budget // common["BLOCK_K"])))
    return scratch, dict(tau=float(tau), log_floor=math.log(floor)), sizes


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
    if config.onchip and config.scaling:
        scratch, stab, sizes = _scaling_args(x, y, compute, config, common, 2)
        _scaling_forward_kernel[(B,)](
            x, y, x if x_lengths is None else x_lengths, x if y_lengths is None else y_lengths,
            loss, f_hist, g_hist, *scratch, M, N, K, n_iters, **stab,
            HAS_XL=x_lengths is not None, HAS_YL=y_lengths is not None,
            num_warps=config.num_warps, **sizes, **common)
        return loss, f_hist, g_hist
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
    if config.onchip and config.scaling:
        scratch, stab, sizes = _scaling_args(x, y, compute, config, common, 3)
        _scaling_backward_kernel[(B,)](
            grad, x, y, x if x_lengths is None else x_lengths, x if y_lengths is None else y_lengths,
            f_hist, g_hist, abar, cbar, grad_x, grad_y, *scratch, M, N, K, T, **stab,
            HAS_XL=x_lengths is not None, HAS_YL=y_lengths is not None, DETACH=detach_plan,
            num_warps=config.num_warps, **sizes, **common)
        return grad_x.to(x.dtype), grad_y.to(y.dtype)
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
