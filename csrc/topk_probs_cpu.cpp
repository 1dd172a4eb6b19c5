// CPU kernels of mlot::topk_probs_stats, mlot::topk_probs_forward and mlot::topk_probs_backward.
//
// logits [B, L, V]. The answer rows of sequence b are rows[b, i], i < lengths[b] (no rows: every
// row, in order); a row l with targets[b, l] != -100 is a cross-entropy row. For each answer row
// z and each temperature tau_t (t < n_t):
//
//   s     = std(z, unbiased) + 1e-4  if std_scale, else 1
//   q^t_v = softmax(z / (s tau_t))_v = exp((z_v - max z) / (s tau_t) - log_sum_t)
//   mass^t[b, v] = sum of q^t_v over the sequence's answer rows (the ranking mass)
//   the top k columns of mass^t[b] ('sequence'), of sum_b mass^t[b] ('batch'), or of the row
//   itself ('token': a row's q has its logits' order), -1 past V
//   probs[t, b, i, j] = q^t_{idx_j}  (0 at index -1)
//
// and for each cross-entropy row, with y = targets[b, l] (the raw logits: no std, no tau):
//
//   ce[b, l] = log_sum_ce + max z - z_y,   log_sum_ce = log sum_v exp(z_v - max z)
//
// Rows that are neither are never read. The [B, L, V] probabilities are never stored: per
// row, row_stats [B, L, 5 + 2 n_t] keeps what the backward needs: max z, s, mean, std,
// log_sum_ce, then (log_sum_t, E_{q^t}[z]) per temperature (E only with std_scale). Each such
// row is read twice, the second time from cache: max z (with std_scale also the mean and the
// std, chunk sums merged with Chan's formula), then one sum of exps per temperature and one
// for the cross-entropy (shared with a temperature of 1 when there is no std scaling). The
// ranking mass reads the answer rows once more, by column blocks.
//
// Backward, with G^t = dloss/dprobs[t] scattered to the chosen columns, dot_t = sum_j p_j G_j
// and g = dloss/dce[b, l]:
//
//   dloss/dz_v = sum_t q^t_v (G^t_v - dot_t) / (s tau_t)
//              + c (z_v - mean) / ((V - 1) std)                     (std_scale, std > 0)
//              + g (exp(z_v - max z - log_sum_ce) - [v = y])
//   c = -sum_t (sum_j p_j G_j z_{idx_j} - dot_t E_{q^t}[z]) / (tau_t s^2)
//
// one pass per answer or cross-entropy row; every other row of the gradient is 0. Each element
// of the gradient is written once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "ops.h"
#include "row_softmax.h"
#include "vec_math.h"

namespace mlot {

namespace {

// row_stats columns
constexpr int kMax = 0, kScale = 1, kMean = 2, kStd = 3, kLogSumCE = 4;
inline int log_sum_col(int t) { return kTopkBaseStats + 2 * t; }
inline int e_z_col(int t) { return kTopkBaseStats + 2 * t + 1; }

// The options every kernel shares: 1/tau_t per temperature, std scaling, the stats layout.
template <typename T>
struct Softmaxes {
  std::vector<T> inv_tau;
  bool std_scale;
  int64_t stats;      // row_stats columns
  int ce_shares = -1;  // the temperature whose log_sum is log_sum_ce (tau = 1, no std), or -1

  Softmaxes(c10::ArrayRef<double> temperatures, bool std_scale_)
      : std_scale(std_scale_), stats(topk_stats_size(temperatures.size())) {
    for (size_t t = 0; t < temperatures.size(); ++t) {
      inv_tau.push_back(T(1) / T(temperatures[t]));
      if (!std_scale && temperatures[t] == 1.0 && ce_shares < 0) ce_shares = int(t);
    }
  }
  int n() const { return int(inv_tau.size()); }
};

// The statistics of one row (`answer`: its softmaxes; `ce`: its cross-entropy's), into out:
// pass 1 max z (and the moments), pass 2, from cache, one sum of exps per softmax.
template <typename scalar_t, typename T>
void row_stats(const scalar_t* z, int64_t V, const Softmaxes<T>& sm, bool answer, bool ce,
               T* out) {
  const bool moments = sm.std_scale && answer;
  T mx, mean, stdv;
  row_max_moments(z, V, moments, mx, mean, stdv);
  const T scale = moments ? stdv + T(1e-4) : T(1);
  out[kMax] = mx;
  out[kScale] = scale;
  out[kMean] = mean;
  out[kStd] = stdv;
  const int n_t = answer ? sm.n() : 0;
  const bool own_ce = ce && !(answer && sm.ce_shares >= 0);
  T inv[kMaxTemperatures + 1], sums[kMaxTemperatures + 1], zsums[kMaxTemperatures + 1];
  int n_e = 0;
  for (int t = 0; t < n_t; ++t) inv[n_e++] = sm.inv_tau[t] / scale;
  if (own_ce) inv[n_e++] = T(1);
  exp_sums(z, V, mx, inv, n_e, sm.std_scale ? n_t : 0, sums, zsums);
  for (int t = 0; t < n_t; ++t) {
    out[log_sum_col(t)] = std::log(sums[t]);
    out[e_z_col(t)] = sm.std_scale ? zsums[t] / sums[t] : T(0);
  }
  if (ce) out[kLogSumCE] = own_ce ? std::log(sums[n_e - 1]) : out[log_sum_col(sm.ce_shares)];
}

// q^t_v of a row from its statistics: exp((z_v - max) * f - log_sum).
template <typename T>
struct RowSoftmax {
  T mx, f, log_sum;
  RowSoftmax(const T* stats, const Softmaxes<T>& sm, int t)
      : mx(stats[kMax]), f(sm.inv_tau[t] / stats[kScale]), log_sum(stats[log_sum_col(t)]) {}
};

// Statistics of every active row, and each cross-entropy row's loss.
template <typename scalar_t, typename T>
void stats_kernel(const at::Tensor& zt, const RowMap& m, const Softmaxes<T>& sm, at::Tensor& stats,
                  at::Tensor& ce) {
  const scalar_t* z = zt.data_ptr<scalar_t>();
  const int64_t* slot = m.slot.data_ptr<int64_t>();
  T* st = stats.data_ptr<T>();
  T* cp = ce.data_ptr<T>();
  const int64_t V = m.V;
  at::parallel_for(0, int64_t(m.active.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t a = begin; a < end; ++a) {
      const int64_t r = m.active[a], y = m.y(r);
      T* out = st + r * sm.stats;
      row_stats<scalar_t, T>(z + m.offset(r), V, sm, slot[r] >= 0, y != kIgnore, out);
      if (y != kIgnore)
        cp[r] = out[kLogSumCE] + out[kMax] - static_cast<T>(z[m.offset(r) + y]);
    }
  });
}

// mass[t, b, v] = sum over the answer rows of sequence b of q^t_v, by column blocks.
template <typename scalar_t, typename T>
void mass_kernel(const at::Tensor& zt, const RowMap& m, const Softmaxes<T>& sm,
                 const at::Tensor& stats, at::Tensor& mass) {
  const scalar_t* z = zt.data_ptr<scalar_t>();
  const int64_t* len = m.len.data_ptr<int64_t>();
  const int64_t* pos = m.pos.data_ptr<int64_t>();
  const T* st = stats.data_ptr<T>();
  T* ms = mass.data_ptr<T>();
  const int64_t B = m.B, V = m.V, blocks = (V + kChunk - 1) / kChunk;
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    T buf[kChunk];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, c0 = (task % blocks) * kChunk;
      const int64_t n = std::min(kChunk, V - c0);
      for (int64_t i = 0; i < len[b]; ++i) {
        const int64_t r = b * m.L + pos[b * m.A + i];
        load_chunk(z + m.offset(r) + c0, n, buf);
        for (int t = 0; t < sm.n(); ++t) {
          const RowSoftmax<T> q(st + r * sm.stats, sm, t);
          T* out = ms + (t * B + b) * V + c0;
#pragma omp simd
          for (int64_t v = 0; v < n; ++v) out[v] += exp_simd((buf[v] - q.mx) * q.f - q.log_sum);
        }
      }
    }
  });
}

// The first kk columns of a row in descending order of its logits (ties: lower index first;
// NaN ranks as +inf, so the order is a strict weak one).
template <typename scalar_t>
void row_topk(const scalar_t* z, int64_t V, int64_t kk, std::vector<int64_t>& order,
              int64_t* out) {
  order.resize(V);
  std::iota(order.begin(), order.end(), int64_t(0));
  auto key = [&](int64_t v) {
    const float x = static_cast<float>(z[v]);
    return x == x ? x : std::numeric_limits<float>::infinity();
  };
  auto before = [&](int64_t a, int64_t b) {
    const float ka = key(a), kb = key(b);
    return ka > kb || (ka == kb && a < b);
  };
  if (kk < V) std::nth_element(order.begin(), order.begin() + kk, order.end(), before);
  std::sort(order.begin(), order.begin() + kk, before);
  std::copy(order.begin(), order.begin() + kk, out);
}

// The column order of each temperature, padded with -1 to k columns: [n_t, B, A, k] for
// 'token', [n_t, B, k] for 'sequence', [n_t, k] for 'batch'.
template <typename scalar_t>
at::Tensor column_order(const at::Tensor& zt, const RowMap& m, const at::Tensor& mass, int64_t n_t,
                        int64_t k, c10::string_view ranking) {
  const int64_t kk = std::min(k, m.V);
  if (ranking != "token") {
    const at::Tensor ms = ranking == "batch" ? mass.sum(1) : mass;  // [n_t, V] or [n_t, B, V]
    at::Tensor idx = std::get<1>(at::topk(ms, kk, -1));
    if (kk < k) idx = at::constant_pad_nd(idx, {0, k - kk}, -1);
    return idx.contiguous();
  }
  at::Tensor idx = at::full({n_t, m.B, m.A, k}, -1, at::kLong);
  int64_t* out = idx.data_ptr<int64_t>();
  const scalar_t* z = zt.data_ptr<scalar_t>();
  const int64_t* len = m.len.data_ptr<int64_t>();
  const int64_t* pos = m.pos.data_ptr<int64_t>();
  const int64_t per_t = m.B * m.A * k;
  at::parallel_for(0, m.B * m.A, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order;
    for (int64_t s = begin; s < end; ++s) {
      const int64_t b = s / m.A, i = s % m.A;
      if (i >= len[b]) continue;
      row_topk(z + m.offset(b * m.L + pos[s]), m.V, kk, order, out + s * k);
      for (int64_t t = 1; t < n_t; ++t) std::copy(out + s * k, out + s * k + kk, out + t * per_t + s * k);
    }
  });
  return idx;
}

// Where answer slot (b, i)'s k chosen columns of temperature t start, in `indices`.
struct IndexStrides {
  int64_t per_t, per_sequence, per_row;
};

IndexStrides index_strides(c10::string_view ranking, int64_t B, int64_t A, int64_t k) {
  if (ranking == "token") return {B * A * k, A * k, k};  // [n_t, B, A, k]
  if (ranking == "sequence") return {B * k, k, 0};       // [n_t, B, k]
  return {k, 0, 0};                                      // [n_t, k]
}

// probs[t, b, i, j] = q^t at the chosen column j of answer row i of sequence b.
template <typename scalar_t, typename T>
void gather_kernel(const at::Tensor& zt, const RowMap& m, const Softmaxes<T>& sm,
                   const at::Tensor& stats, const at::Tensor& indices, int64_t k,
                   c10::string_view ranking, at::Tensor& probs) {
  const scalar_t* z = zt.data_ptr<scalar_t>();
  const int64_t* len = m.len.data_ptr<int64_t>();
  const int64_t* pos = m.pos.data_ptr<int64_t>();
  const int64_t* idx = indices.data_ptr<int64_t>();
  const T* st = stats.data_ptr<T>();
  T* pr = probs.data_ptr<T>();
  const IndexStrides is = index_strides(ranking, m.B, m.A, k);
  const int64_t per_t = m.B * m.A * k;
  at::parallel_for(0, m.B * m.A, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t b = s / m.A, i = s % m.A;
      if (i >= len[b]) continue;
      const int64_t r = b * m.L + pos[s];
      for (int t = 0; t < sm.n(); ++t) {
        const RowSoftmax<T> q(st + r * sm.stats, sm, t);
        const int64_t* ids = idx + t * is.per_t + b * is.per_sequence + i * is.per_row;
        T* p = pr + t * per_t + s * k;
        for (int64_t j = 0; j < k; ++j)
          p[j] = ids[j] < 0 ? T(0)
                            : std::exp((static_cast<T>(z[m.offset(r) + ids[j]]) - q.mx) * q.f - q.log_sum);
      }
    }
  });
}

template <typename scalar_t, typename T>
void backward_kernel(const at::Tensor& gpt, const at::Tensor& gct, const at::Tensor& zt,
                     const RowMap& m, const Softmaxes<T>& sm, const at::Tensor& pt,
                     const at::Tensor& it, const at::Tensor& stt, c10::string_view ranking,
                     at::Tensor& grad) {
  const int64_t V = m.V, k = pt.size(3);
  const scalar_t* z = zt.data_ptr<scalar_t>();
  const T* G = gpt.defined() ? gpt.data_ptr<T>() : nullptr;
  const T* gce = gct.defined() ? gct.data_ptr<T>() : nullptr;
  const T* P = pt.data_ptr<T>();
  const int64_t* idx = it.data_ptr<int64_t>();
  const int64_t* slot = m.slot.data_ptr<int64_t>();
  const T* st = stt.data_ptr<T>();
  scalar_t* out = grad.data_ptr<scalar_t>();
  const IndexStrides is = index_strides(ranking, m.B, m.A, k);
  const int64_t per_t = m.B * m.A * k;
  at::parallel_for(0, int64_t(m.idle.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t a = begin; a < end; ++a)
      std::fill(out + m.idle[a] * V, out + (m.idle[a] + 1) * V, scalar_t(0));
  });
  at::parallel_for(0, int64_t(m.active.size()), 1, [&](int64_t begin, int64_t end) {
    T buf[kChunk], acc[kChunk];
    std::vector<std::pair<int64_t, T>> point;  // (column, addend): the chosen columns, y
    for (int64_t a = begin; a < end; ++a) {
      const int64_t r = m.active[a], b = r / m.L, i = slot[r], y = m.y(r);
      const T* s = st + r * sm.stats;
      const T mx = s[kMax], scale = s[kScale], mean = s[kMean], stdv = s[kStd];
      // Per temperature: dot_t, the chosen columns' addends, and dloss/ds.
      T dot[kMaxTemperatures] = {}, f[kMaxTemperatures] = {}, log_sum[kMaxTemperatures] = {};
      T c = 0;
      point.clear();
      const int n_t = i >= 0 && G ? sm.n() : 0;
      for (int t = 0; t < n_t; ++t) {
        const RowSoftmax<T> q(s, sm, t);
        f[t] = q.f;
        log_sum[t] = q.log_sum;
        const int64_t* ids = idx + t * is.per_t + b * is.per_sequence + i * is.per_row;
        const T* g = G + t * per_t + (b * m.A + i) * k;
        const T* p = P + t * per_t + (b * m.A + i) * k;
        T zdot = 0;
        for (int64_t j = 0; j < k; ++j) {
          if (ids[j] < 0) continue;
          dot[t] += p[j] * g[j];
          zdot += p[j] * g[j] * static_cast<T>(z[m.offset(r) + ids[j]]);
          point.emplace_back(ids[j], p[j] * g[j] * q.f);
        }
        c -= (zdot - dot[t] * s[e_z_col(t)]) * sm.inv_tau[t] / (scale * scale);
      }
      const T std_coef = sm.std_scale && stdv > 0 ? c / (T(V - 1) * stdv) : T(0);
      const T g_ce = y != kIgnore && gce ? gce[r] : T(0);
      const T lse_ce = s[kLogSumCE];
      if (g_ce != 0) point.emplace_back(y, -g_ce);
      std::sort(point.begin(), point.end(),
                [](const auto& u, const auto& w) { return u.first < w.first; });
      auto next = point.begin();
      scalar_t* o = out + r * V;
      for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
        const int64_t n = std::min(kChunk, V - c0);
        load_chunk(z + m.offset(r) + c0, n, buf);
        std::fill(acc, acc + n, T(0));
        for (int t = 0; t < n_t; ++t) {
          if (dot[t] == 0) continue;  // exp(...) <= 1: skipping 0 * exp is exact
          const T w = -dot[t] * f[t], ft = f[t], ls = log_sum[t];
#pragma omp simd
          for (int64_t v = 0; v < n; ++v) acc[v] += w * exp_simd((buf[v] - mx) * ft - ls);
        }
        if (std_coef != 0) {  // (without, a -inf logit's gradient is 0, not 0 * -inf)
#pragma omp simd
          for (int64_t v = 0; v < n; ++v) acc[v] += std_coef * (buf[v] - mean);
        }
        if (g_ce != 0) {
#pragma omp simd
          for (int64_t v = 0; v < n; ++v) acc[v] += g_ce * exp_simd((buf[v] - mx) - lse_ce);
        }
        for (; next != point.end() && next->first < c0 + n; ++next) acc[next->first - c0] += next->second;
        for (int64_t v = 0; v < n; ++v) o[c0 + v] = static_cast<scalar_t>(acc[v]);
      }
    }
  });
}

RowMap topk_row_map(const at::Tensor& z, const std::optional<at::Tensor>& rows,
                    const std::optional<at::Tensor>& lengths,
                    const std::optional<at::Tensor>& targets) {
  const int64_t A = rows.has_value() ? rows->size(1) : z.size(1);
  return row_map(z, rows, lengths_or_full(lengths, z.size(0), A, "topk_probs", "lengths", rows ? "A" : "L"),
                 targets, "topk_probs", "rows", "targets");
}

void check_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "topk_probs: the CPU kernel got tensors on ", x.device());
}

struct Stats {
  at::Tensor stats, mass, ce;
};

// Steps shared by topk_probs_stats and topk_probs_forward: the row statistics, the
// cross-entropy and (but for 'token' ranking) the ranking mass.
template <typename scalar_t, typename T>
Stats stats_and_mass(const at::Tensor& z, const RowMap& m, const Softmaxes<T>& sm,
                     c10::string_view ranking, const at::TensorOptions& opts) {
  Stats out{at::zeros({m.B, m.L, sm.stats}, opts), at::Tensor(), at::zeros({m.B, m.L}, opts)};
  stats_kernel<scalar_t, T>(z, m, sm, out.stats, out.ce);
  out.mass = at::zeros({sm.n(), m.B, ranking == "token" ? 0 : m.V}, opts);
  if (ranking != "token") mass_kernel<scalar_t, T>(z, m, sm, out.stats, out.mass);
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_probs_stats_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& rows,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& targets,
    c10::ArrayRef<double> temperatures, bool std_scale, c10::string_view ranking) {
  check_topk_rows_args(logits, rows, lengths, targets, 1, temperatures, std_scale, ranking);
  check_cpu(logits);
  const at::Tensor z = unit_column_stride(logits);
  const RowMap m = topk_row_map(z, rows, lengths, targets);
  Stats out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "topk_probs_stats_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    out = stats_and_mass<scalar_t, T>(z, m, Softmaxes<T>(temperatures, std_scale), ranking,
                                      logits.options().dtype(compute_dtype(logits)));
  });
  return {out.stats, out.mass, out.ce};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_probs_forward_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& rows,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& targets,
    int64_t k, c10::ArrayRef<double> temperatures, bool std_scale, c10::string_view ranking) {
  check_topk_rows_args(logits, rows, lengths, targets, k, temperatures, std_scale, ranking);
  check_cpu(logits);
  const at::Tensor z = unit_column_stride(logits);
  const RowMap m = topk_row_map(z, rows, lengths, targets);
  const auto opts = logits.options().dtype(compute_dtype(logits));
  const int64_t n_t = int64_t(temperatures.size());
  at::Tensor probs = at::zeros({n_t, m.B, m.A, k}, opts), indices;
  Stats out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "topk_probs_forward_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const Softmaxes<T> sm(temperatures, std_scale);
    out = stats_and_mass<scalar_t, T>(z, m, sm, ranking, opts);
    indices = column_order<scalar_t>(z, m, out.mass, n_t, k, ranking);
    gather_kernel<scalar_t, T>(z, m, sm, out.stats, indices, k, ranking, probs);
  });
  return {probs, indices, out.ce, out.stats};
}

at::Tensor topk_probs_backward_cpu(
    const std::optional<at::Tensor>& grad_probs, const std::optional<at::Tensor>& grad_ce,
    const at::Tensor& logits, const std::optional<at::Tensor>& rows,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& targets,
    const at::Tensor& probs, const at::Tensor& indices, const at::Tensor& row_stats,
    c10::ArrayRef<double> temperatures, bool std_scale, c10::string_view ranking) {
  check_topk_backward_args(grad_probs, grad_ce, logits, rows, targets, probs, indices, row_stats,
                           temperatures, ranking);
  check_cpu(logits);
  const at::Tensor z = unit_column_stride(logits);
  const RowMap m = topk_row_map(z, rows, lengths, targets);
  const auto dtype = compute_dtype(logits);
  const at::Tensor gp = grad_probs.has_value() ? grad_probs->to(dtype).contiguous() : at::Tensor();
  const at::Tensor gc = grad_ce.has_value() ? grad_ce->to(dtype).contiguous() : at::Tensor();
  at::Tensor grad = at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "topk_probs_backward_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_kernel<scalar_t, T>(gp, gc, z, m, Softmaxes<T>(temperatures, std_scale),
                                 probs.contiguous(), indices.contiguous(), row_stats.contiguous(),
                                 ranking, grad);
  });
  return grad;
}

TORCH_LIBRARY_IMPL(mlot, CPU, m) {
  m.impl("topk_probs_stats", &topk_probs_stats_cpu);
  m.impl("topk_probs_forward", &topk_probs_forward_cpu);
  m.impl("topk_probs_backward", &topk_probs_backward_cpu);
}

}  // namespace mlot
