// CUDA implementations of the fastmoe_C ops: checks, workspace from torch's caching allocator,
// the current stream, then the torch-free launchers of csrc/kernels/cuda_launch.h.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "../kernels/cuda_launch.h"
#include "checks.h"

namespace fastmoe {
namespace {

cuda::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "fastmoe_C: data must be float32, float16 or bfloat16, got ", t);
  }
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

void route_topk_cuda(const at::Tensor& logits, int64_t k, bool sigmoid, bool normalize,
                     const c10::optional<at::Tensor>& bias, int64_t num_groups, int64_t topk_groups, double scaling,
                     at::Tensor& idx, at::Tensor& weight, at::Tensor& probs) {
  check_route_topk(logits, k, bias, num_groups, topk_groups, idx, weight, probs);
  TORCH_CHECK(logits.size(1) <= cuda::kMaxRoutingExperts && k <= 32, "route_topk: the CUDA kernel takes E <= ",
              cuda::kMaxRoutingExperts, " and k <= 32");
  const c10::cuda::CUDAGuard guard(logits.device());
  check_launch("route_topk", cuda::route_topk(kernel_dtype(logits.scalar_type()), logits.data_ptr(), logits.size(0),
                                              int(logits.size(1)), int(k), sigmoid, normalize,
                                              bias ? bias->data_ptr<float>() : nullptr, int(num_groups),
                                              int(topk_groups), float(scaling), idx.data_ptr<int>(),
                                              weight.data_ptr<float>(), probs.numel() ? probs.data_ptr<float>() : nullptr,
                                              at::cuda::getCurrentCUDAStream()));
}

void route_topk_backward_cuda(const at::Tensor& grad_w, const at::Tensor& grad_probs, const at::Tensor& logits,
                              const at::Tensor& idx, bool sigmoid, bool normalize, double scaling,
                              at::Tensor& grad_logits) {
  check_route_topk_backward(grad_w, grad_probs, logits, idx, grad_logits);
  TORCH_CHECK(logits.size(1) <= cuda::kMaxRoutingExperts && idx.size(1) <= 32,
              "route_topk_backward: the CUDA kernel takes E <= ", cuda::kMaxRoutingExperts, " and k <= 32");
  const c10::cuda::CUDAGuard guard(logits.device());
  check_launch("route_topk_backward",
               cuda::route_topk_backward(kernel_dtype(logits.scalar_type()), grad_w.data_ptr<float>(),
                                         grad_probs.numel() ? grad_probs.data_ptr<float>() : nullptr,
                                         logits.data_ptr(), idx.data_ptr<int>(), logits.size(0), int(logits.size(1)),
                                         int(idx.size(1)), sigmoid, normalize, float(scaling), grad_logits.data_ptr(),
                                         at::cuda::getCurrentCUDAStream()));
}

void make_plan_cuda(const at::Tensor& expert_idx, int64_t num_experts, int64_t capacity, bool drop_by_weight,
                    const c10::optional<at::Tensor>& weight, bool pad, at::Tensor& counts, at::Tensor& routed,
                    at::Tensor& offsets, at::Tensor& row, at::Tensor& assignment) {
  check_make_plan(expert_idx, num_experts, capacity, drop_by_weight, weight, pad, counts, routed, offsets, row,
                  assignment);
  const c10::cuda::CUDAGuard guard(expert_idx.device());
  const bool by_weight = drop_by_weight && capacity >= 0;
  const int64_t A = expert_idx.numel();
  const size_t bytes = cuda::make_plan_workspace_bytes(A, int(num_experts), by_weight);
  at::Tensor workspace = at::empty({int64_t(bytes)}, expert_idx.options().dtype(at::kByte));
  check_launch("make_plan",
               cuda::make_plan(expert_idx.data_ptr<int>(), A, int(num_experts), int(capacity), by_weight,
                               weight ? weight->data_ptr<float>() : nullptr, pad, assignment.numel(),
                               counts.data_ptr<int>(), routed.data_ptr<int>(), offsets.data_ptr<int>(),
                               row.data_ptr<int>(), assignment.data_ptr<int>(), workspace.data_ptr(), bytes,
                               at::cuda::getCurrentCUDAStream()));
}

void gather_cuda(const at::Tensor& x, const at::Tensor& index, int64_t div, const c10::optional<at::Tensor>& scale,
                 at::Tensor& out) {
  check_gather(x, index, div, scale, out);
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch("gather", cuda::gather(kernel_dtype(x.scalar_type()), x.data_ptr(), x.size(0), x.stride(0),
                                      index.data_ptr<int>(), out.size(0), int(out.size(1)), int(div),
                                      scale ? scale->data_ptr<float>() : nullptr, scale ? scale->numel() : 0,
                                      out.data_ptr(), at::cuda::getCurrentCUDAStream()));
}

void combine_cuda(const at::Tensor& y, const at::Tensor& row, const c10::optional<at::Tensor>& weight, bool ordered,
                  at::Tensor& out) {
  check_combine(y, row, weight, ordered, out);
  const c10::cuda::CUDAGuard guard(y.device());
  check_launch("combine", cuda::combine(kernel_dtype(y.scalar_type()), y.data_ptr(), y.size(0), y.stride(0),
                                        row.data_ptr<int>(), weight ? weight->data_ptr<float>() : nullptr,
                                        row.size(0), int(row.size(1)), int(out.size(1)), ordered, out.data_ptr(),
                                        at::cuda::getCurrentCUDAStream()));
}

void rowdot_cuda(const at::Tensor& g, const at::Tensor& y, const at::Tensor& row, at::Tensor& out) {
  check_rowdot(g, y, row, out);
  const c10::cuda::CUDAGuard guard(g.device());
  check_launch("rowdot", cuda::rowdot(kernel_dtype(g.scalar_type()), g.data_ptr(), y.data_ptr(), y.size(0),
                                      row.data_ptr<int>(), row.size(0), int(row.size(1)), int(g.size(1)),
                                      out.data_ptr<float>(), at::cuda::getCurrentCUDAStream()));
}

void routing_stats_cuda(const at::Tensor& probs, const at::Tensor& expert_idx, int64_t num_segments,
                        at::Tensor& tokens, at::Tensor& prob_mean) {
  check_routing_stats(probs, expert_idx, num_segments, tokens, prob_mean);
  const c10::cuda::CUDAGuard guard(probs.device());
  const size_t bytes = cuda::routing_stats_workspace_bytes(probs.size(0), int(probs.size(1)), int(num_segments));
  at::Tensor workspace = at::empty({int64_t(bytes)}, probs.options().dtype(at::kByte));
  check_launch("routing_stats",
               cuda::routing_stats(probs.data_ptr<float>(), expert_idx.data_ptr<int>(), probs.size(0),
                                   int(probs.size(1)), int(expert_idx.size(1)), int(num_segments),
                                   tokens.data_ptr<float>(), prob_mean.data_ptr<float>(), workspace.data_ptr(),
                                   at::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace fastmoe

TORCH_LIBRARY_IMPL(fastmoe_C, CUDA, m) {
  m.impl("route_topk", &fastmoe::route_topk_cuda);
  m.impl("route_topk_backward", &fastmoe::route_topk_backward_cuda);
  m.impl("make_plan", &fastmoe::make_plan_cuda);
  m.impl("gather", &fastmoe::gather_cuda);
  m.impl("combine", &fastmoe::combine_cuda);
  m.impl("rowdot", &fastmoe::rowdot_cuda);
  m.impl("routing_stats", &fastmoe::routing_stats_cuda);
}
