"""Dispatch plan by counting, not by a global sort, with no host synchronisation.

The key of an assignment is its expert, or the sentinel E when it is dropped or out of range (the
kernels read the expert ids as given and map an id outside [0, E) to E as they load it: no host pass).
Four launches:

1. ``_chunk_count_kernel``: each program owns one chunk of consecutive assignments, walked in tiles
   of BLOCK_A; from a one-hot ``[BLOCK_A, KEYS]`` tile it gets each assignment's rank among the
   earlier ones of its chunk with the same key, and the chunk's per-key counts. Chunks are as few as
   keep the GPU busy (at most MAX_CHUNKS), so the count matrix stays small.
2. ``_chunk_scan_kernel``: programs own tiles of keys and scan their counts down the chunks: each
   chunk's base per key (exclusive), and each key's total.
3. ``_expert_offsets_kernel``: one program turns the totals into the counts per expert (routed, and
   kept under a capacity), each expert's first row and the offsets.
4. ``_place_kernel``: rank within the expert (in token order) = chunk base + rank in chunk, which gives
   the destination row (dropless, capacity with "position" dropping, padded or not) and the row's
   assignment id; its programs also mark the rows no assignment fills (-1), so the assignment index
   needs no fill pass of its own.

Kept assignments are thus laid out in token order within each expert, exactly like the reference.
"probs" dropping needs the assignments ranked by weight inside each expert: that ranking uses
torch's sort (as Megatron-Core does) on top of a first counting pass, then the same kernels lay out
the kept ones.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import empty
from .._shapes import num_plan_rows
from ._common import cdiv, next_pow2, register

MAX_CHUNKS = 4096


@triton.jit
def _key_of(ids_ptr, a, amask, KEYS: tl.constexpr, other):
    """The key of assignments ``a``: the expert id as given (any int dtype), KEYS-1 (the sentinel) for an
    id outside [0, KEYS-1); ``other`` past the end."""
    ids = tl.load(ids_ptr + a, mask=amask, other=0)
    key = tl.where((ids >= 0) & (ids < KEYS - 1), ids, KEYS - 1).to(tl.int32)
    return tl.where(amask, key, other)


@triton.jit
def _chunk_count_kernel(
    key_ptr, rank_ptr, counts_ptr, A, CHUNK,
    KEYS: tl.constexpr, KEYS_PAD: tl.constexpr, BLOCK_A: tl.constexpr,
):
    chunk = tl.program_id(0)
    cols = tl.arange(0, KEYS_PAD)
    running = tl.zeros((KEYS_PAD,), dtype=tl.int32)
    for start in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, A), BLOCK_A):
        a = start + tl.arange(0, BLOCK_A)
        amask = a < A
        key = _key_of(key_ptr, a, amask, KEYS, KEYS_PAD)  # lanes past the end match no key
        onehot = (key[:, None] == cols[None, :]).to(tl.int32)
        before = tl.cumsum(onehot, 0) - onehot + running[None, :]  # same-key assignments earlier in the chunk
        tl.store(rank_ptr + a, tl.sum(tl.where(onehot > 0, before, 0), 1), mask=amask)
        running += tl.sum(onehot, 0)
    tl.store(counts_ptr + chunk * KEYS + cols, running, mask=cols < KEYS)


@triton.jit
def _chunk_scan_kernel(
    counts_ptr, base_ptr, totals_ptr, num_chunks,
    KEYS: tl.constexpr, KEY_TILE: tl.constexpr, CHUNK_TILE: tl.constexpr,
):
    keys = tl.program_id(0) * KEY_TILE + tl.arange(0, KEY_TILE)
    kmask = keys < KEYS
    running = tl.zeros((KEY_TILE,), dtype=tl.int32)
    for c0 in range(0, num_chunks, CHUNK_TILE):
        chunks = c0 + tl.arange(0, CHUNK_TILE)
        mask = (chunks < num_chunks)[:, None] & kmask[None, :]
        offs = chunks.to(tl.int64)[:, None] * KEYS + keys[None, :]
        n = tl.load(counts_ptr + offs, mask=mask, other=0)
        tl.store(base_ptr + offs, tl.cumsum(n, 0) - n + running[None, :], mask=mask)
        running += tl.sum(n, 0)
    tl.store(totals_ptr + keys, running, mask=kmask)


@triton.jit
def _expert_offsets_kernel(
    totals_ptr, counts_ptr, routed_ptr, start_ptr, offsets_ptr, capacity,
    E: tl.constexpr, E_PAD: tl.constexpr, LIMIT: tl.constexpr, PAD: tl.constexpr,
):
    e = tl.arange(0, E_PAD)
    emask = e < E
    routed = tl.load(totals_ptr + e, mask=emask, other=0)
    counts = routed
    if LIMIT:
        counts = tl.minimum(routed, capacity)
    start = tl.cumsum(counts, 0) - counts
    tl.store(routed_ptr + e, routed, mask=emask)
    tl.store(counts_ptr + e, counts, mask=emask)
    tl.store(start_ptr + e, start, mask=emask)
    if PAD:
        tl.store(offsets_ptr + e, e * capacity, mask=emask)
        tl.store(offsets_ptr + E, E * capacity)
    else:
        tl.store(offsets_ptr + e, start, mask=emask)
        tl.store(offsets_ptr + E, tl.sum(counts, 0))


@triton.jit
def _place_kernel(
    key_ptr, rank_ptr, base_ptr, start_ptr, counts_ptr, offsets_ptr, row_ptr, assignment_ptr, A, CHUNK, capacity,
    num_rows, ROWS_PER_PROGRAM,
    KEYS: tl.constexpr, BLOCK_A: tl.constexpr, LIMIT: tl.constexpr, PAD: tl.constexpr,
):
    chunk = tl.program_id(0)
    # The rows no assignment fills get -1: those past the kept ones, or (padded) past each expert's count.
    # Disjoint from the rows the loop below writes, so no order between programs is needed.
    for r0 in range(chunk * ROWS_PER_PROGRAM, tl.minimum(chunk * ROWS_PER_PROGRAM + ROWS_PER_PROGRAM, num_rows), BLOCK_A):
        r = r0 + tl.arange(0, BLOCK_A)
        rmask = r < num_rows
        if PAD:
            e = r // tl.maximum(capacity, 1)
            empty_row = r - e * capacity >= tl.load(counts_ptr + e, mask=rmask, other=0)
        else:
            empty_row = r >= tl.load(offsets_ptr + KEYS - 1)
        tl.store(assignment_ptr + r, tl.full((BLOCK_A,), -1, tl.int32), mask=rmask & empty_row)
    for first in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, A), BLOCK_A):
        a = first + tl.arange(0, BLOCK_A)
        amask = a < A
        key = _key_of(key_ptr, a, amask, KEYS, KEYS - 1)
        kept = amask & (key < KEYS - 1)  # key KEYS-1 is the sentinel
        position = tl.load(rank_ptr + a, mask=amask, other=0) + tl.load(base_ptr + chunk * KEYS + key, mask=kept, other=0)
        if LIMIT:
            kept = kept & (position < capacity)
        if PAD:
            row = key * capacity + position
        else:
            row = tl.load(start_ptr + key, mask=kept, other=0) + position
        kept = kept & (row < num_rows)  # holds by construction; a guard against any write out of bounds
        row = tl.where(kept, row, -1)
        tl.store(row_ptr + a, row, mask=amask)
        tl.store(assignment_ptr + row, a, mask=kept)


def _block_a(keys_pad: int) -> int:
    return max(16, min(256, 8192 // keys_pad))


class _Counts:
    """Per-chunk ranks and counts of a key array, scanned: what both layouts and "probs" need."""

    def __init__(self, key: torch.Tensor, num_keys: int):
        device = key.device
        self.A = key.shape[0]
        self.keys = num_keys
        keys_pad = next_pow2(num_keys)
        self.block_a = _block_a(keys_pad)
        tiles = max(1, cdiv(self.A, self.block_a))
        self.chunk = self.block_a * cdiv(tiles, min(tiles, MAX_CHUNKS))
        self.num_chunks = max(1, cdiv(self.A, self.chunk))
        self.rank = empty(self.A, dtype=torch.int32, device=device)
        counts = empty(self.num_chunks, num_keys, dtype=torch.int32, device=device)
        self.base = empty(self.num_chunks, num_keys, dtype=torch.int32, device=device)
        self.totals = empty(num_keys, dtype=torch.int32, device=device)
        _chunk_count_kernel[(self.num_chunks,)](key, self.rank, counts, self.A, self.chunk,
                                                KEYS=num_keys, KEYS_PAD=keys_pad, BLOCK_A=self.block_a)
        key_tile = min(32, keys_pad)
        _chunk_scan_kernel[(cdiv(num_keys, key_tile),)](
            counts, self.base, self.totals, self.num_chunks,
            KEYS=num_keys, KEY_TILE=key_tile, CHUNK_TILE=max(1, min(128, 4096 // key_tile)))


def _ranks_by_weight(key: torch.Tensor, weight: torch.Tensor, routed: torch.Tensor, E: int) -> torch.Tensor:
    """Each assignment's rank inside its expert by descending weight (ties: lower index first)."""
    by_weight = torch.sort(weight.reshape(-1), descending=True, stable=True).indices
    order = by_weight[torch.sort(key[by_weight], stable=True).indices]
    routed_start = torch.cumsum(routed, 0) - routed
    rank = torch.empty(key.shape[0], dtype=torch.int64, device=key.device)
    rank[order] = torch.arange(key.shape[0], device=key.device) - routed_start[key[order].long()]
    return rank


@register("make_plan")
def make_plan_triton(expert_idx, num_experts, capacity, drop_policy, weight, pad):
    T, k = expert_idx.shape
    E = num_experts
    device = expert_idx.device
    ids = expert_idx.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    R = num_plan_rows(T, k, E, capacity, pad)
    limit = capacity >= 0
    counts = empty(E, dtype=torch.int32, device=device)
    routed = empty(E, dtype=torch.int32, device=device)
    start = empty(E, dtype=torch.int32, device=device)
    offsets = empty(E + 1, dtype=torch.int32, device=device)
    row = empty(T * k, dtype=torch.int32, device=device)
    first = _Counts(ids, E + 1)
    if limit and drop_policy == "probs":
        # Keep each expert's `capacity` highest-weight assignments, then lay out the kept ones by
        # counting like every other mode (their token order within the expert).
        key = torch.where((ids >= 0) & (ids < E), ids, E).to(torch.int32)
        rank = _ranks_by_weight(key, weight, first.totals[:E + 1], E)
        routed.copy_(first.totals[:E])
        ids = torch.where(rank < capacity, key, E).to(torch.int32).contiguous()
        layout = _Counts(ids, E + 1)
        _expert_offsets_kernel[(1,)](layout.totals, counts, torch.empty_like(routed), start, offsets, max(capacity, 0),
                                     E=E, E_PAD=next_pow2(E), LIMIT=False, PAD=pad)
        limit = False  # already applied
    else:
        layout = first
        _expert_offsets_kernel[(1,)](layout.totals, counts, routed, start, offsets, max(capacity, 0),
                                     E=E, E_PAD=next_pow2(E), LIMIT=limit, PAD=pad)
    if layout.A:
        assignment = empty(R, dtype=torch.int32, device=device)  # every row written by the place kernel
        _place_kernel[(layout.num_chunks,)](ids, layout.rank, layout.base, start, counts, offsets, row, assignment,
                                           layout.A, layout.chunk, max(capacity, 0), R,
                                           cdiv(R, layout.num_chunks),
                                           KEYS=E + 1, BLOCK_A=layout.block_a, LIMIT=limit, PAD=pad)
    else:
        assignment = torch.full((R,), -1, dtype=torch.int32, device=device)
    return counts, routed, offsets, row.view(T, k), assignment
