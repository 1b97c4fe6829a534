// C++ CPU kernels, built from the same per-element logic as the CUDA kernels. They run on the host's
// thread pool (parallel.h; serially until the host installs one) and give the same bits on any pool.
// Plain pointers and sizes; contiguous rows unless a stride is given. Element types: float,
// half_t, bf16_t. See fastmoe_kernels/ops/*.py for the contracts.
#pragma once

#include "common.h"

namespace fastmoe {
namespace cpu {

template <typename T>
void route_topk(const T* logits, i64 num_tokens, int E, int k, bool sigmoid, bool normalize, const float* bias,
                int num_groups, int topk_groups, float scaling, int* idx, float* weight, float* probs);

template <typename T>
void route_topk_backward(const float* grad_w, const float* grad_probs, const T* logits, const int* idx,
                         i64 num_tokens, int E, int k, bool sigmoid, bool normalize, float scaling, T* grad_logits);

// make_plan. capacity < 0: dropless. weight (fp32 [A]) only for the "probs" policy.
// Outputs: counts[E], routed[E], offsets[E+1], row[A], assignment[R] (R rows, pre-filled by the callee).
void make_plan(const int* expert, i64 num_assignments, int num_experts, int capacity, bool drop_by_weight,
               const float* weight, bool pad, i64 num_rows, int* counts, int* routed, int* offsets, int* row,
               int* assignment);

// out[r] = x[index[r] / div] (· scale[index[r]]), zero when index[r] < 0. x has num_src rows,
// scale num_scale entries; indices outside them read nothing.
template <typename T>
void gather(const T* x, i64 num_src, i64 stride_x, const int* index, i64 num_rows, int D, int div,
            const float* scale, i64 num_scale, T* out);

// out[t] = Σ_j w[t,j] · y[src(t,j)] in fp32; weight may be null (w = 1). y has num_src rows.
template <typename T>
void combine(const T* y, i64 num_src, i64 stride_y, const int* row, const float* weight, i64 num_tokens, int k,
             int D, bool ordered, T* out);

// out[t,j] = <g[t], y[row[t,j]]> in fp32 (0 when dropped). y has num_src rows.
template <typename T>
void rowdot(const T* g, const T* y, i64 num_src, const int* row, i64 num_tokens, int k, int D, float* out);

// tokens[s,e], prob_mean[s,e] over num_segments equal consecutive segments of the tokens.
void routing_stats(const float* probs, const int* idx, i64 num_tokens, int E, int k, int num_segments,
                   float* tokens, float* prob_mean);

}  // namespace cpu
}  // namespace fastmoe
