// CPU kernels of mlot::uld_forward and mlot::uld_backward: ULD's sorted L1 distance
// (Boizard et al. 2024) between paired rows of two models' logits, and the student's
// cross-entropy, reading no other row.
//
// Pair i < lengths[b] of sequence b is student row l_S = student_rows[b, i] and teacher row
// l_T = teacher_rows[b, i]. With q = softmax(z / tau) of each row and V = max(V_S, V_T):
//
//   s = sort(q_S) descending, zero-padded to V;  t = sort(q_T) likewise
//   distance[b, i] = sum_l |s_l - t_l|
//
// and for each student row l with y = student_targets[b, l] != -100 (the raw logits):
//
//   ce[b, l] = log sum_v exp(z_v - max z) + max z - z_y
//
// A row's softmax has its logits' order, so each row is sorted by its logits: an LSD radix sort
// of order-preserving 32-bit keys, with the column indices where a gradient needs them (three
// 11-bit digits of (key, column) pairs; the teacher's keys alone, without its gradient, in two
// 16-bit digits). The gradient of the distance with respect to q_S is the sign of
// s_l - t_l at the rank l of each column (0 at a tie); it is kept per column as an int8
// (`student_sign` [B, A, V_S], likewise `teacher_sign` with the sign of t_l - s_l when
// teacher_grad), with dot = sum_v q_v sign_v in the row statistics [max z, log_sum,
// log_sum_ce, dot]. Backward, with g = dloss/ddistance[b, i] and g_ce = dloss/dce[b, l]:
//
//   dloss/dz_v = g q_v (sign_v - dot) / tau + g_ce (exp(z_v - max z - log_sum_ce) - [v = y])
//
// one pass per row read; every other row of the gradients is 0.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "row_softmax.h"
#include "vec_math.h"

namespace mlot {

namespace {

constexpr int kMax = 0, kLogSum = 1, kLogSumCE = 2, kDot = 3;  // row statistics columns

// An unsigned key whose ascending order is the descending order of x (NaN: first), and back.
inline uint32_t descending_key(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return (u & 0x80000000u) ? u : ~(u | 0x80000000u);
}

inline float from_descending_key(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? k : ~k & 0x7fffffffu;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// LSD radix sort of a[0..V) by the 32-bit key at bit `shift` of each element, DIGIT bits a pass
// (a pass whose digit is the same for every element is skipped); b is scratch of V elements.
// Returns the sorted array: a or b.
template <int DIGIT, typename E>
E* radix_sort(E* a, E* b, int64_t V, int shift) {
  constexpr int buckets = 1 << DIGIT, passes = (32 + DIGIT - 1) / DIGIT;
  thread_local std::vector<uint32_t> hist;
  hist.assign(size_t(passes) * buckets, 0);
  for (int64_t v = 0; v < V; ++v) {
    const uint32_t k = uint32_t(a[v] >> shift);
    for (int p = 0; p < passes; ++p) ++hist[p * buckets + ((k >> (p * DIGIT)) & (buckets - 1))];
  }
  for (int p = 0; p < passes; ++p) {
    uint32_t* h = hist.data() + p * buckets;
    const int at = shift + p * DIGIT;
    if (h[(uint32_t(a[0] >> at)) & (buckets - 1)] == uint32_t(V)) continue;
    for (uint32_t d = 0, start = 0; d < uint32_t(buckets); ++d) {  // counts -> first positions
      const uint32_t count = h[d];
      h[d] = start;
      start += count;
    }
    for (int64_t v = 0; v < V; ++v) b[h[uint32_t(a[v] >> at) & (buckets - 1)]++] = a[v];
    std::swap(a, b);
  }
  return a;
}

// A row's columns from the largest logit to the smallest (ties in any order), as the low 32 bits
// of `scratch` elements (key << 32 | column).
template <typename scalar_t>
const uint64_t* order_of(const scalar_t* z, int64_t V, std::vector<uint64_t>& scratch) {
  scratch.resize(2 * V);
  uint64_t* a = scratch.data();
  for (int64_t v = 0; v < V; ++v)
    a[v] = uint64_t(descending_key(static_cast<float>(z[v]))) << 32 | uint64_t(v);
  return radix_sort<11>(a, a + V, V, 32);
}

// A row's logits sorted descending (as float), into out[0..V).
template <typename scalar_t>
void sorted_logits(const scalar_t* z, int64_t V, std::vector<uint32_t>& scratch, float* out) {
  scratch.resize(2 * V);
  uint32_t* a = scratch.data();
  for (int64_t v = 0; v < V; ++v) a[v] = descending_key(static_cast<float>(z[v]));
  const uint32_t* sorted = radix_sort<16>(a, a + V, V, 0);
  for (int64_t v = 0; v < V; ++v) out[v] = from_descending_key(sorted[v]);
}

template <typename T>
struct Options {
  T inv_tau;
  bool ce_shares;  // tau == 1: the cross-entropy's softmax is the distance's
  Options(double temperature) : inv_tau(T(1) / T(temperature)), ce_shares(temperature == 1.0) {}
};

// max z and log_sum = log sum exp((z - max) / tau) (and log_sum_ce when `ce`) into out.
template <typename scalar_t, typename T>
void row_stats(const scalar_t* z, int64_t V, const Options<T>& o, bool paired, bool ce, T* out) {
  T mx, mean, stdv;
  row_max_moments(z, V, false, mx, mean, stdv);
  T f[2], sums[2], unused[1];
  int n = 0;
  if (paired) f[n++] = o.inv_tau;
  const bool own_ce = ce && !(paired && o.ce_shares);
  if (own_ce) f[n++] = T(1);
  exp_sums(z, V, mx, f, n, 0, sums, unused);
  out[kMax] = mx;
  if (paired) out[kLogSum] = std::log(sums[0]);
  if (ce) out[kLogSumCE] = own_ce ? std::log(sums[n - 1]) : out[kLogSum];
}

// Scratch of one thread.
template <typename T>
struct PairScratch {
  std::vector<uint64_t> order_s, order_t;  // the rows' orders (and sort scratch)
  std::vector<uint32_t> keys;              // the teacher's sort scratch, without its gradient
  std::vector<T> q_s, q_t;                 // q_s in column order; q_t in column or rank order
  std::vector<float> sorted;               // the teacher's sorted logits
};

// q[0..V) = exp((z_v - max z) / tau - log_sum) of values z (a row, or its sorted logits).
template <typename scalar_t, typename T>
void row_probs(const scalar_t* z, int64_t V, const T* st, T inv_tau, std::vector<T>& q) {
  q.resize(V);
  const T mx = st[kMax], log_sum = st[kLogSum];
  T* p = q.data();
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    load_chunk(z + c0, n, p + c0);
#pragma omp simd
    for (int64_t v = 0; v < n; ++v) p[c0 + v] = exp_simd((p[c0 + v] - mx) * inv_tau - log_sum);
  }
}

template <typename s_scalar, typename t_scalar, typename T>
void forward_kernel(const at::Tensor& zs_t, const RowMap& ms, const at::Tensor& zt_t,
                    const RowMap& mt, const Options<T>& o, bool teacher_grad,
                    at::Tensor& distance, at::Tensor& ce, at::Tensor& s_stats,
                    at::Tensor& s_sign, at::Tensor& t_stats, at::Tensor& t_sign) {
  const s_scalar* zs = zs_t.data_ptr<s_scalar>();
  const t_scalar* zt = zt_t.data_ptr<t_scalar>();
  const int64_t A = ms.A, VS = ms.V, VT = mt.V, V = std::max(VS, VT);
  const int64_t* len = ms.len.data_ptr<int64_t>();
  const int64_t* s_slot = ms.slot.data_ptr<int64_t>();
  T* dist = distance.data_ptr<T>();
  T* cp = ce.data_ptr<T>();
  T* sst = s_stats.data_ptr<T>();
  T* tst = t_stats.data_ptr<T>();
  int8_t* ssg = s_sign.data_ptr<int8_t>();
  int8_t* tsg = teacher_grad ? t_sign.data_ptr<int8_t>() : nullptr;
  // Every student row read: the paired ones sort both rows and compare them.
  at::parallel_for(0, int64_t(ms.active.size()), 1, [&](int64_t begin, int64_t end) {
    PairScratch<T> sc;
    for (int64_t a = begin; a < end; ++a) {
      const int64_t r = ms.active[a], b = r / ms.L, i = s_slot[r], y = ms.y(r);
      const s_scalar* zrow = zs + ms.offset(r);
      T* st = sst + r * kUldStats;
      row_stats<s_scalar, T>(zrow, VS, o, i >= 0, y != kIgnore, st);
      if (y != kIgnore) cp[r] = st[kLogSumCE] + st[kMax] - static_cast<T>(zrow[y]);
      if (i < 0) continue;
      const int64_t rt = b * mt.L + mt.pos.data_ptr<int64_t>()[b * A + i];
      const t_scalar* trow = zt + mt.offset(rt);
      T* tt = tst + rt * kUldStats;
      row_stats<t_scalar, T>(trow, VT, o, true, false, tt);
      // The student's order; the teacher's order (for its gradient, or float64 logits, which
      // the float sort of its logits would round) or its sorted logits.
      const uint64_t* order_s = order_of(zrow, VS, sc.order_s);
      row_probs<s_scalar, T>(zrow, VS, st, o.inv_tau, sc.q_s);
      const uint64_t* order_t = nullptr;
      if (tsg || std::is_same<t_scalar, double>::value) {
        order_t = order_of(trow, VT, sc.order_t);
        row_probs<t_scalar, T>(trow, VT, tt, o.inv_tau, sc.q_t);
      } else {
        sc.sorted.resize(VT);
        sorted_logits(trow, VT, sc.keys, sc.sorted.data());
        row_probs<float, T>(sc.sorted.data(), VT, tt, o.inv_tau, sc.q_t);
      }
      int8_t* sg_s = ssg + (b * A + i) * VS;
      int8_t* sg_t = tsg ? tsg + (b * A + i) * VT : nullptr;
      double total = 0, dot_s = 0, dot_t = 0;
      for (int64_t l = 0; l < V; ++l) {
        const uint32_t vs = l < VS ? uint32_t(order_s[l]) : 0;
        const uint32_t vt = l < VT ? (order_t ? uint32_t(order_t[l]) : uint32_t(l)) : 0;
        const double sl = l < VS ? double(sc.q_s[vs]) : 0.0;
        const double tl = l < VT ? double(sc.q_t[vt]) : 0.0, d = sl - tl;
        const int8_t sign = int8_t((d > 0) - (d < 0));
        total += std::abs(d);
        if (l < VS) sg_s[vs] = sign, dot_s += sl * sign;
        if (sg_t && l < VT) sg_t[vt] = int8_t(-sign), dot_t -= tl * sign;
      }
      dist[b * A + i] = T(total);
      st[kDot] = T(dot_s);
      tt[kDot] = T(dot_t);
    }
  });
}

// The gradient of one model's logits: rows of `m` read in the forward, the others 0. `paired`
// rows take g q (sign - dot) / tau, cross-entropy rows g_ce (softmax - one-hot).
template <typename scalar_t, typename T>
void backward_kernel(const at::Tensor& zt, const RowMap& m, const Options<T>& o,
                     const at::Tensor& stats, const at::Tensor& sign, const T* g_dist,
                     const T* g_ce, at::Tensor& grad) {
  const scalar_t* z = zt.data_ptr<scalar_t>();
  const T* stp = stats.data_ptr<T>();
  const int8_t* sgp = sign.data_ptr<int8_t>();
  const int64_t* slot = m.slot.data_ptr<int64_t>();
  const int64_t V = m.V;
  scalar_t* out = grad.data_ptr<scalar_t>();
  at::parallel_for(0, int64_t(m.idle.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t a = begin; a < end; ++a)
      std::fill(out + m.idle[a] * V, out + (m.idle[a] + 1) * V, scalar_t(0));
  });
  at::parallel_for(0, int64_t(m.active.size()), 1, [&](int64_t begin, int64_t end) {
    T buf[kChunk], acc[kChunk];
    for (int64_t a = begin; a < end; ++a) {
      const int64_t r = m.active[a], b = r / m.L, i = slot[r], y = m.y(r);
      const T* st = stp + r * kUldStats;
      const T mx = st[kMax];
      const T g = i >= 0 && g_dist ? g_dist[b * m.A + i] * o.inv_tau : T(0);
      const T dot = i >= 0 ? st[kDot] : T(0), log_sum = i >= 0 ? st[kLogSum] : T(0);
      const T gc = y != kIgnore && g_ce ? g_ce[r] : T(0), lse_ce = st[kLogSumCE];
      const int8_t* sg = i >= 0 ? sgp + (b * m.A + i) * V : nullptr;
      const scalar_t* zrow = z + m.offset(r);
      scalar_t* o_row = out + r * V;
      for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
        const int64_t n = std::min(kChunk, V - c0);
        load_chunk(zrow + c0, n, buf);
        std::fill(acc, acc + n, T(0));
        if (g != 0) {
          const T f = o.inv_tau;
#pragma omp simd
          for (int64_t v = 0; v < n; ++v)
            acc[v] += g * exp_simd((buf[v] - mx) * f - log_sum) * (T(sg[c0 + v]) - dot);
        }
        if (gc != 0) {
#pragma omp simd
          for (int64_t v = 0; v < n; ++v) acc[v] += gc * exp_simd((buf[v] - mx) - lse_ce);
          if (y >= c0 && y < c0 + n) acc[y - c0] -= gc;
        }
        for (int64_t v = 0; v < n; ++v) o_row[c0 + v] = static_cast<scalar_t>(acc[v]);
      }
    }
  });
}

void check_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "uld_distance: the CPU kernel got tensors on ", x.device());
}

// float64 arithmetic when either model's logits are float64, else float32.
at::ScalarType uld_compute_dtype(const at::Tensor& zs, const at::Tensor& zt) {
  return compute_dtype(zs) == at::kDouble || compute_dtype(zt) == at::kDouble ? at::kDouble
                                                                             : at::kFloat;
}

// f(student scalar, teacher scalar, compute scalar) for the two logits' dtypes: values of the
// three types, whose decltypes the caller uses.
template <typename F>
void dispatch_pair(const at::Tensor& zs, const at::Tensor& zt, F f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zs.scalar_type(), "uld_cpu", [&] {
    using s_scalar = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zt.scalar_type(), "uld_cpu", [&] {
      if (uld_compute_dtype(zs, zt) == at::kDouble)
        f(s_scalar(), scalar_t(), double());
      else
        f(s_scalar(), scalar_t(), float());
    });
  });
}

// The rows of both models that uld_forward reads: the student's paired and cross-entropy rows,
// the teacher's paired rows.
std::pair<RowMap, RowMap> uld_row_maps(const at::Tensor& zs, const at::Tensor& student_rows,
                                       const std::optional<at::Tensor>& student_targets,
                                       const at::Tensor& zt, const at::Tensor& teacher_rows,
                                       const at::Tensor& lengths) {
  const at::Tensor len = lengths_or_full(lengths, zs.size(0), student_rows.size(1),
                                         "uld_distance", "lengths", "A");
  return {row_map(zs, student_rows, len, student_targets, "uld_distance", "student_rows",
                  "student_targets"),
          row_map(zt, teacher_rows, len, std::nullopt, "uld_distance", "teacher_rows", "")};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
uld_forward_cpu(const at::Tensor& student_logits, const at::Tensor& student_rows,
                const std::optional<at::Tensor>& student_targets,
                const at::Tensor& teacher_logits, const at::Tensor& teacher_rows,
                const at::Tensor& lengths, double temperature, bool teacher_grad) {
  check_uld_args(student_logits, student_rows, student_targets, teacher_logits, teacher_rows,
                 lengths, temperature);
  check_cpu(student_logits);
  const at::Tensor zs = unit_column_stride(student_logits);
  const at::Tensor zt = unit_column_stride(teacher_logits);
  const auto [ms, mt] = uld_row_maps(zs, student_rows, student_targets, zt, teacher_rows, lengths);
  const auto opts = zs.options().dtype(uld_compute_dtype(zs, zt));
  const int64_t B = ms.B, A = ms.A;
  at::Tensor distance = at::zeros({B, A}, opts), ce = at::zeros({B, ms.L}, opts);
  at::Tensor s_stats = at::zeros({B, ms.L, kUldStats}, opts);
  at::Tensor t_stats = at::zeros({B, mt.L, kUldStats}, opts);
  at::Tensor s_sign = at::zeros({B, A, ms.V}, opts.dtype(at::kChar));
  at::Tensor t_sign = at::zeros({B, A, teacher_grad ? mt.V : 0}, opts.dtype(at::kChar));
  dispatch_pair(zs, zt, [&](auto s_tag, auto t_tag, auto t_compute) {
    using T = decltype(t_compute);
    forward_kernel<decltype(s_tag), decltype(t_tag), T>(zs, ms, zt, mt, Options<T>(temperature),
                                                        teacher_grad, distance, ce, s_stats,
                                                        s_sign, t_stats, t_sign);
  });
  return {distance, ce, s_stats, s_sign, t_stats, t_sign};
}

std::tuple<at::Tensor, at::Tensor> uld_backward_cpu(
    const std::optional<at::Tensor>& grad_distance, const std::optional<at::Tensor>& grad_ce,
    const at::Tensor& student_logits, const at::Tensor& student_rows,
    const std::optional<at::Tensor>& student_targets, const at::Tensor& teacher_logits,
    const at::Tensor& teacher_rows, const at::Tensor& lengths, const at::Tensor& student_stats,
    const at::Tensor& student_sign, const at::Tensor& teacher_stats,
    const at::Tensor& teacher_sign, double temperature, bool teacher_grad) {
  check_cpu(student_logits);
  const at::Tensor zs = unit_column_stride(student_logits);
  // Without its gradient the teacher's logits are not read (a broadcast tensor will do).
  const at::Tensor zt = teacher_grad ? unit_column_stride(teacher_logits) : teacher_logits;
  const auto [ms, mt] = uld_row_maps(zs, student_rows, student_targets, zt, teacher_rows, lengths);
  const auto dtype = uld_compute_dtype(zs, zt);
  const at::Tensor gd = grad_distance.has_value() ? grad_distance->to(dtype).contiguous() : at::Tensor();
  const at::Tensor gc = grad_ce.has_value() ? grad_ce->to(dtype).contiguous() : at::Tensor();
  at::Tensor g_student = at::empty(zs.sizes(), zs.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor g_teacher = teacher_grad
      ? at::empty(zt.sizes(), zt.options().memory_format(at::MemoryFormat::Contiguous))
      : at::empty({0}, zt.options());
  dispatch_pair(zs, zt, [&](auto s_tag, auto t_tag, auto t_compute) {
    using T = decltype(t_compute);
    const Options<T> o(temperature);
    const T* gdp = gd.defined() ? gd.data_ptr<T>() : nullptr;
    const T* gcp = gc.defined() ? gc.data_ptr<T>() : nullptr;
    backward_kernel<decltype(s_tag), T>(zs, ms, o, student_stats.contiguous(),
                                        student_sign.contiguous(), gdp, gcp, g_student);
    if (teacher_grad)
      backward_kernel<decltype(t_tag), T>(zt, mt, o, teacher_stats.contiguous(),
                                          teacher_sign.contiguous(), gdp, nullptr, g_teacher);
  });
  return {g_student, g_teacher};
}

TORCH_LIBRARY_IMPL(mlot, CPU, m) {
  m.impl("uld_forward", &uld_forward_cpu);
  m.impl("uld_backward", &uld_backward_cpu);
}

}  // namespace mlot
