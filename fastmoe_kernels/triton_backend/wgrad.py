"""The grouped weight gradient: ``dB_e = A_eᵀ · G_e`` per expert, summed in fp32 and stored in dB's dtype.

One program per (output tile, expert) reduces over that expert's rows. Rows of A and G can be read
through an index (the fused gather: neither the permuted x nor the permuted output gradient is
materialised), G can be scaled per row by the routing weight, and A can be the activation
recomputed from its saved input (``act(h_gate) · h_up``) instead of a stored activation. The bias
gradient (the per-expert column sums of G) comes out of the same pass.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import activation_args, cdiv, dot_precision, dummy_index, launch, rows_per_expert_bucket
from ._gemm import b_offsets, pruner, wgrad_configs, wgrad_tile
from ._jit import act_fwd, gather_rows, up_fwd
from ._layout import ExpertMatrices, ExpertVectors


def _footprint(t, args):
    # A [BM, BK] (twice: gate and up of the saved pre-activation when recomputing a gated activation)
    # and G [BM, BN] per step; the [BK, BN] fp32 accumulator, and with ACT_OF_A the fp32 tiles the
    # activation is rebuilt from (in registers: Triton 3.6's sm_90 record showed the 128×256 outputs
    # spilling 112–216 bytes with them, and no other wgrad config spilling).
    a_tiles = 2 if (args["ACT_OF_A"] and args["GATED"]) else 1
    rebuilt = a_tiles * t["BM"] * t["BK"] if args["ACT_OF_A"] else 0
    return a_tiles * t["BM"] * t["BK"] + t["BM"] * t["BN"], t["BK"] * t["BN"] + rebuilt


@triton.autotune(configs=wgrad_configs(), key=["N_MAX", "K_MAX", "M_BUCKET", "E", "ACT_OF_A", "GATED"],
                 prune_configs_by={"early_config_prune": pruner(_footprint, "a_ptr", output_tile=("BK", "BN"))}, cache_results=True)
@triton.jit
def _grouped_wgrad_kernel(
    # A rows: a[a_row_index[r] // A_ROW_DIV] with GATHER_A, else a[r]; with ACT_OF_A, A = act(a) (gated:
    # act(a[:, :up_col]) · a[:, up_col:])
    a_ptr, a_row_index_ptr, num_a_rows, stride_am, stride_ak, up_col,
    # G rows likewise through g_row_index // G_ROW_DIV; with SCALE_G times scale[g_row_index[r]]
    g_ptr, g_row_index_ptr, num_g_rows, stride_gm, stride_gn, scale_ptr, num_scales,
    # dB_e at db_ptr + b_offset[e], k_size[e] × n_size[e]; the bias gradient at dbias + bias_offset[e]
    db_ptr, b_offset_ptr, k_size_ptr, n_size_ptr, stride_bk, stride_bn,
    dbias_ptr, bias_offset_ptr, stride_bias,
    offsets_ptr, num_rows, K_MAX, N_MAX, M_BUCKET,
    alpha, limit, up_offset,  # the activation's parameters, with ACT_OF_A (see _jit.act_fwd, up_fwd)
    E: tl.constexpr, A_ROW_DIV: tl.constexpr, G_ROW_DIV: tl.constexpr,
    B_ALIGN: tl.constexpr, K_ALIGN: tl.constexpr, N_ALIGN: tl.constexpr,
    GATHER_A: tl.constexpr, GATHER_G: tl.constexpr, SCALE_G: tl.constexpr, ACT_OF_A: tl.constexpr,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, OFFSETS_64: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, GROUP_K: tl.constexpr,
):
    e = tl.program_id(1)
    n_tiles = tl.cdiv(N_MAX, BN)
    tile_k, tile_n = wgrad_tile(tl.program_id(0), tl.cdiv(K_MAX, BK), n_tiles, GROUP_K)
    kk = tile_k * BK + tl.arange(0, BK)
    nn = tile_n * BN + tl.arange(0, BN)
    k_size = tl.multiple_of(tl.load(k_size_ptr + e), K_ALIGN)
    n_size = tl.multiple_of(tl.load(n_size_ptr + e), N_ALIGN)
    first_k_tile = tile_k == 0
    # The first K tile runs even for an expert of width 0 (packed along K): its bias gradient is due.
    if (tile_k * BK < k_size or first_k_tile) and tile_n * BN < n_size:
        kmask = kk < k_size
        nmask = nn < n_size
        # Clamped like group_table's ranges: bad offsets give undefined values, never a stray access.
        lo = tl.minimum(tl.maximum(tl.load(offsets_ptr + e), 0), num_rows)
        hi = tl.minimum(tl.maximum(tl.load(offsets_ptr + e + 1), lo), num_rows)
        acc = tl.zeros((BK, BN), dtype=tl.float32)
        bias_acc = tl.zeros((BN,), dtype=tl.float32)
        for m0 in range(lo, hi, BM):
            rows = m0 + tl.arange(0, BM)
            rmask = rows < hi
            a_rows, a_valid = gather_rows(a_row_index_ptr, rows, rmask, num_a_rows, A_ROW_DIV, GATHER_A)
            a_offs = a_rows[:, None] * stride_am + kk[None, :] * stride_ak
            amask = a_valid[:, None] & kmask[None, :]
            if ACT_OF_A:
                # Recompute the activation from its saved input instead of keeping it.
                hg = tl.load(a_ptr + a_offs, mask=amask, other=0.0).to(tl.float32)
                if GATED:
                    hu = tl.load(a_ptr + a_offs + up_col * stride_ak, mask=amask, other=0.0).to(tl.float32)
                    a = (act_fwd(hg, ACT, alpha, limit) * up_fwd(hu, limit, up_offset)).to(a_ptr.dtype.element_ty)
                else:
                    a = act_fwd(hg, ACT, alpha, limit).to(a_ptr.dtype.element_ty)
            else:
                a = tl.load(a_ptr + a_offs, mask=amask, other=0.0)
            g_rows, g_valid = gather_rows(g_row_index_ptr, rows, rmask, num_g_rows, G_ROW_DIV, GATHER_G)
            g = tl.load(g_ptr + g_rows[:, None] * stride_gm + nn[None, :] * stride_gn,
                        mask=g_valid[:, None] & nmask[None, :], other=0.0)
            if SCALE_G:
                s_rows, s_valid = gather_rows(g_row_index_ptr, rows, rmask, num_scales, 1, True)
                w = tl.load(scale_ptr + s_rows, mask=s_valid, other=0.0).to(tl.float32)
                g = (g.to(tl.float32) * w[:, None]).to(g_ptr.dtype.element_ty)
            acc = tl.dot(tl.trans(a), g, acc, input_precision=PRECISION)
            if HAS_BIAS:
                bias_acc += tl.sum(g.to(tl.float32), 0)
        db_base = db_ptr + tl.multiple_of(tl.load(b_offset_ptr + e), B_ALIGN)
        tl.store(db_base + b_offsets(kk, nn, stride_bk, stride_bn, OFFSETS_64), acc.to(db_ptr.dtype.element_ty),
                 mask=kmask[:, None] & nmask[None, :])
        if HAS_BIAS:
            if first_k_tile:
                tl.store(dbias_ptr + tl.load(bias_offset_ptr + e) + nn * stride_bias,
                         bias_acc.to(dbias_ptr.dtype.element_ty), mask=nmask)



def grouped_wgrad(
    a: torch.Tensor,
    g: torch.Tensor,
    offsets: torch.Tensor,
    grad_b: torch.Tensor,
    mats: ExpertMatrices,
    transpose: bool,
    *,
    a_row_index: Optional[torch.Tensor] = None,
    a_row_div: int = 1,
    g_row_index: Optional[torch.Tensor] = None,
    g_row_div: int = 1,
    scale: Optional[torch.Tensor] = None,
    activation_of_a=None,
    up_col: int = 0,
    grad_bias: Optional[torch.Tensor] = None,
    bias_vecs: Optional[ExpertVectors] = None,
) -> None:
    """``grad_b[e] (as B_e) = A_eᵀ · G_e`` summed in fp32 and rounded to grad_b's dtype, written in place (every element of every expert's
    matrix, zeros for empty groups); ``grad_bias[e] = Σ_rows G_e`` when given. ``scale`` (with
    ``g_row_index``) scales G's rows by ``scale[g_row_index[r]]``. ``activation_of_a`` (an
    ``activations.Activation``) makes A that activation recomputed from ``a`` (gate columns, then up
    columns from ``up_col`` when gated)."""
    E = offsets.shape[0] - 1
    act = activation_of_a
    act_args = activation_args(act) if act is not None else dict(ACT=0, alpha=1.0, limit=float("inf"), up_offset=0.0)
    b_offset, k_size, n_size, stride_bk, stride_bn, k_max, n_max = mats.as_b(transpose)
    b_align, k_align, n_align = mats.b_align(transpose)
    device = a.device
    num_rows = a.shape[0] if a_row_index is None else (g.shape[0] if g_row_index is None else g_row_index.shape[0])

    def grid(meta):
        return (cdiv(k_max, meta["BK"]) * cdiv(n_max, meta["BN"]), E)

    launch(_grouped_wgrad_kernel, grid,
        a_ptr=a, a_row_index_ptr=a_row_index if a_row_index is not None else dummy_index(device),
        num_a_rows=a.shape[0], stride_am=a.stride(0), stride_ak=a.stride(1), up_col=up_col,
        g_ptr=g, g_row_index_ptr=g_row_index if g_row_index is not None else dummy_index(device),
        num_g_rows=g.shape[0], stride_gm=g.stride(0), stride_gn=g.stride(1), scale_ptr=scale if scale is not None else g,
        num_scales=scale.numel() if scale is not None else 0,
        db_ptr=grad_b, b_offset_ptr=b_offset, k_size_ptr=k_size, n_size_ptr=n_size,
        stride_bk=stride_bk, stride_bn=stride_bn,
        dbias_ptr=grad_bias if grad_bias is not None else grad_b,
        bias_offset_ptr=bias_vecs.offset if bias_vecs is not None else b_offset,
        stride_bias=bias_vecs.stride if bias_vecs is not None else 0,
        offsets_ptr=offsets, num_rows=num_rows, K_MAX=k_max, N_MAX=n_max, M_BUCKET=rows_per_expert_bucket(num_rows, E),
        E=E, A_ROW_DIV=a_row_div, G_ROW_DIV=g_row_div, B_ALIGN=b_align, K_ALIGN=k_align, N_ALIGN=n_align,
        GATHER_A=a_row_index is not None, GATHER_G=g_row_index is not None, SCALE_G=scale is not None,
        ACT_OF_A=act is not None, GATED=act is not None and act.gated, HAS_BIAS=grad_bias is not None, **act_args,
        OFFSETS_64=mats.offsets_64, PRECISION=dot_precision(a.dtype),
    )
