// C++ CPU kernels: loops over tokens / rows / chunks, run on the host's thread pool (parallel.h: no
// OpenMP, one pool per process), calling the same per-element logic as the CUDA kernels (routing.h,
// plan.h, rows.h). Every parallel loop writes disjoint outputs, so the results do not depend on how
// the pool splits a loop; scratch is allocated once per range a task runs.
#include "cpu_kernels.h"

#include <algorithm>
#include <vector>

#include "parallel.h"
#include "plan.h"
#include "routing.h"
#include "rows.h"

namespace fastmoe {
namespace cpu {

namespace {

// Assignments are processed in contiguous chunks; counting chunk by chunk in order keeps every
// ranking stable (the CPU twin of the CUDA kernels' blocks). The chunk count follows the pool's thread
// count, the results do not.
struct Chunks {
  i64 total;
  i64 size;
  int count;
  Chunks(i64 n, int per_thread) : total(n) {
    const i64 wanted = std::max<i64>(1, std::min<i64>(i64(max_threads()) * per_thread, (n + 4095) / 4096));
    size = std::max<i64>(1, (n + wanted - 1) / wanted);
    count = int((n + size - 1) / size);
    if (count == 0) count = 1;
  }
  i64 begin(int c) const { return std::min(total, c * size); }
  i64 end(int c) const { return std::min(total, (c + 1) * size); }
};

void count_keys(const std::vector<int>& key, const Chunks& chunks, int num_keys, std::vector<int>& chunk_counts) {
  chunk_counts.assign(size_t(chunks.count) * num_keys, 0);
  parallel_for(chunks.count, 1, [&](i64 first, i64 last) {
    for (int c = int(first); c < int(last); ++c) {
      int* counts = chunk_counts.data() + size_t(c) * num_keys;
      for (i64 a = chunks.begin(c); a < chunks.end(c); ++a) counts[key[a]] += 1;
    }
  });
}

// In place: chunk_counts → exclusive prefix over chunks per key; returns the per-key totals.
std::vector<int> scan_chunks(std::vector<int>& chunk_counts, int num_chunks, int num_keys) {
  std::vector<int> totals(num_keys, 0);
  parallel_for(num_keys, grain_for(num_chunks), [&](i64 first, i64 last) {
    for (int key = int(first); key < int(last); ++key) {
      int running = 0;
      for (int c = 0; c < num_chunks; ++c) {
        int& slot = chunk_counts[size_t(c) * num_keys + key];
        const int n = slot;
        slot = running;
        running += n;
      }
      totals[key] = running;
    }
  });
  return totals;
}

}  // namespace

template <typename T>
void route_topk(const T* logits, i64 num_tokens, int E, int k, bool sigmoid, bool normalize, const float* bias,
                int num_groups, int topk_groups, float scaling, int* idx, float* weight, float* probs) {
  // A token costs a few operations per expert (score, key, selection) and more per selected one.
  parallel_for(num_tokens, grain_for(i64(E) * 8 + i64(k) * E), [&](i64 first, i64 last) {
    std::vector<float> scores(E), key(E), group_score(std::max(num_groups, 1));
    for (i64 t = first; t < last; ++t) {
      route_token(logits + t * E, E, k, sigmoid, normalize, bias, num_groups, topk_groups, scaling, scores.data(),
                  key.data(), group_score.data(), idx + t * k, weight + t * k, probs ? probs + t * E : nullptr);
    }
  });
}

template <typename T>
void route_topk_backward(const float* grad_w, const float* grad_probs, const T* logits, const int* idx,
                         i64 num_tokens, int E, int k, bool sigmoid, bool normalize, float scaling, T* grad_logits) {
  parallel_for(num_tokens, grain_for(i64(E) * 8 + k), [&](i64 first, i64 last) {
    std::vector<float> scores(E), grad_scores(E);
    for (i64 t = first; t < last; ++t) {
      route_token_backward(grad_w + t * k, grad_probs ? grad_probs + t * E : nullptr, logits + t * E, idx + t * k, E,
                           k, sigmoid, normalize, scaling, scores.data(), grad_scores.data(), grad_logits + t * E);
    }
  });
}

void make_plan(const int* expert, i64 num_assignments, int num_experts, int capacity, bool drop_by_weight,
               const float* weight, bool pad, i64 num_rows, int* counts, int* routed, int* offsets, int* row,
               int* assignment) {
  const i64 A = num_assignments;
  const int E = num_experts;
  const int num_keys = E + 1;
  std::vector<int> key(A);
  parallel_for(A, grain_for(1), [&](i64 first, i64 last) {
    for (i64 a = first; a < last; ++a) key[a] = plan_key(expert[a], E);
  });
  // Weights order assignments for "probs" dropping; NaN sorts last, so the order stays strict.
  auto weight_before = [&](int x, int y) {
    const float wx = weight[x] == weight[x] ? weight[x] : neg_inf();
    const float wy = weight[y] == weight[y] ? weight[y] : neg_inf();
    return wx > wy;
  };
  const Chunks chunks(A, 4);
  std::vector<int> chunk_base;
  count_keys(key, chunks, num_keys, chunk_base);
  std::vector<int> totals = scan_chunks(chunk_base, chunks.count, num_keys);
  for (int e = 0; e < E; ++e) routed[e] = totals[e];

  if (capacity >= 0 && drop_by_weight) {
    // Each expert keeps its `capacity` highest-weight assignments (ties: earlier assignment):
    // lay assignments out by expert in token order, stable-sort each expert's run by weight.
    std::vector<int> start(num_keys + 1, 0);
    for (int key_id = 0; key_id < num_keys; ++key_id) start[key_id + 1] = start[key_id] + totals[key_id];
    std::vector<int> by_expert(A);
    parallel_for(chunks.count, 1, [&](i64 first, i64 last) {
      for (int c = int(first); c < int(last); ++c) {
        std::vector<int> cursor(chunk_base.begin() + size_t(c) * num_keys,
                                chunk_base.begin() + size_t(c + 1) * num_keys);
        for (i64 a = chunks.begin(c); a < chunks.end(c); ++a) by_expert[start[key[a]] + cursor[key[a]]++] = int(a);
      }
    });
    // Grain 1: one expert's sort is worth a task. (Torch's pool gives each thread one contiguous block of
    // experts, where OpenMP's dynamic schedule balanced uneven loads expert by expert.)
    parallel_for(E, 1, [&](i64 first_expert, i64 last_expert) {
      for (int e = int(first_expert); e < int(last_expert); ++e) {
        int* first = by_expert.data() + start[e];
        int* last = by_expert.data() + start[e + 1];
        std::stable_sort(first, last, weight_before);
        for (int* p = first + std::min<i64>(capacity, last - first); p < last; ++p) key[*p] = E;
      }
    });
    count_keys(key, chunks, num_keys, chunk_base);
    totals = scan_chunks(chunk_base, chunks.count, num_keys);
  }

  const bool limit = capacity >= 0 && !drop_by_weight;
  std::vector<int> start(E, 0);
  int running = 0;
  for (int e = 0; e < E; ++e) {
    counts[e] = plan_count(totals[e], capacity, limit);
    start[e] = running;
    offsets[e] = pad ? e * capacity : running;
    running += counts[e];
  }
  offsets[E] = pad ? E * capacity : running;
  std::fill(assignment, assignment + num_rows, -1);
  parallel_for(chunks.count, 1, [&](i64 first, i64 last) {
    for (int c = int(first); c < int(last); ++c) {
      std::vector<int> cursor(chunk_base.begin() + size_t(c) * num_keys,
                              chunk_base.begin() + size_t(c + 1) * num_keys);
      for (i64 a = chunks.begin(c); a < chunks.end(c); ++a) {
        const int position = cursor[key[a]]++;
        const int r = plan_row(key[a], position, E, capacity, limit, pad, start.data(), num_rows);
        row[a] = r;
        if (r >= 0) assignment[r] = int(a);
      }
    }
  });
}

template <typename T>
void gather(const T* x, i64 num_src, i64 stride_x, const int* index, i64 num_rows, int D, int div,
            const float* scale, i64 num_scale, T* out) {
  parallel_for(num_rows, grain_for(D), [&](i64 first, i64 last) {
    for (i64 r = first; r < last; ++r) {
      const i64 src = gather_source(index[r], div, num_src);
      T* dst = out + r * D;
      if (src < 0) {
        for (int d = 0; d < D; ++d) dst[d] = from_float<T>(0.f);
      } else if (scale != nullptr) {
        const float s = gather_scale(scale, index[r], num_scale);
        for (int d = 0; d < D; ++d) dst[d] = from_float<T>(to_float(x[src * stride_x + d]) * s);
      } else {
        std::memcpy(dst, x + src * stride_x, sizeof(T) * size_t(D));
      }
    }
  });
}

template <typename T>
void combine(const T* y, i64 num_src, i64 stride_y, const int* row, const float* weight, i64 num_tokens, int k,
             int D, bool ordered, T* out) {
  parallel_for(num_tokens, grain_for(i64(k) * D), [&](i64 first, i64 last) {
    std::vector<float> acc(D);
    for (i64 t = first; t < last; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int j = 0; j < k; ++j) {
        const i64 src = combine_source(row[t * k + j], t, j, k, ordered, num_src);
        if (src < 0) continue;
        const float w = weight != nullptr ? weight[t * k + j] : 1.f;
        const T* y_row = y + src * stride_y;
        for (int d = 0; d < D; ++d) acc[d] += w * to_float(y_row[d]);
      }
      for (int d = 0; d < D; ++d) out[t * D + d] = from_float<T>(acc[d]);
    }
  });
}

template <typename T>
void rowdot(const T* g, const T* y, i64 num_src, const int* row, i64 num_tokens, int k, int D, float* out) {
  parallel_for(num_tokens, grain_for(i64(k) * D), [&](i64 first, i64 last) {
    for (i64 t = first; t < last; ++t) {
      for (int j = 0; j < k; ++j) {
        const int r = row[t * k + j];
        float acc = 0.f;
        if (r >= 0 && r < num_src) {
          for (int d = 0; d < D; ++d) acc += to_float(g[t * D + d]) * to_float(y[i64(r) * D + d]);
        }
        out[t * k + j] = acc;
      }
    }
  });
}

void routing_stats(const float* probs, const int* idx, i64 num_tokens, int E, int k, int num_segments,
                   float* tokens, float* prob_mean) {
  const i64 per_segment = num_segments > 0 ? num_tokens / num_segments : 0;
  parallel_for(num_segments, grain_for(per_segment * (i64(E) + k)), [&](i64 first, i64 last) {
    std::vector<double> sums(E);
    for (int s = int(first); s < int(last); ++s) {
      float* count = tokens + i64(s) * E;
      float* mean = prob_mean + i64(s) * E;
      std::fill(sums.begin(), sums.end(), 0.0);
      for (int e = 0; e < E; ++e) count[e] = 0.f;
      for (i64 t = s * per_segment; t < (s + 1) * per_segment; ++t) {
        for (int j = 0; j < k; ++j) {
          const int e = idx[t * k + j];
          if (e >= 0 && e < E) count[e] += 1.f;
        }
        for (int e = 0; e < E; ++e) sums[e] += probs[t * E + e];
      }
      for (int e = 0; e < E; ++e) mean[e] = per_segment > 0 ? float(sums[e] / double(per_segment)) : 0.f;
    }
  });
}

#define FASTMOE_INSTANTIATE(T)                                                                                    \
  template void route_topk<T>(const T*, i64, int, int, bool, bool, const float*, int, int, float, int*, float*, \
                              float*);                                                                          \
  template void route_topk_backward<T>(const float*, const float*, const T*, const int*, i64, int, int, bool,   \
                                       bool, float, T*);                                                        \
  template void gather<T>(const T*, i64, i64, const int*, i64, int, int, const float*, i64, T*);               \
  template void combine<T>(const T*, i64, i64, const int*, const float*, i64, int, int, bool, T*);              \
  template void rowdot<T>(const T*, const T*, i64, const int*, i64, int, int, float*);

FASTMOE_INSTANTIATE(float)
FASTMOE_INSTANTIATE(half_t)
FASTMOE_INSTANTIATE(bf16_t)

}  // namespace cpu
}  // namespace fastmoe
