"""The experts' up projection with the activation in its epilogue.

``out[r] = act(x[src(r)] @ W_gate_eᵀ + b) (· (x[src(r)] @ W_up_eᵀ + b_up) when gated)`` for the rows r
of each expert group e. Rows of x are read through the plan's assignment index (ScatterMoE-style
fused gather: the permuted copy of x is never materialised); gate and up are computed in one pass
over A with two accumulators; the pre-activation ``[gate | up]`` is written to ``h`` only when the
backward needs it.

With ``FASTMOE_C_STORES=tma`` (``_tma.py``) the tiles of act(h) whose rows all belong to their expert
are written by TMA boxes from a device-side 2-D descriptor of out [R, f], which the next tile's K loop
overlaps; an expert's last, partial tile keeps masked pointer stores. ``tma+h`` writes h's gate and up
halves by boxes too (each half its own [R, f] descriptor with h's row stride, so a gate box past f never
reaches the up half). The compiler stages every store through one shared-memory tile (the sm_90 record:
one BM×BN buffer; on the device's Triton 3.6 each store waits for the previous one to *complete*,
``async_tma_store_wait {pendings = 0}``, 3.9 only for it to be read), so with ``tma+h`` a training
tile waits for two write round trips and only act(h) overlaps the next tile. Predicted (the kernel
model, benchmarks/results/model-2026-12-07-latency/): Qwen3's up projection 1.39 → 1.32 ms in the
forward, 1.53 → 1.46 in a training step with ``tma``, ~1.52 with ``tma+h``; in the gated training tiles
``tma+h`` spills nowhere, where pointer stores spill up to 72 B and ``tma`` 24–80 B (the record's table).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import activation_args, dot_precision, launch, next_pow2, persistent_grid, rows_per_expert_bucket
from ._gemm import (expert_tile, k_loop, k_loop_tma_b, k_loop_two_b, k_loop_two_b_tma, matmul_configs, pruner,
                    stacked_b_descriptor, staged_tile_bytes, store_tile_tma)
from ._jit import act_fwd, gather_rows, group_table, up_fwd
from ._layout import ExpertMatrices, ExpertVectors
from ._tma import ensure_allocator, tma_args, tma_h_stores, tma_stack, tma_store_ok


def _footprint(t, args):
    b_tiles = 2 if args["GATED"] else 1  # the gate and up matrices share each A tile
    return t["BM"] * t["BK"] + b_tiles * t["BK"] * t["BN"], b_tiles * t["BM"] * t["BN"]


# The TMA stores' staging tile: one BM×BN buffer for act(h) and h's halves alike (same dtype, and H_TMA
# only with C_TMA: the host's h_tma), as the sm_90 record's shared memory shows (the pipeline's buffers
# plus one tile).
_staged_output_bytes = staged_tile_bytes("out_ptr", "C_TMA")


@triton.autotune(configs=matmul_configs(decode=True), key=["N_OUT", "K_MAX", "M_BUCKET", "E", "GATED", "STORE_H", "C_TMA", "H_TMA"],
                 prune_configs_by={"early_config_prune": pruner(_footprint, "x_ptr", staged_bytes=_staged_output_bytes)},
                 cache_results=True)
@triton.jit
def _up_projection_kernel(
    # A rows: x[x_row_index[r] // X_ROW_DIV] with GATHER_X (nothing where the index is < 0 or past x's
    # rows), else x[r] (rows already in expert order: the composition's permuted x)
    x_ptr, x_row_index_ptr, num_x_rows, stride_xm, stride_xk,
    # expert e's gate (and up) matrix at w_ptr + gate_offset[e] (up_offset[e]), k_size[e] × n_size[e]
    w_ptr, gate_offset_ptr, up_offset_ptr, k_size_ptr, n_size_ptr, stride_wk, stride_wn,
    # with B_TMA: gate_e = W[e, tma_row0 : …]ᵀ, up_e = W[e, tma_up_row0 : …]ᵀ of W [E, tma_rows, tma_cols] (_tma.py)
    tma_rows, tma_cols, tma_stride_e, tma_stride_r, tma_row0, tma_up_row0,
    bias_ptr, gate_bias_offset_ptr, up_bias_offset_ptr, stride_bias,
    out_ptr, stride_om, stride_on,
    # the pre-activation kept for the backward: gate at column n, up at column h_up_col + n
    h_ptr, stride_hm, stride_hn, h_up_col,
    offsets_ptr, num_rows, N_OUT, K_MAX, M_BUCKET,
    alpha, limit, up_offset,  # the activation's parameters (see _jit.act_fwd, up_fwd)
    E: tl.constexpr, E_PAD: tl.constexpr, X_ROW_DIV: tl.constexpr, GATHER_X: tl.constexpr,
    GATE_ALIGN: tl.constexpr, UP_ALIGN: tl.constexpr, K_ALIGN: tl.constexpr, N_ALIGN: tl.constexpr,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_H: tl.constexpr,
    OFFSETS_64: tl.constexpr, PRECISION: tl.constexpr, B_TMA: tl.constexpr, C_TMA: tl.constexpr,
    H_TMA: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    e_range, lo_v, hi_v, mt_v, mend_v = group_table(offsets_ptr, num_rows, E, E_PAD, BM)
    if B_TMA:
        w_desc = stacked_b_descriptor(w_ptr, E, tma_rows, tma_cols, tma_stride_e, tma_stride_r, BN, BK)
    h_up_ptr = h_ptr + h_up_col * stride_hn
    if C_TMA:  # (out, and h with H_TMA, contiguous by rows, unit column stride: the host's tma_store_ok)
        out_desc = tl.make_tensor_descriptor(out_ptr, shape=[num_rows, N_OUT], strides=[stride_om, 1],
                                             block_shape=[BM, BN])
    if H_TMA:  # (only with STORE_H: the host's h_tma) each half its own descriptor: a box past f never
        # reaches the other half
        h_desc = tl.make_tensor_descriptor(h_ptr, shape=[num_rows, N_OUT], strides=[stride_hm, 1],
                                           block_shape=[BM, BN])
        if GATED:
            h_up_desc = tl.make_tensor_descriptor(h_up_ptr, shape=[num_rows, N_OUT], strides=[stride_hm, 1],
                                                  block_shape=[BM, BN])
    n_tiles = tl.cdiv(N_OUT, BN)
    for tile in range(tl.program_id(0), tl.sum(mt_v, 0) * n_tiles, tl.num_programs(0)):
        e, rows, rmask, tile_n = expert_tile(tile, n_tiles, e_range, lo_v, hi_v, mt_v, mend_v, BM, GROUP_M)
        cols = tile_n * BN + tl.arange(0, BN)
        # Alignment hints on the loaded sizes and offsets: see grouped_gemm.py.
        k_size = tl.multiple_of(tl.load(k_size_ptr + e), K_ALIGN)
        n_size = tl.multiple_of(tl.load(n_size_ptr + e), N_ALIGN)
        ncol = cols < n_size
        x_rows, x_valid = gather_rows(x_row_index_ptr, rows, rmask, num_x_rows, X_ROW_DIV, GATHER_X)
        x_row_ptrs = x_ptr + x_rows[:, None] * stride_xm
        gate_base = w_ptr + tl.multiple_of(tl.load(gate_offset_ptr + e), GATE_ALIGN)
        k_end = tl.where(tile_n * BN < n_size, k_size, 0)
        gate = tl.zeros((BM, BN), dtype=tl.float32)
        up = tl.zeros((BM, BN), dtype=tl.float32)
        if B_TMA:
            if GATED:
                gate, up = k_loop_two_b_tma(gate, up, x_row_ptrs, stride_xk, x_valid, w_desc, e, tma_row0 + tile_n * BN,
                                            tma_up_row0 + tile_n * BN, k_end, k_size, PRECISION, BK, BN)
            else:
                gate = k_loop_tma_b(gate, x_row_ptrs, stride_xk, x_valid, w_desc, e, tma_row0 + tile_n * BN, k_end,
                                    k_size, PRECISION, BK, BN)
        elif GATED:
            up_base = w_ptr + tl.multiple_of(tl.load(up_offset_ptr + e), UP_ALIGN)
            gate, up = k_loop_two_b(gate, up, x_row_ptrs, stride_xk, x_valid, gate_base, up_base, stride_wk,
                                    stride_wn, cols, ncol, k_end, k_size, PRECISION, BK, OFFSETS_64)
        else:
            gate = k_loop(gate, x_row_ptrs, stride_xk, x_valid, gate_base, stride_wk, stride_wn, cols, ncol, k_end,
                          k_size, PRECISION, BK, OFFSETS_64)
        if HAS_BIAS:
            bias_base = bias_ptr + cols * stride_bias
            gate += tl.load(bias_base + tl.load(gate_bias_offset_ptr + e), mask=ncol, other=0.0).to(tl.float32)[None, :]
            if GATED:
                up += tl.load(bias_base + tl.load(up_bias_offset_ptr + e), mask=ncol, other=0.0).to(tl.float32)[None, :]
        mask = rmask[:, None] & (cols < N_OUT)[None, :]
        if H_TMA:
            store_tile_tma(h_desc, h_ptr, rows, rmask, cols, N_OUT, stride_hm, stride_hn, gate, BM)
            if GATED:
                store_tile_tma(h_up_desc, h_up_ptr, rows, rmask, cols, N_OUT, stride_hm, stride_hn, up, BM)
        elif STORE_H:
            h_offs = rows.to(tl.int64)[:, None] * stride_hm + cols[None, :] * stride_hn
            tl.store(h_ptr + h_offs, gate.to(h_ptr.dtype.element_ty), mask=mask)
            if GATED:
                tl.store(h_up_ptr + h_offs, up.to(h_ptr.dtype.element_ty), mask=mask)
        out = act_fwd(gate, ACT, alpha, limit)
        if GATED:
            out = out * up_fwd(up, limit, up_offset)
        if C_TMA:
            store_tile_tma(out_desc, out_ptr, rows, rmask, cols, N_OUT, stride_om, stride_on, out, BM)
        else:
            out_offs = rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
            tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def up_projection(
    x: torch.Tensor,
    x_row_index: Optional[torch.Tensor],
    x_row_div: int,
    w: torch.Tensor,
    gate: ExpertMatrices,
    up: Optional[ExpertMatrices],
    offsets: torch.Tensor,
    out: torch.Tensor,
    *,
    activation,
    bias: Optional[torch.Tensor] = None,
    gate_bias: Optional[ExpertVectors] = None,
    up_bias: Optional[ExpertVectors] = None,
    h: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``out [R, f]`` = the ``activation`` (an ``activations.Activation``) of each row's up projection
    (gated when ``up`` is given),
    reading x's rows through ``x_row_index // x_row_div`` (row r itself when None); the pre-activation goes to ``h [R, m·f]``
    (gate columns, then up columns) when given. Written in place and returned."""
    E = offsets.shape[0] - 1
    num_rows, f = out.shape
    if num_rows == 0 or f == 0:
        return out
    gate_offset, k_size, n_size, stride_wk, stride_wn, k_max, _ = gate.as_b(True)
    gate_align, k_align, n_align = gate.b_align(True)
    up_offset = gate_offset if up is None else up.as_b(True)[0]
    up_align = gate_align if up is None else up.b_align(True)[0]
    h_t = h if h is not None else out
    device = x.device
    gate_tma = tma_stack(w, gate, True)
    up_tma = tma_stack(w, up, True) if up is not None else None
    tma = gate_tma if up is None or up_tma is not None else None
    # act(h) by TMA boxes; with tma+h each half of h too (their bases 16-byte aligned: f·size a multiple of 16)
    c_tma = tma_store_ok(out)
    h_tma = (c_tma and h is not None and h.dtype == out.dtype and tma_h_stores() and tma_store_ok(h[:, :f])
             and (up is None or tma_store_ok(h[:, f:])))  # (same dtype: one staging tile serves all three)
    if (tma is not None or c_tma) and device.type == "cuda":
        ensure_allocator()

    launch(_up_projection_kernel, persistent_grid(device, num_rows, f, E),
        x_ptr=x, x_row_index_ptr=x_row_index if x_row_index is not None else offsets, num_x_rows=x.shape[0],
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        w_ptr=w, gate_offset_ptr=gate_offset, up_offset_ptr=up_offset, k_size_ptr=k_size, n_size_ptr=n_size,
        stride_wk=stride_wk, stride_wn=stride_wn, **tma_args(tma),
        tma_up_row0=up_tma.row_start if tma is not None and up_tma is not None else 0,
        bias_ptr=bias if bias is not None else out,
        gate_bias_offset_ptr=gate_bias.offset if gate_bias is not None else gate_offset,
        up_bias_offset_ptr=(up_bias or gate_bias).offset if gate_bias is not None else gate_offset,
        stride_bias=gate_bias.stride if gate_bias is not None else 0,
        out_ptr=out, stride_om=out.stride(0), stride_on=out.stride(1),
        h_ptr=h_t, stride_hm=h_t.stride(0), stride_hn=h_t.stride(1), h_up_col=f,
        offsets_ptr=offsets, num_rows=num_rows, N_OUT=f, K_MAX=k_max, M_BUCKET=rows_per_expert_bucket(num_rows, E),
        E=E, E_PAD=next_pow2(E), X_ROW_DIV=x_row_div, GATHER_X=x_row_index is not None,
        GATE_ALIGN=gate_align, UP_ALIGN=up_align, K_ALIGN=k_align, N_ALIGN=n_align,
        **activation_args(activation), GATED=up is not None, HAS_BIAS=bias is not None, STORE_H=h is not None,
        OFFSETS_64=gate.offsets_64 or (up is not None and up.offsets_64), PRECISION=dot_precision(x.dtype),
        C_TMA=c_tma, H_TMA=h_tma,
    )
    return out
