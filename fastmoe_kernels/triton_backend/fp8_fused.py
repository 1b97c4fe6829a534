"""The fp8 experts' quantisers fused into the kernels that produce their inputs (issue 35, item 2;
``FASTMOE_FP8_QUANTISERS=fused``, ops/fp8_moe_node.py).

The separate path (fp8.py) writes each fp8 operand's source in the layer's dtype and quantises it in
a pass of its own that reads it back: h for the down projection's rows, the combine's input gradient
``w·g[token]`` for the down projection's rows and columns, dh for the up projection's rows and
columns. Here:

- ``_fp8_up_quant_kernel``: the up projection (tokens gathered through the plan) writes h for the
  backward and, in its epilogue, act(h) row-quantised — each output tile is the 128 activation
  columns of one scaling tile, so a row's scale is a reduction inside the tile. A gated activation
  needs the gate and the up column of every activation column in the same tile: the product tile
  takes 256 weight rows, gate and up of each of its 128 activation columns side by side (a gather of
  B's rows, each with its own block scale), and the epilogue splits them into the two halves.
- ``_fp8_dgrad_quant_kernel``: the down projection's input gradient ends in the activation's
  backward, then dh is quantised by rows (the up projection's dgrad operand) and by columns (its
  wgrad operand) and never written in the layer's dtype. Its tiles are 128 rows starting at each
  expert's first row — exactly the column quantiser's tiles — by 128 activation columns: the natural
  columns of dh they cover are two whole row-scaling tiles (gate and up, or for gpt-oss's interleaved
  layout the two halves of 256 interleaved columns). A row's scale needs the whole tile's values, so
  the epilogue computes dh twice from the accumulator: once for the amax (storing the column-quantised
  values, whose scales are complete per column), once to store the row-quantised values.
- the rows of ``w·g[token]`` are read from g by the quantisers (fp8.py's ``row_weight``).

Every value equals the separate path's bit for bit: the same roundings in the same order (h and dh
to the layer's dtype first, then the quantisers' arithmetic of fp8.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._alloc import empty
from ..activations import Activation
from ..fp8 import TILE
from ._common import (cdiv, interpreted, launch, next_pow2, persistent_programs, register,
                      rows_per_expert_bucket)
from ._gemm import GROUPED_ORDER, expert_tile, outside_tile, persistent_tiles, pruner, store_tile
from ._jit import act_fwd, act_grad, gated_grads, gather_rows, pick, up_fwd
from .fp8 import (_scale_of, _to_e4m3, activation_layout, column_tiles, fp8_capable, fp8_k_steps, fp8_matmul,
                  fp8_wgrad, quantize_cols, quantize_rows, quantize_weight_layouts)
from .fp8_weight_cache import cached_weight
from .permute import combine, rowdot

# (BM, warps, stages) of the up projection; its tile is 128 activation columns (256 product columns
# when gated). A 128-row gated tile holds two fp32 128×256 tiles in its K loop: pruned by the register
# estimate, as FP8_WIDE_TILES' is (fp8.py).
UP_QUANT_TILES = [(64, 8, 4), (128, 8, 3), (64, 4, 4)]
# (warps, stages) of the quantising dgrad: 128 rows (the column quantiser's tiles) × 128 activation
# columns; 16 warps hold the accumulator and the epilogue's halves of h in half the registers per thread.
DGRAD_QUANT_TILES = [(8, 3, 4), (8, 3, 8), (16, 3, 4), (8, 4, 8)]


def _up_configs():
    if interpreted():
        return [triton.Config(dict(BM=16, GROUP_M=2), num_warps=1)]
    return [triton.Config(dict(BM=m, GROUP_M=group), num_warps=w, num_stages=s)
            for tiles, group in ((UP_QUANT_TILES, 1), (UP_QUANT_TILES[:1], GROUPED_ORDER)) for m, w, s in tiles]


def _up_footprint(t, args):
    product = 2 * TILE if args.get("GATED") else TILE
    return (t["BM"] + product) * TILE, 2 * t["BM"] * product


def _up_output(t, args):
    return t["BM"] * (2 * TILE if args.get("GATED") else TILE)


def _dgrad_configs():
    if interpreted():
        return [triton.Config(dict(GROUP_M=2, PARTS=8), num_warps=1)]
    return [triton.Config(dict(GROUP_M=group, PARTS=parts), num_warps=w, num_stages=s)
            for tiles, group in ((DGRAD_QUANT_TILES, 1), (DGRAD_QUANT_TILES[:1], GROUPED_ORDER))
            for w, s, parts in tiles]


def _dgrad_footprint(t, args):
    # No register estimate here: every config has the one tile shape (the compile record tells its spills).
    return 2 * TILE * TILE, 0


# ---- the up projection with act(h) row-quantised -----------------------------------------------------
@triton.autotune(configs=_up_configs(), key=["N_ACT", "K", "M_BUCKET", "E", "GATED"],
                 prune_configs_by={"early_config_prune": pruner(_up_footprint, "a_ptr", output_elements=_up_output)},
                 cache_results=True)
@triton.jit
def _fp8_up_quant_kernel(
    a_ptr, a_scale_ptr, a_row_index_ptr, num_a_rows,  # e4m3 token rows [T, K] and scales; row r reads x[src[r]]
    b_ptr, stride_be, stride_bn, b_scale_ptr, stride_se, stride_sn, stride_sk,  # W_up e4m3 [E, H, K], block scales
    h_ptr, stride_hm, q_ptr, q_scale_ptr,  # outputs: h [R, H]; act(h) e4m3 [R, N_ACT] and scales [R, N_ACT / 128]
    offsets_ptr, num_rows, N_ACT, K, KT, M_BUCKET,
    up_col, col_step, alpha, limit, up_offset, ACT: tl.constexpr, GATED: tl.constexpr,
    E, E_PAD: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    PRODUCT: tl.constexpr = 2 * BK if GATED else BK  # product columns per tile of BK activation columns
    n_tiles = tl.cdiv(N_ACT, BK)
    e_range, lo_v, hi_v, mt_v, mend_v, gemm_tiles, first_row, last_row, total_tiles = persistent_tiles(
        offsets_ptr, num_rows, n_tiles, E, E_PAD, BM)
    for tile in range(tl.program_id(0), total_tiles, tl.num_programs(0)):
        if tile < gemm_tiles:
            e, rows, rmask, tile_n = expert_tile(tile, n_tiles, e_range, lo_v, hi_v, mt_v, mend_v, BM, GROUP_M)
            j = tile_n * BK + tl.arange(0, BK)  # the tile's activation columns
            if GATED:  # product column p: activation column j0 + p // 2, its gate (p even) or up (p odd) row of W
                p = tl.arange(0, PRODUCT)
                pj = tile_n * BK + p // 2
                w_row = pj * col_step + (p % 2) * up_col
                pmask = pj < N_ACT
            else:
                w_row = j
                pmask = j < N_ACT
            a_rows, a_valid = gather_rows(a_row_index_ptr, rows, rmask, num_a_rows, 1, True)
            b_rows = b_ptr + e.to(tl.int64) * stride_be + w_row.to(tl.int64)[:, None] * stride_bn
            s_b_cols = b_scale_ptr + e.to(tl.int64) * stride_se + (w_row // BK) * stride_sn
            acc = fp8_k_steps(a_ptr, a_scale_ptr, a_rows, a_valid, b_rows, pmask, s_b_cols, s_b_cols, stride_sk, K, KT,
                              BM, PRODUCT, BK, True)
            rows64 = rows.to(tl.int64)
            mask = rmask[:, None] & (j < N_ACT)[None, :]
            h_offs = rows64[:, None] * stride_hm + (j * col_step)[None, :]
            # h is stored (the backward's), rounded to its dtype; act(h) is computed from those values, as
            # the separate path's quantiser computes it from the stored h.
            if GATED:
                gate, up = tl.split(tl.reshape(acc, (BM, BK, 2)))
                gate = gate.to(h_ptr.dtype.element_ty)
                up = up.to(h_ptr.dtype.element_ty)
                tl.store(h_ptr + h_offs, gate, mask=mask)
                tl.store(h_ptr + h_offs + up_col, up, mask=mask)
                a = act_fwd(gate.to(tl.float32), ACT, alpha, limit) * up_fwd(up.to(tl.float32), limit, up_offset)
            else:
                hv = acc.to(h_ptr.dtype.element_ty)
                tl.store(h_ptr + h_offs, hv, mask=mask)
                a = act_fwd(hv.to(tl.float32), ACT, alpha, limit)
            a = tl.where(mask, a.to(h_ptr.dtype.element_ty).to(tl.float32), 0.0)
            scale = _scale_of(tl.max(tl.abs(a), 1))
            tl.store(q_ptr + rows64[:, None] * N_ACT + j[None, :], _to_e4m3(a, scale[:, None]), mask=mask)
            tl.store(q_scale_ptr + rows64 * n_tiles + tile_n, scale, mask=rmask)
        else:
            # Rows outside every group: h and act(h) are zeros (the separate path's), each scale 1.
            z = tile - gemm_tiles
            z_rows, z_valid, z_cols = outside_tile(z, n_tiles, first_row, last_row, num_rows, BM, BK)
            zeros = tl.zeros((BM, BK), dtype=tl.float32)
            store_tile(h_ptr, z_rows, z_valid, z_cols, N_ACT, stride_hm, col_step, zeros)
            if GATED:
                store_tile(h_ptr + up_col, z_rows, z_valid, z_cols, N_ACT, stride_hm, col_step, zeros)
            store_tile(q_ptr, z_rows, z_valid, z_cols, N_ACT, N_ACT, 1, zeros)
            tl.store(q_scale_ptr + z_rows * n_tiles + z % n_tiles, tl.full((BM,), 1.0, tl.float32), mask=z_valid)


def up_projection_quantised(x_q: torch.Tensor, x_s: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor,
                            offsets: torch.Tensor, src: torch.Tensor, activation: Activation, out_dtype: torch.dtype):
    """(h ``[R, H]`` in ``out_dtype``, act(h) e4m3 ``[R, f]``, its row scales ``[R, ceil(f/128)]``) of the
    up projection of the token rows ``x_q`` (quantised once per token) read through ``src``."""
    E, H, K = w_q.shape
    R = src.shape[0]
    f, act = activation_layout(H, activation)
    h = empty(R, H, dtype=out_dtype, device=x_q.device)
    q = empty(R, f, dtype=torch.float8_e4m3fn, device=x_q.device)
    q_s = empty(R, cdiv(f, TILE), dtype=torch.float32, device=x_q.device)
    if R == 0 or f == 0:
        return h, q, q_s
    launch(_fp8_up_quant_kernel, _grid(x_q.device, R, f, E),
           x_q, x_s, src, x_q.shape[0], w_q, w_q.stride(0), w_q.stride(1), w_s, *w_s.stride(),
           h, h.stride(0), q, q_s, offsets, R, f, K, cdiv(K, TILE), rows_per_expert_bucket(R, E),
           **act, E=E, E_PAD=next_pow2(E), BK=TILE)
    return h, q, q_s


# ---- the down projection's input gradient with dh quantised by rows and by columns -------------------
@triton.jit
def _split_columns(acc, BM: tl.constexpr, BK: tl.constexpr, PARTS: tl.constexpr):
    """acc's columns in PARTS (4 or 8) contiguous parts, as a tuple."""
    if PARTS == 4:
        x = tl.permute(tl.reshape(acc, (BM, 2, 2, BK // 4)), (0, 3, 2, 1))  # [m, i, b, a] = acc[m, 64a + 32b + i]
        lo, hi = tl.split(x)  # a = 0, 1
        p0, p1 = tl.split(lo)
        p2, p3 = tl.split(hi)
        return p0, p1, p2, p3
    else:
        x = tl.permute(tl.reshape(acc, (BM, 2, 2, 2, BK // 8)), (0, 4, 3, 2, 1))  # [m, i, c, b, a]: 64a + 32b + 16c + i
        lo, hi = tl.split(x)
        lo0, lo1 = tl.split(lo)
        hi0, hi1 = tl.split(hi)
        p0, p1 = tl.split(lo0)
        p2, p3 = tl.split(lo1)
        p4, p5 = tl.split(hi0)
        p6, p7 = tl.split(hi1)
        return p0, p1, p2, p3, p4, p5, p6, p7


@triton.jit
def _part(parts, c: tl.constexpr, PARTS: tl.constexpr):
    return parts[c]


@triton.jit
def _dh_part(d_act, rows64, rmask, j, N_ACT, h_ptr, stride_hm, up_col, col_step, alpha, limit, up_offset,
             ACT: tl.constexpr, GATED: tl.constexpr):
    """(d gate, d up) — or (dh, unused) without a gate — at activation columns j of the tile, each
    rounded to h's dtype (dh's, as the separate path stores it) and 0 outside the tile's valid rows."""
    mask = rmask[:, None] & (j < N_ACT)[None, :]
    offs = rows64[:, None] * stride_hm + (j * col_step)[None, :]
    gate = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        up = tl.load(h_ptr + offs + up_col, mask=mask, other=0.0).to(tl.float32)
        d_gate, d_up = gated_grads(d_act, gate, up, ACT, alpha, limit, up_offset)
    else:
        d_gate = d_act * act_grad(gate, ACT, alpha, limit)
        d_up = d_gate
    d_gate = tl.where(mask, d_gate.to(h_ptr.dtype.element_ty).to(tl.float32), 0.0)
    d_up = tl.where(mask, d_up.to(h_ptr.dtype.element_ty).to(tl.float32), 0.0)
    return d_gate, d_up


@triton.jit
def _dh_pairs(d_act, rows64, rmask, j0, N_ACT, h_ptr, stride_hm, alpha, limit, up_offset, ACT: tl.constexpr,
              BM: tl.constexpr, WIDTH: tl.constexpr):
    """dh at activation columns ``j0 …`` of an interleaved h (gate, up at columns 2j, 2j + 1): the tile of
    its 2·WIDTH natural columns (read and written whole: contiguous, vectorised, one address per vector —
    every other column alone spilled on sm_90), the columns, their mask; rounded and masked as _dh_part."""
    cols = 2 * j0 + tl.arange(0, 2 * WIDTH)
    mask = rmask[:, None] & (cols < 2 * N_ACT)[None, :]
    pair = tl.load(h_ptr + rows64[:, None] * stride_hm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gate, up = tl.split(tl.reshape(pair, (BM, WIDTH, 2)))
    d_gate, d_up = gated_grads(d_act, gate, up, ACT, alpha, limit, up_offset)
    dh = tl.reshape(tl.join(d_gate, d_up), (BM, 2 * WIDTH))
    return tl.where(mask, dh.to(h_ptr.dtype.element_ty).to(tl.float32), 0.0), cols, mask


@triton.jit
def _store_cols_quantised(qt_ptr, qt_scale_ptr, v, h_cols, cmask, t, padded_rows, H_COLS, BM: tl.constexpr):
    """Column-quantise v (the tile's BM rows of dh at natural columns ``h_cols``): each column's scale
    is complete inside the tile, so these are stored at once, transposed at the tile's aligned slots."""
    scale = _scale_of(tl.max(tl.abs(v), 0))
    slots = t.to(tl.int64) * BM + tl.arange(0, BM)
    tl.store(qt_ptr + h_cols.to(tl.int64)[None, :] * padded_rows + slots[:, None], _to_e4m3(v, scale[None, :]),
             mask=cmask[None, :])
    tl.store(qt_scale_ptr + t.to(tl.int64) * H_COLS + h_cols, scale, mask=cmask)


@triton.jit
def _natural_tiles(tile_n, up_col, col_step, BK: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The row-scaling tiles (of dh's natural columns) of activation tile ``tile_n``: its gate columns'
    and its up columns' (interleaved: the two halves of its 256 columns; without a gate, one)."""
    first = (tile_n * BK * col_step) // BK
    second = first
    if INTERLEAVED:
        second = first + 1
    elif GATED:
        second = (up_col + tile_n * BK) // BK
    return first, second


@triton.autotune(configs=_dgrad_configs(), key=["N_ACT", "K", "M_BUCKET", "E", "GATED"],
                 prune_configs_by={"early_config_prune": pruner(_dgrad_footprint, "a_ptr",
                                                                 output_elements=lambda t, args: TILE * TILE)},
                 cache_results=True)
@triton.jit
def _fp8_dgrad_quant_kernel(
    a_ptr, a_scale_ptr,  # the output gradient's rows, row-quantised: e4m3 [R, K], scales [R, KT]
    # FOLDED: A is the tokens' gradient [T, K] instead, row r reading token a_row_index[r] // DIV, and the
    # product of row r is scaled by a_weight[a_row_index[r]] (the routing weight folded into its row scales)
    a_row_index_ptr, num_a_rows, a_weight_ptr,
    b_ptr, stride_be, stride_bn, b_scale_ptr, stride_se, stride_sn, stride_sk,  # W_down transposed e4m3 [E, N_ACT, K]
    h_ptr, stride_hm,  # the saved pre-activation h [R, H_COLS]
    q_ptr, q_scale_ptr, qt_ptr, qt_scale_ptr, padded_rows,  # dh by rows [R, H_COLS] + [R, HT]; by columns (fp8.py)
    offsets_ptr, num_rows, N_ACT, H_COLS, HT, K, KT, M_BUCKET,
    up_col, col_step, alpha, limit, up_offset, ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr,
    FOLDED: tl.constexpr, DIV: tl.constexpr,
    E, E_PAD: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, PARTS: tl.constexpr,
):
    BM: tl.constexpr = BK  # the column quantiser's 128-row tiles
    n_tiles = tl.cdiv(N_ACT, BK)
    e_range, lo_v, hi_v, mt_v, mend_v, gemm_tiles, first_row, last_row, total_tiles = persistent_tiles(
        offsets_ptr, num_rows, n_tiles, E, E_PAD, BM)
    for tile in range(tl.program_id(0), total_tiles, tl.num_programs(0)):
        if tile < gemm_tiles:
            e, rows, rmask, tile_n = expert_tile(tile, n_tiles, e_range, lo_v, hi_v, mt_v, mend_v, BM, GROUP_M)
            # this row tile's index among all experts' (the column quantiser's numbering)
            t = pick(mend_v - mt_v, e_range, e) + (tl.min(rows, 0) - pick(lo_v, e_range, e)) // BM
            j = tile_n * BK + tl.arange(0, BK)
            rows64 = rows.to(tl.int64)
            b_rows = b_ptr + e.to(tl.int64) * stride_be + j.to(tl.int64)[:, None] * stride_bn
            s_b = b_scale_ptr + e.to(tl.int64) * stride_se + tile_n * stride_sn
            if FOLDED:
                a_rows, a_valid = gather_rows(a_row_index_ptr, rows, rmask, num_a_rows, DIV, True)
                acc = fp8_k_steps(a_ptr, a_scale_ptr, a_rows, a_valid, b_rows, j < N_ACT, s_b, s_b, stride_sk, K, KT,
                                  BM, BK, BK, False)
                idx = tl.load(a_row_index_ptr + rows, mask=a_valid, other=0)
                acc = acc * tl.load(a_weight_ptr + idx, mask=a_valid, other=0.0).to(tl.float32)[:, None]
            else:
                acc = fp8_k_steps(a_ptr, a_scale_ptr, rows64, rmask, b_rows, j < N_ACT, s_b, s_b, stride_sk, K, KT,
                                  BM, BK, BK, False)
            # The activation columns in PARTS contiguous parts (part c: columns c·BK/PARTS …): one part's tiles of h
            # live at once (halves, as fp8.py's gated epilogue takes them, spilled 1.7 KB on sm_90 here), and
            # which row-scaling tile a part's values belong to is known at compile time.
            parts = _split_columns(acc, BM, BK, PARTS)
            width: tl.constexpr = BK // PARTS
            amax_a = tl.zeros((BM,), dtype=tl.float32)
            amax_b = tl.zeros((BM,), dtype=tl.float32)
            # Pass 1: the column-quantised dh (each column's scale is complete in this tile) and the rows' amax.
            for c in tl.static_range(PARTS):
                j0 = tile_n * BK + c * width
                if INTERLEAVED:  # the first half of the tile's columns is the first row-scaling tile
                    dh, cols, _ = _dh_pairs(_part(parts, c, PARTS), rows64, rmask, j0, N_ACT, h_ptr, stride_hm, alpha,
                                            limit, up_offset, ACT, BM, width)
                    _store_cols_quantised(qt_ptr, qt_scale_ptr, dh, cols, cols < H_COLS, t, padded_rows, H_COLS, BM)
                    if c < PARTS // 2:
                        amax_a = tl.maximum(amax_a, tl.max(tl.abs(dh), 1))
                    else:
                        amax_b = tl.maximum(amax_b, tl.max(tl.abs(dh), 1))
                else:  # gate columns, then (gated) up columns
                    j = j0 + tl.arange(0, width)
                    d_gate, d_up = _dh_part(_part(parts, c, PARTS), rows64, rmask, j, N_ACT, h_ptr, stride_hm, up_col,
                                            col_step, alpha, limit, up_offset, ACT, GATED)
                    _store_cols_quantised(qt_ptr, qt_scale_ptr, d_gate, j, j < N_ACT, t, padded_rows, H_COLS, BM)
                    amax_a = tl.maximum(amax_a, tl.max(tl.abs(d_gate), 1))
                    if GATED:
                        _store_cols_quantised(qt_ptr, qt_scale_ptr, d_up, j + up_col, j < N_ACT, t, padded_rows,
                                              H_COLS, BM)
                        amax_b = tl.maximum(amax_b, tl.max(tl.abs(d_up), 1))
            s_a = _scale_of(amax_a)
            s_b_rows = _scale_of(amax_b)
            # Pass 2: dh again from the accumulator, row-quantised with the tile's two row scales.
            for c in tl.static_range(PARTS):
                j0 = tile_n * BK + c * width
                if INTERLEAVED:
                    dh, cols, mask = _dh_pairs(_part(parts, c, PARTS), rows64, rmask, j0, N_ACT, h_ptr, stride_hm,
                                               alpha, limit, up_offset, ACT, BM, width)
                    scale = s_a if c < PARTS // 2 else s_b_rows
                    tl.store(q_ptr + rows64[:, None] * H_COLS + cols[None, :], _to_e4m3(dh, scale[:, None]), mask=mask)
                else:
                    j = j0 + tl.arange(0, width)
                    d_gate, d_up = _dh_part(_part(parts, c, PARTS), rows64, rmask, j, N_ACT, h_ptr, stride_hm, up_col,
                                            col_step, alpha, limit, up_offset, ACT, GATED)
                    mask = rmask[:, None] & (j < N_ACT)[None, :]
                    offs = rows64[:, None] * H_COLS + j[None, :]
                    tl.store(q_ptr + offs, _to_e4m3(d_gate, s_a[:, None]), mask=mask)
                    if GATED:
                        tl.store(q_ptr + offs + up_col, _to_e4m3(d_up, s_b_rows[:, None]), mask=mask)
            ta, tb = _natural_tiles(tile_n, up_col, col_step, BK, GATED, INTERLEAVED)
            tl.store(q_scale_ptr + rows64 * HT + ta, s_a, mask=rmask)
            if GATED:
                tl.store(q_scale_ptr + rows64 * HT + tb, s_b_rows, mask=rmask & (rows64 * 0 + tb < HT))
        else:
            # Rows outside every group: dh is zeros there (the separate path's), each row scale 1.
            z = tile - gemm_tiles
            z_rows, z_valid, z_cols = outside_tile(z, n_tiles, first_row, last_row, num_rows, BM, BK)
            zeros = tl.zeros((BM, BK), dtype=tl.float32)
            store_tile(q_ptr, z_rows, z_valid, z_cols, N_ACT, H_COLS, col_step, zeros)
            ones = tl.full((BM,), 1.0, tl.float32)
            ta, tb = _natural_tiles(z % n_tiles, up_col, col_step, BK, GATED, INTERLEAVED)
            tl.store(q_scale_ptr + z_rows * HT + ta, ones, mask=z_valid)
            if GATED:
                store_tile(q_ptr + up_col, z_rows, z_valid, z_cols, N_ACT, H_COLS, col_step, zeros)
                tl.store(q_scale_ptr + z_rows * HT + tb, ones, mask=z_valid & (z_rows * 0 + tb < HT))


def dgrad_quantised(g_q: torch.Tensor, g_s: torch.Tensor, w_qt: torch.Tensor, w_s: torch.Tensor, offsets: torch.Tensor,
                    h: torch.Tensor, activation: Activation, *, folded: Optional[Tuple[torch.Tensor, int, torch.Tensor]] = None):
    """dh of the down projection, never in the layer's dtype: ``(dh e4m3 [R, H], its row scales [R,
    ceil(H/128)], dhᵀ column tiles [H, 128·tiles], their scales [tiles, H])`` — the operands of the up
    projection's dgrad and wgrad (fp8.py's quantize_rows and quantize_cols of dh). ``g_q``/``g_s``: the
    output gradient's rows quantised; ``w_qt`` the down weight's transposed e4m3 ``[E, f, d]`` with the
    forward's block scales ``w_s [E, ceil(d/128), ceil(f/128)]``. With ``folded = (assignment, k, weights)``
    ``g_q``/``g_s`` are the tokens' gradient quantised (T rows) and row r's product is
    ``weights[assignment[r]] · (g[assignment[r] // k] · W)``: the routing weight in the row scale."""
    E, f, K = w_qt.shape
    R, H = h.shape
    if activation.gated and not activation.interleaved and f % TILE:
        raise ValueError(f"dgrad_quantised: with gate and up halves side by side the width f must be a multiple of "
                         f"{TILE} (each up column tile one row-scaling tile of dh), got {f}")
    _, act = activation_layout(H, activation)
    tiles = column_tiles(R, E)
    HT = cdiv(H, TILE)
    q = empty(R, H, dtype=torch.float8_e4m3fn, device=h.device)
    q_s = empty(R, HT, dtype=torch.float32, device=h.device)
    qt = empty(H, tiles * TILE, dtype=torch.float8_e4m3fn, device=h.device)
    qt_s = empty(tiles, H, dtype=torch.float32, device=h.device)
    if R == 0 or f == 0:
        return q, q_s, qt, qt_s
    stride_se, stride_sk, stride_sn = w_s.stride()  # read transposed: (n = f, k = d) is w_s[e, k // 128, n // 128]
    index, div, weights = folded if folded is not None else (offsets, 1, g_s)
    launch(_fp8_dgrad_quant_kernel, _grid(h.device, R, f, E),
           g_q, g_s, index, g_q.shape[0], weights, w_qt, w_qt.stride(0), w_qt.stride(1), w_s, stride_se, stride_sn,
           stride_sk, h, h.stride(0), q, q_s, qt, qt_s, tiles * TILE, offsets, R, f, H, HT, K, cdiv(K, TILE),
           rows_per_expert_bucket(R, E), **act,
           INTERLEAVED=activation.gated and activation.interleaved, FOLDED=folded is not None, DIV=div,
           E=E, E_PAD=next_pow2(E), BK=TILE)
    return q, q_s, qt, qt_s


def _grid(device: torch.device, num_rows: int, act_cols: int, num_groups: int):
    """A persistent grid over tiles of 128 activation columns (rows: each config's BM, 128 without one;
    + a partial tile per group and the rows outside them)."""
    def grid(meta):
        row_tiles = cdiv(num_rows, meta.get("BM", TILE)) + num_groups + 2
        return (persistent_programs(device, row_tiles * cdiv(act_cols, TILE)),)

    return grid


# ---- the moe_mlp_fp8_node op's kernels (ops/fp8_moe_node.py) -------------------------------------------
@register("moe_mlp_fp8_node", applies=fp8_capable)
def moe_mlp_fp8_node_triton(x, weight, w_up, w_down, offsets, src, row, assignment, activation):
    """(tokens out ``[T, d]``, h, the down projection's rows y): quantise the tokens, the up projection
    with act(h) quantised in its epilogue, the down projection from those rows, the weighted combine."""
    offsets = offsets.to(torch.int32)
    x_q, x_s = quantize_rows(x)
    w_q, w_s = cached_weight(w_up, False, quantize_weight_layouts)
    h, a_q, a_s = up_projection_quantised(x_q, x_s, w_q, w_s, offsets, src, activation, x.dtype)
    w_q, w_s = cached_weight(w_down, False, quantize_weight_layouts)
    y = fp8_matmul(a_q, a_s, w_q, w_s, offsets, src.shape[0], x.dtype)
    return combine(y, row, weight), h, y


@register("moe_mlp_fp8_node_backward", applies=fp8_capable)
def moe_mlp_fp8_node_backward_triton(grad_out, x, weight, w_up, w_down, offsets, src, row, assignment, h, y,
                                     activation, folded):
    """(dx ``[T, d]``, d weight ``[T, k]`` fp32, dW_up, dW_down): the combine's input gradient ``w·g[token]``
    read from g by its quantisers, dh quantised in the down projection's dgrad epilogue; ``folded``: the
    dgrad's operand is g quantised per token, the routing weight folded into the row scales."""
    offsets = offsets.to(torch.int32)
    R, k = src.shape[0], row.shape[1]
    grad_weight = rowdot(grad_out, y, row)
    weights = weight.reshape(-1)
    w_qt, w_s = cached_weight(w_down, True, quantize_weight_layouts)
    if folded:
        g_q, g_s = quantize_rows(grad_out)  # each token once (T rows, not R)
        dh_q, dh_s, dh_t, dh_ts = dgrad_quantised(g_q, g_s, w_qt, w_s, offsets, h, activation,
                                                  folded=(assignment, k, weights))
    else:
        g_q, g_s = quantize_rows(grad_out, assignment, div=k, row_weight=weights)
        dh_q, dh_s, dh_t, dh_ts = dgrad_quantised(g_q, g_s, w_qt, w_s, offsets, h, activation)
    del g_q, g_s
    g_t, g_ts = quantize_cols(grad_out, offsets, R, row_index=assignment, div=k, row_weight=weights)
    a_t, a_ts = quantize_cols(h, offsets, R, activation=activation)
    grad_w_down = fp8_wgrad(g_t, g_ts, a_t, a_ts, offsets, R, w_down.dtype)
    del g_t, g_ts, a_t, a_ts
    w_qt, w_s = cached_weight(w_up, True, quantize_weight_layouts)
    grad_rows = fp8_matmul(dh_q, dh_s, w_qt, w_s, offsets, R, x.dtype, b_scale_transposed=True)
    del dh_q, dh_s
    x_t, x_ts = quantize_cols(x, offsets, R, row_index=src)
    grad_w_up = fp8_wgrad(dh_t, dh_ts, x_t, x_ts, offsets, R, w_up.dtype)
    return combine(grad_rows, row, None), grad_weight, grad_w_up, grad_w_down
