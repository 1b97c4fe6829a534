// Row movement: the per-element logic of gather (permute), weighted combine (unpermute) and the
// routing-weight gradient, shared by the CPU and CUDA kernels. Sums are fp32 and run over j in
// order, so results are deterministic and identical across CPU and GPU.
#pragma once

#include "common.h"

namespace fastmoe {

// Every source index is checked against the number of source rows: an index out of range (only
// possible when a caller bypasses the Python checks) reads nothing, like a dropped assignment.

// Source row of output row r of a gather: index[r] / div, or -1 when index[r] < 0 or out of range.
FASTMOE_HD i64 gather_source(int index, int div, i64 num_src) {
  if (index < 0) return -1;
  const i64 src = i64(index / div);
  return src < num_src ? src : -1;
}

// Row of y read by combine for assignment (t, j), or -1 when dropped or out of range. `ordered`:
// y is in assignment order (row t·k + j) instead of the plan's row order.
FASTMOE_HD i64 combine_source(int row, i64 t, int j, int k, bool ordered, i64 num_src) {
  if (row < 0) return -1;
  const i64 src = ordered ? t * k + j : i64(row);
  return src < num_src ? src : -1;
}

// Scale of gather row r: scale[index[r]] when index[r] is a valid position, else 1.
FASTMOE_HD float gather_scale(const float* scale, int index, i64 num_scale) {
  return (scale != nullptr && index >= 0 && index < num_scale) ? scale[index] : 1.f;
}

}  // namespace fastmoe
