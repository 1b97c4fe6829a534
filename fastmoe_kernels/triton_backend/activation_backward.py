"""The experts' activation backward (dH), fused into the product that feeds it.

For the rows r of each expert group e, with ``acc = G[r] @ W_down_e`` (G[r] = ``grad_out[src(r)]`` read
through an index, or the r-th row of a contiguous gradient; the gradient of the expert's output,
before the routing weight, reaching its hidden units):

- ``dh[r] = w_r · acc · act'(h_gate)`` (gated: ``· up_fn(h_up)``, and
  ``dh_up = w_r · acc · act(h_gate) · up_fn'(h_up)``),
  h being the pre-activation saved by the forward and ``w_r`` the routing weight of row r (1 without
  scales: the composition's down projection has none);
- optionally the routing-weight gradient's partial sums ``partial[n, r] = Σ_{cols of N tile n} acc · act(h)``,
  one row per N tile (summed by the host). Rows past the launch's N-tile count are written as zeros,
  so the result does not depend on what an earlier launch (an autotuning run with a narrower tile,
  say) left in the buffer;
- optionally the activation itself, ``a[r] = act(h)`` or ``A_s[r] = w_r · act(h)`` (the down
  projection's weight gradient then reads plain rows, instead of rebuilding the activation and scaling
  G in registers per output tile: 85 TFLOP/s on the first H100 run).

dh is written in any column layout (``dh_up_col``, ``dh_col_step``): [gate | up], or interleaved like
gpt-oss's weights so that the input gradient and the up projection's weight gradient are one plain
GEMM over 2f each.

The epilogue runs over the whole tile, or (``SPLIT``) over its even and then its odd columns: the
whole tile keeps acc, h_gate and h_up live at once (3·BM·BN fp32: at most 64×64 tiles without
spilling, 173–204 TFLOP/s on the first H100 run); split, half of h lives at a time (2·BM·BN, so
128×128 fits 8 warps), and the split is free, each thread holding pairs of adjacent accumulator
columns (the fp8 dgrad does the same).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._variants import flag
from ._common import activation_args, cdiv, dot_precision, dummy_index, launch, next_pow2, persistent_grid, rows_per_expert_bucket
from ._gemm import expert_tile, k_loop, matmul_configs, pruner, smallest_bn
from ._jit import act_fwd, act_grad, gated_grads, gather_rows, group_table, up_fwd
from ._layout import ExpertMatrices

# The epilogue over the whole tile ("whole", the kernel the first H100 run measured) or over its even
# and odd columns ("split"); unset, each caller keeps its own default (see moe_mlp.py). Read once.
EPILOGUE = flag("FASTMOE_DH_EPILOGUE", "", ("", "whole", "split"))  # "": each caller's own default


def epilogue_split(default: bool) -> bool:
    """Whether the dH epilogue is split (FASTMOE_DH_EPILOGUE, else the caller's ``default``)."""
    return default if not EPILOGUE else EPILOGUE == "split"


def _footprint(t, args):
    # acc and the h tiles live together in the epilogue: h_gate and h_up over the whole tile, or half
    # of each with the split.
    h_tiles = 2 if args["GATED"] else 1
    live = 1 + (h_tiles / 2 if args["SPLIT"] else h_tiles)
    return t["BM"] * t["BK"] + t["BK"] * t["BN"], int(live * t["BM"] * t["BN"])


@triton.jit
def _dh_columns(acc, w_row, rows64, rmask, cols, N_OUT, h_ptr, stride_hm, stride_hn, h_up_col,
                dh_ptr, stride_dm, stride_dn, dh_up_off, a_ptr, stride_am, alpha, limit, up_offset,
                ACT: tl.constexpr, GATED: tl.constexpr, WRITE_A: tl.constexpr, A_SCALED: tl.constexpr):
    """The epilogue on the columns ``cols`` of one tile (``acc`` holds them): stores dh (and a), returns
    the per-row sums of acc · act(h) over these columns."""
    mask = rmask[:, None] & (cols < N_OUT)[None, :]
    h_offs = rows64[:, None] * stride_hm + cols[None, :] * stride_hn
    h_gate = tl.load(h_ptr + h_offs, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        h_up = tl.load(h_ptr + h_offs + h_up_col * stride_hn, mask=mask, other=0.0).to(tl.float32)
        act = act_fwd(h_gate, ACT, alpha, limit) * up_fwd(h_up, limit, up_offset)
    else:
        act = act_fwd(h_gate, ACT, alpha, limit)
    row_sums = tl.sum(acc * act, 1)
    if WRITE_A:
        a_val = act * w_row[:, None] if A_SCALED else act
        tl.store(a_ptr + rows64[:, None] * stride_am + cols[None, :], a_val.to(a_ptr.dtype.element_ty), mask=mask)
    d_act = acc * w_row[:, None]
    dh_offs = rows64[:, None] * stride_dm + cols[None, :] * stride_dn
    if GATED:
        d_gate, d_up = gated_grads(d_act, h_gate, h_up, ACT, alpha, limit, up_offset)
        tl.store(dh_ptr + dh_offs, d_gate.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + dh_offs + dh_up_off, d_up.to(dh_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(dh_ptr + dh_offs, (d_act * act_grad(h_gate, ACT, alpha, limit)).to(dh_ptr.dtype.element_ty), mask=mask)
    return row_sums


# The autotuner's arguments, shared by the kernel and its in-place launch (below).
_AUTOTUNE = dict(configs=matmul_configs(), key=["N_OUT", "K_MAX", "M_BUCKET", "E", "GATED", "SPLIT"],
                 prune_configs_by={"early_config_prune": pruner(_footprint, "g_ptr")}, cache_results=True)


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _activation_backward_kernel(
    # G rows: grad_out[g_row_index[r] // G_ROW_DIV] with GATHER_G, else grad_out[r]; with SCALED the
    # routing weight of row r is scale[g_row_index[r]]
    g_ptr, g_row_index_ptr, num_g_rows, stride_gm, stride_gk, scale_ptr, num_scales,
    # B_e = W_down_e read as [d, f_e]
    w_ptr, w_offset_ptr, k_size_ptr, n_size_ptr, stride_wk, stride_wn,
    # the saved pre-activation h [R, ·] (gate column c at c·stride_hn, its up column h_up_col columns
    # later) and dh (gate column c at c·stride_dn, its up column dh_up_off elements later)
    h_ptr, stride_hm, stride_hn, h_up_col, dh_ptr, stride_dm, stride_dn, dh_up_off,
    # with WRITE_A: a [R, f] (contiguous columns) receives act(h), times w_r with A_SCALED
    a_ptr, stride_am,
    partial_ptr, stride_partial, num_partials,
    offsets_ptr, num_rows, N_OUT, K_MAX, M_BUCKET,
    alpha, limit, up_offset,  # the activation's parameters (see _jit.act_fwd, up_fwd)
    E: tl.constexpr, E_PAD: tl.constexpr, G_ROW_DIV: tl.constexpr,
    W_ALIGN: tl.constexpr, K_ALIGN: tl.constexpr, N_ALIGN: tl.constexpr,
    ACT: tl.constexpr, GATED: tl.constexpr, GATHER_G: tl.constexpr, SCALED: tl.constexpr,
    PARTIALS: tl.constexpr, WRITE_A: tl.constexpr, A_SCALED: tl.constexpr, SPLIT: tl.constexpr,
    OFFSETS_64: tl.constexpr, PRECISION: tl.constexpr,
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
        g_rows, g_valid = gather_rows(g_row_index_ptr, rows, rmask, num_g_rows, G_ROW_DIV, GATHER_G)
        w_base = w_ptr + tl.multiple_of(tl.load(w_offset_ptr + e), W_ALIGN)
        k_end = tl.where(tile_n * BN < n_size, k_size, 0)
        acc = k_loop(tl.zeros((BM, BN), dtype=tl.float32), g_ptr + g_rows[:, None] * stride_gm, stride_gk, g_valid,
                     w_base, stride_wk, stride_wn, cols, ncol, k_end, k_size, PRECISION, BK, OFFSETS_64)
        if SCALED:
            s_rows, s_valid = gather_rows(g_row_index_ptr, rows, rmask, num_scales, 1, True)
            w_row = tl.load(scale_ptr + s_rows, mask=s_valid, other=0.0).to(tl.float32)
        else:
            w_row = tl.full((BM,), 1.0, tl.float32)
        rows64 = rows.to(tl.int64)
        if SPLIT:
            acc_even, acc_odd = tl.split(tl.reshape(acc, (BM, BN // 2, 2)))
            even = tile_n * BN + 2 * tl.arange(0, BN // 2)
            row_sums = _dh_columns(acc_even, w_row, rows64, rmask, even, N_OUT, h_ptr, stride_hm, stride_hn, h_up_col,
                                   dh_ptr, stride_dm, stride_dn, dh_up_off, a_ptr, stride_am, alpha, limit, up_offset,
                                   ACT, GATED, WRITE_A, A_SCALED)
            row_sums += _dh_columns(acc_odd, w_row, rows64, rmask, even + 1, N_OUT, h_ptr, stride_hm, stride_hn,
                                    h_up_col, dh_ptr, stride_dm, stride_dn, dh_up_off, a_ptr, stride_am, alpha, limit,
                                    up_offset, ACT, GATED, WRITE_A, A_SCALED)
        else:
            row_sums = _dh_columns(acc, w_row, rows64, rmask, cols, N_OUT, h_ptr, stride_hm, stride_hn, h_up_col,
                                   dh_ptr, stride_dm, stride_dn, dh_up_off, a_ptr, stride_am, alpha, limit, up_offset,
                                   ACT, GATED, WRITE_A, A_SCALED)
        if PARTIALS:
            partial_rows = partial_ptr + rows64
            tl.store(partial_rows + tile_n.to(tl.int64) * stride_partial, row_sums, mask=rmask)
            if tile_n == n_tiles - 1:
                tail_rows = partial_rows + n_tiles.to(tl.int64) * stride_partial  # pointer steps: no int32 product
                for _ in range(n_tiles, num_partials):
                    tl.store(tail_rows, tl.zeros((BM,), dtype=tl.float32), mask=rmask)
                    tail_rows += stride_partial


# The same kernel for dh written into h's own buffer (FASTMOE_DH_INTO_H=on, _variants.py):
# each element of h is read by the program that then writes that element of dh, so the launch itself is
# safe; autotuning is not, each trial would read the last trial's dh as h, so this autotuner restores h
# between trials (a copy of h while it tunes, once per shape; the tuning table or the autotuner's cache
# then skip it). Same function, same configs and key: it shares their tuning-table entries.
_activation_backward_in_place_kernel = triton.autotune(**_AUTOTUNE, restore_value=["h_ptr"])(
    _activation_backward_kernel.fn)


def _writes_into_h(h: torch.Tensor, dh: torch.Tensor, dh_interleaved: bool) -> bool:
    """Whether dh is h's own buffer, element for element (then each element of h is read by the program
    that writes the same element of dh). Any other sharing of h's storage is refused: a program could
    overwrite h that another has still to read."""
    if dh.numel() == 0 or h.numel() == 0 or dh.untyped_storage().data_ptr() != h.untyped_storage().data_ptr():
        return False
    if dh.data_ptr() == h.data_ptr() and dh.shape == h.shape and dh.stride() == h.stride() and not dh_interleaved:
        return True
    raise ValueError("activation_backward: dh shares h's storage without being h itself in h's [gate | up] "
                     f"layout (h {tuple(h.shape)} strides {h.stride()}, dh {tuple(dh.shape)} strides {dh.stride()}, "
                     f"interleaved={dh_interleaved}): programs would overwrite h that others still read")


def partial_rows_needed(f: int) -> int:
    """Rows of the routing-weight partial-sum buffer: one per N tile of the narrowest config."""
    return cdiv(f, smallest_bn(_activation_backward_kernel.configs))


def activation_backward(
    grad_out: torch.Tensor,
    g_row_index: Optional[torch.Tensor],
    g_row_div: int,
    scale: Optional[torch.Tensor],
    w: torch.Tensor,
    down: ExpertMatrices,
    offsets: torch.Tensor,
    h: torch.Tensor,
    dh: torch.Tensor,
    partial: Optional[torch.Tensor],
    *,
    activation,
    dh_interleaved: bool = False,
    a_out: Optional[torch.Tensor] = None,
    a_scaled: bool = False,
    split: bool = False,
) -> None:
    """Fill ``dh [R, m·f]`` and, when given, ``partial [partial_rows_needed(f), R]`` and ``a_out [R, f]``
    (see the module docstring) for ``activation`` (an ``activations.Activation``); ``down`` describes
    W_down inside ``w`` (read as ``[d, f_e]`` per expert). ``g_row_index`` None reads grad_out's rows in
    order (then ``scale`` must be None). h is [gate | up]; dh too, or interleaved (gate, up, gate, …)
    with ``dh_interleaved``; dh may be h itself ([gate | up]: dh replaces h). ``a_scaled``: a_out holds
    w_r · act(h)."""
    if scale is not None and g_row_index is None:
        raise ValueError("activation_backward: the routing weights (scale) are indexed by g_row_index")
    gated = activation.gated
    E = offsets.shape[0] - 1
    num_rows = dh.shape[0]
    f = dh.shape[1] // (2 if gated else 1)
    if num_rows == 0 or f == 0:
        return
    w_offset, k_size, n_size, stride_wk, stride_wn, k_max, _ = down.as_b(False)
    w_align, k_align, n_align = down.b_align(False)
    device = grad_out.device
    dh_step, dh_up = (2, dh.stride(1)) if dh_interleaved else (1, f * dh.stride(1))

    kernel = _activation_backward_in_place_kernel if _writes_into_h(h, dh, dh_interleaved) else _activation_backward_kernel
    launch(kernel, persistent_grid(device, num_rows, f, E),
        g_ptr=grad_out, g_row_index_ptr=g_row_index if g_row_index is not None else dummy_index(device),
        num_g_rows=grad_out.shape[0], stride_gm=grad_out.stride(0), stride_gk=grad_out.stride(1),
        scale_ptr=scale if scale is not None else grad_out, num_scales=scale.numel() if scale is not None else 0,
        w_ptr=w, w_offset_ptr=w_offset, k_size_ptr=k_size, n_size_ptr=n_size, stride_wk=stride_wk, stride_wn=stride_wn,
        h_ptr=h, stride_hm=h.stride(0), stride_hn=h.stride(1), h_up_col=f,
        dh_ptr=dh, stride_dm=dh.stride(0), stride_dn=dh.stride(1) * dh_step, dh_up_off=dh_up,
        a_ptr=a_out if a_out is not None else dh, stride_am=a_out.stride(0) if a_out is not None else 0,
        partial_ptr=partial if partial is not None else dh, stride_partial=partial.stride(0) if partial is not None else 0,
        num_partials=partial.shape[0] if partial is not None else 0,
        offsets_ptr=offsets, num_rows=num_rows, N_OUT=f, K_MAX=k_max, M_BUCKET=rows_per_expert_bucket(num_rows, E),
        E=E, E_PAD=next_pow2(E), G_ROW_DIV=g_row_div, W_ALIGN=w_align, K_ALIGN=k_align, N_ALIGN=n_align,
        **activation_args(activation), GATED=gated, GATHER_G=g_row_index is not None, SCALED=scale is not None,
        PARTIALS=partial is not None, WRITE_A=a_out is not None, A_SCALED=a_scaled, SPLIT=split,
        OFFSETS_64=down.offsets_64, PRECISION=dot_precision(grad_out.dtype),
    )
