"""Row movement kernels: gather (permute, and the backward of unpermute), weighted combine
(unpermute, and the backward of permute) and the routing-weight gradient.

Rows are tiles of ``BLOCK_D`` contiguous elements: Triton turns them into 16-byte vector accesses
when the row stride and pointer are aligned (it specialises arguments divisible by 16). Every sum
is accumulated in fp32 and written once, in a fixed order: deterministic, no atomics.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._alloc import empty

from ._common import cdiv, next_pow2, register


def _block_d(d: int) -> int:
    return min(256, next_pow2(max(d, 16)))


@triton.jit
def _gather_kernel(
    x_ptr, index_ptr, scale_ptr, out_ptr, R, D, stride_x, stride_out, num_x_rows, num_scales,
    DIV: tl.constexpr, SCALED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[r] = x[index[r] // DIV] (· scale[index[r]]), zeros where index[r] < 0 or points past x (or
    the scales): an index out of range is never read."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < R
    idx = tl.load(index_ptr + rows, mask=rmask, other=-1)
    valid = (idx >= 0) & (idx // DIV < num_x_rows)
    if SCALED:
        valid = valid & (idx < num_scales)
    src = tl.where(valid, idx // DIV, 0).to(tl.int64)
    cmask = cols < D
    v = tl.load(x_ptr + src[:, None] * stride_x + cols[None, :], mask=valid[:, None] & cmask[None, :], other=0.0)
    if SCALED:
        w = tl.load(scale_ptr + tl.where(valid, idx, 0), mask=valid, other=0.0).to(tl.float32)
        v = v.to(tl.float32) * w[:, None]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :], v.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _combine_kernel(
    y_ptr, row_ptr, w_ptr, out_ptr, assignment_ptr, num_rows, T, D, stride_y, stride_out, num_y_rows,
    K: tl.constexpr, WEIGHTED: tl.constexpr, ORDERED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[t] = Σ_j w[t,j] · y[row[t,j]] (ORDERED: y[t·K + j]), skipping row[t,j] < 0 and rows past y;
    fp32 sum. ORDERED, slot t·K + j holds a result only if the plan's row for it points back to it
    (``assignment[row[t,j]] == t·K + j``; the kernels that fill the slots go by ``assignment``): a plan
    whose two halves disagree (changed after make_plan) drops the assignment instead of reading a
    slot nothing wrote."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tmask = tokens < T
    cmask = cols < D
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(K):
        r = tl.load(row_ptr + tokens * K + j, mask=tmask, other=-1)
        if ORDERED:
            src = (tokens * K + j).to(tl.int64)
            valid = (r >= 0) & (r < num_rows) & (src < num_y_rows)
            back = tl.load(assignment_ptr + r, mask=tmask & valid, other=-1)
            valid = valid & (back == tokens * K + j)
        else:
            valid = (r >= 0) & (r < num_y_rows)
            src = tl.where(valid, r, 0).to(tl.int64)
        v = tl.load(y_ptr + src[:, None] * stride_y + cols[None, :], mask=valid[:, None] & cmask[None, :], other=0.0)
        if WEIGHTED:
            w = tl.load(w_ptr + tokens * K + j, mask=valid, other=0.0).to(tl.float32)
            acc += v.to(tl.float32) * w[:, None]
        else:
            acc += v.to(tl.float32)
    tl.store(out_ptr + tokens.to(tl.int64)[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=tmask[:, None] & cmask[None, :])


@triton.jit
def _rowdot_kernel(
    g_ptr, y_ptr, row_ptr, out_ptr, T, D, stride_g, stride_y, num_y_rows,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[t, j] = <g[t], y[row[t,j]]> in fp32 (0 where row[t,j] < 0 or past y): the routing-weight
    gradient."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tokens < T
    for j in tl.static_range(K):
        r = tl.load(row_ptr + tokens * K + j, mask=tmask, other=-1)
        valid = (r >= 0) & (r < num_y_rows)
        src = tl.where(valid, r, 0).to(tl.int64)
        acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < D
            g = tl.load(g_ptr + tokens.to(tl.int64)[:, None] * stride_g + cols[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
            y = tl.load(y_ptr + src[:, None] * stride_y + cols[None, :], mask=valid[:, None] & cmask[None, :], other=0.0)
            acc += tl.sum(g.to(tl.float32) * y.to(tl.float32), 1)
        tl.store(out_ptr + tokens * K + j, acc, mask=tmask)


@triton.jit
def _row_values_kernel(
    values_ptr, row_ptr, assignment_ptr, out_ptr, A, R, P, stride_p, BLOCK: tl.constexpr,
):
    """out[a] = Σ_p values[p, row[a]] in fp32 for assignment a whose row points back to it (the
    plan's assignment[row[a]] == a), else 0: the fused backward's routing-weight gradient from its
    per-row partial sums, in the assignments' order."""
    a = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    amask = a < A
    r = tl.load(row_ptr + a, mask=amask, other=-1)
    ok = amask & (r >= 0) & (r < R)
    ok = ok & (tl.load(assignment_ptr + r, mask=ok, other=-1) == a)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for p in range(P):
        acc += tl.load(values_ptr + p * stride_p + r, mask=ok, other=0.0)
    tl.store(out_ptr + a, acc.to(out_ptr.dtype.element_ty), mask=amask)


def row_values(values: torch.Tensor, row: torch.Tensor, assignment: torch.Tensor, out_dtype) -> torch.Tensor:
    """``Σ_p values[p, row[t, j]]`` per assignment as a ``[T, k]`` tensor of ``out_dtype`` (``values
    [P, R]`` fp32, P ≥ 0), 0 where the assignment has no row or its row does not point back to it (a
    plan changed after make_plan): one launch for what the host did in a dozen small ops."""
    T, k = row.shape
    out = empty(T, k, dtype=out_dtype, device=row.device)
    if T * k == 0:
        return out
    if values.stride(-1) != 1:
        values = values.contiguous()
    block = 1024
    _row_values_kernel[(cdiv(T * k, block),)](values, row, assignment, out, T * k, assignment.shape[0], values.shape[0],
                                              values.stride(0), BLOCK=block)
    return out


def gather(x: torch.Tensor, index: torch.Tensor, num_rows: int, *, div: int = 1, scale=None, out_dtype=None) -> torch.Tensor:
    out = empty(num_rows, x.shape[1], dtype=out_dtype or x.dtype, device=x.device)
    if num_rows == 0 or x.shape[1] == 0:
        return out.zero_()
    block_d = _block_d(x.shape[1])
    block_r = max(1, 4096 // block_d)
    grid = (cdiv(num_rows, block_r), cdiv(x.shape[1], block_d))
    _gather_kernel[grid](x, index, scale if scale is not None else x, out, num_rows, x.shape[1], x.stride(0), out.stride(0),
                         x.shape[0], scale.numel() if scale is not None else 0,
                         DIV=div, SCALED=scale is not None, BLOCK_R=block_r, BLOCK_D=block_d)
    return out


def combine(y: torch.Tensor, row: torch.Tensor, weight, *, assignment: Optional[torch.Tensor] = None,
            out_dtype=None) -> torch.Tensor:
    """``out[t] = Σ_j w[t,j] · y[row[t,j]]``; with ``assignment`` (the plan's), y holds one slot per
    assignment (``y[t·K + j]``, the fused path's layout) instead of the plan's rows."""
    T, K = row.shape
    ordered = assignment is not None
    out = empty(T, y.shape[1], dtype=out_dtype or y.dtype, device=y.device)
    if T == 0 or y.shape[1] == 0:
        return out.zero_()
    block_d = _block_d(y.shape[1])
    block_t = max(1, 2048 // block_d)
    grid = (cdiv(T, block_t), cdiv(y.shape[1], block_d))
    weighted = weight is not None and weight.numel() > 0
    _combine_kernel[grid](y, row, weight if weighted else y, out, assignment if ordered else row,
                          assignment.shape[0] if ordered else 0, T, y.shape[1], y.stride(0), out.stride(0), y.shape[0],
                          K=K, WEIGHTED=weighted, ORDERED=ordered, BLOCK_T=block_t, BLOCK_D=block_d)
    return out


def rowdot(g: torch.Tensor, y: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    T, K = row.shape
    out = empty(T, K, dtype=torch.float32, device=g.device)
    if T == 0:
        return out
    block_d = _block_d(g.shape[1])
    block_t = max(1, 2048 // block_d)
    _rowdot_kernel[(cdiv(T, block_t),)](g, y, row, out, T, g.shape[1], g.stride(0), y.stride(0), y.shape[0],
                                              K=K, BLOCK_T=block_t, BLOCK_D=block_d)
    return out


@register("permute")
def permute_triton(x, src):
    return gather(x, src, src.shape[0])


@register("combine")
def combine_triton(y, row, weight):
    return combine(y, row, weight)


@register("unpermute_backward")
def unpermute_backward_triton(grad_out, y, row, weight, assignment):
    K = row.shape[1]
    weighted = weight.numel() > 0
    grad_y = gather(grad_out, assignment, assignment.shape[0], div=K, scale=weight if weighted else None, out_dtype=y.dtype)
    return grad_y, rowdot(grad_out, y, row)
