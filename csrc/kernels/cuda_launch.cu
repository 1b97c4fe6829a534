// Host launchers of the CUDA kernels (compiled by nvcc inside the extension).
#include "cuda_launch.h"

#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <cstdint>

#include "cuda_kernels.cuh"

namespace fastmoe {
namespace cuda {
namespace {

constexpr int kPlanThreads = 256;
constexpr int kPlanItems = 16;  // 4096 assignments per block: few blocks for the per-key scan
constexpr int kRowThreads = 256;

i64 ceil_div(i64 a, i64 b) { return (a + b - 1) / b; }

// Carves aligned sub-buffers out of one workspace allocation.
struct Carver {
  char* base;
  size_t used = 0;
  template <typename T>
  T* take(i64 count) {
    used = (used + 255) & ~size_t(255);
    T* p = reinterpret_cast<T*>(base ? base + used : nullptr);
    used += sizeof(T) * size_t(std::max<i64>(count, 1));
    return p;
  }
};

template <typename T>
int pack_width(const void* a, const void* b, i64 stride, int D) {
  const int vec = int(16 / sizeof(T));
  const bool aligned = reinterpret_cast<std::uintptr_t>(a) % 16 == 0 && reinterpret_cast<std::uintptr_t>(b) % 16 == 0;
  return (aligned && D % vec == 0 && stride % vec == 0) ? vec : 1;
}

int row_grid(i64 rows) { return int(std::min<i64>(std::max<i64>(rows, 1), 65535)); }

int row_threads(int packs) { return int(std::min<i64>(kRowThreads, std::max<i64>(32, ceil_div(packs, 32) * 32))); }

template <typename T, int VPL>
void launch_route(const void* logits, i64 num_tokens, int E, int k, bool sigmoid, bool normalize, const float* bias,
                  int num_groups, int topk_groups, float scaling, int* idx, float* weight, float* probs,
                  cudaStream_t stream) {
  const int threads = 256;
  const int blocks = int(ceil_div(num_tokens * 32, threads));
  const size_t shared = size_t(threads / 32) * std::max(num_groups, 1) * sizeof(float);
  route_topk_kernel<T, VPL><<<blocks, threads, shared, stream>>>(static_cast<const T*>(logits), num_tokens, E, k,
                                                                 sigmoid, normalize, bias, num_groups, topk_groups,
                                                                 scaling, idx, weight, probs);
}

template <typename T, int VPL>
void launch_route_backward(const float* grad_w, const float* grad_probs, const void* logits, const int* idx,
                           i64 num_tokens, int E, int k, bool sigmoid, bool normalize, float scaling,
                           void* grad_logits, cudaStream_t stream) {
  const int threads = 256;
  const int blocks = int(ceil_div(num_tokens * 32, threads));
  route_topk_backward_kernel<T, VPL><<<blocks, threads, 0, stream>>>(
      grad_w, grad_probs, static_cast<const T*>(logits), idx, num_tokens, E, k, sigmoid, normalize, scaling,
      static_cast<T*>(grad_logits));
}

// Values per lane: the smallest power of two with 32·VPL >= E.
#define FASTMOE_DISPATCH_VPL(E, FN, T, ...) \
  do {                                      \
    if ((E) <= 32) FN<T, 1>(__VA_ARGS__);   \
    else if ((E) <= 64) FN<T, 2>(__VA_ARGS__); \
    else if ((E) <= 128) FN<T, 4>(__VA_ARGS__); \
    else if ((E) <= 256) FN<T, 8>(__VA_ARGS__); \
    else if ((E) <= 512) FN<T, 16>(__VA_ARGS__); \
    else FN<T, 32>(__VA_ARGS__);            \
  } while (0)

#define FASTMOE_DISPATCH_DTYPE(dtype, T, ...)        \
  switch (dtype) {                                   \
    case DType::kFloat32: { using T = float; __VA_ARGS__; break; } \
    case DType::kFloat16: { using T = half_t; __VA_ARGS__; break; } \
    case DType::kBFloat16: { using T = bf16_t; __VA_ARGS__; break; } \
  }

// One counting pass: keys (from expert ids, or key_in) → ranks, per-block bases, per-key totals.
void rank_and_scan(const int* expert, const int* key_in, i64 A, int E, int* key, int* rank, int* block_counts,
                   int* totals, cudaStream_t stream) {
  const int blocks = int(std::max<i64>(1, ceil_div(A, i64(kPlanThreads) * kPlanItems)));
  const size_t shared = size_t(E + 1) * sizeof(int);
  if (A > 0) {
    plan_rank_kernel<kPlanThreads, kPlanItems><<<blocks, kPlanThreads, shared, stream>>>(expert, key_in, A, E, key,
                                                                                         rank, block_counts);
  } else {
    cudaMemsetAsync(block_counts, 0, sizeof(int) * size_t(E + 1), stream);
  }
  plan_scan_kernel<<<int(ceil_div(E + 1, 256)), 256, 0, stream>>>(block_counts, blocks, E + 1, totals);
}

}  // namespace

cudaError_t route_topk(DType dtype, const void* logits, i64 num_tokens, int E, int k, bool sigmoid, bool normalize,
                       const float* bias, int num_groups, int topk_groups, float scaling, int* idx, float* weight,
                       float* probs, cudaStream_t stream) {
  if (E > kMaxRoutingExperts || k > 32) return cudaErrorInvalidValue;
  if (num_tokens == 0) return cudaSuccess;
  FASTMOE_DISPATCH_DTYPE(dtype, T,
                         FASTMOE_DISPATCH_VPL(E, launch_route, T, logits, num_tokens, E, k, sigmoid, normalize, bias,
                                              num_groups, topk_groups, scaling, idx, weight, probs, stream));
  return cudaGetLastError();
}

cudaError_t route_topk_backward(DType dtype, const float* grad_w, const float* grad_probs, const void* logits,
                                const int* idx, i64 num_tokens, int E, int k, bool sigmoid, bool normalize,
                                float scaling, void* grad_logits, cudaStream_t stream) {
  if (E > kMaxRoutingExperts || k > 32) return cudaErrorInvalidValue;
  if (num_tokens == 0) return cudaSuccess;
  FASTMOE_DISPATCH_DTYPE(dtype, T,
                         FASTMOE_DISPATCH_VPL(E, launch_route_backward, T, grad_w, grad_probs, logits, idx, num_tokens,
                                              E, k, sigmoid, normalize, scaling, grad_logits, stream));
  return cudaGetLastError();
}

namespace {

struct PlanBuffers {
  int *key, *rank, *block_counts, *totals, *start;
  int *by_expert, *sorted_assignment, *scratch_row, *scratch_counts, *scratch_offsets;
  float *weight_by_expert, *sorted_weight;
  void* sort_temp;
  size_t sort_temp_bytes;
};

size_t segmented_sort_bytes(i64 A, int E) {
  size_t bytes = 0;
  cub::DeviceSegmentedRadixSort::SortPairsDescending(nullptr, bytes, static_cast<const float*>(nullptr),
                                                     static_cast<float*>(nullptr), static_cast<const int*>(nullptr),
                                                     static_cast<int*>(nullptr), int(A), E,
                                                     static_cast<const int*>(nullptr), static_cast<const int*>(nullptr));
  return bytes;
}

PlanBuffers carve_plan(char* base, i64 A, int E, bool drop_by_weight, size_t* total_bytes) {
  Carver c{base};
  PlanBuffers b{};
  const i64 blocks = std::max<i64>(1, ceil_div(A, i64(kPlanThreads) * kPlanItems));
  b.key = c.take<int>(A);
  b.rank = c.take<int>(A);
  b.block_counts = c.take<int>(blocks * (E + 1));
  b.totals = c.take<int>(E + 1);
  b.start = c.take<int>(E);
  if (drop_by_weight) {
    b.by_expert = c.take<int>(A);
    b.sorted_assignment = c.take<int>(A);
    b.scratch_row = c.take<int>(A);
    b.scratch_counts = c.take<int>(E);
    b.scratch_offsets = c.take<int>(E + 1);
    b.weight_by_expert = c.take<float>(A);
    b.sorted_weight = c.take<float>(A);
    b.sort_temp_bytes = segmented_sort_bytes(A, E);
    b.sort_temp = c.take<char>(i64(b.sort_temp_bytes));
  }
  *total_bytes = c.used;
  return b;
}

__global__ void gather_weight_kernel(const int* __restrict__ order, const int* __restrict__ offsets, int E,
                                     const float* __restrict__ weight, i64 A, float* __restrict__ out) {
  const i64 i = i64(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < A && i < offsets[E]) out[i] = weight[order[i]];
}

}  // namespace

size_t make_plan_workspace_bytes(i64 A, int E, bool drop_by_weight) {
  size_t bytes = 0;
  carve_plan(nullptr, A, E, drop_by_weight, &bytes);
  return bytes;
}

cudaError_t make_plan(const int* expert, i64 A, int E, int capacity, bool drop_by_weight, const float* weight,
                      bool pad, i64 num_rows, int* counts, int* routed, int* offsets, int* row, int* assignment,
                      void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  size_t needed = 0;
  const bool by_weight = capacity >= 0 && drop_by_weight;
  PlanBuffers b = carve_plan(static_cast<char*>(workspace), A, E, by_weight, &needed);
  if (workspace_bytes < needed) return cudaErrorInvalidValue;
  const int blocks = int(std::max<i64>(1, ceil_div(A, i64(kPlanThreads) * kPlanItems)));
  if (num_rows > 0) cudaMemsetAsync(assignment, 0xff, sizeof(int) * size_t(num_rows), stream);  // -1
  rank_and_scan(expert, nullptr, A, E, b.key, b.rank, b.block_counts, b.totals, stream);
  if (by_weight) {
    // Lay each expert's assignments out in token order (a dropless placement), sort each expert's
    // run by weight (descending, stable), keep the first `capacity`, then count again.
    plan_offsets_kernel<<<1, 1, 0, stream>>>(b.totals, E, 0, false, false, b.scratch_counts, routed, b.start,
                                             b.scratch_offsets, true);
    plan_place_kernel<kPlanThreads, kPlanItems><<<blocks, kPlanThreads, 0, stream>>>(
        b.key, b.rank, b.block_counts, b.start, A, E, 0, false, false, A, b.scratch_row, b.by_expert);
    const int elementwise = int(std::max<i64>(1, ceil_div(A, 256)));
    gather_weight_kernel<<<elementwise, 256, 0, stream>>>(b.by_expert, b.scratch_offsets, E, weight, A,
                                                          b.weight_by_expert);
    size_t temp_bytes = b.sort_temp_bytes;
    cudaError_t err = cub::DeviceSegmentedRadixSort::SortPairsDescending(
        b.sort_temp, temp_bytes, b.weight_by_expert, b.sorted_weight, b.by_expert, b.sorted_assignment, int(A), E,
        b.scratch_offsets, b.scratch_offsets + 1, 0, int(sizeof(float) * 8), stream);
    if (err != cudaSuccess) return err;
    plan_mark_kept_kernel<<<elementwise, 256, 0, stream>>>(b.sorted_assignment, b.scratch_offsets, E, capacity, A,
                                                           b.key);
    rank_and_scan(expert, b.key, A, E, b.key, b.rank, b.block_counts, b.totals, stream);
    plan_offsets_kernel<<<1, 1, 0, stream>>>(b.totals, E, capacity, false, pad, counts, routed, b.start, offsets, false);
  } else {
    plan_offsets_kernel<<<1, 1, 0, stream>>>(b.totals, E, capacity, capacity >= 0, pad, counts, routed, b.start,
                                             offsets, true);
  }
  if (A > 0) {
    plan_place_kernel<kPlanThreads, kPlanItems><<<blocks, kPlanThreads, 0, stream>>>(
        b.key, b.rank, b.block_counts, b.start, A, E, capacity, capacity >= 0 && !by_weight, pad, num_rows, row,
        assignment);
  }
  return cudaGetLastError();
}

namespace {

template <typename T, int VEC>
void launch_gather(const void* x, i64 num_src, i64 stride_x, const int* index, i64 num_rows, int D, int div,
                   const float* scale, i64 num_scale, void* out, cudaStream_t stream) {
  gather_kernel<T, VEC><<<row_grid(num_rows), row_threads(D / VEC), 0, stream>>>(
      static_cast<const T*>(x), num_src, stride_x, index, num_rows, D, div, scale, num_scale, static_cast<T*>(out));
}

template <typename T, int VEC>
void launch_combine(const void* y, i64 num_src, i64 stride_y, const int* row, const float* weight, i64 num_tokens,
                    int k, int D, bool ordered, void* out, cudaStream_t stream) {
  combine_kernel<T, VEC><<<row_grid(num_tokens), row_threads(D / VEC), 0, stream>>>(
      static_cast<const T*>(y), num_src, stride_y, row, weight, num_tokens, k, D, ordered, static_cast<T*>(out));
}

}  // namespace

cudaError_t gather(DType dtype, const void* x, i64 num_src, i64 stride_x, const int* index, i64 num_rows, int D,
                   int div, const float* scale, i64 num_scale, void* out, cudaStream_t stream) {
  if (num_rows == 0 || D == 0) return cudaSuccess;
  FASTMOE_DISPATCH_DTYPE(dtype, T, {
    if (pack_width<T>(x, out, stride_x, D) > 1) {
      launch_gather<T, 16 / sizeof(T)>(x, num_src, stride_x, index, num_rows, D, div, scale, num_scale, out, stream);
    } else {
      launch_gather<T, 1>(x, num_src, stride_x, index, num_rows, D, div, scale, num_scale, out, stream);
    }
  });
  return cudaGetLastError();
}

cudaError_t combine(DType dtype, const void* y, i64 num_src, i64 stride_y, const int* row, const float* weight,
                    i64 num_tokens, int k, int D, bool ordered, void* out, cudaStream_t stream) {
  if (num_tokens == 0 || D == 0) return cudaSuccess;
  FASTMOE_DISPATCH_DTYPE(dtype, T, {
    if (pack_width<T>(y, out, stride_y, D) > 1) {
      launch_combine<T, 16 / sizeof(T)>(y, num_src, stride_y, row, weight, num_tokens, k, D, ordered, out, stream);
    } else {
      launch_combine<T, 1>(y, num_src, stride_y, row, weight, num_tokens, k, D, ordered, out, stream);
    }
  });
  return cudaGetLastError();
}

cudaError_t rowdot(DType dtype, const void* g, const void* y, i64 num_src, const int* row, i64 num_tokens, int k,
                   int D, float* out, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  const int threads = 256;
  const int blocks = int(ceil_div(num_tokens * k * 32, threads));
  FASTMOE_DISPATCH_DTYPE(dtype, T,
                         rowdot_kernel<T><<<blocks, threads, 0, stream>>>(static_cast<const T*>(g),
                                                                        static_cast<const T*>(y), num_src, row,
                                                                        num_tokens, k, D, out));
  return cudaGetLastError();
}

namespace {
constexpr int kStatsTokensPerBlock = 256;
i64 stats_blocks(i64 num_tokens, int num_segments) {
  const i64 per_segment = num_segments > 0 ? num_tokens / num_segments : 0;
  return std::max<i64>(1, ceil_div(per_segment, kStatsTokensPerBlock));
}
}  // namespace

size_t routing_stats_workspace_bytes(i64 num_tokens, int E, int num_segments) {
  return 2 * sizeof(float) * size_t(num_segments) * size_t(stats_blocks(num_tokens, num_segments)) * size_t(E);
}

cudaError_t routing_stats(const float* probs, const int* idx, i64 num_tokens, int E, int k, int num_segments,
                          float* tokens, float* prob_mean, void* workspace, cudaStream_t stream) {
  const i64 per_segment = num_segments > 0 ? num_tokens / num_segments : 0;
  const i64 blocks = stats_blocks(num_tokens, num_segments);
  float* partial_tokens = static_cast<float*>(workspace);
  float* partial_probs = partial_tokens + size_t(num_segments) * size_t(blocks) * size_t(E);
  const unsigned grid = unsigned(blocks * num_segments);
  routing_stats_partial_kernel<<<grid, 256, 0, stream>>>(probs, idx, per_segment, E, k, kStatsTokensPerBlock,
                                                         int(blocks), partial_tokens, partial_probs);
  const i64 outputs = i64(num_segments) * E;
  routing_stats_reduce_kernel<<<int(std::max<i64>(1, ceil_div(outputs, 256))), 256, 0, stream>>>(
      partial_tokens, partial_probs, num_segments, E, int(blocks), per_segment, tokens, prob_mean);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastmoe
