// Argument checks of the fastmoe_C ops, shared by the CPU and CUDA implementations. They raise
// (TORCH_CHECK → RuntimeError in Python) before any kernel runs, naming the argument.
#pragma once

#include <torch/extension.h>

#include "../kernels/common.h"

// Run LAMBDA with scalar_t = the kernel element type of a float / half / bfloat16 tensor.
#define FASTMOE_DISPATCH_FLOAT(TYPE, scalar_t, LAMBDA)                                        \
  [&] {                                                                                      \
    switch (TYPE) {                                                                          \
      case at::ScalarType::Float: { using scalar_t = float; return LAMBDA(); }               \
      case at::ScalarType::Half: { using scalar_t = fastmoe::half_t; return LAMBDA(); }      \
      case at::ScalarType::BFloat16: { using scalar_t = fastmoe::bf16_t; return LAMBDA(); }  \
      default: TORCH_CHECK(false, "fastmoe_C: data must be float32, float16 or bfloat16, got ", TYPE); \
    }                                                                                        \
  }()

namespace fastmoe {

inline void check_data(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": `", name, "` must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op,
              ": `", name, "` must be float32/float16/bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 0 || t.numel() == 0 || t.stride(-1) == 1 || t.size(-1) <= 1, op, ": `", name,
              "` must have contiguous rows (stride 1 in the last dim), got strides ", t.strides());
}

inline void check_exact(const char* op, const char* name, const at::Tensor& t, at::ScalarType type,
                        at::IntArrayRef shape, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == type, op, ": `", name, "` must be ", type, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": `", name, "` must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": `", name, "` must be contiguous");
  TORCH_CHECK(t.device() == like.device(), op, ": `", name, "` is on ", t.device(), ", expected ", like.device());
}

inline void check_index(const char* op, const char* name, const at::Tensor& t, int64_t dim, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == dim, op, ": `", name, "` must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": `", name, "` must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": `", name, "` must be contiguous");
  TORCH_CHECK(t.device() == like.device(), op, ": `", name, "` is on ", t.device(), ", expected ", like.device());
}

inline void check_route_topk(const at::Tensor& logits, int64_t k, const c10::optional<at::Tensor>& bias,
                             int64_t num_groups, int64_t topk_groups, const at::Tensor& idx, const at::Tensor& weight,
                             const at::Tensor& probs) {
  const char* op = "route_topk";
  check_data(op, "logits", logits, 2);
  TORCH_CHECK(logits.is_contiguous(), op, ": `logits` must be contiguous");
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E, op, ": `k` must be in [1, ", E, "], got ", k);
  TORCH_CHECK(num_groups >= 1 && E % num_groups == 0, op, ": `num_groups` must divide ", E, ", got ", num_groups);
  TORCH_CHECK(topk_groups >= 1 && topk_groups <= num_groups && k <= topk_groups * (E / num_groups), op,
              ": `topk_groups` must be in [1, num_groups] and reach at least k experts, got ", topk_groups);
  if (bias) check_exact(op, "bias", *bias, at::kFloat, {E}, logits);
  check_exact(op, "idx", idx, at::kInt, {T, k}, logits);
  check_exact(op, "weight", weight, at::kFloat, {T, k}, logits);
  if (probs.numel()) check_exact(op, "probs", probs, at::kFloat, {T, E}, logits);
}

inline void check_route_topk_backward(const at::Tensor& grad_w, const at::Tensor& grad_probs, const at::Tensor& logits,
                                      const at::Tensor& idx, const at::Tensor& grad_logits) {
  const char* op = "route_topk_backward";
  check_data(op, "logits", logits, 2);
  TORCH_CHECK(logits.is_contiguous(), op, ": `logits` must be contiguous");
  const int64_t T = logits.size(0), E = logits.size(1);
  check_index(op, "idx", idx, 2, logits);
  TORCH_CHECK(idx.size(0) == T, op, ": `idx` must have ", T, " rows, got ", idx.size(0));
  check_exact(op, "grad_w", grad_w, at::kFloat, {T, idx.size(1)}, logits);
  if (grad_probs.numel()) check_exact(op, "grad_probs", grad_probs, at::kFloat, {T, E}, logits);
  check_exact(op, "grad_logits", grad_logits, logits.scalar_type(), {T, E}, logits);
}

inline void check_make_plan(const at::Tensor& expert_idx, int64_t num_experts, int64_t capacity, bool drop_by_weight,
                            const c10::optional<at::Tensor>& weight, bool pad, const at::Tensor& counts,
                            const at::Tensor& routed, const at::Tensor& offsets, const at::Tensor& row,
                            const at::Tensor& assignment) {
  const char* op = "make_plan";
  check_index(op, "expert_idx", expert_idx, 2, expert_idx);
  TORCH_CHECK(num_experts >= 1, op, ": `num_experts` must be >= 1, got ", num_experts);
  TORCH_CHECK(!pad || capacity >= 0, op, ": `pad` needs a capacity >= 0");
  TORCH_CHECK(expert_idx.numel() < (int64_t(1) << 31), op, ": too many assignments for int32 rows");
  if (capacity >= 0 && drop_by_weight) {
    TORCH_CHECK(weight.has_value(), op, ": dropping by weight needs `weight`");
    check_exact(op, "weight", *weight, at::kFloat, expert_idx.sizes(), expert_idx);
  }
  check_exact(op, "counts", counts, at::kInt, {num_experts}, expert_idx);
  check_exact(op, "routed", routed, at::kInt, {num_experts}, expert_idx);
  check_exact(op, "offsets", offsets, at::kInt, {num_experts + 1}, expert_idx);
  check_exact(op, "row", row, at::kInt, expert_idx.sizes(), expert_idx);
  check_index(op, "assignment", assignment, 1, expert_idx);
}

inline void check_gather(const at::Tensor& x, const at::Tensor& index, int64_t div,
                         const c10::optional<at::Tensor>& scale, const at::Tensor& out) {
  const char* op = "gather";
  check_data(op, "x", x, 2);
  check_index(op, "index", index, 1, x);
  TORCH_CHECK(div >= 1, op, ": `div` must be >= 1, got ", div);
  if (scale) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->device() == x.device(), op,
                ": `scale` must be a contiguous float32 tensor on ", x.device());
  }
  check_exact(op, "out", out, x.scalar_type(), {index.size(0), x.size(1)}, x);
}

inline void check_combine(const at::Tensor& y, const at::Tensor& row, const c10::optional<at::Tensor>& weight,
                          bool ordered, const at::Tensor& out) {
  const char* op = "combine";
  check_data(op, "y", y, 2);
  check_index(op, "row", row, 2, y);
  if (weight) check_exact(op, "weight", *weight, at::kFloat, row.sizes(), y);
  check_exact(op, "out", out, y.scalar_type(), {row.size(0), y.size(1)}, y);
}

inline void check_rowdot(const at::Tensor& g, const at::Tensor& y, const at::Tensor& row, const at::Tensor& out) {
  const char* op = "rowdot";
  check_data(op, "g", g, 2);
  check_data(op, "y", y, 2);
  TORCH_CHECK(g.is_contiguous() && y.is_contiguous(), op, ": `g` and `y` must be contiguous");
  TORCH_CHECK(g.scalar_type() == y.scalar_type() && g.size(1) == y.size(1), op,
              ": `g` and `y` must share dtype and width");
  check_index(op, "row", row, 2, g);
  TORCH_CHECK(row.size(0) == g.size(0), op, ": `row` must have one row per token of `g`");
  check_exact(op, "out", out, at::kFloat, row.sizes(), g);
}

inline void check_routing_stats(const at::Tensor& probs, const at::Tensor& expert_idx, int64_t num_segments,
                                const at::Tensor& tokens, const at::Tensor& prob_mean) {
  const char* op = "routing_stats";
  TORCH_CHECK(probs.dim() == 2 && probs.scalar_type() == at::kFloat && probs.is_contiguous(), op,
              ": `probs` must be a contiguous float32 [T, E] tensor");
  check_index(op, "expert_idx", expert_idx, 2, probs);
  TORCH_CHECK(expert_idx.size(0) == probs.size(0), op, ": `expert_idx` must have one row per token");
  TORCH_CHECK(num_segments >= 1 && probs.size(0) % num_segments == 0, op, ": `num_segments` must divide T");
  check_exact(op, "tokens", tokens, at::kFloat, {num_segments, probs.size(1)}, probs);
  check_exact(op, "prob_mean", prob_mean, at::kFloat, {num_segments, probs.size(1)}, probs);
}

}  // namespace fastmoe
