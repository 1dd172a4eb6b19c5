// CPU kernels of mlot::topk_probs_forward and mlot::topk_probs_backward.
//
// For each valid row z (V logits) of logits [B, L, V]:
//
//   s    = std(z, unbiased) + 1e-4  if std_scale, else 1
//   u_v  = z_v / (s T),   q_v = softmax(u)_v = exp((z_v - max z) / (s T) - log_sum),
//   log_sum = log sum_v exp((z_v - max z) / (s T))
//   mass = sum of q over the valid rows of a sequence (ranking 'sequence') or of the
//          batch ('batch'); the top k columns of the mass (or of each row, 'token')
//   probs[j] = q_{idx_j}  (0 for idx_j = -1, a column past V)
//
// The [B, L, V] probabilities are never stored: a first pass per row keeps the
// row statistics (max z, log_sum, s, mean, std, E_q[z]) in row_stats [B, L, 6]; the ranking
// mass recomputes q from them column block by column block; the gather computes
// the k chosen q's. A row's order is that of its logits (s T > 0), so 'token'
// ranking takes at::topk of the logits themselves.
//
// Backward, with G = dloss/dprobs and dot = sum_j probs_j G_j:
//   dloss/du_v = q_v (G_v - dot)        (G_v = G_j at v = idx_j, else 0)
//   dloss/dz_v = dloss/du_v / (s T) + c (z_v - mean) / ((V - 1) std)
//   c = dloss/ds = -(sum_j probs_j G_j z_{idx_j} - dot E_q[z]) / (T s^2)
// (the std term only with std_scale, and 0 where std = 0, as torch's std does):
// one pass per row over V writes the gradient.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "ops.h"
#include "vec_math.h"

namespace mlot {

namespace {

constexpr int64_t kChunk = 512;  // columns per block: the row statistics work on L1-sized blocks
// row_stats columns: max z, log_sum, scale s, mean, std, E_q[z]. Exponents are taken as
// (z - max) / (s T) - log_sum, both terms small, so q keeps float32's relative precision.
constexpr int kStats = 6;

// dst[0..n) = src[0..n) in the compute type.
template <typename scalar_t, typename T>
inline void load_chunk(const scalar_t* src, int64_t n, T* dst) {
  for (int64_t v = 0; v < n; ++v) dst[v] = static_cast<T>(src[v]);
}

// The statistics of one row: the unbiased mean and std in one pass (chunk sums
// merged with Chan's formula), then max and sum of exp online, chunk by chunk.
template <typename scalar_t, typename T>
void row_stats(const scalar_t* z, int64_t V, T inv_t, bool std_scale, T* out) {
  T buf[kChunk];
  T scale = 1, mean = 0, stdv = 0;
  if (std_scale) {
    double m = 0, m2 = 0;
    int64_t count = 0;
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const int64_t n = std::min(kChunk, V - c0);
      load_chunk(z + c0, n, buf);
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t v = 0; v < n; ++v) sum += buf[v];
      const T cm = sum / T(n);
      T sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t v = 0; v < n; ++v) sq += (buf[v] - cm) * (buf[v] - cm);
      const double delta = double(cm) - m, total = double(count + n);
      m += delta * double(n) / total;
      m2 += double(sq) + delta * delta * double(count) * double(n) / total;
      count += n;
    }
    mean = T(m);
    stdv = T(std::sqrt(m2 / double(V - 1)));
    scale = stdv + T(1e-4);
  }
  const T inv = inv_t / scale;  // u = z * inv
  T mx = -std::numeric_limits<T>::infinity(), sum = 0, zsum = 0;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    load_chunk(z + c0, n, buf);
    T cmax = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : cmax)
    for (int64_t v = 0; v < n; ++v) cmax = std::max(cmax, buf[v]);
    if (cmax > mx) {
      const T rescale = exp_simd((mx - cmax) * inv);
      sum *= rescale;
      zsum *= rescale;
      mx = cmax;
    }
    if (mx == -std::numeric_limits<T>::infinity()) continue;  // only -inf so far: weight 0
    T s = 0, zs = 0;
#pragma omp simd reduction(+ : s, zs)
    for (int64_t v = 0; v < n; ++v) {
      const T e = exp_simd((buf[v] - mx) * inv);
      s += e;
      zs += e * buf[v];
    }
    sum += s;
    zsum += zs;
  }
  out[0] = mx;
  out[1] = std::log(sum);
  out[2] = scale;
  out[3] = mean;
  out[4] = stdv;
  out[5] = std_scale ? zsum / sum : T(0);
}

// Where row (b, i)'s k chosen column indices start: idx + b * per_sequence + i * per_row.
struct IndexStrides {
  int64_t per_sequence, per_row;
};

IndexStrides index_strides(c10::string_view ranking, int64_t L, int64_t k) {
  if (ranking == "token") return {L * k, k};  // indices [B, L, k]
  if (ranking == "sequence") return {k, 0};   // [B, k]
  return {0, 0};                              // [k]
}

// The top-k column order of each row ('token', of the logits), of each sequence's
// mass ('sequence') or of the batch's mass ('batch'), padded with -1 to k columns.
at::Tensor column_order(const at::Tensor& logits, const at::Tensor& mass, const at::Tensor& len,
                        int64_t k, c10::string_view ranking) {
  const int64_t L = logits.size(1), V = logits.size(2);
  const int64_t kk = std::min(k, V);
  at::Tensor idx;
  if (ranking == "token") {
    idx = std::get<1>(at::topk(logits, kk, -1));
    const at::Tensor past = at::arange(L, len.options()).unsqueeze(0) >= len.unsqueeze(1);
    idx.masked_fill_(past.unsqueeze(2), -1);  // rows past the lengths choose nothing
  } else {
    const at::Tensor m = ranking == "batch" ? mass.sum(0) : mass;
    idx = std::get<1>(at::topk(m, kk, -1));
  }
  if (kk < k) idx = at::constant_pad_nd(idx, {0, k - kk}, -1);
  return idx.contiguous();
}

template <typename scalar_t, typename T>
void forward_kernel(const at::Tensor& zt, const at::Tensor& len_t, int64_t k, double temperature,
                    bool std_scale, c10::string_view ranking, at::Tensor& probs,
                    at::Tensor& indices, at::Tensor& stats) {
  const int64_t B = zt.size(0), L = zt.size(1), V = zt.size(2);
  const int64_t* len = len_t.data_ptr<int64_t>();
  const scalar_t* z = zt.data_ptr<scalar_t>();
  T* st = stats.data_ptr<T>();
  const T inv_t = T(1) / T(temperature);

  // 1. Row statistics, one pass per valid row.
  at::parallel_for(0, B * L, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      if (r % L < len[r / L]) row_stats<scalar_t, T>(z + r * V, V, inv_t, std_scale, st + r * kStats);
  });

  // 2. Ranking mass per sequence, by column blocks: mass[b, v] = sum_i q_iv.
  at::Tensor mass;
  if (ranking != "token") {
    mass = at::zeros({B, V}, stats.options());
    T* ms = mass.data_ptr<T>();
    const int64_t blocks = (V + kChunk - 1) / kChunk;
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      T buf[kChunk];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, c0 = (task % blocks) * kChunk;
        const int64_t n = std::min(kChunk, V - c0);
        T* out = ms + b * V + c0;
        for (int64_t i = 0; i < len[b]; ++i) {
          const T* s = st + (b * L + i) * kStats;
          const T mx = s[0], log_sum = s[1], inv = inv_t / s[2];
          load_chunk(z + (b * L + i) * V + c0, n, buf);
#pragma omp simd
          for (int64_t v = 0; v < n; ++v) out[v] += exp_simd((buf[v] - mx) * inv - log_sum);
        }
      }
    });
  }

  // 3. The column order.
  indices = column_order(zt, mass, len_t, k, ranking);

  // 4. Gather the chosen probabilities.
  const int64_t* idx = indices.data_ptr<int64_t>();
  const IndexStrides is = index_strides(ranking, L, k);
  T* pr = probs.data_ptr<T>();
  at::parallel_for(0, B * L, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / L, i = r % L;
      if (i >= len[b]) continue;
      const T* s = st + r * kStats;
      const T inv = inv_t / s[2];
      const int64_t* ids = idx + b * is.per_sequence + i * is.per_row;
      for (int64_t j = 0; j < k; ++j)
        pr[r * k + j] = ids[j] < 0 ? T(0)
                                   : std::exp((static_cast<T>(z[r * V + ids[j]]) - s[0]) * inv -
                                              s[1]);
    }
  });
}

template <typename scalar_t, typename T>
void backward_kernel(const at::Tensor& gt, const at::Tensor& zt, const int64_t* len,
                     const at::Tensor& pt, const at::Tensor& it, const at::Tensor& stt,
                     double temperature, bool std_scale, c10::string_view ranking,
                     at::Tensor& grad) {
  const int64_t B = zt.size(0), L = zt.size(1), V = zt.size(2), k = pt.size(2);
  const scalar_t* z = zt.data_ptr<scalar_t>();
  const T* G = gt.data_ptr<T>();
  const T* P = pt.data_ptr<T>();
  const int64_t* idx = it.data_ptr<int64_t>();
  const T* st = stt.data_ptr<T>();
  scalar_t* out = grad.data_ptr<scalar_t>();
  const T t = T(temperature);
  const IndexStrides is = index_strides(ranking, L, k);
  at::parallel_for(0, B * L, 1, [&](int64_t begin, int64_t end) {
    T buf[kChunk];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / L, i = r % L;
      scalar_t* o = out + r * V;
      if (i >= len[b]) {
        std::fill(o, o + V, scalar_t(0));
        continue;
      }
      const T* s = st + r * kStats;
      const T mx = s[0], log_sum = s[1], scale = s[2], mean = s[3], stdv = s[4], qz = s[5];
      const T inv = T(1) / (scale * t);
      const int64_t* ids = idx + b * is.per_sequence + i * is.per_row;
      const T* g = G + r * k;
      const T* p = P + r * k;
      T dot = 0, zdot = 0;
      for (int64_t j = 0; j < k; ++j) {
        if (ids[j] < 0) continue;
        dot += p[j] * g[j];
        zdot += p[j] * g[j] * static_cast<T>(z[r * V + ids[j]]);
      }
      // c = dloss/ds, spread over z through ds/dz_v = (z_v - mean) / ((V - 1) std)
      const T c = -(zdot - dot * qz) / (t * scale * scale);
      const T std_coef = std_scale && stdv > 0 ? c / (T(V - 1) * stdv) : T(0);
      for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
        const int64_t n = std::min(kChunk, V - c0);
        load_chunk(z + r * V + c0, n, buf);
        if (std_coef != 0) {
#pragma omp simd
          for (int64_t v = 0; v < n; ++v)
            buf[v] = -exp_simd((buf[v] - mx) * inv - log_sum) * dot * inv +
                     std_coef * (buf[v] - mean);
        } else {  // no std term: a -inf logit has gradient 0, not 0 * -inf
#pragma omp simd
          for (int64_t v = 0; v < n; ++v) buf[v] = -exp_simd((buf[v] - mx) * inv - log_sum) * dot * inv;
        }
        for (int64_t j = 0; j < k; ++j)
          if (ids[j] >= c0 && ids[j] < c0 + n) buf[ids[j] - c0] += p[j] * g[j] * inv;
        for (int64_t v = 0; v < n; ++v) o[c0 + v] = static_cast<scalar_t>(buf[v]);
      }
    }
  });
}

void check_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "topk_probs: the CPU kernel got tensors on ", x.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_probs_forward_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& lengths, int64_t k,
    double temperature, bool std_scale, c10::string_view ranking) {
  check_topk_probs_args(logits, lengths, k, temperature, std_scale, ranking);
  check_cpu(logits);
  const int64_t B = logits.size(0), L = logits.size(1);
  const at::Tensor len = lengths_or_full(lengths, B, L, "topk_probs", "lengths", "L");
  const at::Tensor z = logits.contiguous();
  const auto dtype = compute_dtype(logits);
  at::Tensor probs = at::zeros({B, L, k}, logits.options().dtype(dtype));
  at::Tensor stats = at::zeros({B, L, kStats}, logits.options().dtype(dtype));
  at::Tensor indices;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(),
                                  "topk_probs_forward_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_kernel<scalar_t, T>(z, len, k, temperature, std_scale, ranking, probs, indices, stats);
  });
  return {probs, indices, stats};
}

at::Tensor topk_probs_backward_cpu(const at::Tensor& grad_probs, const at::Tensor& logits,
                                   const std::optional<at::Tensor>& lengths,
                                   const at::Tensor& probs, const at::Tensor& indices,
                                   const at::Tensor& row_stats, double temperature,
                                   bool std_scale, c10::string_view ranking) {
  check_cpu(logits);
  const int64_t B = logits.size(0), L = logits.size(1);
  const auto dtype = compute_dtype(logits);
  TORCH_CHECK(grad_probs.dim() == 3 && grad_probs.sizes() == probs.sizes() &&
                  probs.size(0) == B && probs.size(1) == L,
              "topk_probs_backward: grad_probs must have the shape of probs [B, L, k]");
  TORCH_CHECK(row_stats.sizes() == at::IntArrayRef({B, L, kStats}) &&
                  row_stats.scalar_type() == dtype && probs.scalar_type() == dtype,
              "topk_probs_backward: probs and row_stats must be those saved by "
              "topk_probs_forward for these logits");
  const at::Tensor len = lengths_or_full(lengths, B, L, "topk_probs", "lengths", "L");
  const at::Tensor z = logits.contiguous();
  const at::Tensor g = grad_probs.to(dtype).contiguous();
  const at::Tensor p = probs.contiguous();
  const at::Tensor idx = indices.contiguous();
  const at::Tensor st = row_stats.contiguous();
  at::Tensor grad = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(),
                                  "topk_probs_backward_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_kernel<scalar_t, T>(g, z, len.data_ptr<int64_t>(), p, idx, st, temperature,
                                 std_scale, ranking, grad);
  });
  return grad;
}

TORCH_LIBRARY_IMPL(mlot, CPU, m) {
  m.impl("topk_probs_forward", &topk_probs_forward_cpu);
  m.impl("topk_probs_backward", &topk_probs_backward_cpu);
}

}  // namespace mlot
