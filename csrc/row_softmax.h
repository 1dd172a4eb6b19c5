// Per-row pieces the softmax kernels share (topk_probs_cpu.cpp, uld_cpu.cpp): reading a row in
// L1-sized chunks, its max (and moments), sums of exps, and which rows of a [B, L, V] tensor a
// call reads.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops.h"
#include "vec_math.h"

namespace mlot {

constexpr int64_t kChunk = 512;  // columns per block: every pass works on L1-sized blocks
constexpr int64_t kIgnore = -100;

// dst[0..n) = src[0..n) in the compute type.
template <typename scalar_t, typename T>
inline void load_chunk(const scalar_t* src, int64_t n, T* dst) {
  for (int64_t v = 0; v < n; ++v) dst[v] = static_cast<T>(src[v]);
}

// max z of a row and, with `moments`, its mean and unbiased std (each chunk's mean and sum of
// squared deviations, merged with Chan's formula: no cancellation).
template <typename scalar_t, typename T>
void row_max_moments(const scalar_t* z, int64_t V, bool moments, T& mx, T& mean, T& stdv) {
  T buf[kChunk];
  mx = -std::numeric_limits<T>::infinity();
  double m = 0, m2 = 0;
  for (int64_t c0 = 0, count = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    load_chunk(z + c0, n, buf);
    T cmax = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : cmax)
    for (int64_t v = 0; v < n; ++v) cmax = std::max(cmax, buf[v]);
    mx = std::max(mx, cmax);
    if (!moments) continue;
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
  mean = moments ? T(m) : T(0);
  stdv = moments ? T(std::sqrt(m2 / double(V - 1))) : T(0);
}

// For each of n exponent factors f_e: sums[e] = sum_v exp((z_v - mx) f_e) and, for e < n_z,
// zsums[e] = sum_v exp((z_v - mx) f_e) z_v, every chunk loaded once for all of them. A row of
// -inf only (mx = -inf) has no softmax: its sums stay 0.
template <typename scalar_t, typename T>
void exp_sums(const scalar_t* z, int64_t V, T mx, const T* factors, int n_e, int n_z, T* sums,
              T* zsums) {
  std::fill(sums, sums + n_e, T(0));
  std::fill(zsums, zsums + n_z, T(0));
  if (!(mx > -std::numeric_limits<T>::infinity())) return;
  T buf[kChunk];
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    load_chunk(z + c0, n, buf);
    for (int e = 0; e < n_e; ++e) {
      const T f = factors[e];
      T s = 0, zs = 0;
      if (e < n_z) {
#pragma omp simd reduction(+ : s, zs)
        for (int64_t v = 0; v < n; ++v) {
          const T x = exp_simd((buf[v] - mx) * f);
          s += x;
          zs += x * buf[v];
        }
        zsums[e] += zs;
      } else {
#pragma omp simd reduction(+ : s)
        for (int64_t v = 0; v < n; ++v) s += exp_simd((buf[v] - mx) * f);
      }
      sums[e] += s;
    }
  }
}

// The rows of logits [B, L, V] a call reads, from its (host) index tensors, checked:
// answer rows rows[b, :len[b]] (distinct within a sequence, in [0, L)) and cross-entropy rows
// (targets[b, l] != -100, in [0, V)). `op` and `rows_name` name them in errors.
struct RowMap {
  int64_t B, L, V, A;
  int64_t stride_b, stride_t;   // the logits' strides (unit stride along V)
  at::Tensor len;               // [B] int64: answer rows per sequence
  at::Tensor pos;               // [B, A] int64: the answer rows (rows, or 0..L-1)
  at::Tensor slot;              // [B * L] int64: the answer index i of logits row (b, l), or -1
  at::Tensor target;            // [B * L] int64 cross-entropy targets; undefined: none
  std::vector<int64_t> active;  // flat logits rows that are answer or cross-entropy rows
  std::vector<int64_t> idle;    // the others

  int64_t y(int64_t r) const { return target.defined() ? target.data_ptr<int64_t>()[r] : kIgnore; }
  int64_t offset(int64_t r) const { return (r / L) * stride_b + (r % L) * stride_t; }  // row r's
};

RowMap row_map(const at::Tensor& logits, const std::optional<at::Tensor>& rows,
               const at::Tensor& len, const std::optional<at::Tensor>& targets, const char* op,
               const char* rows_name, const char* targets_name);

// The logits with unit stride along V: themselves when they have it (any strides for B and L,
// so that a view such as logits[:, :-1] is not copied).
inline at::Tensor unit_column_stride(const at::Tensor& logits) {
  return logits.stride(2) == 1 || logits.size(2) == 1 ? logits : logits.contiguous();
}

}  // namespace mlot
