// Host launchers of the CUDA kernels: plain pointers, sizes and a stream, no torch.
// Each returns the CUDA error of its launches (cudaSuccess when all went well).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "common.h"

namespace fastmoe {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// Largest E the warp-per-token routing kernels take (32 lanes × 32 values).
constexpr int kMaxRoutingExperts = 1024;

cudaError_t route_topk(DType dtype, const void* logits, i64 num_tokens, int E, int k, bool sigmoid, bool normalize,
                       const float* bias, int num_groups, int topk_groups, float scaling, int* idx, float* weight,
                       float* probs, cudaStream_t stream);

cudaError_t route_topk_backward(DType dtype, const float* grad_w, const float* grad_probs, const void* logits,
                                const int* idx, i64 num_tokens, int E, int k, bool sigmoid, bool normalize,
                                float scaling, void* grad_logits, cudaStream_t stream);

// Bytes of scratch make_plan needs for A assignments and E experts.
size_t make_plan_workspace_bytes(i64 A, int E, bool drop_by_weight);

// capacity < 0: dropless. weight (fp32 [A]) only for "probs" dropping. `assignment` [num_rows] is
// filled with -1 first by the launcher.
cudaError_t make_plan(const int* expert, i64 A, int E, int capacity, bool drop_by_weight, const float* weight,
                      bool pad, i64 num_rows, int* counts, int* routed, int* offsets, int* row, int* assignment,
                      void* workspace, size_t workspace_bytes, cudaStream_t stream);

cudaError_t gather(DType dtype, const void* x, i64 num_src, i64 stride_x, const int* index, i64 num_rows, int D,
                   int div, const float* scale, i64 num_scale, void* out, cudaStream_t stream);

cudaError_t combine(DType dtype, const void* y, i64 num_src, i64 stride_y, const int* row, const float* weight,
                    i64 num_tokens, int k, int D, bool ordered, void* out, cudaStream_t stream);

cudaError_t rowdot(DType dtype, const void* g, const void* y, i64 num_src, const int* row, i64 num_tokens, int k,
                   int D, float* out, cudaStream_t stream);

size_t routing_stats_workspace_bytes(i64 num_tokens, int E, int num_segments);

cudaError_t routing_stats(const float* probs, const int* idx, i64 num_tokens, int E, int k, int num_segments,
                          float* tokens, float* prob_mean, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmoe
