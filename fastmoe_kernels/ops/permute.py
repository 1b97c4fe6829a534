"""permute / unpermute: move token rows into the expert-grouped layout of a plan, and back.

- ``permute(x [T,d], plan) → [R,d]``: row r holds ``x[src[r]]``, zeros for padding/unused rows.
- ``unpermute(y [R,d], plan, weight [T,k]) → [T,d]``: ``out[t] = Σ_j weight[t,j] · y[row[t,j]]``,
  accumulated in fp32, dropped assignments adding exactly 0 (their rows are never read, so even a
  NaN in an unused row cannot leak).

Backward passes are gathers, never scatters with atomics, so they are deterministic:
``grad_x[t] = Σ_j grad[row[t,j]]`` (the same combine without weights), ``grad_y[r] =
weight[a_r] · grad_out[t_r]`` and ``grad_weight[t,j] = <grad_out[t], y[row[t,j]]>`` (fp32).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .._checks import FLOAT_DTYPES, accum_dtype, check_tensor
from .plan import DispatchPlan


def _with_zero_row(t: Tensor) -> Tensor:
    """``t`` with one extra row of zeros at the end: index -1 entries are sent there."""
    return torch.cat([t, t.new_zeros(1, t.shape[1])])


def _kept(index: Tensor, num_rows: int) -> Tensor:
    """Entries that point at a row: in [0, num_rows). Any other (-1 for none, or out of range in a plan
    changed after make_plan) reads nothing, as in every kernel."""
    return (index >= 0) & (index < num_rows)


def _redirect(index: Tensor, sentinel: int) -> Tensor:
    """``index`` with every entry that points at no row sent to ``sentinel`` (a zero row)."""
    return torch.where(_kept(index, sentinel), index, sentinel).long()


def permute_reference(x: Tensor, src: Tensor) -> Tensor:
    """``out[r] = x[src[r]]`` (0 where ``src[r] < 0``)."""
    return _with_zero_row(x)[_redirect(src, x.shape[0])]


def combine_reference(y: Tensor, row: Tensor, weight: Tensor) -> Tensor:
    """``out[t] = Σ_j w[t,j] · y[row[t,j]]`` in fp32 (w = 1 when ``weight`` is empty); y's dtype. A
    dropped assignment adds exactly 0, whatever its weight (NaN included)."""
    acc = accum_dtype(y, weight)
    gathered = _with_zero_row(y.to(acc))[_redirect(row, y.shape[0])]  # [T, k, d]
    if weight.numel():
        kept_weight = torch.where(_kept(row, y.shape[0]), weight.to(acc), 0.0)
        gathered = gathered * kept_weight.unsqueeze(-1)
    return gathered.sum(dim=1).to(y.dtype)


def unpermute_backward_reference(
    grad_out: Tensor, y: Tensor, row: Tensor, weight: Tensor, assignment: Tensor
) -> tuple[Tensor, Tensor]:
    """``(grad_y [R,d] in y's dtype, grad_weight [T,k] fp32, fp64 for fp64 inputs)``."""
    T, k = row.shape
    acc = accum_dtype(grad_out, y, weight)
    g32 = grad_out.to(acc)
    grad_weight = (g32.unsqueeze(1) * _with_zero_row(y.to(acc))[_redirect(row, y.shape[0])]).sum(dim=-1)
    valid = _kept(assignment, T * k)
    token = _redirect(torch.where(valid, torch.div(assignment, k, rounding_mode="floor"), -1), T)
    if weight.numel():
        row_weight = torch.where(valid, weight.reshape(-1).to(acc)[torch.where(valid, assignment, 0).long()], 0.0)
    else:
        row_weight = valid.to(acc)
    grad_y = _with_zero_row(g32)[token] * row_weight.unsqueeze(-1)
    return grad_y.to(y.dtype), grad_weight


backends.register("permute", "torch")(permute_reference)
backends.register("combine", "torch")(combine_reference)
backends.register("unpermute_backward", "torch")(unpermute_backward_reference)


# ---- permute ---------------------------------------------------------------------------------
@torch.library.custom_op("fastmoe::permute", mutates_args=())
def _permute_op(x: Tensor, src: Tensor, row: Tensor, backend: str, backward_backend: str) -> Tensor:
    return backends.get_kernel("permute", backend)(x, src)


@_permute_op.register_fake
def _(x, src, row, backend, backward_backend):
    return x.new_empty((src.shape[0], x.shape[1]))


@torch.library.custom_op("fastmoe::combine", mutates_args=())
def _combine_op(y: Tensor, row: Tensor, weight: Tensor, backend: str) -> Tensor:
    return backends.get_kernel("combine", backend)(y, row, weight)


@_combine_op.register_fake
def _(y, row, weight, backend):
    return y.new_empty((row.shape[0], y.shape[1]))


def _permute_setup(ctx, inputs, output):
    _x, _src, row, _backend, backward_backend = inputs
    ctx.save_for_backward(row)
    ctx.backend = backward_backend


def _permute_backward(ctx, grad):
    (row,) = ctx.saved_tensors
    no_weight = grad.new_empty(0, dtype=torch.float32)
    return _combine_op(grad.contiguous(), row, no_weight, ctx.backend), None, None, None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


# ---- unpermute -------------------------------------------------------------------------------
@torch.library.custom_op("fastmoe::unpermute", mutates_args=())
def _unpermute_op(y: Tensor, row: Tensor, weight: Tensor, assignment: Tensor, backend: str,
                  backward_backend: str) -> Tensor:
    return backends.get_kernel("combine", backend)(y, row, weight)


@_unpermute_op.register_fake
def _(y, row, weight, assignment, backend, backward_backend):
    return y.new_empty((row.shape[0], y.shape[1]))


@torch.library.custom_op("fastmoe::unpermute_backward", mutates_args=())
def _unpermute_backward_op(
    grad_out: Tensor, y: Tensor, row: Tensor, weight: Tensor, assignment: Tensor, backend: str
) -> tuple[Tensor, Tensor]:
    return backends.get_kernel("unpermute_backward", backend)(grad_out, y, row, weight, assignment)


@_unpermute_backward_op.register_fake
def _(grad_out, y, row, weight, assignment, backend):
    return torch.empty_like(y), row.new_empty(row.shape, dtype=accum_dtype(grad_out, y, weight))


def _unpermute_setup(ctx, inputs, output):
    y, row, weight, assignment, _backend, backward_backend = inputs
    ctx.save_for_backward(y, row, weight, assignment)
    ctx.backend = backward_backend
    ctx.weight_dtype = weight.dtype


def _unpermute_backward(ctx, grad_out):
    y, row, weight, assignment = ctx.saved_tensors
    grad_y, grad_weight = _unpermute_backward_op(grad_out.contiguous(), y, row, weight, assignment, ctx.backend)
    return grad_y, None, grad_weight.to(ctx.weight_dtype), None, None, None


_unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


# ---- public API ------------------------------------------------------------------------------
def check_plan(where: str, plan: DispatchPlan, device: torch.device) -> None:
    """The plan's structure (its values are the kernels' to bound: a changed plan reads nothing out of range)."""
    if not isinstance(plan, DispatchPlan):
        raise TypeError(f"{where}: `plan` must be a DispatchPlan from make_plan, got {type(plan).__name__}")
    if plan.row.device != device:
        raise ValueError(f"{where}: `plan` is on {plan.row.device} but the data is on {device}")
    check_tensor(where, "plan.row", plan.row, ndim=2, dtypes=(torch.int32,))
    check_tensor(where, "plan.assignment", plan.assignment, ndim=1, dtypes=(torch.int32,), device=device)
    check_tensor(where, "plan.offsets", plan.offsets, ndim=1, dtypes=(torch.int32,), device=device,
                 shape=(plan.counts.shape[0] + 1,))


def permute(x: Tensor, plan: DispatchPlan, *, backend: Optional[str] = None) -> Tensor:
    """Gather ``x [T, d]`` into the plan's expert-grouped rows: ``[R, d]``, same dtype. Differentiable."""
    where = "permute"
    check_tensor(where, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_plan(where, plan, x.device)
    check_tensor(where, "x", x, shape=(plan.row.shape[0], None))
    forward = backends.resolve("permute", backend, x.device, x.dtype)
    backward = backends.resolve("combine", backend, x.device, x.dtype)
    return _permute_op(x.contiguous(), plan.src, plan.row, forward, backward)


def unpermute(y: Tensor, plan: DispatchPlan, weight: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Combine expert outputs ``y [R, d]`` back to tokens: ``[T, d]`` in y's dtype, fp32 sums.

    ``weight [T, k]`` (float) scales each assignment; differentiable in ``y`` and ``weight``.
    """
    where = "unpermute"
    check_tensor(where, "y", y, ndim=2, dtypes=FLOAT_DTYPES)
    check_plan(where, plan, y.device)
    check_tensor(where, "y", y, shape=(plan.num_rows, None))
    check_tensor(where, "weight", weight, ndim=2, dtypes=FLOAT_DTYPES, shape=tuple(plan.row.shape), device=y.device)
    forward = backends.resolve("combine", backend, y.device, y.dtype)
    backward = backends.resolve("unpermute_backward", backend, y.device, y.dtype)
    return _unpermute_op(y.contiguous(), plan.row, weight.contiguous(), plan.assignment, forward, backward)
