// CUDA kernels. Device code only (no host code, no standard headers), so that NVRTC can compile
// this file as it is; cuda_launch.cu launches them from the extension. The per-element logic lives
// in routing.h / plan.h / rows.h and is shared with the CPU kernels.
#pragma once

#include "common.h"
#include "plan.h"
#include "routing.h"
#include "rows.h"

namespace fastmoe {
namespace cuda {

static const unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Warp-wide (key, index) maximum in the ranks_before order; every lane gets the winner.
__device__ __forceinline__ void warp_best(float& key, int& index) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other_key = __shfl_xor_sync(kFullMask, key, offset);
    const int other_index = __shfl_xor_sync(kFullMask, index, offset);
    if (ranks_before(other_key, other_index, key, index)) {
      key = other_key;
      index = other_index;
    }
  }
}

// Register array element i (i not a compile-time constant) without spilling the array to local memory.
template <int N>
__device__ __forceinline__ float select_slot(const float (&values)[N], int i) {
  float out = 0.f;
#pragma unroll
  for (int s = 0; s < N; ++s) out = (s == i) ? values[s] : out;
  return out;
}

// ---- routing: one warp per token, lane l holds experts l, l+32, ... (VPL per lane, E <= 32·VPL) ----
// The lane's logits and scores (softmax over the warp's E, or sigmoid); returns the warp's score
// total (1 after softmax's normalisation). Experts past E get logit -inf and score 0.
template <typename T, int VPL>
__device__ __forceinline__ float warp_scores(const T* __restrict__ row, int E, int lane, bool sigmoid,
                                             float (&logit)[VPL], float (&score)[VPL]) {
  float max_logit = neg_inf();
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    logit[i] = e < E ? to_float(row[e]) : neg_inf();
    max_logit = fmaxf(max_logit, logit[i]);
  }
  max_logit = warp_max(max_logit);
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    score[i] = e < E ? (sigmoid ? sigmoidf(logit[i]) : expf(logit[i] - max_logit)) : 0.f;
    total += score[i];
  }
  total = warp_sum(total);
  if (!sigmoid) {
#pragma unroll
    for (int i = 0; i < VPL; ++i) score[i] /= total;
    total = 1.f;
  }
  return total;
}

template <typename T, int VPL>
__global__ void route_topk_kernel(const T* __restrict__ logits, i64 num_tokens, int E, int k, bool sigmoid,
                                  bool normalize, const float* __restrict__ bias, int num_groups, int topk_groups,
                                  float scaling, int* __restrict__ idx_out, float* __restrict__ w_out,
                                  float* __restrict__ probs_out) {
  extern __shared__ float group_scores[];  // [warps per block][num_groups]
  const int lane = threadIdx.x & 31;
  const i64 token = (i64(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (token >= num_tokens) return;  // uniform per warp
  float logit[VPL], score[VPL], key[VPL];
  const float total = warp_scores<T, VPL>(logits + token * E, E, lane, sigmoid, logit, score);
  const bool keyed = bias != nullptr || num_groups > 1;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    key[i] = e < E ? selection_key(keyed ? score[i] + (bias != nullptr ? bias[e] : 0.f) : logit[i]) : neg_inf();
  }
  // allowed[i]: expert lane + 32·i is in one of the token's topk_groups best groups (all, without groups).
  bool allowed[VPL];
#pragma unroll
  for (int i = 0; i < VPL; ++i) allowed[i] = true;
  if (num_groups > 1) {
    float* gs = group_scores + (threadIdx.x >> 5) * num_groups;
    const int size = E / num_groups;
    for (int g = 0; g < num_groups; ++g) {
      float best = neg_inf();
      int best_e = 0x7fffffff;
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        const int e = lane + 32 * i;
        if (e < E && e / size == g && ranks_before(key[i], e, best, best_e)) {
          best = key[i];
          best_e = e;
        }
      }
      warp_best(best, best_e);
      float second = neg_inf();
      int second_e = 0x7fffffff;
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        const int e = lane + 32 * i;
        if (e < E && e / size == g && e != best_e && ranks_before(key[i], e, second, second_e)) {
          second = key[i];
          second_e = e;
        }
      }
      warp_best(second, second_e);
      if (lane == 0) gs[g] = selection_key(size >= 2 ? best + second : best);  // +inf + -inf is NaN
    }
    __syncwarp();
    if (lane == 0) mark_best_groups(gs, num_groups, topk_groups);
    __syncwarp();
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      const int e = lane + 32 * i;
      allowed[i] = e < E && is_taken(gs[e / size]);
    }
  }
  // k rounds of "best expert not yet taken", experts of the allowed groups first: one warp-wide
  // reduction among the allowed ones, a second among all only if none is left.
  int my_idx = 0;
  float my_w = 0.f, selected_total = 0.f;
  for (int j = 0; j < k; ++j) {
    float best = neg_inf();
    int best_e = 0x7fffffff;
    for (int pass = 0; pass < 2 && best_e == 0x7fffffff; ++pass) {
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        const int e = lane + 32 * i;
        if (e < E && !is_taken(key[i]) && (pass == 1 || allowed[i]) && ranks_before(key[i], e, best, best_e)) {
          best = key[i];
          best_e = e;
        }
      }
      warp_best(best, best_e);
    }
    const int owner = best_e & 31;
    float s = 0.f;
    if (lane == owner) {
      s = select_slot(score, best_e >> 5);
#pragma unroll
      for (int i = 0; i < VPL; ++i) key[i] = (i == (best_e >> 5)) ? taken_mark() : key[i];
    }
    s = __shfl_sync(kFullMask, s, owner);
    selected_total += s;
    if (lane == j) {
      my_idx = best_e;
      my_w = s;
    }
  }
  if (lane < k) {
    const float w = normalize ? my_w / (selected_total + kNormalizeEps) : my_w;
    idx_out[token * k + lane] = my_idx;
    w_out[token * k + lane] = w * scaling;
  }
  if (probs_out != nullptr) {
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      const int e = lane + 32 * i;
      if (e < E) probs_out[token * E + e] = aux_probability(score[i], sigmoid, total);
    }
  }
}

template <typename T, int VPL>
__global__ void route_topk_backward_kernel(const float* __restrict__ grad_w, const float* __restrict__ grad_probs,
                                           const T* __restrict__ logits, const int* __restrict__ idx,
                                           i64 num_tokens, int E, int k, bool sigmoid, bool normalize, float scaling,
                                           T* __restrict__ grad_logits) {
  const int lane = threadIdx.x & 31;
  const i64 token = (i64(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (token >= num_tokens) return;
  float logit[VPL], score[VPL], grad_score[VPL];
  const float total = warp_scores<T, VPL>(logits + token * E, E, lane, sigmoid, logit, score);
#pragma unroll
  for (int i = 0; i < VPL; ++i) grad_score[i] = 0.f;
  // Ids outside [0, E) (a caller bypassing the checks) contribute nothing.
  const int loaded_idx = lane < k ? idx[token * k + lane] : -1;
  const bool my_valid = loaded_idx >= 0 && loaded_idx < E;
  const int my_idx = my_valid ? loaded_idx : 0;
  const float my_gw = my_valid ? grad_w[token * k + lane] : 0.f;
  float selected_total = 0.f, dot = 0.f;
  for (int j = 0; j < k; ++j) {
    const int e_j = __shfl_sync(kFullMask, my_idx, j);
    const float gw_j = __shfl_sync(kFullMask, my_gw, j);
    const bool valid_j = __shfl_sync(kFullMask, my_valid ? 1 : 0, j) != 0;
    float s = lane == (e_j & 31) ? select_slot(score, e_j >> 5) : 0.f;
    s = __shfl_sync(kFullMask, s, e_j & 31);
    if (valid_j) {
      selected_total += s;
      dot += gw_j * s;
    }
  }
  selected_total += kNormalizeEps;
  const float my_grad_sel = selected_score_grad(my_gw, dot, selected_total, normalize, scaling);
  for (int j = 0; j < k; ++j) {
    const int e_j = __shfl_sync(kFullMask, my_idx, j);
    const float g_j = __shfl_sync(kFullMask, my_valid ? my_grad_sel : 0.f, j);
    if (lane == (e_j & 31)) {
#pragma unroll
      for (int i = 0; i < VPL; ++i) grad_score[i] += (i == (e_j >> 5)) ? g_j : 0.f;
    }
  }
  if (grad_probs != nullptr) {
    float gp[VPL];
    float gp_dot = 0.f;
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      const int e = lane + 32 * i;
      gp[i] = e < E ? grad_probs[token * E + e] : 0.f;
      gp_dot += gp[i] * score[i];
    }
    if (sigmoid) {
      gp_dot = warp_sum(gp_dot);
#pragma unroll
      for (int i = 0; i < VPL; ++i) grad_score[i] += (gp[i] - gp_dot / total) / total;
    } else {
#pragma unroll
      for (int i = 0; i < VPL; ++i) grad_score[i] += gp[i];
    }
  }
  float gs_dot = 0.f;
#pragma unroll
  for (int i = 0; i < VPL; ++i) gs_dot += grad_score[i] * score[i];
  gs_dot = warp_sum(gs_dot);
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    if (e < E) {
      const float g = sigmoid ? grad_score[i] * score[i] * (1.f - score[i]) : score[i] * (grad_score[i] - gs_dot);
      grad_logits[token * E + e] = from_float<T>(g);
    }
  }
}

// ---- plan: rank within block by key (stable), per-block key counts ------------------------------
// Assignment a = block·THREADS·ITEMS + item·THREADS + thread: items, then warps, then lanes are in
// assignment order, and ranks are handed out in that order (match_any within a warp, shared
// per-key counters across warps), so the ranking is stable without sorting.
template <int THREADS, int ITEMS>
__global__ void plan_rank_kernel(const int* __restrict__ expert, const int* __restrict__ key_in, i64 A, int E,
                                 int* __restrict__ key_out, int* __restrict__ rank_out, int* __restrict__ block_counts) {
  extern __shared__ int key_counts[];  // [E + 1]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int i = tid; i <= E; i += THREADS) key_counts[i] = 0;
  __syncthreads();
  const i64 block_start = i64(blockIdx.x) * THREADS * ITEMS;
  for (int item = 0; item < ITEMS; ++item) {
    const i64 a = block_start + i64(item) * THREADS + tid;
    const bool live = a < A;
    int key = E + 1;  // dead lanes match only each other
    if (live) key = key_in != nullptr ? key_in[a] : plan_key(expert[a], E);
    for (int w = 0; w < THREADS / 32; ++w) {
      if (warp == w) {
        const unsigned peers = __match_any_sync(kFullMask, key);
        const unsigned lower = peers & ((1u << lane) - 1u);
        const int base = live ? key_counts[key] : 0;
        __syncwarp();
        if (live) {
          rank_out[a] = base + __popc(lower);
          key_out[a] = key;
          if (lower == 0) key_counts[key] += __popc(peers);  // the first peer publishes the warp's count
        }
      }
      __syncthreads();
    }
  }
  for (int i = tid; i <= E; i += THREADS) block_counts[i64(blockIdx.x) * (E + 1) + i] = key_counts[i];
}

// Per key: block counts → exclusive base over blocks (in place), and the key's total.
__global__ void plan_scan_kernel(int* __restrict__ block_counts, int num_blocks, int num_keys, int* __restrict__ totals) {
  const int key = blockIdx.x * blockDim.x + threadIdx.x;
  if (key >= num_keys) return;
  int running = 0;
  for (int b = 0; b < num_blocks; ++b) {
    const i64 slot = i64(b) * num_keys + key;
    const int n = block_counts[slot];
    block_counts[slot] = running;
    running += n;
  }
  totals[key] = running;
}

// One thread: counts, row starts and offsets from the key totals (E is small).
__global__ void plan_offsets_kernel(const int* __restrict__ totals, int E, int capacity, bool limit, bool pad,
                                    int* __restrict__ counts, int* __restrict__ routed, int* __restrict__ start,
                                    int* __restrict__ offsets, bool write_routed) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int running = 0;
  for (int e = 0; e < E; ++e) {
    if (write_routed) routed[e] = totals[e];
    counts[e] = plan_count(totals[e], capacity, limit);
    start[e] = running;
    offsets[e] = pad ? e * capacity : running;
    running += counts[e];
  }
  offsets[E] = pad ? E * capacity : running;
}

template <int THREADS, int ITEMS>
__global__ void plan_place_kernel(const int* __restrict__ key, const int* __restrict__ rank,
                                  const int* __restrict__ block_base, const int* __restrict__ start, i64 A, int E,
                                  int capacity, bool limit, bool pad, i64 num_rows, int* __restrict__ row,
                                  int* __restrict__ assignment) {
  const i64 block_start = i64(blockIdx.x) * THREADS * ITEMS;
  for (int item = 0; item < ITEMS; ++item) {
    const i64 a = block_start + i64(item) * THREADS + threadIdx.x;
    if (a >= A) return;
    const int k_a = key[a];
    const int position = rank[a] + block_base[i64(blockIdx.x) * (E + 1) + k_a];
    const int r = plan_row(k_a, position, E, capacity, limit, pad, start, num_rows);
    row[a] = r;
    if (r >= 0) assignment[r] = int(a);
  }
}

// "probs" dropping: after a segmented sort of each expert's weights (descending, stable), the
// first `capacity` of each segment are kept; the others get the sentinel key.
// segment_start has E + 1 entries; its last is the number of valid (sorted) assignments.
__global__ void plan_mark_kept_kernel(const int* __restrict__ sorted_assignment, const int* __restrict__ segment_start,
                                      int E, int capacity, i64 A, int* __restrict__ key) {
  const i64 i = i64(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= A || i >= segment_start[E]) return;
  int lo = 0, hi = E;  // segment: the last e with segment_start[e] <= i
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (segment_start[mid] <= i) lo = mid; else hi = mid;
  }
  if (i - segment_start[lo] >= capacity) key[sorted_assignment[i]] = E;
}

// ---- rows: 16-byte packs of VEC elements (VEC = 1 when rows are not 16-byte aligned) ----------------
template <typename T, int VEC>
struct Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  Pack<T, VEC> out;
  if (VEC * sizeof(T) == 16) {
    *reinterpret_cast<uint4*>(&out) = *reinterpret_cast<const uint4*>(p);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out.v[i] = p[i];
  }
  return out;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& pack) {
  if (VEC * sizeof(T) == 16) {
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&pack);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = pack.v[i];
  }
}

// out[r] = x[index[r] / div] (· scale[index[r]]); zeros for index < 0. Grid-stride over rows.
template <typename T, int VEC>
__global__ void gather_kernel(const T* __restrict__ x, i64 num_src, i64 stride_x, const int* __restrict__ index,
                              i64 num_rows, int D, int div, const float* __restrict__ scale, i64 num_scale,
                              T* __restrict__ out) {
  const int packs = D / VEC;
  for (i64 r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const int idx = index[r];
    const i64 src = gather_source(idx, div, num_src);
    const float s = gather_scale(scale, idx, num_scale);
    for (int c = threadIdx.x; c < packs; c += blockDim.x) {
      Pack<T, VEC> p;
      if (src < 0) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) p.v[i] = from_float<T>(0.f);
      } else {
        p = load_pack<T, VEC>(x + src * stride_x + i64(c) * VEC);
        if (scale != nullptr) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) p.v[i] = from_float<T>(to_float(p.v[i]) * s);
        }
      }
      store_pack<T, VEC>(out + r * D + i64(c) * VEC, p);
    }
  }
}

// out[t] = Σ_j w[t,j] · y[src(t,j)], fp32, j in order. Grid-stride over tokens.
template <typename T, int VEC>
__global__ void combine_kernel(const T* __restrict__ y, i64 num_src, i64 stride_y, const int* __restrict__ row,
                               const float* __restrict__ weight, i64 num_tokens, int k, int D, bool ordered,
                               T* __restrict__ out) {
  const int packs = D / VEC;
  for (i64 t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    for (int c = threadIdx.x; c < packs; c += blockDim.x) {
      float acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
      for (int j = 0; j < k; ++j) {
        const i64 src = combine_source(row[t * k + j], t, j, k, ordered, num_src);
        if (src < 0) continue;
        const float w = weight != nullptr ? weight[t * k + j] : 1.f;
        const Pack<T, VEC> p = load_pack<T, VEC>(y + src * stride_y + i64(c) * VEC);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += w * to_float(p.v[i]);
      }
      Pack<T, VEC> o;
#pragma unroll
      for (int i = 0; i < VEC; ++i) o.v[i] = from_float<T>(acc[i]);
      store_pack<T, VEC>(out + t * D + i64(c) * VEC, o);
    }
  }
}

// out[t,j] = <g[t], y[row[t,j]]>: one warp per (t, j).
template <typename T>
__global__ void rowdot_kernel(const T* __restrict__ g, const T* __restrict__ y, i64 num_src,
                              const int* __restrict__ row, i64 num_tokens, int k, int D, float* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const i64 pair = (i64(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (pair >= num_tokens * k) return;
  const i64 t = pair / k;
  const int r = row[pair];
  float acc = 0.f;
  if (r >= 0 && r < num_src) {
    for (int d = lane; d < D; d += 32) acc += to_float(g[t * D + d]) * to_float(y[i64(r) * D + d]);
  }
  acc = warp_sum(acc);
  if (lane == 0) out[pair] = acc;
}

// ---- routing statistics: partial sums per (segment, block of tokens), then a fixed-order reduce ----
__global__ void routing_stats_partial_kernel(const float* __restrict__ probs, const int* __restrict__ idx,
                                             i64 tokens_per_segment, int E, int k, int tokens_per_block,
                                             int blocks_per_segment, float* __restrict__ partial_tokens,
                                             float* __restrict__ partial_probs) {
  // One flat grid axis (a grid's y axis stops at 65,535; one segment per sequence can pass it).
  const int segment = int(blockIdx.x / unsigned(blocks_per_segment));
  const int block = int(blockIdx.x % unsigned(blocks_per_segment));
  const i64 first = i64(segment) * tokens_per_segment + i64(block) * tokens_per_block;
  const i64 end_local = (i64(block) + 1) * tokens_per_block < tokens_per_segment ? (i64(block) + 1) * tokens_per_block
                                                                                 : tokens_per_segment;
  const i64 last = i64(segment) * tokens_per_segment + end_local;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    float count = 0.f, sum = 0.f;
    for (i64 t = first; t < last; ++t) {
      sum += probs[t * E + e];
      for (int j = 0; j < k; ++j) count += idx[t * k + j] == e ? 1.f : 0.f;
    }
    const i64 out = (i64(segment) * blocks_per_segment + block) * E + e;
    partial_tokens[out] = count;
    partial_probs[out] = sum;
  }
}

__global__ void routing_stats_reduce_kernel(const float* __restrict__ partial_tokens,
                                            const float* __restrict__ partial_probs, int num_segments, int E,
                                            int blocks_per_segment, i64 tokens_per_segment, float* __restrict__ tokens,
                                            float* __restrict__ prob_mean) {
  const i64 i = i64(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= i64(num_segments) * E) return;
  const i64 s = i / E, e = i % E;
  float count = 0.f, sum = 0.f;
  for (int b = 0; b < blocks_per_segment; ++b) {
    count += partial_tokens[(s * blocks_per_segment + b) * E + e];
    sum += partial_probs[(s * blocks_per_segment + b) * E + e];
  }
  tokens[i] = count;
  prob_mean[i] = tokens_per_segment > 0 ? sum / float(tokens_per_segment) : 0.f;
}

}  // namespace cuda
}  // namespace fastmoe
