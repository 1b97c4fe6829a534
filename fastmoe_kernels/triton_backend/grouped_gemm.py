"""The plain grouped GEMM: ``C[r] = A[r] @ B_e (+ bias_e)`` for the rows r of each expert group e.

One kernel, one job: the product, with C rows optionally written through an index (the fused
scatter of the down projection), and optionally a second A/B pair summed into the same accumulator
(``[A | A2] @ [B; B2]``: the input gradient of a gated MLP). It also writes zeros into the rows that
belong to no group (the ``grouped_gemm`` op's contract). The activation epilogues live in
``up_projection.py`` and ``activation_backward.py``, the weight gradient in ``wgrad.py``.

This file also holds the ``grouped_gemm`` op's triton kernels (forward and weight gradient).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .._alloc import empty
from .._shapes import grouped_gemm_output_width
from ._common import dot_precision, dummy_index, launch, next_pow2, persistent_grid, register, rows_per_expert_bucket
from ._gemm import (expert_tile, grouped_row_span, k_loop, k_loop_tma_b, k_loop_two_ab, matmul_configs, outside_tile,
                    outside_tile_count, pruner, stacked_b_descriptor, staged_tile_bytes, store_tile,
                    store_tile_tma)
from ._jit import gather_rows, group_table
from ._tma import ensure_allocator, tma_args, tma_stack, tma_store_ok
from ._layout import ExpertMatrices, ExpertVectors, packed_cols, packed_rows, packed_vectors, stacked, stacked_vectors
from .wgrad import grouped_wgrad


def _footprint(t, args):
    pairs = 2 if args["DUAL_AB"] else 1  # [A | A2] @ [B; B2] loads two A and two B tiles per step
    return pairs * (t["BM"] * t["BK"] + t["BK"] * t["BN"]), t["BM"] * t["BN"]


_staged_output_bytes = staged_tile_bytes("c_ptr", "C_TMA")  # a TMA store's staging tile, in C's dtype


@triton.autotune(configs=matmul_configs(decode=True), key=["N_OUT", "K_MAX", "M_BUCKET", "E", "DUAL_AB", "C_TMA"],
                 prune_configs_by={"early_config_prune": pruner(_footprint, "a_ptr", staged_bytes=_staged_output_bytes)},
                 cache_results=True)
@triton.jit
def _grouped_matmul_kernel(
    # A [num_rows, ·], rows in group order; with DUAL_AB its columns from a2_col are the second A
    a_ptr, stride_am, stride_ak, a2_col,
    # B_e (and B2_e): expert e's matrix at b_ptr + b_offset[e] (b2_offset[e]), k_size[e] × n_size[e]
    b_ptr, b_offset_ptr, b2_offset_ptr, k_size_ptr, n_size_ptr, stride_bk, stride_bn,
    # with B_TMA: B_e = W[e, tma_row0 : tma_row0 + n_size, :]ᵀ of the stacked weight W [E, tma_rows, tma_cols]
    # at b_ptr (_tma.py)
    tma_rows, tma_cols, tma_stride_e, tma_stride_r, tma_row0,
    bias_ptr, bias_offset_ptr, stride_bias,
    # C: row r goes to row c_row_index[r] (skipped when < 0 or past C's rows) with SCATTER_C, else to row r
    c_ptr, c_row_index_ptr, num_c_rows, stride_cm, stride_cn,
    # groups: expert e owns rows offsets[e]:offsets[e+1] of A
    offsets_ptr, num_rows, N_OUT, K_MAX, M_BUCKET,
    E: tl.constexpr, E_PAD: tl.constexpr,
    B_ALIGN: tl.constexpr, B2_ALIGN: tl.constexpr, K_ALIGN: tl.constexpr, N_ALIGN: tl.constexpr,
    SCATTER_C: tl.constexpr, HAS_BIAS: tl.constexpr, DUAL_AB: tl.constexpr, ZERO_OUTSIDE: tl.constexpr,
    OFFSETS_64: tl.constexpr, PRECISION: tl.constexpr, B_TMA: tl.constexpr, C_TMA: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    e_range, lo_v, hi_v, mt_v, mend_v = group_table(offsets_ptr, num_rows, E, E_PAD, BM)
    if B_TMA:
        b_desc = stacked_b_descriptor(b_ptr, E, tma_rows, tma_cols, tma_stride_e, tma_stride_r, BN, BK)
    if C_TMA:  # (_tma.C_STORES: C contiguous, its rows the groups' own)
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[num_c_rows, N_OUT], strides=[stride_cm, 1],
                                           block_shape=[BM, BN])
    n_tiles = tl.cdiv(N_OUT, BN)
    gemm_tiles = tl.sum(mt_v, 0) * n_tiles
    first_row, last_row = grouped_row_span(offsets_ptr, num_rows, E)
    total_tiles = gemm_tiles
    if ZERO_OUTSIDE:
        total_tiles += outside_tile_count(first_row, last_row, num_rows, n_tiles, BM)
    for tile in range(tl.program_id(0), total_tiles, tl.num_programs(0)):
        if tile < gemm_tiles:
            e, rows, rmask, tile_n = expert_tile(tile, n_tiles, e_range, lo_v, hi_v, mt_v, mend_v, BM, GROUP_M)
            cols = tile_n * BN + tl.arange(0, BN)
            # Sizes and weight offsets are loaded, so the compiler cannot know they are multiples of
            # 8/16; the host checked (_layout.alignment) and says so. Without these hints the operand
            # loads are not vectorised and the K loop is not pipelined. (multiple_of must wrap the
            # load itself: applied to a helper's argument it is lost.)
            k_size = tl.multiple_of(tl.load(k_size_ptr + e), K_ALIGN)
            n_size = tl.multiple_of(tl.load(n_size_ptr + e), N_ALIGN)
            ncol = cols < n_size
            a_row_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am
            b_base = b_ptr + tl.multiple_of(tl.load(b_offset_ptr + e), B_ALIGN)
            # Tiles entirely past this expert's width (heterogeneous experts) only write zeros.
            k_end = tl.where(tile_n * BN < n_size, k_size, 0)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            if DUAL_AB:
                b2_base = b_ptr + tl.multiple_of(tl.load(b2_offset_ptr + e), B2_ALIGN)
                acc = k_loop_two_ab(acc, a_row_ptrs, a2_col, stride_ak, rmask, b_base, b2_base, stride_bk, stride_bn,
                                    cols, ncol, k_end, k_size, PRECISION, BK, OFFSETS_64)
            elif B_TMA:
                acc = k_loop_tma_b(acc, a_row_ptrs, stride_ak, rmask, b_desc, e, tma_row0 + tile_n * BN, k_end, k_size,
                                   PRECISION, BK, BN)
            else:
                acc = k_loop(acc, a_row_ptrs, stride_ak, rmask, b_base, stride_bk, stride_bn, cols, ncol, k_end,
                             k_size, PRECISION, BK, OFFSETS_64)
            if HAS_BIAS:
                bias = tl.load(bias_ptr + tl.load(bias_offset_ptr + e) + cols * stride_bias, mask=ncol, other=0.0)
                acc += bias.to(tl.float32)[None, :]
            # Each branch stores its own tile: with one store after the branches, the sm_90 compile
            # check showed 128×256 tiles at 254 registers and spilling instead of 210 without.
            if C_TMA:
                store_tile_tma(c_desc, c_ptr, rows, rmask, cols, N_OUT, stride_cm, stride_cn, acc, BM)
            else:
                c_rows, c_valid = gather_rows(c_row_index_ptr, rows, rmask, num_c_rows, 1, SCATTER_C)
                store_tile(c_ptr, c_rows, c_valid, cols, N_OUT, stride_cm, stride_cn, acc)
        else:
            # Own names: a variable of both branches must keep one type (the compiler's rule; rows are int32 above).
            z_rows, z_valid, z_cols = outside_tile(tile - gemm_tiles, n_tiles, first_row, last_row, num_rows, BM, BN)
            store_tile(c_ptr, z_rows, z_valid, z_cols, N_OUT, stride_cm, stride_cn, tl.zeros((BM, BN), dtype=tl.float32))



def grouped_matmul(
    a: torch.Tensor,
    mats: ExpertMatrices,
    transpose: bool,
    offsets: torch.Tensor,
    out: torch.Tensor,
    *,
    b: torch.Tensor,
    n_out: int,
    c_row_index: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    bias_vecs: Optional[ExpertVectors] = None,
    second: Optional[ExpertMatrices] = None,
    a2_col: int = 0,
    zero_outside: bool = False,
    num_rows: Optional[int] = None,
) -> torch.Tensor:
    """``out[r] = A[r] @ B_e (+ bias_e)`` for the rows of each group, written in place and returned.

    ``B_e`` is expert e's matrix of ``mats`` inside ``b`` (read transposed when ``transpose``).
    ``c_row_index``: row r is written to row ``c_row_index[r]`` of out (skipped when < 0).
    ``second``: also add ``A[:, a2_col:] @ B2_e`` (B2 = ``second``'s matrices inside ``b``).
    ``zero_outside``: write zeros into the rows outside every group. ``num_rows`` is the grouped row
    count of A (default ``out.shape[0]``).
    """
    E = offsets.shape[0] - 1
    num_rows = out.shape[0] if num_rows is None else num_rows
    if num_rows == 0 or n_out == 0:
        return out
    b_offset, k_size, n_size, stride_bk, stride_bn, k_max, _ = mats.as_b(transpose)
    b_align, k_align, n_align = mats.b_align(transpose)
    b2_offset = b_offset if second is None else second.as_b(transpose)[0]
    b2_align = b_align if second is None else second.b_align(transpose)[0]
    device = a.device
    tma = tma_stack(b, mats, transpose) if second is None else None
    c_tma = c_row_index is None and tma_store_ok(out)
    if (tma is not None or c_tma) and device.type == "cuda":
        ensure_allocator()

    # + 2 row tiles: the rows before the first group and after the last (zero_outside).
    launch(_grouped_matmul_kernel, persistent_grid(device, num_rows, n_out, E, extra_row_tiles=2),
        a_ptr=a, stride_am=a.stride(0), stride_ak=a.stride(1), a2_col=a2_col,
        b_ptr=b, b_offset_ptr=b_offset, b2_offset_ptr=b2_offset, k_size_ptr=k_size, n_size_ptr=n_size,
        stride_bk=stride_bk, stride_bn=stride_bn, **tma_args(tma),
        bias_ptr=bias if bias is not None else out, bias_offset_ptr=bias_vecs.offset if bias_vecs is not None else b_offset,
        stride_bias=bias_vecs.stride if bias_vecs is not None else 0,
        c_ptr=out, c_row_index_ptr=c_row_index if c_row_index is not None else dummy_index(device),
        num_c_rows=out.shape[0], stride_cm=out.stride(0), stride_cn=out.stride(1),
        offsets_ptr=offsets, num_rows=num_rows, N_OUT=n_out, K_MAX=k_max, M_BUCKET=rows_per_expert_bucket(num_rows, E),
        E=E, E_PAD=next_pow2(E), B_ALIGN=b_align, B2_ALIGN=b2_align, K_ALIGN=k_align, N_ALIGN=n_align,
        SCATTER_C=c_row_index is not None, HAS_BIAS=bias is not None, DUAL_AB=second is not None,
        ZERO_OUTSIDE=zero_outside, OFFSETS_64=mats.offsets_64 or (second is not None and second.offsets_64),
        PRECISION=dot_precision(a.dtype), C_TMA=c_tma,
    )
    return out


# ---- the grouped_gemm op's kernels -----------------------------------------------------------------
def op_layout(b: torch.Tensor, trans_b: bool, widths: List[int], packed: str) -> ExpertMatrices:
    """The grouped_gemm op's weight layouts as ExpertMatrices, with the access direction folded in:
    the returned matrices are always read *transposed iff trans_b*."""
    if not packed:
        return stacked(b)
    if packed == "n":
        return packed_rows(b, widths) if trans_b else packed_cols(b, widths)
    return packed_cols(b, widths) if trans_b else packed_rows(b, widths)


def op_bias_layout(bias: torch.Tensor, widths: List[int], packed: str) -> ExpertVectors:
    return packed_vectors(bias, widths) if packed == "n" else stacked_vectors(bias)


@register("grouped_gemm")
def grouped_gemm_triton(a, b, offsets, trans_b, bias, widths, packed):
    # Cast first: the layout describes the tensor the kernel reads (a cast copy has its own strides).
    b = b.to(a.dtype)
    bias = None if bias is None else bias.to(a.dtype)
    n_out = grouped_gemm_output_width(b, trans_b, widths, packed)
    out = empty(a.shape[0], n_out, dtype=a.dtype, device=a.device)
    return grouped_matmul(
        a, op_layout(b, trans_b, widths, packed), trans_b, offsets.to(torch.int32), out, b=b, n_out=n_out,
        bias=bias, bias_vecs=None if bias is None else op_bias_layout(bias, widths, packed), zero_outside=True,
    )


@register("grouped_gemm_wgrad")
def grouped_gemm_wgrad_triton(a, grad, offsets, trans_b, has_bias, widths, packed, b_shape, out_dtype, bias_dtype):
    # The kernel rounds its fp32 sums to the parameters' dtypes as it stores them (one program reduces
    # each element): no fp32 copy of the experts, no cast pass.
    grad_b = empty(b_shape, dtype=out_dtype, device=a.device)
    E = offsets.shape[0] - 1
    grad_bias = bias_vecs = None
    if has_bias:
        grad_bias = empty((sum(widths),) if packed == "n" else (E, grad.shape[1]), dtype=bias_dtype, device=a.device)
        bias_vecs = op_bias_layout(grad_bias, widths, packed)
    grouped_wgrad(a, grad.to(a.dtype), offsets.to(torch.int32), grad_b, op_layout(grad_b, trans_b, widths, packed),
                  trans_b, grad_bias=grad_bias, bias_vecs=bias_vecs)
    return grad_b, grad_bias if grad_bias is not None else grad.new_empty(0, dtype=bias_dtype)
