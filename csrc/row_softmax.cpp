// Which rows of a [B, L, V] logits tensor a softmax kernel reads (row_softmax.h).
#include "row_softmax.h"

namespace mlot {

RowMap row_map(const at::Tensor& logits, const std::optional<at::Tensor>& rows,
               const at::Tensor& len, const std::optional<at::Tensor>& targets, const char* op,
               const char* rows_name, const char* targets_name) {
  RowMap m;
  m.B = logits.size(0);
  m.L = logits.size(1);
  m.V = logits.size(2);
  m.A = rows.has_value() ? rows->size(1) : m.L;
  m.stride_b = logits.stride(0);
  m.stride_t = logits.stride(1);
  m.len = len;
  m.pos = rows.has_value() ? rows->to(at::kCPU, at::kLong).contiguous()
                           : at::arange(m.L, at::kLong).expand({m.B, m.L}).contiguous();
  m.slot = at::full({m.B * m.L}, -1, at::kLong);
  const int64_t* lp = m.len.data_ptr<int64_t>();
  const int64_t* pos = m.pos.data_ptr<int64_t>();
  int64_t* slot = m.slot.data_ptr<int64_t>();
  for (int64_t b = 0; b < m.B; ++b) {
    for (int64_t i = 0; i < lp[b]; ++i) {
      const int64_t t = pos[b * m.A + i];
      TORCH_CHECK(t >= 0 && t < m.L, op, ": ", rows_name, " must lie in [0, L) = [0, ", m.L,
                  "), got ", rows_name, "[", b, ", ", i, "] = ", t);
      TORCH_CHECK(slot[b * m.L + t] < 0, op, ": the answer rows of a sequence must be distinct, "
                  "got ", rows_name, "[", b, ", ", slot[b * m.L + t], "] = ", rows_name, "[", b,
                  ", ", i, "] = ", t);
      slot[b * m.L + t] = i;
    }
  }
  if (targets.has_value()) {
    m.target = targets->to(at::kCPU, at::kLong).contiguous().view({-1});
    const int64_t* y = m.target.data_ptr<int64_t>();
    for (int64_t r = 0; r < m.B * m.L; ++r) {
      TORCH_CHECK(y[r] == kIgnore || (y[r] >= 0 && y[r] < m.V), op, ": ", targets_name,
                  " must be ", kIgnore, " or lie in [0, V) = [0, ", m.V, "), got ", targets_name,
                  "[", r / m.L, ", ", r % m.L, "] = ", y[r]);
    }
  }
  for (int64_t r = 0; r < m.B * m.L; ++r)
    (slot[r] >= 0 || m.y(r) != kIgnore ? m.active : m.idle).push_back(r);
  return m;
}

}  // namespace mlot
