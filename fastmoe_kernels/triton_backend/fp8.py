"""FP8 (e4m3) blockwise-scaled grouped GEMMs: the quantisers and the three products (issue 16).

They compute what :mod:`fastmoe_kernels.fp8` specifies (DeepSeek-V3's recipe): activations and
gradients in 1×128 tiles along the reduction, weights in 128×128 blocks, one fp32 scale each, fp32
accumulation. The reduction runs in steps of exactly 128 so that every step's fp8 product is scaled
once by its two tiles' scales (``acc += dot(a, b) · s_a · s_b``, as DeepGEMM and vLLM's block-fp8
kernels promote each K block to the fp32 accumulator).

- ``_quantize_rows_kernel``: ``x [M, K]`` → e4m3 ``[M, K]`` and scales ``[M, ceil(K/128)]``; rows can
  be read through an index (the gather of the up projection: quantising each token once instead
  of each of its k copies gives the same values, since a row's tiles do not depend on other rows).
- ``_quantize_cols_kernel``: the wgrad's operands, 128 rows of one column per scale, the tiles
  starting at each expert's first row; written transposed, tile t in columns ``128·t …`` of a
  ``[K, 128·tiles]`` buffer (zeros past an expert's last row): the K-major layout fp8 tensor cores
  need for a reduction over tokens, with every tile aligned so that the wgrad's loads are
  contiguous, vectorised and pipelined (an expert's rows start anywhere; its tiles do not).
- ``_quantize_blocks_kernel``: weights ``[E, N, K]`` → e4m3 in ``[E, N, K]`` (forward) and/or
  ``[E, K, N]`` (dgrad: again K-major for its reduction over N), one scale per 128×128 block; kept per
  weight version by ``fp8_weight_cache`` (quantised once per optimizer step, not per call).
- ``_fp8_matmul_kernel``: forward and dgrad (a persistent grouped GEMM, as ``grouped_gemm.py``).
- ``_fp8_wgrad_kernel``: ``dW_e = Σ_tiles (G_tᵀ·X_t) · s_G · s_X``.

The down projection multiplies act(h) without storing it: given an activation, the row and column
quantisers read the pre-activation h and compute act(h) as they load it (rounded to h's dtype, the
value a stored act(h) would hold), and the dgrad's epilogue turns the gradient of act(h) into dh
(``_jit.load_activated``, ``_jit.store_activation_grad``; ops/fp8_mlp.py's ``activated_gemm_fp8``).

Rounding: scales are ``amax / 448`` (round-to-nearest division, 1 for an all-zero tile), values are
rounded to e4m3 by :func:`_e4m3_round` (round to nearest even, in fp32 arithmetic) and only then
cast, so the cast is exact. (Triton's CPU interpreter rounds an fp32→e4m3 cast wrongly where the
rounding carries into the exponent — 7.93 became 4 — so the kernels never rely on the cast to round.)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._alloc import empty
from .._variants import flag
from ..activations import Activation
from ..fp8 import TILE
from ._common import activation_args, cdiv, interpreted, launch, next_pow2, persistent_grid, register, rows_per_expert_bucket
from . import _gemm
from ._gemm import GROUPED_ORDER, expert_tile, outside_tile, persistent_tiles, pruner, rotating_pruner, store_tile
from ._jit import gather_rows, group_table, load_activated, pick, store_activation_grad
from .fp8_weight_cache import cached_weight

# Globals read inside kernels must be constexpr (the interpreter reads any; the compiler does not).
FP8_MAX = tl.constexpr(448.0)
# 1.5 · 2²³: adding and subtracting it rounds an fp32 of magnitude < 2²² to an integer, ties to even.
_ROUND_MAGIC = tl.constexpr(12582912.0)

# (BM, BN, warps, stages) of the forward/dgrad; BK is the 128 of the scaling tiles. BN divides 128 so
# that an output tile lies in one weight block (one weight scale per K step; wider tiles: below). The 8-warp forms of the
# mid-sized tiles are there for the gated activation's backward in the dgrad's epilogue: it holds a
# third fp32 tile, which 4 warps cannot hold without spilling (sm_90 compile check).
FP8_MATMUL_TILES = [(128, 128, 8, 4), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 3), (64, 128, 8, 4),
                    (128, 64, 8, 4)]
# Hopper-sized fp8 tiles (FASTMOE_FP8_TILES=wide; default narrow, the set the first H100 run measured):
# 256 columns span two weight blocks, so each K step multiplies the product by a column vector of two
# B scales (a_scale ⊗ b_scale) instead of one scalar — Hopper's fp8 rate wants wide tiles (DeepGEMM's
# blockwise grouped GEMM runs 128×128 per warpgroup, two warpgroups side by side). The sm_90 compile
# record (benchmarks/results/sm90-compile-2026-12-06-fp8-wide/) keeps one: 64×256, 8 warps, no spills
# (128×256 holds two 128×256 fp32 tiles: pruned). Expected: A read once per 256 columns instead of per
# 128 (half A's L2 traffic where N ≥ 256: Mixtral, gpt-oss), fewer rows per tile; the size of the
# effect is the GPU A/B's ("fp8 wide tiles"), not a model's: the first run's fp8 profile has no
# per-tile rates to calibrate one.
FP8_TILES = flag("FASTMOE_FP8_TILES", "narrow", ("narrow", "wide"))
FP8_WIDE_TILES = [(128, 256, 8, 3), (64, 256, 8, 4), (64, 256, 4, 3)]
# The decode tiles of the fp8 product (the forward issue's _gemm.DECODE_TILES for fp8, now that the weight
# cache makes an fp8 forward read the hit experts' e4m3 weights only): 16 rows, 32-128 columns, BK the
# scaling tile's 128; offered where the mean rows per expert (M_BUCKET) is at most 16 and never above
# (_gemm.for_rows_per_expert), unless FASTMOE_DECODE_TILES=off. At 1 token the 64-row tiles above leave
# 63 of 64 rows padding and one program per (expert, 128 columns): Mixtral's hit experts' up projection
# is 2 × 224 programs, 16-row 64-column tiles 2 × 448. Bound: one read of the hit experts' e4m3 weights,
# half a bf16 forward's bytes (benchmarks/results/model-2026-12-07/).
FP8_DECODE_TILES = [(16, 64, 4, 4), (16, 32, 4, 4), (16, 128, 4, 4)]
# (BN, BK) of the wgrad's output tile; the reduction steps over 128 tokens (one scaling tile).
FP8_WGRAD_TILES = [(128, 128, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 3)]


def _matmul_configs():
    wide = FP8_TILES == "wide"
    if interpreted():  # with wide tiles, one that spans two weight blocks (the scale vector's path)
        return [triton.Config(dict(BM=16, BN=256 if wide else 32, GROUP_M=2), num_warps=1)]
    tiles = FP8_MATMUL_TILES + (FP8_WIDE_TILES if wide else [])
    # Each tile in the row-major order, the first also in the grouped one (see _gemm.GROUPED_TILES).
    groups = [(tiles, 1), (tiles[:1], GROUPED_ORDER)] + ([(FP8_DECODE_TILES, 1)] if _gemm.DECODE_TILES_ON else [])
    return [triton.Config(dict(BM=m, BN=n, GROUP_M=group), num_warps=w, num_stages=s)
            for tiles, group in groups for m, n, w, s in tiles]


def _matmul_footprint(t, args):
    # fp8 operand tiles per stage; fp32 tiles live at once: the accumulator and a K step's product, or
    # in a gated activation's backward the accumulator and the gate and up halves of h.
    live = 3 if args.get("GATED") else 2
    return (t["BM"] + t["BN"]) * TILE, live * t["BM"] * t["BN"]


def _wgrad_configs():
    if interpreted():
        return [triton.Config(dict(BN=32, BK=32), num_warps=1)]
    return [triton.Config(dict(BN=n, BK=k), num_warps=w, num_stages=s) for n, k, w, s in FP8_WGRAD_TILES]


# ---- device helpers --------------------------------------------------------------------------------
@triton.jit
def _e4m3_round(v):
    """v (fp32, |v| ≤ 448) rounded to the nearest e4m3 value, ties to even: e4m3 keeps 3 mantissa
    bits, so the step is 2^(e-3) for exponent e ≥ -6 (2⁻⁹ among the subnormals)."""
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    step = ((124 + e) << 23).to(tl.float32, bitcast=True)  # 2^(e-3): exponent field 127 + e - 3
    inv_step = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3-e), exact
    y = tl.abs(v) * inv_step
    r = ((y + _ROUND_MAGIC) - _ROUND_MAGIC) * step
    # The sign bit is put back by bits, not by negation: a negative value rounding to zero stays -0, as
    # torch's cast gives it. Triton compiles -r as 0 - r, which is +0 for r = 0 (seen on an H100: every
    # negative value below half the smallest subnormal came out +0; the interpreter negates exactly).
    sign = (bits >> 31) << 31  # arithmetic shift: 0x80000000 for a negative v, else 0
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _scale_of(amax):
    return tl.where(amax > 0, tl.math.div_rn(amax, FP8_MAX), 1.0)


@triton.jit
def _to_e4m3(x, scale):
    return _e4m3_round(tl.math.div_rn(x, scale)).to(tl.float8e4nv)


# ---- quantisers ------------------------------------------------------------------------------------
@triton.jit
def _weighted(x, x_ptr, row_index_ptr, rows, valid, row_weight_ptr, ROW_WEIGHTED: tl.constexpr):
    """x, or with ROW_WEIGHTED each row times ``row_weight[index[r]]`` rounded to x's dtype: the rows of
    the weighted combine's input gradient, ``w·g[token]`` as the combine's backward writes them
    (permute.py's gather with a scale), read from g itself so that they are never written."""
    if ROW_WEIGHTED:
        idx = tl.load(row_index_ptr + rows, mask=valid, other=0)
        w = tl.load(row_weight_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        x = (x * w[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _quantize_rows_kernel(x_ptr, row_index_ptr, num_src, stride_xm, row_weight_ptr, q_ptr, s_ptr, M, K, KT,
                          up_col, col_step, alpha, limit, up_offset, ACT: tl.constexpr, GATED: tl.constexpr,
                          GATHER: tl.constexpr, DIV: tl.constexpr, ROW_WEIGHTED: tl.constexpr, BM: tl.constexpr,
                          TILE_K: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * TILE_K + tl.arange(0, TILE_K)
    rmask = rows < M
    src, valid = gather_rows(row_index_ptr, rows, rmask, num_src, DIV, GATHER)
    x = load_activated(x_ptr, src, valid, stride_xm, cols, cols < K, up_col, col_step, alpha, limit, up_offset,
                       ACT, GATED)
    x = _weighted(x, x_ptr, row_index_ptr, rows, valid, row_weight_ptr, ROW_WEIGHTED)
    scale = _scale_of(tl.max(tl.abs(x), 1))
    out = rows.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(q_ptr + out, _to_e4m3(x, scale[:, None]), mask=rmask[:, None] & (cols < K)[None, :])
    tl.store(s_ptr + rows.to(tl.int64) * KT + tl.program_id(1), scale, mask=rmask)


@triton.jit
def _quantize_cols_kernel(x_ptr, row_index_ptr, num_src, stride_xm, row_weight_ptr, qt_ptr, s_ptr, offsets_ptr, num_rows,
                          padded_rows, K, up_col, col_step, alpha, limit, up_offset, ACT: tl.constexpr,
                          GATED: tl.constexpr, E, E_PAD: tl.constexpr, GATHER: tl.constexpr, DIV: tl.constexpr,
                          ROW_WEIGHTED: tl.constexpr, BK: tl.constexpr, TILE_M: tl.constexpr):
    e_range, lo_v, hi_v, mt_v, mend_v = group_table(offsets_ptr, num_rows, E, E_PAD, TILE_M)
    t = tl.program_id(0)
    if t < tl.sum(mt_v, 0):
        _, rows, rmask, _ = expert_tile(t, 1, e_range, lo_v, hi_v, mt_v, mend_v, TILE_M, 1)  # row tile t of its expert
        cols = tl.program_id(1) * BK + tl.arange(0, BK)
        cmask = cols < K
        src, valid = gather_rows(row_index_ptr, rows, rmask, num_src, DIV, GATHER)
        x = load_activated(x_ptr, src, valid, stride_xm, cols, cmask, up_col, col_step, alpha, limit, up_offset,
                           ACT, GATED)
        x = _weighted(x, x_ptr, row_index_ptr, rows, valid, row_weight_ptr, ROW_WEIGHTED)
        scale = _scale_of(tl.max(tl.abs(x), 0))
        # The whole tile is written (rows past the expert's end as zeros), at its aligned place.
        slots = t * TILE_M + tl.arange(0, TILE_M)
        tl.store(qt_ptr + cols.to(tl.int64)[None, :] * padded_rows + slots[:, None], _to_e4m3(x, scale[None, :]),
                 mask=cmask[None, :])
        tl.store(s_ptr + t.to(tl.int64) * K + cols, scale, mask=cmask)


@triton.jit
def _quantize_blocks_kernel(w_ptr, stride_we, stride_wn, stride_wk, q_ptr, qt_ptr, s_ptr, N, K, NB, KB,
                            WRITE_Q: tl.constexpr, WRITE_QT: tl.constexpr, BLOCK: tl.constexpr):
    e, nb, kb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = nb * BLOCK + tl.arange(0, BLOCK)
    k = kb * BLOCK + tl.arange(0, BLOCK)
    mask = (n < N)[:, None] & (k < K)[None, :]
    w = tl.load(w_ptr + e.to(tl.int64) * stride_we + n[:, None] * stride_wn + k[None, :] * stride_wk, mask=mask,
                other=0.0).to(tl.float32)
    scale = _scale_of(tl.max(tl.max(tl.abs(w), 1), 0))
    q = _to_e4m3(w, scale)
    base = e.to(tl.int64) * N * K
    # Both layouts from one read of the block (the weight cache's training entries): same values, same scale.
    if WRITE_Q:
        tl.store(q_ptr + base + n[:, None] * K + k[None, :], q, mask=mask)
    if WRITE_QT:
        tl.store(qt_ptr + base + k[None, :] * N + n[:, None], q, mask=mask)
    tl.store(s_ptr + (e * NB + nb) * KB + kb, scale)


# The kernels' activation arguments when they read (or write) a tensor's own columns.
_NO_ACTIVATION = dict(up_col=0, col_step=1, alpha=1.0, limit=1.0, up_offset=0.0, ACT=0, GATED=False)


def _activation_view(x: torch.Tensor, activation: Optional[Activation]):
    """(the width the quantisers read, their activation arguments): x's own columns, or act(x) from
    the gate (and up) columns of a pre-activation x (see _jit.load_activated)."""
    return activation_layout(x.shape[1], activation)


def activation_layout(columns: int, activation: Optional[Activation]):
    """:func:`_activation_view` for a pre-activation of ``columns`` columns (one not allocated yet)."""
    if activation is None:
        return columns, _NO_ACTIVATION
    if not activation.gated:
        return columns, dict(up_col=0, col_step=1, **activation_args(activation), GATED=False)
    f = columns // 2
    up_col, col_step = (1, 2) if activation.interleaved else (f, 1)
    return f, dict(up_col=up_col, col_step=col_step, **activation_args(activation), GATED=True)


def quantize_rows(x: torch.Tensor, row_index: Optional[torch.Tensor] = None,
                  activation: Optional[Activation] = None, *, div: int = 1,
                  row_weight: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` (or ``x[row_index // div]`` — rows < 0 are zeros —, each times ``row_weight[row_index]``
    rounded to x's dtype when given; or ``act(x)``, x a pre-activation) → (e4m3 ``[M', K']``, scales
    ``[M', ceil(K'/128)]``)."""
    M = x.shape[0] if row_index is None else row_index.shape[0]
    K, act = _activation_view(x, activation)
    KT = cdiv(K, TILE)
    q = empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = empty(M, KT, dtype=torch.float32, device=x.device)
    if M and K:
        BM = 16 if interpreted() else 32
        _quantize_rows_kernel[(cdiv(M, BM), KT)](
            x, row_index if row_index is not None else x, x.shape[0], x.stride(0),
            row_weight if row_weight is not None else x, q, s, M, K, KT, **act,
            GATHER=row_index is not None, DIV=div, ROW_WEIGHTED=row_weight is not None, BM=BM, TILE_K=TILE)
    return q, s


def column_tiles(num_rows: int, num_experts: int) -> int:
    """An upper bound on the wgrad's row tiles: each expert's rows in tiles of 128, each expert
    starting a tile of its own."""
    return cdiv(num_rows, TILE) + num_experts


def quantize_cols(x: torch.Tensor, offsets: torch.Tensor, num_rows: int, row_index: Optional[torch.Tensor] = None,
                  activation: Optional[Activation] = None, *, div: int = 1,
                  row_weight: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The wgrad operand: rows ``offsets[e]:offsets[e+1]`` of ``x`` (or of ``x[row_index // div]``, weighted as
    in :func:`quantize_rows`, or of ``act(x)``) in tiles of
    128 rows per column, starting at each expert's first row → (e4m3 ``xᵀ`` tiles ``[K, 128·tiles]``,
    scales ``[tiles, K]``): tile t of expert e, ``t = Σ_{e'<e} ceil(n_e'/128) + j``, holds its rows
    ``offsets[e] + 128·j …`` in columns ``128·t …`` and zeros after the expert's last row. Tiles past
    the last expert's are left unwritten (the wgrad never reads them)."""
    K, act = _activation_view(x, activation)
    E = offsets.shape[0] - 1
    tiles = column_tiles(num_rows, E)
    qt = empty(K, tiles * TILE, dtype=torch.float8_e4m3fn, device=x.device)
    s = empty(tiles, K, dtype=torch.float32, device=x.device)
    if num_rows and K:
        BK = 32 if interpreted() else 64
        _quantize_cols_kernel[(tiles, cdiv(K, BK))](
            x, row_index if row_index is not None else x, x.shape[0], x.stride(0),
            row_weight if row_weight is not None else x, qt, s, offsets, num_rows, tiles * TILE, K, **act,
            E=E, E_PAD=next_pow2(E), GATHER=row_index is not None, DIV=div, ROW_WEIGHTED=row_weight is not None,
            BK=BK, TILE_M=TILE)
    return qt, s


def quantize_weight(w: torch.Tensor, transposed: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``w [E, N, K]`` → (e4m3 ``[E, N, K]``, or ``[E, K, N]`` when ``transposed``; scales
    ``[E, ceil(N/128), ceil(K/128)]``). One layout per call (see :func:`quantize_weight_layouts`)."""
    q, qt, s = quantize_weight_layouts(w, forward=not transposed, transposed=transposed)
    return (qt if transposed else q), s


def quantize_weight_layouts(w: torch.Tensor, *, forward: bool = True, transposed: bool = True):
    """``w [E, N, K]`` → (e4m3 ``[E, N, K]`` or None, e4m3 ``[E, K, N]`` or None, scales
    ``[E, ceil(N/128), ceil(K/128)]``): the layouts asked for, from one read of each 128×128 block —
    the forward reads the first, the dgrad the second (K-major for its reduction over N)."""
    E, N, K = w.shape
    NB, KB = cdiv(N, TILE), cdiv(K, TILE)
    q = empty(E, N, K, dtype=torch.float8_e4m3fn, device=w.device) if forward else None
    qt = empty(E, K, N, dtype=torch.float8_e4m3fn, device=w.device) if transposed else None
    s = empty(E, NB, KB, dtype=torch.float32, device=w.device)
    if E and N and K:
        some = q if q is not None else qt
        _quantize_blocks_kernel[(E, NB, KB)](w, w.stride(0), w.stride(1), w.stride(2),
                                             q if q is not None else some, qt if qt is not None else some, s,
                                             N, K, NB, KB, WRITE_Q=forward, WRITE_QT=transposed, BLOCK=TILE,
                                             # a 128×128 fp32 block over 256 threads: with 128 and both
                                             # layouts it spilled 184 B on sm_90 (Triton 3.6)
                                             num_warps=8)
    return q, qt, s


# ---- the products ----------------------------------------------------------------------------------
@triton.jit
def fp8_k_steps(a_ptr, a_scale_ptr, a_rows, a_valid, b_rows, ncol, s_b, s_b_cols, stride_sk, K, KT,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, COLUMN_SCALES: tl.constexpr):
    """The fp32 product ``A[a_rows] · Bᵀ`` of one output tile, each 128-deep K step scaled by its A row
    scales and B's block scale: one (``s_b``, the tile inside one weight block) or one per column
    (``s_b_cols``: a tile over several blocks, or columns gathered from anywhere in the weight)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, KT):
        kk = kb * BK + tl.arange(0, BK)
        kmask = kk < K
        a = tl.load(a_ptr + a_rows[:, None] * K + kk[None, :], mask=a_valid[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_rows + kk[None, :], mask=ncol[:, None] & kmask[None, :], other=0.0)
        a_scale = tl.load(a_scale_ptr + a_rows * KT + kb, mask=a_valid, other=0.0)
        if COLUMN_SCALES:
            b_scale_cols = tl.load(s_b_cols + kb * stride_sk, mask=ncol, other=0.0)
            acc += tl.dot(a, tl.trans(b)) * (a_scale[:, None] * b_scale_cols[None, :])
        else:
            b_scale = tl.load(s_b + kb * stride_sk)
            acc += tl.dot(a, tl.trans(b)) * (a_scale * b_scale)[:, None]
    return acc


@triton.autotune(configs=_matmul_configs(), key=["N_OUT", "K", "M_BUCKET", "E", "GATED"],
                 prune_configs_by={"early_config_prune": pruner(_matmul_footprint, "a_ptr")}, cache_results=True)
@triton.jit
def _fp8_matmul_kernel(
    # A: e4m3 [num_a_rows, K] with scales [num_a_rows, KT]; row r of the product reads A row
    # a_row_index[r] with GATHER_A, else row r
    a_ptr, a_scale_ptr, a_row_index_ptr, num_a_rows,
    # B_e: e4m3 rows of length K (K contiguous) at b_ptr + e·stride_be + n·stride_bn; its block scale
    # for (n // 128, k // 128) at b_scale_ptr + e·stride_se + (n//128)·stride_sn + (k//128)·stride_sk
    b_ptr, stride_be, stride_bn, b_scale_ptr, stride_se, stride_sn, stride_sk,
    c_ptr, stride_cm, offsets_ptr, num_rows, N_OUT, K, KT, M_BUCKET,
    # with ACT: the product is the gradient of act(h) and C receives dh (h's layout: see _jit.load_activated)
    h_ptr, up_col, col_step, alpha, limit, up_offset, ACT: tl.constexpr, GATED: tl.constexpr,
    E, E_PAD: tl.constexpr, GATHER_A: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    n_tiles = tl.cdiv(N_OUT, BN)
    e_range, lo_v, hi_v, mt_v, mend_v, gemm_tiles, first_row, last_row, total_tiles = persistent_tiles(
        offsets_ptr, num_rows, n_tiles, E, E_PAD, BM)
    for tile in range(tl.program_id(0), total_tiles, tl.num_programs(0)):
        if tile < gemm_tiles:
            e, rows, rmask, tile_n = expert_tile(tile, n_tiles, e_range, lo_v, hi_v, mt_v, mend_v, BM, GROUP_M)
            cols = tile_n * BN + tl.arange(0, BN)
            ncol = cols < N_OUT
            a_rows, a_valid = gather_rows(a_row_index_ptr, rows, rmask, num_a_rows, 1, GATHER_A)
            b_rows = b_ptr + e.to(tl.int64) * stride_be + cols.to(tl.int64)[:, None] * stride_bn
            s_b = b_scale_ptr + e.to(tl.int64) * stride_se + ((tile_n * BN) // BK) * stride_sn
            # A tile wider than a weight block (FP8_WIDE_TILES) reads one B scale per column's block.
            s_b_cols = b_scale_ptr + e.to(tl.int64) * stride_se + (cols // BK) * stride_sn
            acc = fp8_k_steps(a_ptr, a_scale_ptr, a_rows, a_valid, b_rows, ncol, s_b, s_b_cols, stride_sk, K, KT,
                              BM, BN, BK, BN > BK)
            if GATED:
                # The activation's backward in the epilogue (the gradient of act(h) is never stored), on the
                # even and then the odd columns: half the tiles of h live at once (the whole tile spilled on
                # sm_90), and the split is free, each thread holding pairs of adjacent accumulator columns.
                acc_even, acc_odd = tl.split(tl.reshape(acc, (BM, BN // 2, 2)))
                even = tile_n * BN + 2 * tl.arange(0, BN // 2)
                store_activation_grad(c_ptr, h_ptr, rows.to(tl.int64), rmask, even, N_OUT, stride_cm, up_col, col_step,
                                      acc_even, alpha, limit, up_offset, ACT, GATED)
                store_activation_grad(c_ptr, h_ptr, rows.to(tl.int64), rmask, even + 1, N_OUT, stride_cm, up_col,
                                      col_step, acc_odd, alpha, limit, up_offset, ACT, GATED)
            elif ACT != 0:
                store_activation_grad(c_ptr, h_ptr, rows.to(tl.int64), rmask, cols, N_OUT, stride_cm, up_col, col_step,
                                      acc, alpha, limit, up_offset, ACT, GATED)
            else:
                store_tile(c_ptr, rows.to(tl.int64), rmask, cols, N_OUT, stride_cm, 1, acc)
        else:
            # Own names: a variable of both branches must keep one type (the compiler's rule; rows are int32 above).
            z_rows, z_valid, z_cols = outside_tile(tile - gemm_tiles, n_tiles, first_row, last_row, num_rows, BM, BN)
            zeros = tl.zeros((BM, BN), dtype=tl.float32)
            store_tile(c_ptr, z_rows, z_valid, z_cols, N_OUT, stride_cm, col_step, zeros)
            if GATED:  # dh's up columns
                store_tile(c_ptr + up_col, z_rows, z_valid, z_cols, N_OUT, stride_cm, col_step, zeros)


@triton.autotune(configs=_wgrad_configs(), key=["N", "K", "M_BUCKET", "E"],
                 prune_configs_by={"early_config_prune": rotating_pruner}, cache_results=True)
@triton.jit
def _fp8_wgrad_kernel(gt_ptr, g_scale_ptr, xt_ptr, x_scale_ptr, dw_ptr, offsets_ptr, num_rows, padded_rows, N, K,
                      M_BUCKET, E, E_PAD: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TILE_M: tl.constexpr):
    """dW_e [N, K] = Σ over e's 128-row tiles t of (Gᵀ_t · X_t) · s_G[t, n] · s_X[t, k]; the tiles are
    :func:`quantize_cols`' aligned ones (zeros past the expert's rows, so no row mask)."""
    e_range, lo_v, hi_v, mt_v, mend_v = group_table(offsets_ptr, num_rows, E, E_PAD, TILE_M)
    e = tl.program_id(1)
    k_tiles = tl.cdiv(K, BK)
    nn = (tl.program_id(0) // k_tiles) * BN + tl.arange(0, BN)
    kk = (tl.program_id(0) % k_tiles) * BK + tl.arange(0, BK)
    nmask = nn < N
    kmask = kk < K
    first_tile = pick(mend_v - mt_v, e_range, e)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for j in range(0, pick(mt_v, e_range, e)):
        t = (first_tile + j).to(tl.int64)
        slots = t * TILE_M + tl.arange(0, TILE_M)
        g = tl.load(gt_ptr + nn.to(tl.int64)[:, None] * padded_rows + slots[None, :], mask=nmask[:, None], other=0.0)
        x = tl.load(xt_ptr + kk.to(tl.int64)[:, None] * padded_rows + slots[None, :], mask=kmask[:, None], other=0.0)
        g_scale = tl.load(g_scale_ptr + t * N + nn, mask=nmask, other=0.0)
        x_scale = tl.load(x_scale_ptr + t * K + kk, mask=kmask, other=0.0)
        acc += tl.dot(g, tl.trans(x)) * g_scale[:, None] * x_scale[None, :]
    out = dw_ptr + e.to(tl.int64) * N * K + nn[:, None] * K + kk[None, :]
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=nmask[:, None] & kmask[None, :])


def fp8_matmul(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
               offsets: torch.Tensor, num_rows: int, out_dtype: torch.dtype, *, b_scale_transposed: bool = False,
               a_row_index: Optional[torch.Tensor] = None,
               grad_of: Optional[Tuple[torch.Tensor, Activation]] = None) -> torch.Tensor:
    """``out[r] = A[r] · B_eᵀ`` for the rows r of group e (zeros outside every group), ``b_q [E, N, K]``
    e4m3 with K contiguous; ``b_scale [E, ceil(N/128), ceil(K/128)]``, or ``[E, ceil(K/128),
    ceil(N/128)]`` read transposed (the dgrad reads the forward's weight scales). With ``grad_of =
    (h, activation)`` the product is the gradient of ``act(h)`` (N its width) and the result is ``dh``,
    h's shape."""
    E, N, K = b_q.shape
    if grad_of is None:
        h, act = None, _NO_ACTIVATION
        out = empty(num_rows, N, dtype=out_dtype, device=a_q.device)
    else:
        h, activation = grad_of
        width, act = _activation_view(h, activation)
        if (width, h.shape[0], h.stride(1)) != (N, num_rows, 1):
            raise ValueError(f"fp8_matmul: `grad_of` h must be the pre-activation of {num_rows} rows of act width {N} "
                             f"with unit column stride, got shape {tuple(h.shape)} strides {h.stride()}")
        out = empty(*h.shape, dtype=out_dtype, device=a_q.device)
    if num_rows == 0 or N == 0:
        return out
    stride_se, stride_sn, stride_sk = b_scale.stride()
    if b_scale_transposed:
        stride_sn, stride_sk = stride_sk, stride_sn
    # + 2 row tiles: the rows before the first group and after the last (written as zeros).
    launch(_fp8_matmul_kernel, persistent_grid(a_q.device, num_rows, N, E, extra_row_tiles=2),
        a_q, a_scale, a_row_index if a_row_index is not None else offsets, a_q.shape[0],
        b_q, b_q.stride(0), b_q.stride(1), b_scale, stride_se, stride_sn, stride_sk,
        out, out.stride(0), offsets, num_rows, N, K, cdiv(K, TILE), rows_per_expert_bucket(num_rows, E),
        h if h is not None else out, **act, E=E, E_PAD=next_pow2(E), GATHER_A=a_row_index is not None, BK=TILE)
    return out


def fp8_wgrad(g_t: torch.Tensor, g_scale: torch.Tensor, x_t: torch.Tensor, x_scale: torch.Tensor,
              offsets: torch.Tensor, num_rows: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``dW [E, N, K]`` from the column-quantised ``gᵀ`` and ``xᵀ`` tiles of ``num_rows`` rows
    (:func:`quantize_cols`)."""
    N, padded = g_t.shape
    K = x_t.shape[0]
    E = offsets.shape[0] - 1
    dw = empty(E, N, K, dtype=out_dtype, device=g_t.device)
    if E == 0 or N == 0 or K == 0:
        return dw

    def grid(meta):
        return (cdiv(N, meta["BN"]) * cdiv(K, meta["BK"]), E)

    launch(_fp8_wgrad_kernel, grid, g_t, g_scale, x_t, x_scale, dw, offsets, num_rows, padded, N, K,
           rows_per_expert_bucket(num_rows, E), E, E_PAD=next_pow2(E), TILE_M=TILE)
    return dw


# ---- the grouped_gemm_fp8 op's kernels ---------------------------------------------------------------
def fp8_capable(cc: int = 0, **_) -> Optional[str]:
    """fp8 tensor cores: compute capability 8.9 (Ada) and later; ``cc`` 0 is the CPU interpreter."""
    if cc == 0 or cc >= 89:
        return None
    return f"fp8 (e4m3) tensor cores need compute capability 8.9 or later, this GPU is {cc // 10}.{cc % 10}"


@register("grouped_gemm_fp8", applies=fp8_capable)
def grouped_gemm_fp8_triton(x, w, offsets):
    return _forward(x, w, offsets.to(torch.int32), x.shape[0])


@register("grouped_gemm_fp8_backward", applies=fp8_capable)
def grouped_gemm_fp8_backward_triton(grad, x, w, offsets):
    return _backward(grad, x, w, offsets.to(torch.int32))


# The gathered forms read row r of x as x[src[r]] (the up projection straight from the tokens).
@register("grouped_gemm_fp8_gathered", applies=fp8_capable)
def grouped_gemm_fp8_gathered_triton(x, w, offsets, src):
    return _forward(x, w, offsets.to(torch.int32), src.shape[0], src=src)


@register("grouped_gemm_fp8_gathered_backward", applies=fp8_capable)
def grouped_gemm_fp8_gathered_backward_triton(grad, x, w, offsets, src):
    return _backward(grad, x, w, offsets.to(torch.int32), src=src)


# The activated forms multiply act(h) (the down projection from the pre-activation h): the
# activation runs in the quantisers' prologue, its backward in the dgrad's epilogue.
@register("grouped_gemm_fp8_activated", applies=fp8_capable)
def grouped_gemm_fp8_activated_triton(h, w, offsets, activation):
    return _forward(h, w, offsets.to(torch.int32), h.shape[0], activation=activation)


@register("grouped_gemm_fp8_activated_backward", applies=fp8_capable)
def grouped_gemm_fp8_activated_backward_triton(grad, h, w, offsets, activation):
    return _backward(grad, h, w, offsets.to(torch.int32), activation=activation)


def _forward(x, w, offsets, num_rows, *, src=None, activation=None):
    x_q, x_s = quantize_rows(x, activation=activation)  # each row (token) once, read through src by the GEMM
    w_q, w_s = cached_weight(w, False, quantize_weight_layouts)
    return fp8_matmul(x_q, x_s, w_q, w_s, offsets, num_rows, x.dtype, a_row_index=src)


def _backward(grad, x, w, offsets, *, src=None, activation=None):
    """(dgrad in x's dtype: of the rows ``[R, K]``, or of h for an activated x; wgrad in w's dtype)."""
    R = grad.shape[0]
    w_qt, w_s = cached_weight(w, True, quantize_weight_layouts)
    g_q, g_s = quantize_rows(grad)
    grad_of = (x, activation) if activation is not None else None
    grad_rows = fp8_matmul(g_q, g_s, w_qt, w_s, offsets, R, x.dtype, b_scale_transposed=True, grad_of=grad_of)
    g_t, g_ts = quantize_cols(grad, offsets, R)
    x_t, x_ts = quantize_cols(x, offsets, R, row_index=src, activation=activation)
    return grad_rows, fp8_wgrad(g_t, g_ts, x_t, x_ts, offsets, R, w.dtype)
