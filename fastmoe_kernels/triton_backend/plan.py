"""Dispatch plan by counting, not by a global sort.

Two kernels around one small cumulative sum:
1. ``_block_count``: each program takes BLOCK_A consecutive assignments, and from a one-hot
   ``[BLOCK_A, E+1]`` tile computes each assignment's rank among the earlier ones of the block with
   the same key, and the block's per-key counts.
2. ``torch.cumsum`` over blocks turns block counts into each block's base per key (deterministic).
3. ``_place``: rank within the expert (in token order) = block base + rank in block, which gives
   the destination row (dropless, capacity with "position" dropping, padded or not) and the row's
   assignment id.

The key of an assignment is its expert, or the sentinel E when it is dropped or out of range, so
kept assignments are laid out in token order within each expert, exactly like the reference.
"probs" dropping needs the assignments ranked by weight inside each expert: that ranking uses
torch's sort (as Megatron-Core does), then the same counting kernels lay out the kept ones.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import empty

from ..ops.plan import num_plan_rows
from ._common import next_pow2, register


@triton.jit
def _block_count_kernel(
    key_ptr, rank_ptr, counts_ptr, A, KEYS: tl.constexpr, KEYS_PAD: tl.constexpr, BLOCK_A: tl.constexpr,
):
    block = tl.program_id(0)
    a = block * BLOCK_A + tl.arange(0, BLOCK_A)
    amask = a < A
    key = tl.load(key_ptr + a, mask=amask, other=KEYS_PAD)  # out-of-range lanes match no key
    cols = tl.arange(0, KEYS_PAD)
    onehot = (key[:, None] == cols[None, :]).to(tl.int32)
    inclusive = tl.cumsum(onehot, 0)
    rank = tl.sum(tl.where(onehot > 0, inclusive - 1, 0), 1)
    tl.store(rank_ptr + a, rank, mask=amask)
    tl.store(counts_ptr + block * KEYS + cols, tl.sum(onehot, 0), mask=cols < KEYS)


@triton.jit
def _place_kernel(
    key_ptr, rank_ptr, base_ptr, start_ptr, row_ptr, assignment_ptr, A, capacity,
    KEYS: tl.constexpr, BLOCK_A: tl.constexpr, LIMIT: tl.constexpr, PAD: tl.constexpr,
):
    block = tl.program_id(0)
    a = block * BLOCK_A + tl.arange(0, BLOCK_A)
    amask = a < A
    key = tl.load(key_ptr + a, mask=amask, other=KEYS - 1)
    kept = amask & (key < KEYS - 1)  # key KEYS-1 is the sentinel
    position = tl.load(rank_ptr + a, mask=amask, other=0) + tl.load(base_ptr + block * KEYS + key, mask=kept, other=0)
    if LIMIT:
        kept = kept & (position < capacity)
    if PAD:
        row = key * capacity + position
    else:
        row = tl.load(start_ptr + key, mask=kept, other=0) + position
    row = tl.where(kept, row, -1)
    tl.store(row_ptr + a, row, mask=amask)
    tl.store(assignment_ptr + row, a, mask=kept)


def _block_a(keys_pad: int) -> int:
    return max(16, min(256, 8192 // keys_pad))


def _count_and_place(key, E, capacity, limit, pad, R, device):
    """Shared tail: per-block counts → bases → rows. ``key`` holds E for dropped assignments."""
    A = key.shape[0]
    keys = E + 1
    keys_pad = next_pow2(keys)
    block_a = _block_a(keys_pad)
    num_blocks = max(1, triton.cdiv(A, block_a))
    rank = empty(A, dtype=torch.int32, device=device)
    block_counts = empty(num_blocks, keys, dtype=torch.int32, device=device)
    if A:
        _block_count_kernel[(num_blocks,)](key, rank, block_counts, A, KEYS=keys, KEYS_PAD=keys_pad, BLOCK_A=block_a)
    else:
        block_counts.zero_()
    inclusive = torch.cumsum(block_counts, 0, dtype=torch.int32)
    base = inclusive - block_counts
    per_key = inclusive[-1]
    counts = per_key[:E].clamp(max=capacity) if limit else per_key[:E]
    start = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    row = empty(A, dtype=torch.int32, device=device)
    assignment = torch.full((R,), -1, dtype=torch.int32, device=device)
    if A:
        _place_kernel[(num_blocks,)](key, rank, base, start, row, assignment, A, max(capacity, 0),
                                    KEYS=keys, BLOCK_A=block_a, LIMIT=limit, PAD=pad)
    return counts, start, row, assignment


@register("make_plan")
def make_plan_triton(expert_idx, num_experts, capacity, drop_policy, weight, pad):
    T, k = expert_idx.shape
    E = num_experts
    device = expert_idx.device
    flat = expert_idx.reshape(-1).to(torch.int32)
    valid = (flat >= 0) & (flat < E)
    key = torch.where(valid, flat, E).contiguous()
    R = num_plan_rows(T, k, E, capacity, pad)
    routed_full = torch.bincount(key.long(), minlength=E + 1)
    limit = capacity >= 0
    if limit and drop_policy == "probs":
        # Keep each expert's `capacity` highest-weight assignments (ties: lower index), then lay
        # the kept ones out by counting like every other mode.
        by_weight = torch.sort(weight.reshape(-1), descending=True, stable=True).indices
        order = by_weight[torch.sort(key[by_weight], stable=True).indices]
        start_full = torch.cumsum(routed_full, 0) - routed_full
        rank = empty(key.shape[0], dtype=torch.long, device=device)
        rank[order] = torch.arange(key.shape[0], device=device) - start_full[key[order].long()]
        key = torch.where(valid & (rank < capacity), key, E).contiguous()
        limit = False  # already applied
    counts, start, row, assignment = _count_and_place(key, E, capacity, limit, pad, R, device)
    if pad:
        offsets = torch.arange(E + 1, dtype=torch.int32, device=device) * capacity
    else:
        offsets = torch.cat([start, (start[-1:] + counts[-1:])]) if E else torch.zeros(1, dtype=torch.int32, device=device)
    return counts, routed_full[:E].to(torch.int32), offsets.to(torch.int32), row.view(T, k), assignment
