"""Output shapes the ops and every backend agree on (shared below both, so neither imports the other)."""
from __future__ import annotations

from typing import Sequence

import torch


def grouped_gemm_output_width(b: torch.Tensor, trans_b: bool, widths: Sequence[int], packed: str) -> int:
    """N of ``grouped_gemm``'s ``[R, N]`` output for weight ``b`` in its layout (see ops/grouped_gemm.py)."""
    if packed == "n":
        return max(widths) if widths else 0
    if packed == "k":
        return b.shape[0] if trans_b else b.shape[1]
    return b.shape[1] if trans_b else b.shape[2]


def num_plan_rows(num_tokens, top_k: int, num_experts: int, capacity: int, pad: bool):
    """R, the number of rows of a dispatch plan's layout (static: never depends on the routing).
    ``capacity`` < 0 means dropless."""
    if capacity < 0:
        return num_tokens * top_k
    if pad:
        return num_experts * capacity
    return torch.sym_min(num_tokens * top_k, num_experts * capacity)
