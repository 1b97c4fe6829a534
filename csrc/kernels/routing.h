// Router top-k: the per-token logic, written once for the CPU kernels and the CUDA kernels.
// Conventions (identical to fastmoe_kernels/ops/route_topk.py, the specification):
//  - scores: softmax over all E logits, or sigmoid; fp32.
//  - selection key: the logit itself without bias or groups, else score + bias; a NaN key ranks as
//    -inf (selection_key); ties break to the lower expert (ranks_before). A token never gets an
//    expert twice, and experts of its allowed groups come before all others (selects_before), so
//    -inf or NaN keys (a -inf bias masking an expert, a NaN token) still give k distinct experts.
//  - groups: experts in num_groups equal consecutive groups, a group scored by the sum of its two
//    best keys (its best when a group has one expert); a token picks experts in its topk_groups
//    best groups only (ties to the lower group).
//  - weight = scaling · score / (Σ selected scores + 1e-20 when normalising).
#pragma once

#include "common.h"

namespace fastmoe {

static const float kNormalizeEps = 1e-20f;

// a ranks before b: larger key, or equal key and lower index.
FASTMOE_HD bool ranks_before(float key_a, int a, float key_b, int b) {
  return key_a > key_b || (key_a == key_b && a < b);
}

// A selection key as ranked: NaN counts as -inf (it would otherwise compare false with everything).
FASTMOE_HD float selection_key(float key) { return key != key ? neg_inf() : key; }

// The mark of an expert already chosen for this token (NaN: no selection key is NaN).
FASTMOE_HD float taken_mark() { return bits_to_float(0x7fc00000u); }
FASTMOE_HD bool is_taken(float key) { return key != key; }

// Selection order: experts of the token's allowed groups first, then by ranks_before.
FASTMOE_HD bool selects_before(bool allowed_a, float key_a, int a, bool allowed_b, float key_b, int b) {
  return (allowed_a && !allowed_b) || (allowed_a == allowed_b && ranks_before(key_a, a, key_b, b));
}

// The probability the load-balancing loss uses, from a score and the token's score total.
FASTMOE_HD float aux_probability(float score, bool sigmoid, float score_total) {
  return sigmoid ? score / score_total : score;
}

// d weight_j / d selected score, contracted with the weight gradient (see route_topk.py).
FASTMOE_HD float selected_score_grad(float grad_w_j, float dot_grad_w_sel, float total, bool normalize, float scaling) {
  return normalize ? (scaling / total) * (grad_w_j - dot_grad_w_sel / total) : scaling * grad_w_j;
}

// A group's score: the sum of its two best keys (its best when it has one expert); NaN (+inf + -inf)
// counts as -inf.
FASTMOE_HD float group_key(const float* key, int first, int size) {
  float best = neg_inf(), second = neg_inf();
  int best_e = -1;
  for (int i = 0; i < size; ++i) {
    if (best_e < 0 || ranks_before(key[i], first + i, best, best_e)) {
      second = best;
      best = key[i];
      best_e = first + i;
    } else if (key[i] > second) {
      second = key[i];
    }
  }
  return selection_key(size >= 2 ? best + second : best);
}

// Mark (taken_mark) the topk_groups best groups of one token, in place: rounds of "best group not yet
// marked", ties to the lower group — so -inf scores still give topk_groups distinct groups.
FASTMOE_HD void mark_best_groups(float* group_score, int num_groups, int topk_groups) {
  for (int r = 0; r < topk_groups; ++r) {
    int best = -1;
    for (int g = 0; g < num_groups; ++g) {
      if (!is_taken(group_score[g]) && (best < 0 || ranks_before(group_score[g], g, group_score[best], best))) best = g;
    }
    group_score[best] = taken_mark();
  }
}

// ---- sequential per-token routing (CPU kernels; one token per call) -------------------------
// Scores of one token (softmax or sigmoid of its logits, fp32) into `scores`; returns their total
// (1 after softmax's normalisation). `logits_out`, when not null, receives the logits as fp32.
template <typename T>
FASTMOE_HD float token_scores(const T* logits, int E, bool sigmoid, float* scores, float* logits_out) {
  float max_logit = neg_inf();
  for (int e = 0; e < E; ++e) {
    const float l = to_float(logits[e]);
    scores[e] = l;
    if (logits_out != nullptr) logits_out[e] = l;
    max_logit = l > max_logit ? l : max_logit;
  }
  float total = 0.f;
  for (int e = 0; e < E; ++e) {
    scores[e] = sigmoid ? sigmoidf(scores[e]) : expf(scores[e] - max_logit);
    total += scores[e];
  }
  if (!sigmoid) {
    for (int e = 0; e < E; ++e) scores[e] /= total;
    total = 1.f;
  }
  return total;
}

// scores, key: scratch of E floats; group_score: scratch of num_groups floats.
template <typename T>
FASTMOE_HD void route_token(const T* logits, int E, int k, bool sigmoid, bool normalize, const float* bias,
                            int num_groups, int topk_groups, float scaling, float* scores, float* key,
                            float* group_score, int* out_idx, float* out_w, float* out_probs) {
  const float total = token_scores(logits, E, sigmoid, scores, key);  // key starts as the logits
  for (int e = 0; e < E; ++e) {
    key[e] = selection_key(bias != nullptr || num_groups > 1 ? scores[e] + (bias != nullptr ? bias[e] : 0.f) : key[e]);
  }
  const int size = num_groups > 1 ? E / num_groups : E;
  if (num_groups > 1) {
    for (int g = 0; g < num_groups; ++g) group_score[g] = group_key(key + g * size, g * size, size);
    mark_best_groups(group_score, num_groups, topk_groups);
  }
  float selected_total = 0.f;
  for (int j = 0; j < k; ++j) {
    int best_e = -1;
    bool best_allowed = false;
    for (int e = 0; e < E; ++e) {
      if (is_taken(key[e])) continue;
      const bool allowed = num_groups <= 1 || is_taken(group_score[e / size]);
      if (best_e < 0 || selects_before(allowed, key[e], e, best_allowed, key[best_e], best_e)) {
        best_e = e;
        best_allowed = allowed;
      }
    }
    out_idx[j] = best_e;
    out_w[j] = scores[best_e];
    selected_total += scores[best_e];
    key[best_e] = taken_mark();
  }
  for (int j = 0; j < k; ++j) {
    out_w[j] = (normalize ? out_w[j] / (selected_total + kNormalizeEps) : out_w[j]) * scaling;
  }
  if (out_probs != nullptr) {
    for (int e = 0; e < E; ++e) out_probs[e] = aux_probability(scores[e], sigmoid, total);
  }
}

// Backward of route_token: gradient of the logits from the weight gradient (and, if grad_probs is
// not null, the probs gradient). scores, grad_scores: scratch of E floats.
template <typename T>
FASTMOE_HD void route_token_backward(const float* grad_w, const float* grad_probs, const T* logits, const int* idx,
                                     int E, int k, bool sigmoid, bool normalize, float scaling, float* scores,
                                     float* grad_scores, T* grad_logits) {
  const float total = token_scores(logits, E, sigmoid, scores, static_cast<float*>(nullptr));
  for (int e = 0; e < E; ++e) grad_scores[e] = 0.f;
  // Expert ids outside [0, E) (a caller bypassing the checks) contribute nothing.
  float selected_total = 0.f, dot = 0.f;
  for (int j = 0; j < k; ++j) {
    if (idx[j] < 0 || idx[j] >= E) continue;
    selected_total += scores[idx[j]];
    dot += grad_w[j] * scores[idx[j]];
  }
  selected_total += kNormalizeEps;
  for (int j = 0; j < k; ++j) {
    if (idx[j] < 0 || idx[j] >= E) continue;
    grad_scores[idx[j]] += selected_score_grad(grad_w[j], dot, selected_total, normalize, scaling);
  }
  if (grad_probs != nullptr) {
    if (sigmoid) {
      float gp_dot = 0.f;
      for (int e = 0; e < E; ++e) gp_dot += grad_probs[e] * scores[e];
      for (int e = 0; e < E; ++e) grad_scores[e] += (grad_probs[e] - gp_dot / total) / total;
    } else {
      for (int e = 0; e < E; ++e) grad_scores[e] += grad_probs[e];
    }
  }
  float gs_dot = 0.f;
  if (!sigmoid) {
    for (int e = 0; e < E; ++e) gs_dot += grad_scores[e] * scores[e];
  }
  for (int e = 0; e < E; ++e) {
    const float g = sigmoid ? grad_scores[e] * scores[e] * (1.f - scores[e]) : scores[e] * (grad_scores[e] - gs_dot);
    grad_logits[e] = from_float<T>(g);
  }
}

}  // namespace fastmoe
