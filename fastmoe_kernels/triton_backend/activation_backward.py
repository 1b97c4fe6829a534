"""The experts' activation backward, fused into the product that feeds it.

For the rows r of each expert group e, with ``acc = grad_out[src(r)] @ W_down_e`` (the gradient of
the expert's output, before the routing weight, reaching its hidden units):

- ``dh[r] = w_r · acc · act'(h_gate)`` (gated: ``· up_fn(h_up)``, and
  ``dh_up = w_r · acc · act(h_gate) · up_fn'(h_up)``),
  h being the pre-activation saved by the forward and ``w_r`` the routing weight of row r;
- the routing-weight gradient's partial sums ``partial[n, r] = Σ_{cols of N tile n} acc · act(h)``,
  one row per N tile (summed by the host). Rows past the launch's N-tile count are written as zeros,
  so the result does not depend on what an earlier launch (an autotuning run with a narrower tile,
  say) left in the buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import activation_args, dot_precision, launch, next_pow2, persistent_grid, rows_per_expert_bucket
from ._gemm import expert_tile, k_loop, matmul_configs, pruner, smallest_bn
from ._jit import act_fwd, act_grad, gather_rows, group_table, up_fwd, up_grad
from ._layout import ExpertMatrices


def _footprint(t, args):
    # acc, h_gate (and h_up) live together in the epilogue.
    live = 3 if args["GATED"] else 2
    return t["BM"] * t["BK"] + t["BK"] * t["BN"], live * t["BM"] * t["BN"]


@triton.autotune(configs=matmul_configs(), key=["N_OUT", "K_MAX", "M_BUCKET", "E", "GATED"],
                 prune_configs_by={"early_config_prune": pruner(_footprint, "g_ptr")}, cache_results=True)
@triton.jit
def _activation_backward_kernel(
    # A rows: grad_out[g_row_index[r] // G_ROW_DIV]; the routing weight of row r is scale[g_row_index[r]]
    g_ptr, g_row_index_ptr, num_g_rows, stride_gm, stride_gk, scale_ptr, num_scales,
    # B_e = W_down_e read as [d, f_e]
    w_ptr, w_offset_ptr, k_size_ptr, n_size_ptr, stride_wk, stride_wn,
    # the saved pre-activation h [R, m·f] (gate columns, then up columns from up_col) and dh, same layout
    h_ptr, stride_hm, stride_hn, dh_ptr, stride_dm, stride_dn, up_col,
    partial_ptr, stride_partial, num_partials,
    offsets_ptr, num_rows, N_OUT, K_MAX, M_BUCKET,
    alpha, limit, up_offset,  # the activation's parameters (see _jit.act_fwd, up_fwd)
    E: tl.constexpr, E_PAD: tl.constexpr, G_ROW_DIV: tl.constexpr,
    W_ALIGN: tl.constexpr, K_ALIGN: tl.constexpr, N_ALIGN: tl.constexpr,
    ACT: tl.constexpr, GATED: tl.constexpr, OFFSETS_64: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    e_range, lo_v, hi_v, mt_v, mend_v = group_table(offsets_ptr, num_rows, E, E_PAD, BM)
    n_tiles = tl.cdiv(N_OUT, BN)
    for tile in range(tl.program_id(0), tl.sum(mt_v, 0) * n_tiles, tl.num_programs(0)):
        e, rows, rmask, tile_n = expert_tile(tile, n_tiles, e_range, lo_v, hi_v, mt_v, mend_v, BM, GROUP_M)
        cols = tile_n * BN + tl.arange(0, BN)
        # Alignment hints on the loaded sizes and offsets: see grouped_gemm.py.
        k_size = tl.multiple_of(tl.load(k_size_ptr + e), K_ALIGN)
        n_size = tl.multiple_of(tl.load(n_size_ptr + e), N_ALIGN)
        ncol = cols < n_size
        g_rows, g_valid = gather_rows(g_row_index_ptr, rows, rmask, num_g_rows, G_ROW_DIV, True)
        w_base = w_ptr + tl.multiple_of(tl.load(w_offset_ptr + e), W_ALIGN)
        k_end = tl.where(tile_n * BN < n_size, k_size, 0)
        acc = k_loop(tl.zeros((BM, BN), dtype=tl.float32), g_ptr + g_rows[:, None] * stride_gm, stride_gk, g_valid,
                     w_base, stride_wk, stride_wn, cols, ncol, k_end, k_size, PRECISION, BK, OFFSETS_64)
        mask = rmask[:, None] & (cols < N_OUT)[None, :]
        h_offs = rows.to(tl.int64)[:, None] * stride_hm + cols[None, :] * stride_hn
        h_gate = tl.load(h_ptr + h_offs, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            h_up = tl.load(h_ptr + h_offs + up_col * stride_hn, mask=mask, other=0.0).to(tl.float32)
            act = act_fwd(h_gate, ACT, alpha, limit) * up_fwd(h_up, limit, up_offset)
        else:
            act = act_fwd(h_gate, ACT, alpha, limit)
        partial_rows = partial_ptr + rows.to(tl.int64)
        tl.store(partial_rows + tile_n.to(tl.int64) * stride_partial, tl.sum(acc * act, 1), mask=rmask)
        if tile_n == n_tiles - 1:
            tail_rows = partial_rows + n_tiles.to(tl.int64) * stride_partial  # pointer steps: no int32 product
            for _ in range(n_tiles, num_partials):
                tl.store(tail_rows, tl.zeros((BM,), dtype=tl.float32), mask=rmask)
                tail_rows += stride_partial
        s_rows, s_valid = gather_rows(g_row_index_ptr, rows, rmask, num_scales, 1, True)
        d_act = acc * tl.load(scale_ptr + s_rows, mask=s_valid, other=0.0).to(tl.float32)[:, None]
        dh_offs = rows.to(tl.int64)[:, None] * stride_dm + cols[None, :] * stride_dn
        if GATED:
            d_gate = d_act * up_fwd(h_up, limit, up_offset) * act_grad(h_gate, ACT, alpha, limit)
            d_up = d_act * act_fwd(h_gate, ACT, alpha, limit) * up_grad(h_up, limit)
            tl.store(dh_ptr + dh_offs, d_gate.to(dh_ptr.dtype.element_ty), mask=mask)
            tl.store(dh_ptr + dh_offs + up_col * stride_dn, d_up.to(dh_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(dh_ptr + dh_offs, (d_act * act_grad(h_gate, ACT, alpha, limit)).to(dh_ptr.dtype.element_ty), mask=mask)


def partial_rows_needed(f: int) -> int:
    """Rows of the routing-weight partial-sum buffer: one per N tile of the narrowest config."""
    return triton.cdiv(f, smallest_bn(_activation_backward_kernel.configs))


def activation_backward(
    grad_out: torch.Tensor,
    g_row_index: torch.Tensor,
    g_row_div: int,
    scale: torch.Tensor,
    w: torch.Tensor,
    down: ExpertMatrices,
    offsets: torch.Tensor,
    h: torch.Tensor,
    dh: torch.Tensor,
    partial: torch.Tensor,
    *,
    activation,
) -> None:
    """Fill ``dh [R, m·f]`` and ``partial [partial_rows_needed(f), R]`` (see the module docstring) for
    ``activation`` (an ``activations.Activation``); ``down`` describes W_down inside ``w`` (read as
    ``[d, f_e]`` per expert)."""
    gated = activation.gated
    E = offsets.shape[0] - 1
    num_rows = dh.shape[0]
    f = dh.shape[1] // (2 if gated else 1)
    if num_rows == 0 or f == 0:
        return
    w_offset, k_size, n_size, stride_wk, stride_wn, k_max, _ = down.as_b(False)
    w_align, k_align, n_align = down.b_align(False)
    device = grad_out.device

    launch(_activation_backward_kernel, persistent_grid(device, num_rows, f, E),
        g_ptr=grad_out, g_row_index_ptr=g_row_index, num_g_rows=grad_out.shape[0], stride_gm=grad_out.stride(0),
        stride_gk=grad_out.stride(1), scale_ptr=scale, num_scales=scale.numel(),
        w_ptr=w, w_offset_ptr=w_offset, k_size_ptr=k_size, n_size_ptr=n_size, stride_wk=stride_wk, stride_wn=stride_wn,
        h_ptr=h, stride_hm=h.stride(0), stride_hn=h.stride(1), dh_ptr=dh, stride_dm=dh.stride(0), stride_dn=dh.stride(1),
        up_col=f, partial_ptr=partial, stride_partial=partial.stride(0), num_partials=partial.shape[0],
        offsets_ptr=offsets, num_rows=num_rows, N_OUT=f, K_MAX=k_max, M_BUCKET=rows_per_expert_bucket(num_rows, E),
        E=E, E_PAD=next_pow2(E), G_ROW_DIV=g_row_div, W_ALIGN=w_align, K_ALIGN=k_align, N_ALIGN=n_align,
        **activation_args(activation), GATED=gated, OFFSETS_64=down.offsets_64, PRECISION=dot_precision(grad_out.dtype),
    )
