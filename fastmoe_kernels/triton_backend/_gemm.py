"""What the grouped GEMM kernels share: tile configs and their pruning (host), and the tile
schedule and K loops they are built from (device).

Every grouped GEMM kernel is persistent: its programs walk a tile list built in the kernel from the
group offsets (:func:`expert_tile`), so many small experts still fill the GPU and no host sync is
needed. The K loops load operand tiles with masks and accumulate in fp32 with ``tl.dot``.

Autotuning. Triton keys a tuned config on the values of the ``key`` arguments plus the tensors'
dtypes, not on other constexprs: every constexpr that changes how much shared memory a config needs
(a second B operand, a second A/B pair) is therefore in its kernel's key, and :func:`pruner` drops the
configs whose shared memory (estimated for a fully pipelined K loop, which is the most a variant can
use) exceeds the device's, or whose fp32 tiles alone would spill registers. A config kept for
one variant therefore fits every variant that shares its key (the sm_90 compile check verifies the
estimate against the compiler's figures).
"""
from __future__ import annotations

import itertools
import os
from typing import Callable, Dict, List, Optional, Tuple

import triton
import triton.language as tl

from .._variants import flag
from ._common import interpreted, shared_memory_limit
from ._jit import group_table, pick

# (BM, BN, BK, warps, stages). Hopper-sized tiles first; smaller ones for small groups (fine-grained
# MoE) and narrow N; the last fits every variant on every GPU (the pruner's fallback: the smallest).
MATMUL_TILES = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                (64, 64, 64, 4, 4), (64, 256, 64, 8, 3), (32, 128, 64, 4, 4), (32, 64, 32, 4, 2)]
# The Hopper tiles again with GROUP_M row blocks per column sweep (see expert_tile): on the first H100
# run the row-major order re-read a wide expert's B from HBM for every 128-row block (Mixtral's up
# projection: 128 FLOP/byte, under the ridge of ~257, and 54% of dense), while the narrow down
# projection ran at 89%. The autotuner measures both orders; GROUP_M = 1 is the row-major order.
GROUPED_ORDER = 8
GROUPED_TILES = MATMUL_TILES[:2]
# wgrad tiles are (BM = rows reduced over, BK × BN = the output tile).
WGRAD_TILES = [(64, 128, 128, 8, 3), (64, 64, 128, 4, 4), (32, 128, 64, 4, 4), (64, 128, 64, 4, 3),
               (64, 64, 64, 4, 4), (32, 64, 32, 4, 2)]
# Hopper-sized weight-gradient tiles (128×256 outputs, 3 and 4 stages) with GROUP_K K blocks per column
# sweep, offered beside the row-major ones (GROUP_K 1). On the first H100 run the wgrad walked every N
# tile of one K block before the next, so Mixtral's up-projection wgrad re-read each expert's 235 MB dh
# from HBM for every K block (22.5 ms, 26% of the step). The kernel model predicts 19.5 → 11.9 ms with
# both (benchmarks/results/model-2026-12-02/predictions.md); the autotuner measures each against today's.
WGRAD_GROUPED_ORDER = 8
WGRAD_HOPPER_TILES = [(64, 128, 256, 8, 3), (64, 128, 256, 8, 4), (64, 256, 128, 8, 3)]
INTERPRETER_TILE = dict(BM=16, BN=16, BK=16)
# The decode path (the forward issue): at a few rows per expert every tile above is mostly padding and
# a 1-token Qwen3 step has 8 experts × 12 N tiles of 128 = 96 programs for 132 SMs, each streaming a
# 128 × 2048 slab of weights. What bounds it is reading the hit experts' weights, so the decode tiles
# are 16 rows (the smallest tensor-core tile) and 32-128 columns with deep K steps: every hit expert's
# weights split across N over ≥ 2 programs per SM at the headline shapes from 1 token up (Qwen3:
# 8 experts × 1,536/32 = 384 up-projection tiles; Mixtral: 2 × 28,672/64 = 896; gpt-oss: 4 × 5,760/32
# = 720; the down projections 384, 256 and 360 with BN 32), 3-4 stages of 16-32 KiB in flight per
# program. Experts without rows have no tiles (group_table): their weights are never read. They are
# offered to the autotuner where the mean rows per expert (the M_BUCKET key) is at most DECODE_ROWS,
# beside the others; above it they are not. FASTMOE_DECODE_TILES=off restores the tile list without them (the A/B).
# Predicted (bench/predictions.py decode rows): see benchmarks/results/model-2026-12-03/.
DECODE_TILES = [(16, 64, 128, 4, 4), (16, 32, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 3),
                (16, 32, 256, 4, 3)]
DECODE_ROWS = 16
DECODE_TILES_ON = flag("FASTMOE_DECODE_TILES", "on", ("on", "off")) == "on"


# Deeper pipelines for the Hopper tiles (the forward issue's item 2), offered to the grouped matmul's, the
# up projection's and the dH kernel's autotuners with FASTMOE_DEEP_PIPELINES=on (default off: the list
# the first H100 run measured), in both tile orders: 4 stages (128×256: 192 KiB, 128×128: 128 KiB; the
# pruner drops what does not fit beside a TMA store's staging tile). Predicted: none faster — the kernel
# model finds these K loops fill-bound, the 3-stage loop already hiding the load latency (0.657 µs / 2 =
# 0.33 µs per step against 0.76 µs of operand fill), and a deeper pipeline's longer fill before the first
# product costs 1-6% (benchmarks/results/model-2026-12-07-latency/). If the autotuner picks them on the
# GPU, the model's latency term is what the measurement refutes.
DEEP_PIPELINE_TILES = [(128, 128, 64, 8, 4), (128, 256, 64, 8, 4)]
DEEP_PIPELINES = flag("FASTMOE_DEEP_PIPELINES", "off", ("off", "on"))


def matmul_configs(decode: bool = False) -> List[triton.Config]:
    """The grouped GEMMs' tiles; with ``decode`` (the forward's kernels) the decode tiles too, unless
    FASTMOE_DECODE_TILES=off; the deeper pipelines with FASTMOE_DEEP_PIPELINES=on."""
    if interpreted():
        # The grouped order (GROUP_M 2), the general form of the row-major one (GROUP_M 1).
        return [triton.Config(dict(INTERPRETER_TILE, GROUP_M=2), num_warps=1)]
    groups = [(MATMUL_TILES, 1), (GROUPED_TILES, GROUPED_ORDER)]
    if DEEP_PIPELINES == "on":
        groups += [(DEEP_PIPELINE_TILES, 1), (DEEP_PIPELINE_TILES, GROUPED_ORDER)]
    if decode and DECODE_TILES_ON:
        groups.append((DECODE_TILES, 1))
    return [triton.Config({"BM": m, "BN": n, "BK": k, "GROUP_M": group}, num_warps=w, num_stages=s)
            for tiles, group in groups for m, n, k, w, s in tiles]


def offers_decode_tiles(m_bucket) -> bool:
    """Whether the decode tiles are offered at ``m_bucket`` mean rows per expert (None: unknown)."""
    return m_bucket is None or m_bucket <= DECODE_ROWS


def for_rows_per_expert(configs: List[triton.Config], m_bucket) -> List[triton.Config]:
    """The configs offered at ``m_bucket`` mean rows per expert: every one where the decode tiles are
    offered (the model keeps a 128-row tile fastest at gpt-oss's 64 tokens, 8 rows per expert: the
    autotuner measures), none of the decode tiles above (their 16 rows re-read B for every 16 rows)."""
    if offers_decode_tiles(m_bucket):
        return configs
    kept = [c for c in configs if c.kwargs.get("BM") != DECODE_TILES[0][0]]
    return kept or configs


def wgrad_configs() -> List[triton.Config]:
    if interpreted():
        # The grouped order (GROUP_K 2), the general form of the row-major one.
        return [triton.Config(dict(INTERPRETER_TILE, GROUP_K=2), num_warps=1)]
    return [triton.Config({"BM": m, "BK": k, "BN": n, "GROUP_K": group}, num_warps=w, num_stages=s)
            for tiles, group in ((WGRAD_TILES, 1), (WGRAD_TILES[:1] + WGRAD_HOPPER_TILES, WGRAD_GROUPED_ORDER))
            for m, k, n, w, s in tiles]


def smallest_bn(configs: List[triton.Config]) -> int:
    return min(c.kwargs["BN"] for c in configs)


# What a variant keeps per K step: (elements of the operand tiles loaded per stage, elements of the
# fp32 tiles live in registers), given a config's tile sizes and the launch's arguments. Each kernel
# passes its own.
Footprint = Callable[[Dict[str, int], Dict[str, object]], Tuple[int, int]]


# Shared memory the compiler adds beyond the operand buffers (barriers, alignment): up to 4 KiB in the
# sm_90 compile check; twice that is kept in hand.
SHARED_MEMORY_SLACK = 8192


def shared_memory_estimate(config: triton.Config, element_size: int, stage_elements: int, output_elements: int) -> int:
    """An upper bound on the bytes of shared memory of a fully pipelined K loop (one buffer per stage
    and operand tile), or of the epilogue's fp32 output-tile layout conversion if larger (it reuses
    the pipeline's buffers)."""
    return max(config.num_stages * stage_elements * element_size, output_elements * 4) + SHARED_MEMORY_SLACK


def registers_fit(config: triton.Config, register_elements: int) -> bool:
    """fp32 tiles beyond 128 registers per thread spill (sm_90 compile check)."""
    return register_elements <= 128 * 32 * config.num_warps


AUTOTUNE_MODES = ("all", "one")
_rotation = itertools.count()


def autotune_mode() -> str:
    """``FASTMOE_AUTOTUNE``: "all" (the default) benchmarks every config that fits and keeps the
    fastest; "one" takes one config per autotune key, the next of the fitting ones in turn. "one" is
    for GPU test runs: each key compiles one config instead of up to eight (the compile time, not the
    kernels, dominated such a run), while the run as a whole still exercises every tile shape."""
    mode = os.environ.get("FASTMOE_AUTOTUNE", "all").strip().lower()
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"FASTMOE_AUTOTUNE must be one of {AUTOTUNE_MODES}, got {mode!r}")
    return mode


def take_configs(kept: List[triton.Config]) -> List[triton.Config]:
    """The configs the autotuner benchmarks for a new key, from those that fit (see autotune_mode)."""
    if autotune_mode() == "one" and len(kept) > 1:
        return [kept[next(_rotation) % len(kept)]]
    return kept


def rotating_pruner(configs, named_args, **kwargs):
    """An ``early_config_prune`` for kernels whose every config fits: only :func:`take_configs`."""
    return take_configs(list(configs))


def staged_tile_bytes(output: str, flag: str):
    """A pruner's ``staged_bytes``: the one BM×BN tile, in the dtype of the argument ``output``, that a
    kernel's TMA stores stage in shared memory beside the pipeline's buffers when the constexpr ``flag``
    is on (the compiler reuses it for every store of the epilogue: the sm_90 records)."""

    def staged(t: Dict[str, int], args: Dict[str, object]) -> int:
        return t["BM"] * t["BN"] * args[output].element_size() if args.get(flag) else 0

    return staged


def pruner(footprint: Footprint, operand_tensor: str, output_tile: Tuple[str, str] = ("BM", "BN"),
           output_elements: Optional[Callable[[Dict[str, int], Dict[str, object]], int]] = None,
           staged_bytes: Optional[Callable[[Dict[str, int], Dict[str, object]], int]] = None):
    """An ``early_config_prune`` keeping the configs that fit (see the module docstring);
    ``operand_tensor`` names the argument whose element size the operand tiles have, ``output_tile``
    the two tile sizes of the kernel's output tile (or ``output_elements`` its size, for a kernel
    whose output tile is not two config values); ``staged_bytes``: shared memory the epilogue holds
    beside the pipeline's buffers (a TMA store's staging tile)."""

    def estimate(config: triton.Config, args: Dict[str, object]) -> int:
        tiles = config.kwargs
        output = (output_elements(tiles, args) if output_elements is not None
                  else tiles[output_tile[0]] * tiles[output_tile[1]])
        staged = staged_bytes(tiles, args) if staged_bytes is not None else 0
        return shared_memory_estimate(config, args[operand_tensor].element_size(), footprint(tiles, args)[0],
                                      output) + staged

    def prune(configs, named_args, **kwargs):
        if len(configs) == 1:
            return configs
        args = {**named_args, **kwargs}
        configs = for_rows_per_expert(list(configs), args.get("M_BUCKET"))
        limit = shared_memory_limit()
        kept = [c for c in configs if estimate(c, args) <= limit and registers_fit(c, footprint(c.kwargs, args)[1])]
        # None fits: the smallest (MATMUL_TILES' last fits every variant on every GPU).
        return take_configs(kept or [min(configs, key=lambda c: estimate(c, args))])

    prune.estimate = estimate  # for the compile check, which compares it with the compiler's figure
    return prune


# ---- device helpers --------------------------------------------------------------------------------
@triton.jit
def expert_tile(tile, n_tiles, e_range, lo_v, hi_v, mt_v, mend_v, BM: tl.constexpr, GROUP_M: tl.constexpr):
    """(expert, rows [BM], valid rows, N tile) of GEMM tile ``tile`` of the persistent schedule
    (``group_table``'s per-expert vectors). Experts come in order, each with its M tiles × N tiles;
    inside an expert, GROUP_M row blocks at a time sweep the N tiles column by column, so that the
    programs running at once share B's column tiles in L2 (GROUP_M = 1: each row block with every N
    tile in turn, row-major)."""
    e = tl.sum((mend_v <= tile // n_tiles).to(tl.int32), 0)  # an expert's tiles are whole rows of N tiles
    m_tiles = pick(mt_v, e_range, e)
    local = tile - pick(mend_v - mt_v, e_range, e) * n_tiles  # this tile's index inside its expert
    first_m = local // (GROUP_M * n_tiles) * GROUP_M
    group_rows = tl.minimum(m_tiles - first_m, GROUP_M)  # the last group of an expert can be shorter
    in_group = local - first_m * n_tiles
    tile_m = first_m + in_group % group_rows
    rows = pick(lo_v, e_range, e) + tile_m * BM + tl.arange(0, BM)
    return e, rows, rows < pick(hi_v, e_range, e), in_group // group_rows


@triton.jit
def wgrad_tile(tile, k_tiles, n_tiles, GROUP_K: tl.constexpr):
    """(K tile, N tile) of weight-gradient program ``tile``: GROUP_K K blocks at a time sweep the N tiles
    column by column, so that the programs running at once share G's column blocks in L2 (GROUP_K = 1:
    every N tile of one K block before the next)."""
    first_k = tile // (GROUP_K * n_tiles) * GROUP_K
    group_k = tl.minimum(k_tiles - first_k, GROUP_K)  # the last group can be shorter
    in_group = tile - first_k * n_tiles
    return first_k + in_group % group_k, in_group // group_k


@triton.jit
def grouped_row_span(offsets_ptr, num_rows, E):
    """(first, end) row of the groups, clamped to ``[0, num_rows]`` like group_table's ranges."""
    first_row = tl.minimum(tl.maximum(tl.load(offsets_ptr), 0), num_rows)
    last_row = tl.minimum(tl.maximum(tl.load(offsets_ptr + E), first_row), num_rows)
    return first_row, last_row


@triton.jit
def outside_tile_count(first_row, last_row, num_rows, n_tiles, BM: tl.constexpr):
    """Tiles covering the rows before the first group and after the last, every N tile of each."""
    return (tl.cdiv(first_row, BM) + tl.cdiv(num_rows - last_row, BM)) * n_tiles


@triton.jit
def persistent_tiles(offsets_ptr, num_rows, n_tiles, E, E_PAD: tl.constexpr, BM: tl.constexpr):
    """The persistent schedule of a grouped GEMM that also writes the rows outside every group: (group_table's
    five vectors, GEMM tiles, first and end row of the groups, all tiles: the GEMM's, then the outside ones)."""
    e_range, lo_v, hi_v, mt_v, mend_v = group_table(offsets_ptr, num_rows, E, E_PAD, BM)
    gemm_tiles = tl.sum(mt_v, 0) * n_tiles
    first_row, last_row = grouped_row_span(offsets_ptr, num_rows, E)
    total_tiles = gemm_tiles + outside_tile_count(first_row, last_row, num_rows, n_tiles, BM)
    return e_range, lo_v, hi_v, mt_v, mend_v, gemm_tiles, first_row, last_row, total_tiles


@triton.jit
def outside_tile(z, n_tiles, first_row, last_row, num_rows, BM: tl.constexpr, BN: tl.constexpr):
    """(int64 rows [BM], valid, columns [BN]) of the ``z``-th of those tiles: the grouped GEMMs write
    zeros there (rows that belong to no group are zeros, their op's contract)."""
    z_m = z // n_tiles
    cols = (z % n_tiles) * BN + tl.arange(0, BN)
    head = tl.cdiv(first_row, BM)
    if z_m < head:
        rows = z_m * BM + tl.arange(0, BM)
        valid = rows < first_row
    else:
        rows = last_row + (z_m - head) * BM + tl.arange(0, BM)
        valid = rows < num_rows
    return rows.to(tl.int64), valid, cols


@triton.jit
def store_tile(c_ptr, c_rows, c_valid, cols, N_OUT, stride_cm, stride_cn, tile):
    """C[c_rows, cols] = tile, in C's dtype, for the valid rows and the columns below N_OUT."""
    mask = c_valid[:, None] & (cols < N_OUT)[None, :]
    tl.store(c_ptr + c_rows[:, None] * stride_cm + cols[None, :] * stride_cn, tile.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_tile_tma(c_desc, c_ptr, rows, rmask, cols, N_OUT, stride_cm, stride_cn, tile, BM: tl.constexpr):
    """store_tile for a tile of contiguous rows: by one TMA box of ``c_desc`` (C [rows, N_OUT]) when
    every row of the tile is valid (its expert's rows), else by masked pointer stores (an expert's last
    tile: a box would write the next expert's rows)."""
    if tl.sum(rmask.to(tl.int32), 0) == BM:
        c_desc.store([tl.min(rows, 0), tl.min(cols, 0)], tile.to(c_ptr.dtype.element_ty))
    else:
        store_tile(c_ptr, rows.to(tl.int64), rmask, cols, N_OUT, stride_cm, stride_cn, tile)


@triton.jit
def b_offsets(kk, cols, stride_bk, stride_bn, OFFSETS_64: tl.constexpr):
    """Element offsets of a [BK, BN] tile of B inside one expert's matrix (int64 when they can pass
    2³¹, which packed heterogeneous weights can: their column stride is Σ widths)."""
    if OFFSETS_64:
        return kk.to(tl.int64)[:, None] * stride_bk + cols.to(tl.int64)[None, :] * stride_bn
    else:
        return kk[:, None] * stride_bk + cols[None, :] * stride_bn


@triton.jit
def k_loop(acc, a_row_ptrs, stride_ak, a_valid, b_base, stride_bk, stride_bn, cols, ncol, k_end, k_size,
           PRECISION: tl.constexpr, BK: tl.constexpr, OFFSETS_64: tl.constexpr):
    """acc += A[rows, :k_size] @ B_e[:k_size, cols], stepping K to ``k_end`` (0 skips the loop)."""
    for k0 in range(0, k_end, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < k_size
        a = tl.load(a_row_ptrs + kk[None, :] * stride_ak, mask=a_valid[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_base + b_offsets(kk, cols, stride_bk, stride_bn, OFFSETS_64),
                    mask=kmask[:, None] & ncol[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def k_loop_two_b(acc, acc2, a_row_ptrs, stride_ak, a_valid, b_base, b2_base, stride_bk, stride_bn, cols, ncol,
                 k_end, k_size, PRECISION: tl.constexpr, BK: tl.constexpr, OFFSETS_64: tl.constexpr):
    """acc += A @ B_e and acc2 += A @ B2_e over one read of A (the gate and up halves of an MLP)."""
    for k0 in range(0, k_end, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < k_size
        a = tl.load(a_row_ptrs + kk[None, :] * stride_ak, mask=a_valid[:, None] & kmask[None, :], other=0.0)
        offs = b_offsets(kk, cols, stride_bk, stride_bn, OFFSETS_64)
        bmask = kmask[:, None] & ncol[None, :]
        acc = tl.dot(a, tl.load(b_base + offs, mask=bmask, other=0.0), acc, input_precision=PRECISION)
        acc2 = tl.dot(a, tl.load(b2_base + offs, mask=bmask, other=0.0), acc2, input_precision=PRECISION)
    return acc, acc2


@triton.jit
def k_loop_two_ab(acc, a_row_ptrs, a2_col, stride_ak, a_valid, b_base, b2_base, stride_bk, stride_bn, cols, ncol,
                  k_end, k_size, PRECISION: tl.constexpr, BK: tl.constexpr, OFFSETS_64: tl.constexpr):
    """acc += [A | A2] @ [B_e; B2_e], A2 being A's columns from ``a2_col`` (the input gradient of a
    gated MLP: [dgate | dup] @ [W_gate; W_up])."""
    for k0 in range(0, k_end, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < k_size
        amask = a_valid[:, None] & kmask[None, :]
        offs = b_offsets(kk, cols, stride_bk, stride_bn, OFFSETS_64)
        bmask = kmask[:, None] & ncol[None, :]
        a = tl.load(a_row_ptrs + kk[None, :] * stride_ak, mask=amask, other=0.0)
        acc = tl.dot(a, tl.load(b_base + offs, mask=bmask, other=0.0), acc, input_precision=PRECISION)
        a2 = tl.load(a_row_ptrs + (a2_col + kk[None, :]) * stride_ak, mask=amask, other=0.0)
        acc = tl.dot(a2, tl.load(b2_base + offs, mask=bmask, other=0.0), acc, input_precision=PRECISION)
    return acc


# ---- B through the TMA (FASTMOE_B_LOADS=tma, _tma.py) -----------------------------------------------
@triton.jit
def stacked_b_descriptor(b_ptr, E, tma_rows, tma_cols, tma_stride_e, tma_stride_r, BN: tl.constexpr,
                         BK: tl.constexpr):
    """One descriptor of the whole stacked weight [E, rows, cols]; its [1, BN, BK] boxes are B_eᵀ tiles."""
    return tl.make_tensor_descriptor(b_ptr, shape=[E, tma_rows, tma_cols], strides=[tma_stride_e, tma_stride_r, 1],
                                     block_shape=[1, BN, BK])


@triton.jit
def k_loop_tma_b(acc, a_row_ptrs, stride_ak, a_valid, b_desc, e, b_row, k_end, k_size,
                 PRECISION: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """k_loop with B_e = W[e, b_row : b_row + BN, :]ᵀ read by TMA boxes (zeros past the weight's edges)."""
    for k0 in range(0, k_end, BK):
        kk = k0 + tl.arange(0, BK)
        a = tl.load(a_row_ptrs + kk[None, :] * stride_ak, mask=a_valid[:, None] & (kk < k_size)[None, :], other=0.0)
        b = b_desc.load([e, b_row, k0]).reshape(BN, BK)
        acc = tl.dot(a, b.T, acc, input_precision=PRECISION)
    return acc


@triton.jit
def k_loop_two_b_tma(acc, acc2, a_row_ptrs, stride_ak, a_valid, b_desc, e, b_row, b2_row, k_end, k_size,
                     PRECISION: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """k_loop_two_b with both matrices (gate rows from b_row, up rows from b2_row) read by TMA boxes."""
    for k0 in range(0, k_end, BK):
        kk = k0 + tl.arange(0, BK)
        a = tl.load(a_row_ptrs + kk[None, :] * stride_ak, mask=a_valid[:, None] & (kk < k_size)[None, :], other=0.0)
        acc = tl.dot(a, b_desc.load([e, b_row, k0]).reshape(BN, BK).T, acc, input_precision=PRECISION)
        acc2 = tl.dot(a, b_desc.load([e, b2_row, k0]).reshape(BN, BK).T, acc2, input_precision=PRECISION)
    return acc, acc2
