"""moe_mlp: the routed experts from tokens to tokens — gather, expert MLPs, weighted combine.

``moe_mlp(x [T, d], plan, weight [T, k], w_up, w_down, activation) → [T, d]`` is, by definition,
``unpermute(grouped_mlp(permute(x, plan), w_up, w_down, plan.offsets), plan, weight)`` — that
composition is the reference, and what runs on backends without fused kernels (weights as in
:mod:`.grouped_mlp`).

A backend that registers the fused kernels (``moe_mlp``, ``moe_mlp_backward``) runs it as one
autograd node: the up projection reads rows of x by index, the activation is applied in the GEMM
epilogue, the down projection writes rows straight to their assignment slots, and the combine sums
them. Neither the permuted copy of x nor the expert outputs outlive the forward: the backward keeps
only x, the routing and the activation input (which it needs), and recomputes the activation.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .. import _variants, backends, tuning
from ..tuning import LayerShape
from ..activations import Activation, ActivationLike, apply_activation, is_gated
from .grouped_gemm import grouped_gemm_reference
from .._checks import FLOAT_DTYPES, check_optional_bool, check_tensor
from .grouped_mlp import check_expert_weights, grouped_mlp
from .permute import check_plan, combine_reference, permute, permute_reference, unpermute
from .plan import DispatchPlan


def _hidden_width(w_down: Tensor, widths: List[int]) -> int:
    return max(widths) if widths else w_down.shape[2]


# An Activation crosses the custom ops as (name, [alpha, limit], interleaved): op schemas take plain values.
def _activation_args(act: Activation) -> tuple:
    return act.name, [act.alpha, act.limit], act.interleaved


def _activation_of(name: str, params: List[float], interleaved: bool) -> Activation:
    return Activation(name, params[0], params[1], interleaved)


@torch.library.custom_op("fastmoe::moe_mlp", mutates_args=())
def _moe_mlp_op(
    x: Tensor, w_up: Tensor, w_down: Tensor, b_up: Optional[Tensor], b_down: Optional[Tensor], weight: Tensor,
    row: Tensor, assignment: Tensor, offsets: Tensor, activation: str, activation_params: List[float],
    interleaved: bool, widths: List[int], save_for_backward: bool, backend: str, backward_backend: str,
) -> tuple[Tensor, Tensor]:
    fn = backends.get_kernel("moe_mlp", backend)
    act = _activation_of(activation, activation_params, interleaved)
    return fn(x, w_up, w_down, b_up, b_down, weight, row, assignment, offsets, act, widths, save_for_backward)


@_moe_mlp_op.register_fake
def _(x, w_up, w_down, b_up, b_down, weight, row, assignment, offsets, activation, activation_params, interleaved,
      widths, save_for_backward, backend, backward_backend):
    m = 2 if is_gated(activation) else 1
    h_shape = (assignment.shape[0], m * _hidden_width(w_down, widths)) if save_for_backward else (0,)
    return torch.empty_like(x), x.new_empty(h_shape)


@torch.library.custom_op("fastmoe::moe_mlp_backward", mutates_args=())
def _moe_mlp_backward_op(
    grad_out: Tensor, x: Tensor, w_up: Tensor, w_down: Tensor, b_up: Optional[Tensor], b_down: Optional[Tensor],
    weight: Tensor, row: Tensor, assignment: Tensor, offsets: Tensor, h: Tensor, activation: str,
    activation_params: List[float], interleaved: bool, widths: List[int], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    fn = backends.get_kernel("moe_mlp_backward", backend)
    act = _activation_of(activation, activation_params, interleaved)
    return fn(grad_out, x, w_up, w_down, b_up, b_down, weight, row, assignment, offsets, h, act, widths)


@_moe_mlp_backward_op.register_fake
def _backward_fake(grad_out, x, w_up, w_down, b_up, b_down, weight, row, assignment, offsets, h, activation,
                   activation_params, interleaved, widths, backend):
    def like(t):
        return torch.empty_like(t) if t is not None else x.new_empty(0)

    return torch.empty_like(x), torch.empty_like(w_up), torch.empty_like(w_down), like(b_up), like(b_down), torch.empty_like(weight)


@torch.library.custom_op("fastmoe::moe_mlp_backward_consuming_h", mutates_args=("h",))
def _moe_mlp_backward_consuming_h_op(
    grad_out: Tensor, x: Tensor, w_up: Tensor, w_down: Tensor, b_up: Optional[Tensor], b_down: Optional[Tensor],
    weight: Tensor, row: Tensor, assignment: Tensor, offsets: Tensor, h: Tensor, activation: str,
    activation_params: List[float], interleaved: bool, widths: List[int], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """moe_mlp_backward that may overwrite h with dh (_variants.DH_INTO_H: h is dead after it)."""
    fn = backends.get_kernel("moe_mlp_backward", backend)
    act = _activation_of(activation, activation_params, interleaved)
    return fn(grad_out, x, w_up, w_down, b_up, b_down, weight, row, assignment, offsets, h, act, widths, dh_buffer=h)


_moe_mlp_backward_consuming_h_op.register_fake(_backward_fake)


def _setup(ctx, inputs, output):
    (x, w_up, w_down, b_up, b_down, weight, row, assignment, offsets, activation, params, interleaved, widths, _save,
     _fwd, backward) = inputs
    ctx.save_for_backward(x, w_up, w_down, b_up, b_down, weight, row, assignment, offsets, output[1])
    ctx.activation, ctx.widths, ctx.backend = (activation, params, interleaved), widths, backward
    # h is saved, never differentiated: autograd would otherwise fill a zero gradient of its size
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_h):
    if grad_out is None:  # no gradient reached the output (grads are not materialised)
        return (None,) * 16
    x, w_up, w_down, b_up, b_down, weight, row, assignment, offsets, h = ctx.saved_tensors
    op = _moe_mlp_backward_consuming_h_op if _variants.DH_INTO_H else _moe_mlp_backward_op
    grads = op(
        grad_out.contiguous(), x, w_up, w_down, b_up, b_down, weight, row, assignment, offsets, h,
        *ctx.activation, ctx.widths, ctx.backend,
    )
    grad_x, grad_w_up, grad_w_down, grad_b_up, grad_b_down, grad_weight = grads
    return (grad_x, grad_w_up, grad_w_down, grad_b_up if b_up is not None else None,
            grad_b_down if b_down is not None else None, grad_weight, *([None] * 10))


_moe_mlp_op.register_autograd(_backward, setup_context=_setup)


def moe_mlp_reference(x, plan, weight, w_up, w_down, activation="swiglu", b_up=None, b_down=None, *, widths=None,
                      backend=None) -> Tensor:
    """The definition: permute → grouped_mlp → unpermute, each op on the backend resolution picks."""
    x_perm = permute(x, plan, backend=backend)
    # A dropless or padded plan groups every row (rows of dropped invalid ids aside, which nothing reads).
    y_perm = grouped_mlp(x_perm, w_up, w_down, plan.offsets, activation, b_up, b_down, widths=widths, backend=backend,
                         all_rows_grouped=plan.capacity is None or plan.padded)
    return unpermute(y_perm, plan, weight, backend=backend)


# ---- the fused kernels' contract, as references -------------------------------------------------
# ops.moe_mlp runs the composition above itself when resolution picks "torch" (so that each of its
# ops can still run on the backend resolution picks for it); these two are the specification of the
# fused kernels' own signature, which the kernel tests compare against.
def _pre_activation(x_perm, w_up, b_up, offsets, activation, widths):
    """``[gate | up]`` (or the one projection; gate and up interleaved if the weights are) of each row,
    ``[R, m·max f]``."""
    if not widths:
        return grouped_gemm_reference(x_perm, w_up, offsets, True, b_up, [], "")
    total = sum(widths)
    halves = [(w_up[:total], None if b_up is None else b_up[:total])]
    if activation.gated:
        halves.append((w_up[total:], None if b_up is None else b_up[total:]))
    return torch.cat([grouped_gemm_reference(x_perm, w, offsets, True, b, widths, "n") for w, b in halves], dim=1)


def _expert_outputs(x, w_up, w_down, b_up, b_down, row, assignment, offsets, activation, widths):
    k = row.shape[1]
    src = torch.where(assignment >= 0, torch.div(assignment, k, rounding_mode="floor"), -1)
    h = _pre_activation(permute_reference(x, src), w_up.to(x.dtype), None if b_up is None else b_up.to(x.dtype),
                        offsets, activation, widths)
    y = grouped_gemm_reference(apply_activation(h, activation), w_down.to(x.dtype), offsets, True,
                               None if b_down is None else b_down.to(x.dtype), widths, "k" if widths else "")
    return h, y


def moe_mlp_fused_reference(x, w_up, w_down, b_up, b_down, weight, row, assignment, offsets, activation, widths, save):
    """``(out [T, d], h)``: the combined expert outputs, and the pre-activation ``[R, m·f]`` when ``save``."""
    h, y = _expert_outputs(x, w_up, w_down, b_up, b_down, row, assignment, offsets, activation, widths)
    return combine_reference(y, row, weight), (h if save else x.new_empty(0))


def moe_mlp_backward_reference(grad_out, x, w_up, w_down, b_up, b_down, weight, row, assignment, offsets, h,
                               activation, widths, dh_buffer=None):
    """Gradients of ``moe_mlp_fused_reference``'s output: ``(x, w_up, w_down, b_up, b_down, weight)``,
    empty tensors for absent biases (``dh_buffer``, where a backend may write dh, is not used: the
    reference recomputes)."""
    inputs = [t for t in (x, w_up, w_down, b_up, b_down, weight) if t is not None]

    def output(*tensors):
        it = iter(tensors)
        args = [next(it) if t is not None else None for t in (x, w_up, w_down, b_up, b_down, weight)]
        return moe_mlp_fused_reference(*args, row, assignment, offsets, activation, widths, False)[0]

    with torch.enable_grad():
        grads = iter(torch.autograd.functional.vjp(output, tuple(inputs), grad_out)[1])
    return tuple(next(grads) if t is not None else x.new_empty(0) for t in (x, w_up, w_down, b_up, b_down, weight))


backends.register("moe_mlp", "torch")(moe_mlp_fused_reference)
backends.register("moe_mlp_backward", "torch")(moe_mlp_backward_reference)


def default_fusion(fused: Optional[bool], needs_grad: bool, device: torch.device,
                   shape: Optional[LayerShape] = None) -> Optional[bool]:
    """``fused`` as given; for None, what the device's tuning table measured fastest for this layer
    ``shape`` and mode (``fastmoe_kernels.tuning``), else the composition (False) for a training step
    on a GPU.

    The rule without a table was measured on an H100 (benchmarks/results/h100-2026-11-24): the fused
    kernels' training step was 1.3-1.5x slower than the composition's at all five model shapes (its
    weight gradients gather rows and recompute the activation per output tile), while its forward was
    faster."""
    if fused is not None:
        return fused
    if shape is not None:
        measured = tuning.fused_choice(device, shape, "fwd+bwd" if needs_grad else "fwd")
        if measured is not None:
            return measured
    if needs_grad and device.type == "cuda":
        return False
    return None


def moe_mlp(
    x: Tensor,
    plan: DispatchPlan,
    weight: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    activation: ActivationLike = "swiglu",
    b_up: Optional[Tensor] = None,
    b_down: Optional[Tensor] = None,
    *,
    widths: Optional[Sequence[int]] = None,
    backend: Optional[str] = None,
    fused: Optional[bool] = None,
) -> Tensor:
    """Expert MLPs of a routed layer, tokens in, tokens out (see the module docstring).

    ``fused`` None follows the device's tuning table (the faster of the two measured at this shape and
    mode), else uses the fused kernels when the backend has them except for a training step on a GPU
    (the composition was faster there on the first H100 run); False forces the composition of permute / grouped_mlp /
    unpermute and True the fused kernels (the benchmark suite compares the two).
    """
    where = "moe_mlp"
    check_tensor(where, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_plan(where, plan, x.device)
    check_tensor(where, "x", x, shape=(plan.row.shape[0], None))
    check_tensor(where, "weight", weight, ndim=2, dtypes=FLOAT_DTYPES, shape=tuple(plan.row.shape), device=x.device)
    act, widths = check_expert_weights(where, x, w_up, w_down, b_up, b_down, activation, widths, plan.num_experts)
    check_optional_bool(where, "fused", fused)
    tensors = [t for t in (x, w_up, w_down, b_up, b_down, weight) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    shape = LayerShape.of(x.shape[1], _hidden_width(w_down, widths or []), plan.num_experts, plan.top_k, act.name,
                          x.dtype, x.shape[0]) if fused is None else None
    fused = default_fusion(fused, needs_grad, x.device, shape)
    name = "torch" if fused is False else backends.resolve("moe_mlp", backend, x.device, x.dtype)
    if name == "torch":
        return moe_mlp_reference(x, plan, weight, w_up, w_down, act, b_up, b_down, widths=widths, backend=backend)
    backward = backends.resolve("moe_mlp_backward", backend, x.device, x.dtype)
    out, _ = _moe_mlp_op(
        x.contiguous(), w_up, w_down, b_up, b_down, weight.contiguous(), plan.row, plan.assignment, plan.offsets,
        *_activation_args(act), list(widths) if widths is not None else [], needs_grad, name, backward,
    )
    return out
