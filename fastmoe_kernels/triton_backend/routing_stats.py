"""Routing statistics for the load-balancing loss in one pass over probs and expert ids.

Programs own (segment, block of tokens) pairs and write partial per-expert sums; a fixed-order
torch sum over the blocks finishes the reduction (deterministic, unlike float atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import empty

from ._common import cdiv, next_pow2, register


@triton.jit
def _stats_kernel(
    probs_ptr, idx_ptr, tokens_ptr, probsum_ptr, TOKENS_PER_SEGMENT, BLOCKS,
    E: tl.constexpr, E_PAD: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # One flat grid axis: a grid's second axis stops at 65,535 (one segment per sequence can pass it).
    segment = tl.program_id(0) // BLOCKS
    block = tl.program_id(0) % BLOCKS
    local = block * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = local < TOKENS_PER_SEGMENT
    tokens = (segment * TOKENS_PER_SEGMENT + local).to(tl.int64)
    cols = tl.arange(0, E_PAD)
    cmask = cols < E
    p = tl.load(probs_ptr + tokens[:, None] * E + cols[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
    counts = tl.zeros((E_PAD,), tl.float32)
    for j in tl.static_range(K):
        e_j = tl.load(idx_ptr + tokens * K + j, mask=tmask, other=-1)
        counts += tl.sum((e_j[:, None] == cols[None, :]).to(tl.float32), 0)
    out = (segment * BLOCKS + block) * E + cols
    tl.store(tokens_ptr + out, counts, mask=cmask)
    tl.store(probsum_ptr + out, tl.sum(p.to(tl.float32), 0), mask=cmask)


@register("routing_stats")
def routing_stats_triton(probs, expert_idx, num_segments):
    T, E = probs.shape
    S = num_segments
    if T == 0:
        return probs.new_zeros(S, E, dtype=torch.float32), probs.new_zeros(S, E)
    per_segment = T // S
    e_pad = next_pow2(E)
    block_t = max(1, min(128, 4096 // e_pad))
    blocks = cdiv(per_segment, block_t)
    tokens = empty(S, blocks, E, dtype=torch.float32, device=probs.device)
    probsum = empty(S, blocks, E, dtype=torch.float32, device=probs.device)
    _stats_kernel[(S * blocks,)](probs, expert_idx, tokens, probsum, per_segment, blocks,
                               E=E, E_PAD=e_pad, K=expert_idx.shape[1], BLOCK_T=block_t)
    return tokens.sum(1), (probsum.sum(1) / per_segment).to(probs.dtype)
