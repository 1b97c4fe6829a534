// Dispatch plan: the per-assignment logic shared by the CPU and CUDA kernels.
//
// Every assignment a = t·k + j gets a key: its expert, or the sentinel E when it is dropped or out
// of range. Counting keys block by block (in assignment order) gives each assignment its position
// among the earlier assignments with the same key — a stable, sort-free ranking. The row is then
// a function of (key, position) alone: see plan_row. Layout and drop rules are those of
// fastmoe_kernels/ops/plan.py (the specification).
#pragma once

#include "common.h"

namespace fastmoe {

FASTMOE_HD int plan_key(int expert, int num_experts) {
  return (expert >= 0 && expert < num_experts) ? expert : num_experts;
}

// Destination row of an assignment with this key and position among its expert's assignments
// (token order), or -1 when dropped. `limit`: drop positions >= capacity ("position" policy);
// `pad`: expert e owns rows [e·C, (e+1)·C); otherwise rows start at start[key]. A row past
// num_rows (inconsistent sizes from a caller bypassing the checks) is dropped, never written.
FASTMOE_HD int plan_row(int key, int position, int num_experts, int capacity, bool limit, bool pad, const int* start,
                        i64 num_rows) {
  if (key >= num_experts) return -1;
  if (limit && position >= capacity) return -1;
  const i64 row = pad ? i64(key) * capacity + position : i64(start[key]) + position;
  return row < num_rows ? int(row) : -1;
}

// Rows kept per expert.
FASTMOE_HD int plan_count(int routed, int capacity, bool limit) {
  return (limit && routed > capacity) ? capacity : routed;
}

}  // namespace fastmoe
