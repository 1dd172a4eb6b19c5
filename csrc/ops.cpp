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
#include <torch/library.h>

#include <ATen/ATen.h>

#include "sinkhorn.h"

namespace mlot {

namespace {

void check_floating(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
                  dtype == at::kDouble,
              "sinkhorn_loss: ", name,
              " must be float16, bfloat16, float32 or float64, got ", dtype);
}

void check_lengths_meta(const std::optional<at::Tensor>& lengths, const at::Tensor& x,
                        const char* name) {
  if (!lengths.has_value()) return;
  const at::Tensor& l = *lengths;
  TORCH_CHECK(l.dim() == 1 && l.size(0) == x.size(0), "sinkhorn_loss: ", name,
              " must have shape [B] = [", x.size(0), "], got shape ", l.sizes());
  TORCH_CHECK(at::isIntegralType(l.scalar_type(), /*includeBool=*/false),
              "sinkhorn_loss: ", name, " must have an integer dtype, got ", l.scalar_type());
  TORCH_CHECK(l.device() == x.device(), "sinkhorn_loss: ", name,
              " must be on the same device as x (", x.device(), "), got ", l.device());
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
  check_floating(x, "x");
  check_floating(y, "y");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(),
              "sinkhorn_loss: x and y must have the same dtype, got x ", x.scalar_type(),
              " and y ", y.scalar_type());
  TORCH_CHECK(x.device() == y.device(),
              "sinkhorn_loss: x and y must be on the same device, got x on ", x.device(),
              " and y on ", y.device());
  check_lengths_meta(x_lengths, x, "x_lengths");
  check_lengths_meta(y_lengths, x, "y_lengths");
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
                           int64_t size, const char* name, const char* size_name) {
  if (!lengths.has_value()) return at::full({batch}, size, at::kLong);
  at::Tensor l = lengths->to(at::kCPU, at::kLong).contiguous();
  const int64_t* data = l.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(data[b] >= 0 && data[b] <= size, "sinkhorn_loss: ", name,
                " must lie in [0, ", size_name, "] = [0, ", size, "], got ", name, "[", b,
                "] = ", data[b]);
  }
  return l;
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
}

TORCH_LIBRARY_IMPL(mlot, CompositeImplicitAutograd, m) {
  m.impl("sinkhorn_loss", &sinkhorn_loss);
}

}  // namespace mlot
