// The mlot operator library: schemas, argument checks, and the public
// sinkhorn_loss as a composite of the differentiable sinkhorn_forward.
//
//   sinkhorn_loss   public op, CompositeImplicitAutograd: returns the loss of
//                   sinkhorn_forward. Gradients, fake tensors and torch.compile
//                   all go through sinkhorn_forward.
//   sinkhorn_forward   (loss [B], f_hist [B, n_iters+1, M], g_hist [B, n_iters+1, N]):
//                   the loss and the dual potentials after every iteration
//                   (index 0 holds the zero initialisation), which the
//                   backward needs. Autograd is registered in Python
//                   (mlot_kernels/sinkhorn.py); detach_plan only matters there.
//   sinkhorn_backward  (grad_x, grad_y) from the saved potentials.
//
//   topk_probs      public op, CompositeImplicitAutograd over topk_probs_forward:
//                   (probs, indices).
//   topk_probs_forward   (probs [B, L, k], indices, row_stats [B, L, 6]): the
//                   per-row statistics (max, log-sum, std scale, mean, std,
//                   E_q[z]) are what the backward needs besides the logits.
//   topk_probs_backward  grad_logits from the saved statistics, in one pass.
#include <torch/library.h>

#include <ATen/ATen.h>

#include "ops.h"

namespace mlot {

namespace {

void check_floating(const at::Tensor& t, const char* op, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
                  dtype == at::kDouble,
              op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", dtype);
}

void check_lengths_meta(const std::optional<at::Tensor>& lengths, const at::Tensor& x,
                        const char* op, const char* name, const char* x_name) {
  if (!lengths.has_value()) return;
  const at::Tensor& l = *lengths;
  TORCH_CHECK(l.dim() == 1 && l.size(0) == x.size(0), op, ": ", name,
              " must have shape [B] = [", x.size(0), "], got shape ", l.sizes());
  TORCH_CHECK(at::isIntegralType(l.scalar_type(), /*includeBool=*/false), op, ": ", name,
              " must have an integer dtype, got ", l.scalar_type());
  TORCH_CHECK(l.device() == x.device(), op, ": ", name, " must be on the same device as ",
              x_name, " (", x.device(), "), got ", l.device());
}

}  // namespace

void check_sinkhorn_args(const at::Tensor& x, const at::Tensor& y,
                         const std::optional<at::Tensor>& x_lengths,
                         const std::optional<at::Tensor>& y_lengths, double epsilon,
                         int64_t n_iters, double temperature, int64_t p) {
  TORCH_CHECK(x.dim() == 3, "sinkhorn_loss: x must be a 3-D tensor [B, M, K], got ",
              x.dim(), "-D with shape ", x.sizes());
  TORCH_CHECK(y.dim() == 3, "sinkhorn_loss: y must be a 3-D tensor [B, N, K], got ",
              y.dim(), "-D with shape ", y.sizes());
  TORCH_CHECK(x.size(0) == y.size(0),
              "sinkhorn_loss: x and y must have the same batch size B, got x ", x.sizes(),
              " and y ", y.sizes());
  TORCH_CHECK(x.size(2) == y.size(2),
              "sinkhorn_loss: x and y must have the same vector size K, got x ", x.sizes(),
              " and y ", y.sizes());
  TORCH_CHECK(x.size(2) >= 1, "sinkhorn_loss: x and y must have K >= 1, got x ",
              x.sizes());
  check_floating(x, "sinkhorn_loss", "x");
  check_floating(y, "sinkhorn_loss", "y");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(),
              "sinkhorn_loss: x and y must have the same dtype, got x ", x.scalar_type(),
              " and y ", y.scalar_type());
  TORCH_CHECK(x.device() == y.device(),
              "sinkhorn_loss: x and y must be on the same device, got x on ", x.device(),
              " and y on ", y.device());
  check_lengths_meta(x_lengths, x, "sinkhorn_loss", "x_lengths", "x");
  check_lengths_meta(y_lengths, x, "sinkhorn_loss", "y_lengths", "x");
  TORCH_CHECK(epsilon > 0 && std::isfinite(epsilon),
              "sinkhorn_loss: epsilon must be a finite number > 0, got ", epsilon);
  TORCH_CHECK(n_iters >= 0, "sinkhorn_loss: n_iters must be >= 0, got ", n_iters);
  TORCH_CHECK(temperature >= 0 && std::isfinite(temperature),
              "sinkhorn_loss: temperature must be a finite number >= 0 (0 = use the "
              "vectors as given), got ",
              temperature);
  TORCH_CHECK(p == 1 || p == 2, "sinkhorn_loss: p must be 1 or 2, got ", p);
}

at::Tensor lengths_or_full(const std::optional<at::Tensor>& lengths, int64_t batch,
                           int64_t size, const char* op, const char* name,
                           const char* size_name) {
  if (!lengths.has_value()) return at::full({batch}, size, at::kLong);
  at::Tensor l = lengths->to(at::kCPU, at::kLong).contiguous();
  const int64_t* data = l.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(data[b] >= 0 && data[b] <= size, op, ": ", name,
                " must lie in [0, ", size_name, "] = [0, ", size, "], got ", name, "[", b,
                "] = ", data[b]);
  }
  return l;
}

void check_topk_probs_args(const at::Tensor& logits, const std::optional<at::Tensor>& lengths,
                           int64_t k, double temperature, bool std_scale,
                           c10::string_view ranking) {
  TORCH_CHECK(logits.dim() == 3, "topk_probs: logits must be a 3-D tensor [B, L, V], got ",
              logits.dim(), "-D with shape ", logits.sizes());
  TORCH_CHECK(logits.size(2) >= 1, "topk_probs: logits must have V >= 1 columns, got shape ",
              logits.sizes());
  check_floating(logits, "topk_probs", "logits");
  check_lengths_meta(lengths, logits, "topk_probs", "lengths", "logits");
  TORCH_CHECK(k >= 1, "topk_probs: k must be >= 1, got ", k);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature),
              "topk_probs: temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK(!std_scale || logits.size(2) >= 2,
              "topk_probs: std_scale needs V >= 2 columns (the unbiased std of one value is "
              "undefined), got logits of shape ",
              logits.sizes());
  TORCH_CHECK(ranking == "token" || ranking == "sequence" || ranking == "batch",
              "topk_probs: ranking must be 'token', 'sequence' or 'batch', got '", ranking, "'");
}

namespace {

at::Tensor sinkhorn_loss(const at::Tensor& x, const at::Tensor& y,
                         const std::optional<at::Tensor>& x_lengths,
                         const std::optional<at::Tensor>& y_lengths, double epsilon,
                         int64_t n_iters, double temperature, int64_t p,
                         bool unit_marginals, bool detach_plan) {
  check_sinkhorn_args(x, y, x_lengths, y_lengths, epsilon, n_iters, temperature, p);
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("mlot::sinkhorn_forward", "")
                            .typed<decltype(sinkhorn_forward_cpu)>();
  return std::get<0>(forward.call(x, y, x_lengths, y_lengths, epsilon, n_iters, temperature,
                                  p, unit_marginals, detach_plan));
}

std::tuple<at::Tensor, at::Tensor> topk_probs(const at::Tensor& logits,
                                              const std::optional<at::Tensor>& lengths,
                                              int64_t k, double temperature, bool std_scale,
                                              c10::string_view ranking) {
  check_topk_probs_args(logits, lengths, k, temperature, std_scale, ranking);
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("mlot::topk_probs_forward", "")
                            .typed<decltype(topk_probs_forward_cpu)>();
  auto out = forward.call(logits, lengths, k, temperature, std_scale, ranking);
  return {std::get<0>(out), std::get<1>(out)};
}

}  // namespace

TORCH_LIBRARY(mlot, m) {
  m.def(
      "sinkhorn_loss(Tensor x, Tensor y, Tensor? x_lengths=None, Tensor? y_lengths=None, "
      "float epsilon=0.1, int n_iters=20, float temperature=0.0, int p=1, "
      "bool unit_marginals=False, bool detach_plan=False) -> Tensor");
  m.def(
      "sinkhorn_forward(Tensor x, Tensor y, Tensor? x_lengths, Tensor? y_lengths, "
      "float epsilon, int n_iters, float temperature, int p, bool unit_marginals, "
      "bool detach_plan) -> (Tensor, Tensor, Tensor)");
  m.def(
      "sinkhorn_backward(Tensor grad, Tensor x, Tensor y, Tensor? x_lengths, "
      "Tensor? y_lengths, Tensor f_hist, Tensor g_hist, float epsilon, float temperature, "
      "int p, bool unit_marginals, bool detach_plan) -> (Tensor, Tensor)");
  m.def(
      "topk_probs(Tensor logits, Tensor? lengths=None, int k=50, float temperature=1.0, "
      "bool std_scale=False, str ranking=\"sequence\") -> (Tensor, Tensor)");
  m.def(
      "topk_probs_forward(Tensor logits, Tensor? lengths, int k, float temperature, "
      "bool std_scale, str ranking) -> (Tensor, Tensor, Tensor)");
  m.def(
      "topk_probs_backward(Tensor grad_probs, Tensor logits, Tensor? lengths, Tensor probs, "
      "Tensor indices, Tensor row_stats, float temperature, bool std_scale, str ranking) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(mlot, CompositeImplicitAutograd, m) {
  m.impl("sinkhorn_loss", &sinkhorn_loss);
  m.impl("topk_probs", &topk_probs);
}

}  // namespace mlot
