// Declarations shared by the op registration (ops.cpp) and the CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace mlot {

// The arithmetic dtype of the kernels: float64 for float64 inputs, else float32.
inline at::ScalarType compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks everything about sinkhorn_loss's arguments that does not need tensor
// data (shapes, dtypes, devices, scalar options); raises a c10::Error that
// names the argument, what was expected and what was given.
void check_sinkhorn_args(const at::Tensor& x, const at::Tensor& y,
                         const std::optional<at::Tensor>& x_lengths,
                         const std::optional<at::Tensor>& y_lengths, double epsilon,
                         int64_t n_iters, double temperature, int64_t p);

// topk_probs_stats/forward/backward: row_stats has kTopkBaseStats columns (max z, s, mean,
// std, log_sum_ce) and two per temperature (log_sum, E_q[z]); 1 to kMaxTemperatures of them.
constexpr int kTopkBaseStats = 5;
constexpr int kMaxTemperatures = 2;
inline int64_t topk_stats_size(int64_t n_temperatures) { return kTopkBaseStats + 2 * n_temperatures; }

// Checks the arguments of topk_probs and of topk_probs_stats/forward (rows, targets and several
// temperatures) that do not need tensor data, like check_sinkhorn_args.
void check_topk_rows_args(const at::Tensor& logits, const std::optional<at::Tensor>& rows,
                          const std::optional<at::Tensor>& lengths,
                          const std::optional<at::Tensor>& targets, int64_t k,
                          c10::ArrayRef<double> temperatures, bool std_scale,
                          c10::string_view ranking);

// uld_forward/backward: row statistics columns (max z, log_sum, log_sum_ce, dot).
constexpr int kUldStats = 4;

// Checks the arguments of uld_forward that do not need tensor data.
void check_uld_args(const at::Tensor& student_logits, const at::Tensor& student_rows,
                    const std::optional<at::Tensor>& student_targets,
                    const at::Tensor& teacher_logits, const at::Tensor& teacher_rows,
                    const at::Tensor& lengths, double temperature);

// Checks that topk_probs_backward got the tensors topk_probs_forward gives for these arguments.
void check_topk_backward_args(const std::optional<at::Tensor>& grad_probs,
                              const std::optional<at::Tensor>& grad_ce, const at::Tensor& logits,
                              const std::optional<at::Tensor>& rows,
                              const std::optional<at::Tensor>& targets, const at::Tensor& probs,
                              const at::Tensor& indices, const at::Tensor& row_stats,
                              c10::ArrayRef<double> temperatures, c10::string_view ranking);

// Valid lengths as an int64 CPU tensor [B]: `lengths` checked to lie in
// [0, size], or `size` everywhere when absent; errors name the op `op`. Reads
// tensor data.
at::Tensor lengths_or_full(const std::optional<at::Tensor>& lengths, int64_t batch,
                           int64_t size, const char* op, const char* name,
                           const char* size_name);

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_forward_cpu(
    const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& x_lengths,
    const std::optional<at::Tensor>& y_lengths, double epsilon, int64_t n_iters,
    double temperature, int64_t p, bool unit_marginals, bool detach_plan);

std::tuple<at::Tensor, at::Tensor> sinkhorn_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
    const std::optional<at::Tensor>& x_lengths, const std::optional<at::Tensor>& y_lengths,
    const at::Tensor& f_hist, const at::Tensor& g_hist, double epsilon, double temperature,
    int64_t p, bool unit_marginals, bool detach_plan);

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_probs_stats_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& rows,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& targets,
    c10::ArrayRef<double> temperatures, bool std_scale, c10::string_view ranking);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_probs_forward_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& rows,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& targets,
    int64_t k, c10::ArrayRef<double> temperatures, bool std_scale, c10::string_view ranking);

at::Tensor topk_probs_backward_cpu(
    const std::optional<at::Tensor>& grad_probs, const std::optional<at::Tensor>& grad_ce,
    const at::Tensor& logits, const std::optional<at::Tensor>& rows,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& targets,
    const at::Tensor& probs, const at::Tensor& indices, const at::Tensor& row_stats,
    c10::ArrayRef<double> temperatures, bool std_scale, c10::string_view ranking);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
uld_forward_cpu(const at::Tensor& student_logits, const at::Tensor& student_rows,
                const std::optional<at::Tensor>& student_targets,
                const at::Tensor& teacher_logits, const at::Tensor& teacher_rows,
                const at::Tensor& lengths, double temperature, bool teacher_grad);

std::tuple<at::Tensor, at::Tensor> uld_backward_cpu(
    const std::optional<at::Tensor>& grad_distance, const std::optional<at::Tensor>& grad_ce,
    const at::Tensor& student_logits, const at::Tensor& student_rows,
    const std::optional<at::Tensor>& student_targets, const at::Tensor& teacher_logits,
    const at::Tensor& teacher_rows, const at::Tensor& lengths, const at::Tensor& student_stats,
    const at::Tensor& student_sign, const at::Tensor& teacher_stats,
    const at::Tensor& teacher_sign, double temperature, bool teacher_grad);

}  // namespace mlot
