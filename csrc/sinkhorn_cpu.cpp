// CPU kernels of mlot::sinkhorn_forward and mlot::sinkhorn_backward.
//
// One problem b has m = x_lengths[b] rows of x[b] and n = y_lengths[b] rows of y[b]:
//
//   a_i  = softmax(x_i / T)  (x_i itself when T == 0),  c_j likewise
//   C_ij = sum_l |a_il - c_jl|^p
//   la = lb = 0 (unit marginals), else la = -log m, lb = -log n
//   f = g = 0, then n_iters times
//     f_i = eps*la - eps*LSE_j((g_j - C_ij)/eps)
//     g_j = eps*lb - eps*LSE_i((f_i - C_ij)/eps)
//   P_ij = exp((f_i + g_j - C_ij)/eps),   loss = sum_ij P_ij C_ij   (0 when m or n is 0)
//
// The iterations run in the scaling form with absorption (Schmitzer, "Stabilized
// sparse scaling algorithms for entropy regularized transport problems", 2019),
// which computes the same numbers with one exp per entry per absorption instead
// of one per entry per half-iteration:
//
//   f = alpha + eps*log u,  g = beta + eps*log v,  G_ij = exp((alpha_i + beta_j - C_ij)/eps)
//   f-step: r_i = sum_j G_ij v_j,  log u_i = la - log r_i     (a matrix-vector product)
//   g-step: s_j = sum_i G_ij u_i,  log v_j = lb - log s_j
//
// Stability rules (Stab<T> below holds the thresholds):
//   - a sum r_i (s_j) that is not finite or below `sum_floor` is not trusted: that
//     row (column) is computed exactly in the log domain instead;
//   - when some |log u_i| or |log v_j| exceeds `tau`, the scalings are absorbed:
//     alpha = f, beta = g, u = v = 1, and G is recomputed.
// Right after an absorption G <= 1 (f_i + g_j - C_ij <= eps*la <= 0 by the
// definition of f), entries below the float range are dropped, and u, v stay
// in [e^-tau, e^tau]: the dropped mass per sum is below n * FLT_MIN * e^tau, far
// under sum_floor times the float32 resolution, so the trusted sums are exact
// to rounding.
//
// Backward (the exact derivative of the computed loss through every iteration):
// with the adjoints fbar, gbar and Cbar = dloss/dC,
//   loss:       Cbar = P (1 - C/eps),  fbar_i = sum_j P_ij C_ij / eps,  gbar_j = sum_i P_ij C_ij / eps
//   g-step t:   pi^g_ij = exp((f^t_i + g^t_j - C_ij)/eps - lb)      (columns sum to 1)
//               fbar^t -= pi^g gbar^t,    Cbar += pi^g diag(gbar^t)
//   f-step t:   pi^f_ij = exp((f^t_i + g^{t-1}_j - C_ij)/eps - la)  (rows sum to 1)
//               gbar^{t-1} = -pi^f^T fbar^t,   Cbar += diag(fbar^t) pi^f
//   detach_plan: Cbar = P and nothing else.
// Every pi is G_ij * U_i * V_j for the current reference (alpha, beta), so each
// step is a matrix-vector product, and the Cbar updates are rank-1 factors
// buffered and added in one pass (PlanGradient). One scaling comes from the
// saved potential (U from f^t for pi^g); the other normalises the plan as the
// softmax does (V_j = 1 / sum_i G_ij U_i), so that its columns (rows) sum to 1 to
// rounding: the adjoints cancel against those sums, and scalings rebuilt from two
// saved potentials would miss them by |f|/eps float32 ulps. The reference is
// re-based onto the step's own potentials when a scaling leaves [e^-tau, e^tau]
// or a sum is not trusted. Finally
//   abar_il = sum_j Cbar_ij * p|a_il - c_jl|^(p-1) sign(a_il - c_jl),  cbar likewise
// (sign(0) = 0), and back through the softmax when T > 0.
// Work per problem: O(m n K) for the cost and its gradient, O(m n) per
// half-iteration; memory O(m n) scratch per thread plus the saved potentials.
//
// Vectorisation (Simd<T> in vec_math.h, one register of the widest unit the build targets):
// the cost and its gradient run over register blocks of rows x vectors of columns that stay in
// registers for the whole sum over l; the matrix-vector products keep independent vector
// accumulators. G (64 KiB at 128 x 128) outgrows L1, so passes over it are shared: a forward
// iteration is one pass (each block of rows of the f-step, still in cache, adds into the
// g-step's column sums, unless a row falls back or a scaling leaves its range), and in the
// backward each product with G or G^T also computes the next step's normalising sums.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

#include "ops.h"
#include "vec_math.h"

namespace mlot {
namespace {

template <typename T>
struct Stab;
template <>
struct Stab<float> {
  static constexpr float tau = 30.0f;
  static constexpr float sum_floor = 1e-12f;
};
template <>
struct Stab<double> {
  static constexpr double tau = 200.0;
  static constexpr double sum_floor = 1e-180;
};

// Carves the scratch arrays of one problem out of one tensor (visible to the
// allocator and so to memory profiling).
template <typename T>
class Arena {
 public:
  explicit Arena(int64_t numel)
      : buffer_(at::empty({numel}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value))),
        next_(buffer_.data_ptr<T>()),
        end_(next_ + numel) {}
  T* take(int64_t numel) {
    TORCH_INTERNAL_ASSERT(next_ + numel <= end_, "Arena: scratch size undercounted");
    T* out = next_;
    next_ += numel;
    return out;
  }

 private:
  at::Tensor buffer_;
  T* next_;
  T* end_;
};

// ---------------------------------------------------------------- vectors and cost

// out_i = softmax(in_i / temperature) (in_i when temperature == 0) for rows 0..rows-1.
template <typename T>
void load_rows(const T* in, int64_t rows, int64_t K, double temperature, T* out) {
  if (temperature == 0) {
    std::copy(in, in + rows * K, out);
    return;
  }
  using S = Simd<T>;
  constexpr int64_t lanes = S::kLanes;
  const T inv_t = T(1) / T(temperature);
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = in + i * K;
    T* o = out + i * K;
    const auto mx = S::splat(max_of(row, K));
    typename S::V sums{};
    int64_t l = 0;
    for (; l + lanes <= K; l += lanes) {
      const auto e = S::exp((S::load(row + l) - mx) * inv_t);
      S::store(o + l, e);
      sums += e;
    }
    if (l < K) {  // the tail, padded with -inf (probability 0)
      T tail[lanes];
      std::fill(tail, tail + lanes, -std::numeric_limits<T>::infinity());
      std::copy(row + l, row + K, tail);
      const auto e = S::exp((S::load(tail) - mx) * inv_t);
      S::store(tail, e);
      std::copy(tail, tail + (K - l), o + l);
      sums += e;
    }
    const T inv_sum = T(1) / S::sum(sums);
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) o[k] *= inv_sum;
  }
}

// out[j * rows + i] = in[i * in_stride + j] for i < rows, j < cols.
template <typename T>
void transpose(const T* in, int64_t rows, int64_t cols, int64_t in_stride, T* out) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[j * rows + i] = in[i * in_stride + j];
}

// The cost and its gradient run over register blocks of kRowTile rows x NB vectors of columns
// (Simd<T>), which stay in registers for the whole sum over l: per l, the block loads NB vectors
// of c and kRowTile scalars of a. a is zero-padded to whole row tiles ([m_pad, K]) and c,
// transposed, to whole column tiles ([K, n_pad]); the blocks hold kBlockVectors vectors, and
// the columns left over go one vector at a time.
constexpr int64_t kRowTile = 4;
constexpr int64_t kColTile = 16;
constexpr int kBlockVectors = kRegisters == 32 ? 4 : 2;
constexpr int64_t kMatvecRows = kRegisters == 32 ? 8 : 4;  // accumulators of a matrix-vector product
static_assert(kColTile % Simd<float>::kLanes == 0 && kColTile % Simd<double>::kLanes == 0,
              "column tiles must be whole vectors");

inline int64_t round_up(int64_t value, int64_t tile) { return (value + tile - 1) / tile * tile; }

// |d|^P, and Cbar * dC/da = Cbar * P |d|^(P-1) sign(d) (sign(0) = 0), for d = a - c.
template <typename T, int P>
inline typename Simd<T>::V cost_term(typename Simd<T>::V d) {
  return P == 1 ? Simd<T>::abs(d) : d * d;
}
template <typename T, int P>
inline typename Simd<T>::V cost_weight(typename Simd<T>::V cbar, typename Simd<T>::V d) {
  return P == 1 ? Simd<T>::times_sign(cbar, d) : cbar * (d + d);
}

// C_ij = sum_l |a_il - c_jl|^P for rows i0..i0+kRowTile and NB vectors of columns from j0.
template <typename T, int P, int NB>
inline void cost_block(const T* a, const T* cT, int64_t n_pad, int64_t K, int64_t i0, int64_t j0,
                       typename Simd<T>::V (&acc)[kRowTile][NB]) {
  using S = Simd<T>;
  for (auto& row : acc)
    for (auto& v : row) v = typename S::V{};
  for (int64_t l = 0; l < K; ++l) {
    typename S::V c[NB];
    for (int v = 0; v < NB; ++v) c[v] = S::load(cT + l * n_pad + j0 + v * S::kLanes);
    for (int64_t r = 0; r < kRowTile; ++r) {
      const auto ar = S::splat(a[(i0 + r) * K + l]);
      for (int v = 0; v < NB; ++v) acc[r][v] += cost_term<T, P>(ar - c[v]);
    }
  }
}

// C stored [m, n] (the block's rows and columns past m, n are dropped).
template <typename T, int P, int NB>
inline void store_cost_block(const T* a, const T* cT, int64_t m, int64_t n, int64_t n_pad,
                             int64_t K, int64_t i0, int64_t j0, T* C) {
  using S = Simd<T>;
  typename S::V acc[kRowTile][NB];
  cost_block<T, P, NB>(a, cT, n_pad, K, i0, j0, acc);
  T tile[NB * S::kLanes];
  const int64_t rows = std::min(kRowTile, m - i0), cols = std::min<int64_t>(NB * S::kLanes, n - j0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int v = 0; v < NB; ++v) S::store(tile + v * S::kLanes, acc[r][v]);
    std::copy(tile, tile + cols, C + (i0 + r) * n + j0);
  }
}

template <typename T, int P>
void build_cost(const T* a, const T* cT, int64_t m, int64_t n, int64_t n_pad, int64_t K, T* C) {
  constexpr int64_t lanes = Simd<T>::kLanes, width = kBlockVectors * lanes;
  for (int64_t i0 = 0; i0 < m; i0 += kRowTile) {
    int64_t j0 = 0;
    for (; j0 + width <= n_pad; j0 += width)
      store_cost_block<T, P, kBlockVectors>(a, cT, m, n, n_pad, K, i0, j0, C);
    for (; j0 < n; j0 += lanes) store_cost_block<T, P, 1>(a, cT, m, n, n_pad, K, i0, j0, C);
  }
}

// The gradient of one block: partial[r, l] (a vector) += sum over the block's columns of
// Cbar_ij dC_ij/da_il, and cbarT_lj -= the same terms summed over the block's rows. Cbar is
// [m_pad, n_pad] with zero padding, so padded rows and columns add nothing.
template <typename T, int P, int NB>
inline void cost_backward_block(const T* a, const T* cT, const T* Cbar, int64_t n_pad, int64_t K,
                                int64_t i0, int64_t j0, T* cbarT, T* partial) {
  using S = Simd<T>;
  using V = typename S::V;
  V cb[kRowTile][NB];
  for (int64_t r = 0; r < kRowTile; ++r)
    for (int v = 0; v < NB; ++v) cb[r][v] = S::load(Cbar + (i0 + r) * n_pad + j0 + v * S::kLanes);
  for (int64_t l = 0; l < K; ++l) {
    T* cbl = cbarT + l * n_pad + j0;
    V c[NB], col[NB];
    for (int v = 0; v < NB; ++v) {
      c[v] = S::load(cT + l * n_pad + j0 + v * S::kLanes);
      col[v] = V{};
    }
    for (int64_t r = 0; r < kRowTile; ++r) {
      const V ar = S::splat(a[(i0 + r) * K + l]);
      V row{};
      for (int v = 0; v < NB; ++v) {
        const V w = cost_weight<T, P>(cb[r][v], ar - c[v]);
        row += w;
        col[v] += w;
      }
      T* part = partial + (r * K + l) * S::kLanes;
      S::store(part, S::load(part) + row);
    }
    for (int v = 0; v < NB; ++v) S::store(cbl + v * S::kLanes, S::load(cbl + v * S::kLanes) - col[v]);
  }
}

// abar_il = sum_j Cbar_ij dC_ij/da_il and cbarT_lj = sum_i Cbar_ij dC_ij/dc_jl (= -dC/da) over
// abar [m_pad, K] and Cbar [m_pad, n_pad]; `partial` [kRowTile, K, lanes] holds the per-lane
// sums of abar for one row tile.
template <typename T, int P>
void cost_backward(const T* a, const T* cT, const T* Cbar, int64_t m_pad, int64_t n_pad,
                   int64_t K, T* abar, T* cbarT, T* partial) {
  using S = Simd<T>;
  constexpr int64_t lanes = S::kLanes, width = kBlockVectors * lanes;
  std::fill(cbarT, cbarT + K * n_pad, T(0));
  for (int64_t i0 = 0; i0 < m_pad; i0 += kRowTile) {
    std::fill(partial, partial + kRowTile * K * lanes, T(0));
    int64_t j0 = 0;
    for (; j0 + width <= n_pad; j0 += width)
      cost_backward_block<T, P, kBlockVectors>(a, cT, Cbar, n_pad, K, i0, j0, cbarT, partial);
    for (; j0 < n_pad; j0 += lanes)
      cost_backward_block<T, P, 1>(a, cT, Cbar, n_pad, K, i0, j0, cbarT, partial);
    for (int64_t r = 0; r < kRowTile; ++r)
      for (int64_t l = 0; l < K; ++l)
        abar[(i0 + r) * K + l] = S::sum(S::load(partial + (r * K + l) * lanes));
  }
}

// Gradient with respect to the rows given to load_rows, from the gradient
// with respect to its output `out`.
template <typename T>
void load_rows_backward(const T* out, const T* grad_out, int64_t rows, int64_t K,
                        double temperature, T* grad_in) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* o = out + i * K;
    const T* go = grad_out + i * K;
    T* gi = grad_in + i * K;
    if (temperature == 0) {
      std::copy(go, go + K, gi);
      continue;
    }
    const T d = dot(o, go, K);
    const T inv_t = T(1) / T(temperature);
#pragma omp simd
    for (int64_t l = 0; l < K; ++l) gi[l] = o[l] * (go[l] - d) * inv_t;
  }
}

// Loads a_i, c_j and builds C for one problem.
template <typename T>
struct Geometry {
  int64_t m, n, K, n_pad;
  T* a;   // [m_pad, K], rows past m zero
  T* c;   // [n, K]
  T* cT;  // [K, n_pad], columns past n zero
  T* C;   // [m, n]

  static int64_t scratch(int64_t m, int64_t n, int64_t K) {
    return round_up(m, kRowTile) * K + n * K + K * round_up(n, kColTile) + m * n;
  }

  Geometry(Arena<T>& arena, const T* x, const T* y, int64_t m_, int64_t n_, int64_t K_,
           double temperature, int64_t p)
      : m(m_), n(n_), K(K_), n_pad(round_up(n_, kColTile)) {
    const int64_t m_pad = round_up(m, kRowTile);
    a = arena.take(m_pad * K);
    c = arena.take(n * K);
    cT = arena.take(K * n_pad);
    C = arena.take(m * n);
    load_rows(x, m, K, temperature, a);
    std::fill(a + m * K, a + m_pad * K, T(0));
    load_rows(y, n, K, temperature, c);
    std::fill(cT, cT + K * n_pad, T(0));
    for (int64_t l = 0; l < K; ++l)
      for (int64_t j = 0; j < n; ++j) cT[l * n_pad + j] = c[j * K + l];
    if (p == 1)
      build_cost<T, 1>(a, cT, m, n, n_pad, K, C);
    else
      build_cost<T, 2>(a, cT, m, n, n_pad, K, C);
  }
};

// ---------------------------------------------------------------- Gibbs kernel

// G_ij = exp((alpha_i + beta_j - C_ij)/eps) for a reference pair of potentials.
template <typename T>
struct GibbsKernel {
  int64_t m, n;
  T eps;
  const T* C;
  T* G;      // [m, n]
  T* alpha;  // [m]
  T* beta;   // [n]

  static int64_t scratch(int64_t m, int64_t n) { return m * n + m + n; }

  GibbsKernel(Arena<T>& arena, const T* C_, int64_t m_, int64_t n_, T eps_)
      : m(m_), n(n_), eps(eps_), C(C_) {
    G = arena.take(m * n);
    alpha = arena.take(m);
    beta = arena.take(n);
  }

  void rebase(const T* f, const T* g) {
    std::copy(f, f + m, alpha);
    std::copy(g, g + n, beta);
    const T inv_eps = T(1) / eps;
    for (int64_t i = 0; i < m; ++i) {
      const T* Ci = C + i * n;
      T* Gi = G + i * n;
      const T ai = alpha[i];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) Gi[j] = exp_simd((ai + beta[j] - Ci[j]) * inv_eps);
    }
  }

  // out_j += sum_i u_i G_ij over the rows i0..i0+rows-1 only: kBlockVectors vectors of out at
  // a time summed over the rows in registers (one load and store of out per block of rows).
  void add_rows(const T* u, int64_t i0, int64_t rows, T* out) const {
    using S = Simd<T>;
    constexpr int64_t lanes = S::kLanes, width = kBlockVectors * lanes;
    int64_t j = 0;
    for (; j + width <= n; j += width) add_rows_block<kBlockVectors>(u, i0, rows, j, out);
    for (; j + lanes <= n; j += lanes) add_rows_block<1>(u, i0, rows, j, out);
    for (; j < n; ++j) {
      T total = out[j];
      for (int64_t i = i0; i < i0 + rows; ++i) total += G[i * n + j] * u[i];
      out[j] = total;
    }
  }

  // out_i = sum_j G_ij v_j, and out2 = G v2 in the same pass when v2 is given; kMatvecRows rows
  // at a time: independent accumulators, v's vectors loaded once per block of rows.
  void times(const T* v, T* out, const T* v2 = nullptr, T* out2 = nullptr) const {
    if (v2 == nullptr) return times_n<1>({v}, {out}, 0, m);
    times_n<2>({v, v2}, {out, out2}, 0, m);
  }

  // out[i - i0] = sum_j G_ij v_j for the rows i0..i0+rows-1.
  void times_rows(const T* v, int64_t i0, int64_t rows, T* out) const {
    times_n<1>({v}, {out - i0}, i0, i0 + rows);
  }

  // out_j = sum_i u_i G_ij (and out2 = G^T u2 in the same pass), kMatvecRows vectors of
  // columns at a time, held in registers over all the rows.
  void transpose_times(const T* u, T* out, const T* u2 = nullptr, T* out2 = nullptr) const {
    if (u2 == nullptr) return transpose_times_n<1>({u}, {out});
    transpose_times_n<2>({u, u2}, {out, out2});
  }

 private:
  template <int NB>
  void add_rows_block(const T* u, int64_t i0, int64_t rows, int64_t j0, T* out) const {
    using S = Simd<T>;
    typename S::V acc[NB];
    for (int v = 0; v < NB; ++v) acc[v] = S::load(out + j0 + v * S::kLanes);
    for (int64_t i = i0; i < i0 + rows; ++i) {
      const auto ui = S::splat(u[i]);
      for (int v = 0; v < NB; ++v) acc[v] += S::load(G + i * n + j0 + v * S::kLanes) * ui;
    }
    for (int v = 0; v < NB; ++v) S::store(out + j0 + v * S::kLanes, acc[v]);
  }

  template <int NV>
  void times_n(std::array<const T*, NV> v, std::array<T*, NV> out, int64_t begin,
               int64_t end) const {
    using S = Simd<T>;
    constexpr int64_t lanes = S::kLanes;
    const int64_t n_vec = n / lanes * lanes;
    int64_t i = begin;
    for (; i + kMatvecRows <= end; i += kMatvecRows) {
      typename S::V acc[NV][kMatvecRows] = {};
      for (int64_t j = 0; j < n_vec; j += lanes) {
        typename S::V vj[NV];
        for (int k = 0; k < NV; ++k) vj[k] = S::load(v[k] + j);
        for (int64_t r = 0; r < kMatvecRows; ++r) {
          const auto Gij = S::load(G + (i + r) * n + j);
          for (int k = 0; k < NV; ++k) acc[k][r] += Gij * vj[k];
        }
      }
      for (int k = 0; k < NV; ++k)
        for (int64_t r = 0; r < kMatvecRows; ++r) {
          T total = S::sum(acc[k][r]);
          for (int64_t j = n_vec; j < n; ++j) total += G[(i + r) * n + j] * v[k][j];
          out[k][i + r] = total;
        }
    }
    for (; i < end; ++i)
      for (int k = 0; k < NV; ++k) out[k][i] = dot(G + i * n, v[k], n);
  }

  template <int NV>
  void transpose_times_n(std::array<const T*, NV> u, std::array<T*, NV> out) const {
    using S = Simd<T>;
    constexpr int64_t lanes = S::kLanes, width = kMatvecRows / NV * lanes;
    int64_t j = 0;
    for (; j + width <= n; j += width) {
      typename S::V acc[NV][kMatvecRows / NV] = {};
      for (int64_t i = 0; i < m; ++i) {
        typename S::V ui[NV];
        for (int k = 0; k < NV; ++k) ui[k] = S::splat(u[k][i]);
        for (int64_t c = 0; c < kMatvecRows / NV; ++c) {
          const auto Gij = S::load(G + i * n + j + c * lanes);
          for (int k = 0; k < NV; ++k) acc[k][c] += Gij * ui[k];
        }
      }
      for (int k = 0; k < NV; ++k)
        for (int64_t c = 0; c < kMatvecRows / NV; ++c) S::store(out[k] + j + c * lanes, acc[k][c]);
    }
    for (int k = 0; k < NV; ++k) {
      std::fill(out[k] + j, out[k] + n, T(0));
      for (int64_t i = 0; i < m && j < n; ++i) {
        const T* Gi = G + i * n;
        const T ui = u[k][i];
#pragma omp simd
        for (int64_t jj = j; jj < n; ++jj) out[k][jj] += Gi[jj] * ui;
      }
    }
  }
};

// A kernel-scaling sum is trusted when finite and above the floor (see the top of the file).
template <typename T>
bool trusted(T sum) {
  return sum >= Stab<T>::sum_floor && sum <= std::numeric_limits<T>::max();  // false for NaN
}

// -eps * LSE_k((h_k - C_k)/eps) over k = 0..len-1, C_k = C[k * stride].
template <typename T>
T neg_eps_lse(const T* h, const T* C, int64_t len, int64_t stride, T eps) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t k = 0; k < len; ++k) mx = std::max(mx, h[k] - C[k * stride]);
  const T inv_eps = T(1) / eps;
  T sum = 0;
  for (int64_t k = 0; k < len; ++k) sum += exp_simd((h[k] - C[k * stride] - mx) * inv_eps);
  return -mx - eps * std::log(sum);
}

// True when every |log_scale[k]| <= tau (false for NaN); then scale = exp(log_scale).
template <typename T>
bool scalings_in_range(const T* log_scale, int64_t len, T* scale) {
  int out = 0;
#pragma omp simd reduction(| : out)
  for (int64_t k = 0; k < len; ++k) out |= !(std::abs(log_scale[k]) <= Stab<T>::tau);
  if (out) return false;
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) scale[k] = exp_simd(log_scale[k]);
  return true;
}

// ---------------------------------------------------------------- forward

template <typename T>
struct ForwardSolver {
  GibbsKernel<T> kernel;
  T la, lb;
  T* f;  // [m]
  T* g;  // [n]
  T* u;  // [m]
  T* v;  // [n]
  T* log_scale;    // [max(m, n)]
  T* column_sums;  // [n]

  static int64_t scratch(int64_t m, int64_t n) {
    return GibbsKernel<T>::scratch(m, n) + 2 * m + 3 * n + std::max(m, n);
  }

  ForwardSolver(Arena<T>& arena, const Geometry<T>& geo, T eps, bool unit_marginals)
      : kernel(arena, geo.C, geo.m, geo.n, eps),
        la(unit_marginals ? T(0) : -std::log(T(geo.m))),
        lb(unit_marginals ? T(0) : -std::log(T(geo.n))) {
    const int64_t m = geo.m, n = geo.n;
    f = arena.take(m);
    g = arena.take(n);
    u = arena.take(m);
    v = arena.take(n);
    log_scale = arena.take(std::max(m, n));
    column_sums = arena.take(n);
    std::fill(f, f + m, T(0));
    std::fill(g, g + n, T(0));
    rebase();
  }

  void rebase() {
    kernel.rebase(f, g);
    std::fill(u, u + kernel.m, T(1));
    std::fill(v, v + kernel.n, T(1));
  }

  // One iteration (an f-step, then a g-step) with one read of G: the f-step runs over blocks of
  // kStepRows rows (whole vectors of the row updates' exp and log), and each block, still in
  // cache, adds its rows into the g-step's column sums s = G^T u. That needs every row sum
  // trusted and every scaling in range; otherwise (a fallback row or an absorption) the two
  // steps run apart, from the start.
  static constexpr int64_t kStepRows = 2 * kMatvecRows;

  void iterate() {
    const int64_t m = kernel.m, n = kernel.n;
    const T eps = kernel.eps;
    T* s = column_sums;
    std::fill(s, s + n, T(0));
    for (int64_t i0 = 0; i0 < m; i0 += kStepRows) {
      const int64_t rows = std::min(kStepRows, m - i0);
      kernel.times_rows(v, i0, rows, log_scale + i0);
      int out = 0;
#pragma omp simd reduction(| : out)
      for (int64_t i = i0; i < i0 + rows; ++i) {
        const bool ok = trusted(log_scale[i]);
        const T ls = la - log_simd(ok ? log_scale[i] : T(1));
        out |= !(ok && std::abs(ls) <= Stab<T>::tau);
        f[i] = kernel.alpha[i] + eps * ls;
        u[i] = exp_simd(ls);
      }
      if (out) {
        f_step();
        g_step();
        return;
      }
      kernel.add_rows(u, i0, rows, s);
    }
    std::copy(s, s + n, log_scale);
    update(n, lb, kernel.beta, f, m, 1, n, g, v);
  }

  // f-step: r = G v, then f_i = alpha_i + eps*(la - log r_i).
  void f_step() {
    kernel.times(v, log_scale);
    update(kernel.m, la, kernel.alpha, g, kernel.n, kernel.n, 1, f, u);
  }

  // g-step: s = G^T u, then g_j = beta_j + eps*(lb - log s_j).
  void g_step() {
    kernel.transpose_times(u, log_scale);
    update(kernel.n, lb, kernel.beta, f, kernel.m, 1, kernel.n, g, v);
  }

  // Turns the `len` kernel sums held in log_scale into potentials pot_k = ref_k + eps*(lmarg -
  // log sum_k); a sum that is not trusted gives instead the exact eps*lmarg - eps*LSE_l((other_l -
  // C_kl)/eps), with C_kl = C[k * k_stride + l * l_stride]. Then scale_k = exp((pot_k - ref_k)/eps),
  // or an absorption when one leaves [e^-tau, e^tau].
  void update(int64_t len, T lmarg, const T* ref, const T* other, int64_t other_len,
              int64_t k_stride, int64_t l_stride, T* pot, T* scale) {
    const T eps = kernel.eps;
    int untrusted = 0;
#pragma omp simd reduction(| : untrusted)
    for (int64_t k = 0; k < len; ++k) {
      const bool ok = trusted(log_scale[k]);
      untrusted |= !ok;
      const T ls = lmarg - log_simd(ok ? log_scale[k] : T(1));
      pot[k] = ref[k] + eps * ls;
      log_scale[k] = ok ? ls : std::numeric_limits<T>::quiet_NaN();  // NaN marks the fallbacks
    }
    for (int64_t k = 0; untrusted && k < len; ++k) {
      if (log_scale[k] == log_scale[k]) continue;
      pot[k] = eps * lmarg + neg_eps_lse(other, kernel.C + k * k_stride, other_len, l_stride, eps);
      log_scale[k] = (pot[k] - ref[k]) / eps;
    }
    if (!scalings_in_range(log_scale, len, scale)) rebase();
  }

  // sum_ij P_ij C_ij with P_ij = u_i G_ij v_j; rows summed in float64.
  double loss() const {
    const int64_t m = kernel.m, n = kernel.n;
    double total = 0;
    for (int64_t i = 0; i < m; ++i) {
      const T* Gi = kernel.G + i * n;
      const T* Ci = kernel.C + i * n;
      T row = 0;
#pragma omp simd reduction(+ : row)
      for (int64_t j = 0; j < n; ++j) row += Gi[j] * v[j] * Ci[j];
      total += double(u[i]) * double(row);
    }
    return total;
  }
};

template <typename T>
void forward_problem(const T* x, const T* y, int64_t m, int64_t n, int64_t K, T eps,
                     int64_t n_iters, double temperature, int64_t p, bool unit_marginals,
                     T* loss, T* f_hist, T* g_hist, int64_t M, int64_t N) {
  if (m == 0 || n == 0) {
    *loss = 0;
    return;
  }
  Arena<T> arena(Geometry<T>::scratch(m, n, K) + ForwardSolver<T>::scratch(m, n));
  const Geometry<T> geo(arena, x, y, m, n, K, temperature, p);
  ForwardSolver<T> solver(arena, geo, eps, unit_marginals);
  for (int64_t t = 1; t <= n_iters; ++t) {
    solver.iterate();
    std::copy(solver.f, solver.f + m, f_hist + t * M);
    std::copy(solver.g, solver.g + n, g_hist + t * N);
  }
  *loss = T(solver.loss());
}

// ---------------------------------------------------------------- backward

// Cbar_ij += G_ij * sum_r A_ri B_rj: the plan terms of the backward, buffered as
// rank-1 factors and added in one pass per kernel reference.
template <typename T>
struct PlanGradient {
  static constexpr int64_t kCapacity = 16;
  int64_t m, n, count = 0;
  T* A;    // [kCapacity, m]
  T* B;    // [kCapacity, n]
  T* row;  // [n]

  static int64_t scratch(int64_t m, int64_t n) { return kCapacity * (m + n) + n; }

  PlanGradient(Arena<T>& arena, int64_t m_, int64_t n_) : m(m_), n(n_) {
    A = arena.take(kCapacity * m);
    B = arena.take(kCapacity * n);
    row = arena.take(n);
  }

  // Adds diag(a) G diag(b), flushing first when the buffer is full.
  void add(const T* a, const T* b, const GibbsKernel<T>& kernel, T* Cbar) {
    if (count == kCapacity) flush(kernel, Cbar);
    std::copy(a, a + m, A + count * m);
    std::copy(b, b + n, B + count * n);
    ++count;
  }

  // Cbar_ij += G_ij * sum_r A_ri B_rj: kBlockVectors vectors of a row at a time, summed over r
  // in registers; the columns left over through `row`.
  void flush(const GibbsKernel<T>& kernel, T* Cbar) {
    using S = Simd<T>;
    constexpr int64_t lanes = S::kLanes, width = kBlockVectors * lanes;
    if (count == 0) return;
    const int64_t n_blocks = n / width * width;
    for (int64_t i = 0; i < m; ++i) {
      const T* Gi = kernel.G + i * n;
      T* Cbi = Cbar + i * n;
      for (int64_t j = 0; j < n_blocks; j += width) {
        typename S::V acc[kBlockVectors] = {};
        for (int64_t r = 0; r < count; ++r) {
          const auto ari = S::splat(A[r * m + i]);
          for (int v = 0; v < kBlockVectors; ++v)
            acc[v] += ari * S::load(B + r * n + j + v * lanes);
        }
        for (int v = 0; v < kBlockVectors; ++v) {
          T* out = Cbi + j + v * lanes;
          S::store(out, S::load(out) + S::load(Gi + j + v * lanes) * acc[v]);
        }
      }
      if (n_blocks == n) continue;
      std::fill(row + n_blocks, row + n, T(0));
      for (int64_t r = 0; r < count; ++r) {
        const T ari = A[r * m + i];
        const T* Br = B + r * n;
#pragma omp simd
        for (int64_t j = n_blocks; j < n; ++j) row[j] += ari * Br[j];
      }
#pragma omp simd
      for (int64_t j = n_blocks; j < n; ++j) Cbi[j] += Gi[j] * row[j];
    }
    count = 0;
  }
};

template <typename T>
struct BackwardSweep {
  GibbsKernel<T> kernel;
  PlanGradient<T> plan;
  T lb;
  T* Cbar;  // [m, n]
  T* fbar;  // [m]
  T* gbar;  // [n]
  T* U;     // [m]
  T* V;     // [n]
  T* w;     // [max(m, n)]
  T* Gw;    // [m]

  static int64_t scratch(int64_t m, int64_t n) {
    return GibbsKernel<T>::scratch(m, n) + PlanGradient<T>::scratch(m, n) + m * n + 3 * m +
           2 * n + 3 * std::max(m, n);
  }

  BackwardSweep(Arena<T>& arena, const Geometry<T>& geo, T eps, bool unit_marginals)
      : kernel(arena, geo.C, geo.m, geo.n, eps),
        plan(arena, geo.m, geo.n),
        lb(unit_marginals ? T(0) : -std::log(T(geo.n))) {
    const int64_t m = geo.m, n = geo.n;
    Cbar = arena.take(m * n);
    fbar = arena.take(m);
    gbar = arena.take(n);
    U = arena.take(m);
    V = arena.take(n);
    w = arena.take(std::max(m, n));
    Gw = arena.take(m);
    next_scale = arena.take(std::max(m, n));
    next_sums = arena.take(std::max(m, n));
  }

  // sums_k <- 1 / sums_k; false when a sum is not trusted.
  static bool invert_sums(T* sums, int64_t len) {
    int bad = 0;
#pragma omp simd reduction(| : bad)
    for (int64_t k = 0; k < len; ++k) {
      bad |= !trusted(sums[k]);
      sums[k] = T(1) / sums[k];
    }
    return !bad;
  }

  // scale_k = exp((pot_k - ref_k)/eps); false when one leaves [e^-tau, e^tau].
  bool scale_from(const T* pot, const T* ref, int64_t len, T* scale) const {
    const T inv_eps = T(1) / kernel.eps;
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) scale[k] = (pot[k] - ref[k]) * inv_eps;
    return scalings_in_range(scale, len, scale);
  }

  // V_j = 1 / sum_i G_ij U_i; false when a sum is not trusted.
  bool normalize_columns() {
    kernel.transpose_times(U, V);
    return invert_sums(V, kernel.n);
  }

  // U_i = 1 / sum_j G_ij V_j; false when a sum is not trusted.
  bool normalize_rows() {
    kernel.times(V, U);
    return invert_sums(U, kernel.m);
  }

  void rebase(const T* f, const T* g) {
    plan.flush(kernel, Cbar);
    kernel.rebase(f, g);
  }

  // pi^g = diag(U) G diag(V): column j is softmax_i((f_i - C_ij)/eps). U comes from the
  // saved f and V normalises the columns, as the softmax does, so that the columns
  // sum to 1 to rounding (the adjoints below rely on that cancellation).
  void column_stochastic_plan(const T* f, const T* g) {
    if (scale_from(f, kernel.alpha, kernel.m, U) && normalize_columns()) return;
    rebase(f, g);  // column sums become exp(lb) up to rounding
    std::fill(U, U + kernel.m, T(1));
    normalize_columns();
  }

  // pi^f = diag(U) G diag(V): row i is softmax_j((g_j - C_ij)/eps), likewise.
  void row_stochastic_plan(const T* f, const T* g) {
    if (scale_from(g, kernel.beta, kernel.n, V) && normalize_rows()) return;
    rebase(f, g);
    std::fill(V, V + kernel.n, T(1));
    normalize_rows();
  }

  // Loss term at the final potentials: P = diag(U) G diag(V) with P's columns summing
  // to exp(lb) when the last g-step normalised them (n_iters >= 1), G itself otherwise.
  void loss_term(const T* f, const T* g, bool normalized, T grad, bool detach_plan) {
    const int64_t m = kernel.m, n = kernel.n;
    const T eps = kernel.eps;
    kernel.rebase(f, g);
    std::fill(U, U + m, T(1));
    if (normalized) {
      normalize_columns();
      for (int64_t j = 0; j < n; ++j) V[j] *= std::exp(lb);
    } else {
      std::fill(V, V + n, T(1));
    }
    std::fill(gbar, gbar + n, T(0));
    for (int64_t i = 0; i < m; ++i) {
      const T* Gi = kernel.G + i * n;
      const T* Ci = kernel.C + i * n;
      T* Cbi = Cbar + i * n;
      if (detach_plan) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) Cbi[j] = grad * Gi[j] * V[j];
        continue;
      }
      T row = 0;
#pragma omp simd reduction(+ : row)
      for (int64_t j = 0; j < n; ++j) {
        const T P = Gi[j] * V[j];
        const T PC = P * Ci[j];
        Cbi[j] = grad * (P - PC / eps);
        gbar[j] += grad * PC / eps;
        row += PC;
      }
      fbar[i] = grad * row / eps;
    }
  }

  // g^t = eps*lb - eps*LSE_i((f^t_i - C_ij)/eps):  fbar^t -= pi^g gbar^t,  Cbar += pi^g diag(gbar^t).
  // The pass for pi^g gbar^t also sums the rows of the f-step's plan (pi^f from g^{t-1}) when
  // its scalings are in range: one read of G for both.
  void g_step(const T* f_t, const T* g_t, const T* g_prev) {
    const int64_t m = kernel.m, n = kernel.n;
    if (next_plan_ready && invert_sums(next_sums, n))
      take_next_plan(/*g_plan=*/true);
    else
      column_stochastic_plan(f_t, g_t);
    for (int64_t j = 0; j < n; ++j) w[j] = V[j] * gbar[j];
    next_plan_ready = scale_from(g_prev, kernel.beta, n, next_scale);
    kernel.times(w, Gw, next_plan_ready ? next_scale : nullptr, next_sums);
    for (int64_t i = 0; i < m; ++i) fbar[i] -= U[i] * Gw[i];
    plan.add(U, w, kernel, Cbar);
  }

  // f^t = eps*la - eps*LSE_j((g^{t-1}_j - C_ij)/eps):  gbar^{t-1} = -pi^f^T fbar^t,
  // Cbar += diag(fbar^t) pi^f; then fbar restarts at 0 for f^{t-1}. The pass for gbar^{t-1}
  // also sums the columns of the next g-step's plan (from f^{t-1}, when given) likewise.
  void f_step(const T* f_t, const T* g_prev, const T* f_prev) {
    const int64_t m = kernel.m, n = kernel.n;
    if (next_plan_ready && invert_sums(next_sums, m))
      take_next_plan(/*g_plan=*/false);
    else
      row_stochastic_plan(f_t, g_prev);
    for (int64_t i = 0; i < m; ++i) w[i] = U[i] * fbar[i];
    next_plan_ready = false;
    if (f_prev != nullptr) {
      next_plan_ready = scale_from(f_prev, kernel.alpha, m, next_scale);
      kernel.transpose_times(w, gbar, next_plan_ready ? next_scale : nullptr, next_sums);
      for (int64_t j = 0; j < n; ++j) gbar[j] *= -V[j];
    }
    plan.add(w, V, kernel, Cbar);
    std::fill(fbar, fbar + m, T(0));
  }

 private:
  // The plan prepared by the previous step's pass: next_scale the scalings from the saved
  // potential, next_sums (inverted) the normalisers; a g-step's plan is diag(U) G diag(V) with
  // U = next_scale, V = next_sums, an f-step's the other way round.
  bool next_plan_ready = false;
  T* next_scale;  // [max(m, n)]
  T* next_sums;   // [max(m, n)]

  // U, V <- the prepared plan of a g-step (g_plan) or of an f-step.
  void take_next_plan(bool g_plan) {
    const int64_t m = kernel.m, n = kernel.n;
    std::copy(next_scale, next_scale + (g_plan ? m : n), g_plan ? U : V);
    std::copy(next_sums, next_sums + (g_plan ? n : m), g_plan ? V : U);
  }
};

template <typename T>
void backward_problem(T grad, const T* x, const T* y, int64_t m, int64_t n, int64_t K, T eps,
                      int64_t n_iters, double temperature, int64_t p, bool unit_marginals,
                      bool detach_plan, const T* f_hist, const T* g_hist, int64_t M,
                      int64_t N, T* grad_x, T* grad_y) {
  if (m == 0 || n == 0) return;  // grad_x, grad_y stay 0
  const int64_t m_pad = round_up(m, kRowTile), n_pad = round_up(n, kColTile);
  Arena<T> arena(Geometry<T>::scratch(m, n, K) + BackwardSweep<T>::scratch(m, n) +
                 m_pad * n_pad + m_pad * K + K * n_pad + n * K + kRowTile * K * kColTile);
  const Geometry<T> geo(arena, x, y, m, n, K, temperature, p);
  BackwardSweep<T> sweep(arena, geo, eps, unit_marginals);

  sweep.loss_term(f_hist + n_iters * M, g_hist + n_iters * N, n_iters > 0, grad, detach_plan);
  if (!detach_plan) {
    for (int64_t t = n_iters; t >= 1; --t) {
      sweep.g_step(f_hist + t * M, g_hist + t * N, g_hist + (t - 1) * N);
      sweep.f_step(f_hist + t * M, g_hist + (t - 1) * N, t > 1 ? f_hist + (t - 1) * M : nullptr);
    }
  }
  sweep.plan.flush(sweep.kernel, sweep.Cbar);

  T* Cbar = arena.take(m_pad * n_pad);  // sweep.Cbar zero-padded to whole tiles
  std::fill(Cbar, Cbar + m_pad * n_pad, T(0));
  for (int64_t i = 0; i < m; ++i)
    std::copy(sweep.Cbar + i * n, sweep.Cbar + (i + 1) * n, Cbar + i * n_pad);
  T* abar = arena.take(m_pad * K);
  T* cbarT = arena.take(K * n_pad);
  T* cbar = arena.take(n * K);
  T* partial = arena.take(kRowTile * K * kColTile);
  if (p == 1)
    cost_backward<T, 1>(geo.a, geo.cT, Cbar, m_pad, n_pad, K, abar, cbarT, partial);
  else
    cost_backward<T, 2>(geo.a, geo.cT, Cbar, m_pad, n_pad, K, abar, cbarT, partial);
  transpose(cbarT, K, n, geo.n_pad, cbar);
  load_rows_backward(geo.a, abar, m, K, temperature, grad_x);
  load_rows_backward(geo.c, cbar, n, K, temperature, grad_y);
}

// ---------------------------------------------------------------- batch entry points

void check_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "sinkhorn_loss: the CPU kernel got tensors on ",
              x.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_forward_cpu(
    const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& x_lengths,
    const std::optional<at::Tensor>& y_lengths, double epsilon, int64_t n_iters,
    double temperature, int64_t p, bool unit_marginals, bool /*detach_plan: backward only*/) {
  check_sinkhorn_args(x, y, x_lengths, y_lengths, epsilon, n_iters, temperature, p);
  check_cpu(x);
  const int64_t B = x.size(0), M = x.size(1), N = y.size(1), K = x.size(2);
  const at::Tensor lx = lengths_or_full(x_lengths, B, M, "sinkhorn_loss", "x_lengths", "M");
  const at::Tensor ly = lengths_or_full(y_lengths, B, N, "sinkhorn_loss", "y_lengths", "N");
  const auto dtype = compute_dtype(x);
  const at::Tensor xc = x.to(dtype).contiguous();
  const at::Tensor yc = y.to(dtype).contiguous();
  at::Tensor loss = at::empty({B}, x.options().dtype(dtype));
  at::Tensor f_hist = at::zeros({B, n_iters + 1, M}, x.options().dtype(dtype));
  at::Tensor g_hist = at::zeros({B, n_iters + 1, N}, x.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "sinkhorn_forward_cpu", [&] {
    const int64_t* lxp = lx.data_ptr<int64_t>();
    const int64_t* lyp = ly.data_ptr<int64_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        forward_problem<scalar_t>(
            xc.data_ptr<scalar_t>() + b * M * K, yc.data_ptr<scalar_t>() + b * N * K, lxp[b],
            lyp[b], K, scalar_t(epsilon), n_iters, temperature, p, unit_marginals,
            loss.data_ptr<scalar_t>() + b, f_hist.data_ptr<scalar_t>() + b * (n_iters + 1) * M,
            g_hist.data_ptr<scalar_t>() + b * (n_iters + 1) * N, M, N);
      }
    });
  });
  return {loss, f_hist, g_hist};
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
    const std::optional<at::Tensor>& x_lengths, const std::optional<at::Tensor>& y_lengths,
    const at::Tensor& f_hist, const at::Tensor& g_hist, double epsilon, double temperature,
    int64_t p, bool unit_marginals, bool detach_plan) {
  check_cpu(x);
  const int64_t B = x.size(0), M = x.size(1), N = y.size(1), K = x.size(2);
  const auto dtype = compute_dtype(x);
  const int64_t n_iters = f_hist.size(1) - 1;
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == B, "sinkhorn_backward: grad must be [B]");
  TORCH_CHECK(f_hist.sizes() == at::IntArrayRef({B, n_iters + 1, M}) &&
                  g_hist.sizes() == at::IntArrayRef({B, n_iters + 1, N}) &&
                  f_hist.scalar_type() == dtype && g_hist.scalar_type() == dtype,
              "sinkhorn_backward: f_hist and g_hist must be the potentials saved by "
              "sinkhorn_forward for these inputs");
  const at::Tensor lx = lengths_or_full(x_lengths, B, M, "sinkhorn_loss", "x_lengths", "M");
  const at::Tensor ly = lengths_or_full(y_lengths, B, N, "sinkhorn_loss", "y_lengths", "N");
  const at::Tensor xc = x.to(dtype).contiguous();
  const at::Tensor yc = y.to(dtype).contiguous();
  const at::Tensor gc = grad.to(dtype).contiguous();
  const at::Tensor fc = f_hist.contiguous();
  const at::Tensor hc = g_hist.contiguous();
  at::Tensor grad_x = at::zeros({B, M, K}, x.options().dtype(dtype));
  at::Tensor grad_y = at::zeros({B, N, K}, x.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "sinkhorn_backward_cpu", [&] {
    const int64_t* lxp = lx.data_ptr<int64_t>();
    const int64_t* lyp = ly.data_ptr<int64_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        backward_problem<scalar_t>(
            gc.data_ptr<scalar_t>()[b], xc.data_ptr<scalar_t>() + b * M * K,
            yc.data_ptr<scalar_t>() + b * N * K, lxp[b], lyp[b], K, scalar_t(epsilon),
            n_iters, temperature, p, unit_marginals, detach_plan,
            fc.data_ptr<scalar_t>() + b * (n_iters + 1) * M,
            hc.data_ptr<scalar_t>() + b * (n_iters + 1) * N, M, N,
            grad_x.data_ptr<scalar_t>() + b * M * K, grad_y.data_ptr<scalar_t>() + b * N * K);
      }
    });
  });
  return {grad_x.to(x.scalar_type()), grad_y.to(y.scalar_type())};
}

TORCH_LIBRARY_IMPL(mlot, CPU, m) {
  m.impl("sinkhorn_forward", &sinkhorn_forward_cpu);
  m.impl("sinkhorn_backward", &sinkhorn_backward_cpu);
}

}  // namespace mlot
