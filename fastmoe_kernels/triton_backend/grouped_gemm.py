"""Persistent grouped GEMM (forward / input-gradient) and its weight gradient.

``grouped_matmul``: ``C[r] = A[r] @ B_e`` for the rows r of each expert group e, with
- A rows read through an index (ScatterMoE-style fused gather: the permuted copy of x is never
  materialised) and C rows written through an index (fused scatter), either optional;
- a bias, and one of three epilogues: plain; activation forward (gated: gate and up computed in the
  same pass from two B matrices, so the ``[R, 2·f]`` pre-activation is written only when the
  backward needs it); activation backward (``dh = act'(h) · w · acc``, with the routing-weight
  gradient ``Σ_n acc · act(h)`` emitted per N tile);
- a second A/B pair summed into the same accumulator (the ``[dgate | dup] @ [Wg; Wu]`` product of
  heterogeneous gated experts).

One launch covers all experts: programs loop over a tile list built in the kernel from the group
offsets (persistent scheduling), so many small experts still fill the GPU and no host sync is
needed. ``grouped_wgrad``: ``dB_e = A_eᵀ G_e`` per expert (one program per expert × output tile).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .._alloc import empty

from ..ops.grouped_gemm import output_width
from ._common import dot_precision, interpreted, next_pow2, persistent_programs, register
from ._jit import act_fwd, act_grad, gather_rows, group_table, pick
from ._layout import ExpertMatrices, ExpertVectors, packed_cols, packed_rows, packed_vectors, stacked, stacked_vectors


def _configs(kind: str):
    if interpreted():
        return [triton.Config({"BM": 16, "BN": 16, "BK": 16}, num_warps=1)]
    if kind == "fwd":
        # Hopper-sized tiles first; smaller ones for small groups (fine-grained MoE) and narrow N.
        shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                  (64, 64, 64, 4, 4), (64, 256, 64, 8, 3), (32, 128, 64, 4, 4)]
        return [triton.Config({"BM": m, "BN": n, "BK": k}, num_warps=w, num_stages=s) for m, n, k, w, s in shapes]
    shapes = [(64, 128, 128, 8, 3), (64, 64, 128, 4, 4), (32, 128, 64, 4, 4), (64, 128, 64, 4, 3), (64, 64, 64, 4, 4)]
    return [triton.Config({"BM": m, "BK": k, "BN": n}, num_warps=w, num_stages=s) for m, k, n, w, s in shapes]


def _prune_fwd(configs, named_args, **kwargs):
    """Drop tiles whose fp32 accumulators alone need more than 128 registers per thread (two
    accumulators when gate and up are computed together): they spill (sm_90 compile check)."""
    accumulators = 2 if kwargs.get("SECOND_B") == 1 else 1
    kept = [c for c in configs
            if accumulators * c.kwargs["BM"] * c.kwargs["BN"] <= 128 * 32 * c.num_warps]
    return kept or configs[-1:]


@triton.autotune(configs=_configs("fwd"), key=["N_OUT", "K_MAX", "M_BUCKET", "E"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _grouped_matmul_kernel(
    a_ptr, a_index_ptr, stride_am, stride_ak, A_UP,
    b_ptr, b_off_ptr, b2_off_ptr, k_size_ptr, n_size_ptr, stride_bk, stride_bn,
    bias_ptr, bias_off_ptr, bias2_off_ptr, stride_biasn,
    c_ptr, c_index_ptr, stride_cm, stride_cn,
    h_ptr, stride_hm, stride_hn, UP_COL,
    scale_ptr, scale_index_ptr, partial_ptr, stride_pt,
    offsets_ptr, R, N_OUT, K_MAX, M_BUCKET,
    E: tl.constexpr, E_PAD: tl.constexpr, A_DIV: tl.constexpr,
    B_ALIGN: tl.constexpr, B2_ALIGN: tl.constexpr, K_ALIGN: tl.constexpr, N_ALIGN: tl.constexpr,
    A_INDEXED: tl.constexpr, C_INDEXED: tl.constexpr, HAS_BIAS: tl.constexpr, SECOND_B: tl.constexpr,
    EPI: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, H_STORE: tl.constexpr, ZERO_OUTSIDE: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    e_range, lo_v, mt_v, mend_v = group_table(offsets_ptr, E, E_PAD, BM)
    n_tiles = tl.cdiv(N_OUT, BN)
    gemm_tiles = tl.sum(mt_v, 0) * n_tiles
    first_row = tl.load(offsets_ptr)
    last_row = tl.load(offsets_ptr + E)
    total_tiles = gemm_tiles
    if ZERO_OUTSIDE:
        total_tiles += (tl.cdiv(first_row, BM) + tl.cdiv(R - last_row, BM)) * n_tiles
    for tile in range(pid, total_tiles, num_programs):
        tile_n = tile % n_tiles
        cols = tile_n * BN + tl.arange(0, BN)
        if tile < gemm_tiles:
            tile_m = tile // n_tiles
            e = tl.sum((mend_v <= tile_m).to(tl.int32), 0)
            rows = pick(lo_v, e_range, e) + (tile_m - pick(mend_v - mt_v, e_range, e)) * BM + tl.arange(0, BM)
            rmask = rows < tl.load(offsets_ptr + e + 1)
            # Per-expert sizes and weight offsets are loaded, so the compiler cannot know they are
            # multiples of 8/16; the host checked (_layout.alignment) and says so. Without these
            # hints the operand loads are not vectorised and the K loop is not pipelined.
            # (multiple_of must wrap the load itself: on a helper's argument it is lost.)
            k_e = tl.multiple_of(tl.load(k_size_ptr + e), K_ALIGN)
            n_e = tl.multiple_of(tl.load(n_size_ptr + e), N_ALIGN)
            ncol = cols < n_e
            a_rows, a_valid = gather_rows(a_index_ptr, rows, rmask, A_DIV, A_INDEXED)
            a_base = a_ptr + a_rows[:, None] * stride_am
            b_base = b_ptr + tl.multiple_of(tl.load(b_off_ptr + e), B_ALIGN)
            b2_base = b_ptr + tl.multiple_of(tl.load(b2_off_ptr + e), B2_ALIGN)
            # Tiles entirely past this expert's width (heterogeneous experts) only write zeros.
            k_loop = tl.where(tile_n * BN < n_e, k_e, 0)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            acc2 = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, k_loop, BK):
                kk = k0 + tl.arange(0, BK)
                kmask = kk < k_e
                a = tl.load(a_base + kk[None, :] * stride_ak, mask=a_valid[:, None] & kmask[None, :], other=0.0)
                b_offs = kk[:, None] * stride_bk + cols[None, :] * stride_bn
                bmask = kmask[:, None] & ncol[None, :]
                b = tl.load(b_base + b_offs, mask=bmask, other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                if SECOND_B == 1:  # gate and up: two accumulators over the same A
                    b2 = tl.load(b2_base + b_offs, mask=bmask, other=0.0)
                    acc2 = tl.dot(a, b2, acc2, input_precision=PRECISION)
                if SECOND_B == 2:  # [A | A2] @ [B; B2] into one accumulator
                    a2 = tl.load(a_base + (A_UP + kk[None, :]) * stride_ak, mask=a_valid[:, None] & kmask[None, :], other=0.0)
                    b2 = tl.load(b2_base + b_offs, mask=bmask, other=0.0)
                    acc = tl.dot(a2, b2, acc, input_precision=PRECISION)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + tl.load(bias_off_ptr + e) + cols * stride_biasn, mask=ncol, other=0.0).to(tl.float32)[None, :]
                if SECOND_B == 1:
                    acc2 += tl.load(bias_ptr + tl.load(bias2_off_ptr + e) + cols * stride_biasn, mask=ncol, other=0.0).to(tl.float32)[None, :]
            out = acc
            out2 = acc2
            hmask = rmask[:, None] & (cols < N_OUT)[None, :]
            h_offs = rows.to(tl.int64)[:, None] * stride_hm + cols[None, :] * stride_hn
            if EPI == 1:
                # Activation forward; keep the activation input for the backward only when asked.
                if H_STORE:
                    tl.store(h_ptr + h_offs, acc.to(h_ptr.dtype.element_ty), mask=hmask)
                    if GATED:
                        tl.store(h_ptr + h_offs + UP_COL * stride_hn, acc2.to(h_ptr.dtype.element_ty), mask=hmask)
                if GATED:
                    out = act_fwd(acc, ACT) * acc2
                else:
                    out = act_fwd(acc, ACT)
            elif EPI == 2:
                # Activation backward: acc = g·W (unweighted), h = the saved activation input.
                hg = tl.load(h_ptr + h_offs, mask=hmask, other=0.0).to(tl.float32)
                if GATED:
                    hu = tl.load(h_ptr + h_offs + UP_COL * stride_hn, mask=hmask, other=0.0).to(tl.float32)
                    act = act_fwd(hg, ACT) * hu
                else:
                    act = act_fwd(hg, ACT)
                tl.store(partial_ptr + tile_n * stride_pt + rows, tl.sum(acc * act, 1), mask=rmask)
                s_rows, s_valid = gather_rows(scale_index_ptr, rows, rmask, 1, True)
                da = acc * tl.load(scale_ptr + s_rows, mask=s_valid, other=0.0).to(tl.float32)[:, None]
                if GATED:
                    out = da * hu * act_grad(hg, ACT)
                    out2 = da * act_fwd(hg, ACT)
                else:
                    out = da * act_grad(hg, ACT)
            c_rows, c_valid = gather_rows(c_index_ptr, rows, rmask, 1, C_INDEXED)
            cmask = c_valid[:, None] & (cols < N_OUT)[None, :]
            c_offs = c_rows[:, None] * stride_cm + cols[None, :] * stride_cn
            tl.store(c_ptr + c_offs, out.to(c_ptr.dtype.element_ty), mask=cmask)
            if EPI == 2 and GATED:
                tl.store(c_ptr + c_offs + UP_COL * stride_cn, out2.to(c_ptr.dtype.element_ty), mask=cmask)
        else:
            # Rows that belong to no group are zeros (the op's contract).
            z_m = (tile - gemm_tiles) // n_tiles
            head = tl.cdiv(first_row, BM)
            if z_m < head:
                rows = z_m * BM + tl.arange(0, BM)
                rmask = rows < first_row
            else:
                rows = last_row + (z_m - head) * BM + tl.arange(0, BM)
                rmask = rows < R
            zmask = rmask[:, None] & (cols < N_OUT)[None, :]
            c_offs = rows.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn
            tl.store(c_ptr + c_offs, tl.zeros((BM, BN), dtype=c_ptr.dtype.element_ty), mask=zmask)


@triton.autotune(configs=_configs("wgrad"), key=["N_MAX", "K_MAX", "M_BUCKET", "E"])
@triton.jit
def _grouped_wgrad_kernel(
    a_ptr, a_index_ptr, stride_am, stride_ak, UP_COL,
    g_ptr, g_index_ptr, stride_gm, stride_gn, scale_ptr,
    db_ptr, b_off_ptr, k_size_ptr, n_size_ptr, stride_bk, stride_bn,
    dbias_ptr, bias_off_ptr, stride_biasn,
    offsets_ptr, K_MAX, N_MAX, M_BUCKET,
    E: tl.constexpr, A_DIV: tl.constexpr, G_DIV: tl.constexpr,
    B_ALIGN: tl.constexpr, K_ALIGN: tl.constexpr, N_ALIGN: tl.constexpr,
    A_INDEXED: tl.constexpr, G_INDEXED: tl.constexpr, G_SCALED: tl.constexpr,
    A_ACT: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
):
    e = tl.program_id(0)
    tile = tl.program_id(1)
    n_tiles = tl.cdiv(N_MAX, BN)
    kk = (tile // n_tiles) * BK + tl.arange(0, BK)
    nn = (tile % n_tiles) * BN + tl.arange(0, BN)
    k_e = tl.multiple_of(tl.load(k_size_ptr + e), K_ALIGN)
    n_e = tl.multiple_of(tl.load(n_size_ptr + e), N_ALIGN)
    if (tile // n_tiles) * BK < k_e and (tile % n_tiles) * BN < n_e:
        kmask = kk < k_e
        nmask = nn < n_e
        lo = tl.load(offsets_ptr + e)
        hi = tl.load(offsets_ptr + e + 1)
        acc = tl.zeros((BK, BN), dtype=tl.float32)
        bias_acc = tl.zeros((BN,), dtype=tl.float32)
        for m0 in range(lo, hi, BM):
            rows = m0 + tl.arange(0, BM)
            rmask = rows < hi
            a_rows, a_valid = gather_rows(a_index_ptr, rows, rmask, A_DIV, A_INDEXED)
            a_offs = a_rows[:, None] * stride_am + kk[None, :] * stride_ak
            amask = a_valid[:, None] & kmask[None, :]
            if A_ACT:
                # Recompute the activation from its saved input instead of keeping it.
                hg = tl.load(a_ptr + a_offs, mask=amask, other=0.0).to(tl.float32)
                if GATED:
                    hu = tl.load(a_ptr + a_offs + UP_COL * stride_ak, mask=amask, other=0.0).to(tl.float32)
                    a = (act_fwd(hg, ACT) * hu).to(a_ptr.dtype.element_ty)
                else:
                    a = act_fwd(hg, ACT).to(a_ptr.dtype.element_ty)
            else:
                a = tl.load(a_ptr + a_offs, mask=amask, other=0.0)
            g_rows, g_valid = gather_rows(g_index_ptr, rows, rmask, G_DIV, G_INDEXED)
            g = tl.load(g_ptr + g_rows[:, None] * stride_gm + nn[None, :] * stride_gn,
                        mask=g_valid[:, None] & nmask[None, :], other=0.0)
            if G_SCALED:
                s_rows, s_valid = gather_rows(g_index_ptr, rows, rmask, 1, True)
                w = tl.load(scale_ptr + s_rows, mask=s_valid, other=0.0).to(tl.float32)
                g = (g.to(tl.float32) * w[:, None]).to(g_ptr.dtype.element_ty)
            acc = tl.dot(tl.trans(a), g, acc, input_precision=PRECISION)
            if HAS_BIAS:
                bias_acc += tl.sum(g.to(tl.float32), 0)
        tl.store(db_ptr + tl.multiple_of(tl.load(b_off_ptr + e), B_ALIGN) + kk[:, None] * stride_bk + nn[None, :] * stride_bn, acc,
                 mask=kmask[:, None] & nmask[None, :])
        if HAS_BIAS:
            if tile // n_tiles == 0:
                tl.store(dbias_ptr + tl.load(bias_off_ptr + e) + nn * stride_biasn, bias_acc, mask=nmask)


def _empty_i32(device):
    return empty(0, dtype=torch.int32, device=device)


def grouped_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    mats: ExpertMatrices,
    transpose: bool,
    offsets: torch.Tensor,
    out: torch.Tensor,
    *,
    n_out: int,
    a_index: Optional[torch.Tensor] = None,
    a_div: int = 1,
    c_index: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    vecs: Optional[ExpertVectors] = None,
    mats2: Optional[ExpertMatrices] = None,
    vecs2: Optional[ExpertVectors] = None,
    second_b: int = 0,
    a_up_col: int = 0,
    epilogue: int = 0,
    act: int = 0,
    gated: bool = False,
    h: Optional[torch.Tensor] = None,
    up_col: int = 0,
    store_h: bool = False,
    scale: Optional[torch.Tensor] = None,
    scale_index: Optional[torch.Tensor] = None,
    partial: Optional[torch.Tensor] = None,
    zero_outside: bool = False,
    num_rows: Optional[int] = None,
) -> torch.Tensor:
    """Launch the grouped matmul; ``out`` is written in place and returned.

    ``B_e`` is expert e's matrix of ``mats`` (transposed when ``transpose``). ``second_b`` = 1 adds
    a second accumulator over ``mats2`` (gate and up), 2 adds ``A[:, a_up_col:] @ B2_e`` to the
    same accumulator. ``epilogue`` 0: plain, 1: activation ``act`` (``gated``: act(acc)·acc2; stores
    the activation input into ``h`` when ``store_h``), 2: activation backward against ``h``
    (``scale[scale_index[r]]`` per row; per-N-tile row sums of acc·act(h) into ``partial``).
    ``num_rows`` is R, the grouped row count (defaults to ``out.shape[0]``).
    """
    E = offsets.shape[0] - 1
    R = out.shape[0] if num_rows is None else num_rows
    device = a.device
    if R == 0:
        return out
    b_off, k_size, n_size, s_bk, s_bn, k_max, _ = mats.as_b(transpose)
    b_align, k_align, n_align = mats.b_align(transpose)
    b2_off = b_off if mats2 is None else mats2.as_b(transpose)[0]
    b2_align = b_align if mats2 is None else mats2.b_align(transpose)[0]
    dummy = _empty_i32(device)
    h_t = h if h is not None else out

    def grid(meta):
        max_tiles = (triton.cdiv(R, meta["BM"]) + E + 2) * triton.cdiv(n_out, meta["BN"])
        return (persistent_programs(device, max_tiles),)

    _grouped_matmul_kernel[grid](
        a, a_index if a_index is not None else dummy, a.stride(0), a.stride(1), a_up_col,
        b, b_off, b2_off, k_size, n_size, s_bk, s_bn,
        bias if bias is not None else out, vecs.offset if vecs is not None else b_off,
        (vecs2 or vecs).offset if vecs is not None else b_off, vecs.stride if vecs is not None else 0,
        out, c_index if c_index is not None else dummy, out.stride(0), out.stride(1),
        h_t, h_t.stride(0), h_t.stride(1), up_col,
        scale if scale is not None else out, scale_index if scale_index is not None else dummy,
        partial if partial is not None else out, partial.stride(0) if partial is not None else 0,
        offsets, R, n_out, k_max, next_pow2(max(1, R // E)),
        E=E, E_PAD=next_pow2(E), A_DIV=a_div,
        B_ALIGN=b_align, B2_ALIGN=b2_align, K_ALIGN=k_align, N_ALIGN=n_align,
        A_INDEXED=a_index is not None, C_INDEXED=c_index is not None, HAS_BIAS=bias is not None, SECOND_B=second_b,
        EPI=epilogue, ACT=act, GATED=gated, H_STORE=store_h, ZERO_OUTSIDE=zero_outside,
        PRECISION=dot_precision(a.dtype),
    )
    return out


def grouped_wgrad(
    a: torch.Tensor,
    g: torch.Tensor,
    offsets: torch.Tensor,
    grad_b: torch.Tensor,
    mats: ExpertMatrices,
    transpose: bool,
    *,
    a_index: Optional[torch.Tensor] = None,
    a_div: int = 1,
    g_index: Optional[torch.Tensor] = None,
    g_div: int = 1,
    scale: Optional[torch.Tensor] = None,
    a_act: int = 0,
    gated: bool = False,
    up_col: int = 0,
    grad_bias: Optional[torch.Tensor] = None,
    vecs: Optional[ExpertVectors] = None,
) -> None:
    """``grad_b[e] (as B_e) = A_eᵀ · G_e`` in fp32, written in place (every element of every
    expert's matrix, zeros for empty groups); ``grad_bias[e] = Σ_rows G_e`` when given."""
    E = offsets.shape[0] - 1
    b_off, k_size, n_size, s_bk, s_bn, k_max, n_max = mats.as_b(transpose)
    b_align, k_align, n_align = mats.b_align(transpose)
    dummy = _empty_i32(a.device)
    R = a.shape[0] if a_index is None else (g.shape[0] if g_index is None else g_index.shape[0])

    def grid(meta):
        return (E, triton.cdiv(k_max, meta["BK"]) * triton.cdiv(n_max, meta["BN"]))

    _grouped_wgrad_kernel[grid](
        a, a_index if a_index is not None else dummy, a.stride(0), a.stride(1), up_col,
        g, g_index if g_index is not None else dummy, g.stride(0), g.stride(1), scale if scale is not None else g,
        grad_b, b_off, k_size, n_size, s_bk, s_bn,
        grad_bias if grad_bias is not None else grad_b, vecs.offset if vecs is not None else b_off,
        vecs.stride if vecs is not None else 0,
        offsets, k_max, n_max, next_pow2(max(1, R // max(E, 1))),
        E=E, A_DIV=a_div, G_DIV=g_div, B_ALIGN=b_align, K_ALIGN=k_align, N_ALIGN=n_align,
        A_INDEXED=a_index is not None, G_INDEXED=g_index is not None, G_SCALED=scale is not None,
        A_ACT=a_act, ACT=a_act, GATED=gated, HAS_BIAS=grad_bias is not None,
        PRECISION=dot_precision(a.dtype),
    )


# ---- the grouped_gemm op's kernels ---------------------------------------------------------
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
    mats = op_layout(b, trans_b, widths, packed)
    n_out = output_width(a, b, trans_b, widths, packed)
    out = empty(a.shape[0], n_out, dtype=a.dtype, device=a.device)
    b = b.to(a.dtype)
    bias_c = None if bias is None else bias.to(a.dtype)
    return grouped_matmul(
        a, b, mats, trans_b, offsets.to(torch.int32), out, n_out=n_out,
        bias=bias_c, vecs=None if bias is None else op_bias_layout(bias_c, widths, packed), zero_outside=True,
    )


@register("grouped_gemm_wgrad")
def grouped_gemm_wgrad_triton(a, grad, offsets, trans_b, has_bias, widths, packed, b_shape):
    grad_b = empty(b_shape, dtype=torch.float32, device=a.device)
    mats = op_layout(grad_b, trans_b, widths, packed)
    E = offsets.shape[0] - 1
    grad_bias = None
    vecs = None
    if has_bias:
        grad_bias = empty((sum(widths),) if packed == "n" else (E, grad.shape[1]), dtype=torch.float32, device=a.device)
        vecs = op_bias_layout(grad_bias, widths, packed)
    grouped_wgrad(a, grad.to(a.dtype), offsets.to(torch.int32), grad_b, mats, trans_b, grad_bias=grad_bias, vecs=vecs)
    return grad_b, grad_bias if grad_bias is not None else grad.new_empty(0, dtype=torch.float32)
