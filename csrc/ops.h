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

// Checks topk_probs's arguments that do not need tensor data, like
// check_sinkhorn_args.
void check_topk_probs_args(const at::Tensor& logits, const std::optional<at::Tensor>& lengths,
                           int64_t k, double temperature, bool std_scale,
                           c10::string_view ranking);

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_probs_forward_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& lengths, int64_t k,
    double temperature, bool std_scale, c10::string_view ranking);

at::Tensor topk_probs_backward_cpu(const at::Tensor& grad_probs, const at::Tensor& logits,
                                   const std::optional<at::Tensor>& lengths,
                                   const at::Tensor& probs, const at::Tensor& indices,
                                   const at::Tensor& row_stats, double temperature,
                                   bool std_scale, c10::string_view ranking);

}  // namespace mlot
