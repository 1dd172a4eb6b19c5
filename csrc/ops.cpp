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
//   topk_probs      public op, CompositeImplicitAutograd over topk_probs_forward
//                   with every row and one temperature: (probs, indices).
//   topk_probs_forward   the fused truncation the losses use: the answer rows
//                   `rows` of the logits at each of `temperatures`, and the
//                   cross-entropy of the rows that have `targets`, reading no
//                   other row: (probs [n_t, B, A, k], indices, ce [B, L],
//                   row_stats [B, L, 5 + 2 n_t]). Autograd is registered in
//                   Python (mlot_kernels/topk_probs.py).
//   topk_probs_stats   its first steps alone (row_stats, ranking mass, ce),
//                   for callers that make the logits in chunks (the hidden path).
//   topk_probs_backward  grad_logits [B, L, V] from the saved statistics, one
//                   pass per row read; the other rows get 0.
//
//   uld_forward     ULD's sorted L1 distance between paired rows of two models'
//                   logits and the student's cross-entropy, reading no other
//                   row: (distance [B, A], ce [B, L_S], the row statistics and
//                   the distance's per-column signs of both models). Autograd
//                   in Python (mlot_kernels/uld_distance.py).
//   uld_backward    (grad_student [B, L_S, V_S], grad_teacher or an empty tensor).
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

void check_topk_rows_args(const at::Tensor& logits, const std::optional<at::Tensor>& rows,
                          const std::optional<at::Tensor>& lengths,
                          const std::optional<at::Tensor>& targets, int64_t k,
                          c10::ArrayRef<double> temperatures, bool std_scale,
                          c10::string_view ranking) {
  TORCH_CHECK(logits.dim() == 3, "topk_probs: logits must be a 3-D tensor [B, L, V], got ",
              logits.dim(), "-D with shape ", logits.sizes());
  TORCH_CHECK(logits.size(2) >= 1, "topk_probs: logits must have V >= 1 columns, got shape ",
              logits.sizes());
  check_floating(logits, "topk_probs", "logits");
  if (rows.has_value()) {
    TORCH_CHECK(rows->dim() == 2 && rows->size(0) == logits.size(0),
                "topk_probs: rows must have shape [B, A] with B = ", logits.size(0), ", got shape ",
                rows->sizes());
    TORCH_CHECK(at::isIntegralType(rows->scalar_type(), /*includeBool=*/false),
                "topk_probs: rows must have an integer dtype, got ", rows->scalar_type());
    TORCH_CHECK(rows->device() == logits.device(), "topk_probs: rows must be on the same device "
                "as logits (", logits.device(), "), got ", rows->device());
  }
  check_lengths_meta(lengths, logits, "topk_probs", "lengths", "logits");
  if (targets.has_value()) {
    TORCH_CHECK(targets->dim() == 2 && targets->sizes() == logits.sizes().slice(0, 2),
                "topk_probs: targets must have shape [B, L] = ", logits.sizes().slice(0, 2),
                ", got shape ", targets->sizes());
    TORCH_CHECK(at::isIntegralType(targets->scalar_type(), /*includeBool=*/false),
                "topk_probs: targets must have an integer dtype, got ", targets->scalar_type());
    TORCH_CHECK(targets->device() == logits.device(), "topk_probs: targets must be on the same "
                "device as logits (", logits.device(), "), got ", targets->device());
  }
  TORCH_CHECK(k >= 1, "topk_probs: k must be >= 1, got ", k);
  TORCH_CHECK(!temperatures.empty() && temperatures.size() <= kMaxTemperatures,
              "topk_probs: temperatures must hold 1 to ", kMaxTemperatures, " temperatures, got ",
              temperatures.size());
  for (size_t t = 0; t < temperatures.size(); ++t) {
    TORCH_CHECK(temperatures[t] > 0 && std::isfinite(temperatures[t]), "topk_probs: ",
                temperatures.size() == 1 ? std::string("temperature")
                                         : "temperatures[" + std::to_string(t) + "]",
                " must be a finite number > 0, got ", temperatures[t]);
  }
  TORCH_CHECK(!std_scale || logits.size(2) >= 2,
              "topk_probs: std_scale needs V >= 2 columns (the unbiased std of one value is "
              "undefined), got logits of shape ",
              logits.sizes());
  TORCH_CHECK(ranking == "token" || ranking == "sequence" || ranking == "batch",
              "topk_probs: ranking must be 'token', 'sequence' or 'batch', got '", ranking, "'");
}

void check_uld_args(const at::Tensor& student_logits, const at::Tensor& student_rows,
                    const std::optional<at::Tensor>& student_targets,
                    const at::Tensor& teacher_logits, const at::Tensor& teacher_rows,
                    const at::Tensor& lengths, double temperature) {
  const char* op = "uld_distance";
  for (const auto& [z, name] : {std::pair{&student_logits, "student_logits"},
                                std::pair{&teacher_logits, "teacher_logits"}}) {
    TORCH_CHECK(z->dim() == 3 && z->size(2) >= 1, op, ": ", name,
                " must be a 3-D tensor [B, L, V] with V >= 1, got shape ", z->sizes());
    check_floating(*z, op, name);
  }
  TORCH_CHECK(teacher_logits.size(0) == student_logits.size(0), op, ": student_logits and "
              "teacher_logits must have the same batch size, got ", student_logits.sizes(),
              " and ", teacher_logits.sizes());
  TORCH_CHECK(teacher_logits.device() == student_logits.device(), op, ": teacher_logits must be "
              "on the device of student_logits (", student_logits.device(), "), got ",
              teacher_logits.device());
  const int64_t B = student_logits.size(0);
  for (const auto& [rows, name] : {std::pair{&student_rows, "student_rows"},
                                   std::pair{&teacher_rows, "teacher_rows"}}) {
    TORCH_CHECK(rows->dim() == 2 && rows->size(0) == B && rows->size(1) == student_rows.size(1),
                op, ": ", name, " must have shape [B, A] = [", B, ", ", student_rows.size(1),
                "], got shape ", rows->sizes());
    TORCH_CHECK(at::isIntegralType(rows->scalar_type(), /*includeBool=*/false), op, ": ", name,
                " must have an integer dtype, got ", rows->scalar_type());
    TORCH_CHECK(rows->device() == student_logits.device(), op, ": ", name, " must be on the "
                "device of student_logits (", student_logits.device(), "), got ", rows->device());
  }
  check_lengths_meta(lengths, student_logits, op, "lengths", "student_logits");
  if (student_targets.has_value()) {
    TORCH_CHECK(student_targets->sizes() == student_logits.sizes().slice(0, 2), op,
                ": student_targets must have shape [B, L] = ", student_logits.sizes().slice(0, 2),
                ", got shape ", student_targets->sizes());
    TORCH_CHECK(at::isIntegralType(student_targets->scalar_type(), /*includeBool=*/false), op,
                ": student_targets must have an integer dtype, got ",
                student_targets->scalar_type());
    TORCH_CHECK(student_targets->device() == student_logits.device(), op, ": student_targets "
                "must be on the device of student_logits (", student_logits.device(), "), got ",
                student_targets->device());
  }
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), op,
              ": temperature must be a finite number > 0, got ", temperature);
}

void check_topk_backward_args(const std::optional<at::Tensor>& grad_probs,
                              const std::optional<at::Tensor>& grad_ce, const at::Tensor& logits,
                              const std::optional<at::Tensor>& rows,
                              const std::optional<at::Tensor>& targets, const at::Tensor& probs,
                              const at::Tensor& indices, const at::Tensor& row_stats,
                              c10::ArrayRef<double> temperatures, c10::string_view ranking) {
  const int64_t B = logits.size(0), L = logits.size(1);
  const int64_t A = rows.has_value() ? rows->size(1) : L;
  const auto dtype = compute_dtype(logits);
  const int64_t n_t = int64_t(temperatures.size());
  TORCH_CHECK(probs.dim() == 4 && probs.size(0) == n_t && probs.size(1) == B &&
                  probs.size(2) == A && probs.scalar_type() == dtype &&
                  row_stats.sizes() == at::IntArrayRef({B, L, topk_stats_size(n_t)}) &&
                  row_stats.scalar_type() == dtype && indices.scalar_type() == at::kLong,
              "topk_probs_backward: probs, indices and row_stats must be those topk_probs_forward "
              "gives for these logits, rows and temperatures");
  const int64_t k = probs.size(3);
  const std::vector<int64_t> index_shape =
      ranking == "token" ? std::vector<int64_t>{n_t, B, A, k}
      : ranking == "sequence" ? std::vector<int64_t>{n_t, B, k} : std::vector<int64_t>{n_t, k};
  TORCH_CHECK(indices.sizes() == at::IntArrayRef(index_shape), "topk_probs_backward: indices "
              "must have the shape ", at::IntArrayRef(index_shape), " topk_probs_forward gives "
              "for ranking '", ranking, "', got ", indices.sizes());
  TORCH_CHECK(!grad_probs.has_value() || grad_probs->sizes() == probs.sizes(),
              "topk_probs_backward: grad_probs must have the shape of probs ", probs.sizes(),
              ", got ", grad_probs->sizes());
  TORCH_CHECK(!grad_ce.has_value() || (targets.has_value() &&
                                       grad_ce->sizes() == logits.sizes().slice(0, 2)),
              "topk_probs_backward: grad_ce needs targets and must have shape [B, L] = ",
              logits.sizes().slice(0, 2));
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
  const double temperatures[] = {temperature};
  check_topk_rows_args(logits, std::nullopt, lengths, std::nullopt, k, temperatures, std_scale,
                       ranking);
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("mlot::topk_probs_forward", "")
                            .typed<decltype(topk_probs_forward_cpu)>();
  auto out = forward.call(logits, std::nullopt, lengths, std::nullopt, k, temperatures, std_scale,
                          ranking);
  return {std::get<0>(out).select(0, 0), std::get<1>(out).select(0, 0)};
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
      "topk_probs_stats(Tensor logits, Tensor? rows, Tensor? lengths, Tensor? targets, "
      "float[] temperatures, bool std_scale, str ranking) -> (Tensor, Tensor, Tensor)");
  m.def(
      "topk_probs_forward(Tensor logits, Tensor? rows, Tensor? lengths, Tensor? targets, int k, "
      "float[] temperatures, bool std_scale, str ranking) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "topk_probs_backward(Tensor? grad_probs, Tensor? grad_ce, Tensor logits, Tensor? rows, "
      "Tensor? lengths, Tensor? targets, Tensor probs, Tensor indices, Tensor row_stats, "
      "float[] temperatures, bool std_scale, str ranking) -> Tensor");
  m.def(
      "uld_forward(Tensor student_logits, Tensor student_rows, Tensor? student_targets, "
      "Tensor teacher_logits, Tensor teacher_rows, Tensor lengths, float temperature, "
      "bool teacher_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "uld_backward(Tensor? grad_distance, Tensor? grad_ce, Tensor student_logits, "
      "Tensor student_rows, Tensor? student_targets, Tensor teacher_logits, Tensor teacher_rows, "
      "Tensor lengths, Tensor student_stats, Tensor student_sign, Tensor teacher_stats, "
      "Tensor teacher_sign, float temperature, bool teacher_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mlot, CompositeImplicitAutograd, m) {
  m.impl("sinkhorn_loss", &sinkhorn_loss);
  m.impl("topk_probs", &topk_probs);
}

}  // namespace mlot
