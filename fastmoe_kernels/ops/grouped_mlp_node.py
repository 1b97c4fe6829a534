"""The composition's experts as one autograd node: ``y = act(x @ W_upᵀ + b_up) @ W_downᵀ + b_down`` per
expert group, with the activation's backward in the epilogue of the down projection's input gradient.

It is ``grouped_mlp``'s composition (``grouped_up``, then ``grouped_gemm``) by definition: the
reference composes exactly those references. A backend with the kernels runs the forward as the same
two launches and keeps only x and h (the pre-activation), not the activation; its backward has no
torch elementwise pass: the down projection's input gradient ``G @ W_down`` ends in the dH epilogue
(dh from h, and ``a = act(h)`` rebuilt once for the down projection's weight gradient), then dW_down
from (a, G), dW_up as one weight gradient over dh's 2f columns and dx as one GEMM over them (dh is
written in W_up's row order, interleaved for gpt-oss). On the first H100 run the composition's torch
activation and its backward cost 1.7 ms of a 12.4 ms Qwen3 step and 8.4 ms at Mixtral (the forward
half of which ``grouped_up`` already removed).

``grouped_mlp`` takes this node where ``FASTMOE_MLP_BACKWARD=epilogue`` (the default stays
"separate", today's two nodes, until a GPU measures the node faster).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .. import _variants, backends
from ..activations import Activation, is_gated
from .grouped_gemm import grouped_gemm_reference
from .grouped_up import grouped_up_reference


def _activation_of(name: str, params: List[float], interleaved: bool) -> Activation:
    return Activation(name, params[0], params[1], interleaved)


def grouped_mlp_node_reference(x, w_up, w_down, b_up, b_down, offsets, activation: Activation, widths: List[int],
                               all_rows_grouped: bool, save_h: bool):
    """``(y, h)``: the experts' outputs, and the pre-activation (empty unless ``save_h``)."""
    a, h = grouped_up_reference(x, w_up, b_up, offsets, activation, widths, all_rows_grouped)
    y = grouped_gemm_reference(a, w_down.to(x.dtype), offsets, True, None if b_down is None else b_down.to(x.dtype),
                               widths, "k" if widths else "")
    return y, (h if save_h else x.new_empty(0))


def grouped_mlp_node_backward_reference(grad_y, x, w_up, w_down, b_up, b_down, offsets, h, activation: Activation,
                                        widths: List[int], dh_buffer=None):
    """Gradients ``(x, w_up, w_down, b_up, b_down)`` of the reference forward (empty for absent biases),
    in the inputs' dtypes (``dh_buffer``, where a backend may write dh, is not used: the reference
    recomputes)."""
    inputs = [t for t in (x, w_up, w_down, b_up, b_down) if t is not None]

    def output(*tensors):
        it = iter(tensors)
        args = [next(it) if t is not None else None for t in (x, w_up, w_down, b_up, b_down)]
        return grouped_mlp_node_reference(*args, offsets, activation, widths, False, False)[0]

    _, vjp = torch.func.vjp(output, *inputs)  # torch.func: autograd is off inside a custom op
    grads = iter(vjp(grad_y.to(x.dtype)))
    return tuple(next(grads) if t is not None else x.new_empty(0) for t in (x, w_up, w_down, b_up, b_down))


backends.register("grouped_mlp_node", "torch")(grouped_mlp_node_reference)
backends.register("grouped_mlp_node_backward", "torch")(grouped_mlp_node_backward_reference)


@torch.library.custom_op("fastmoe::grouped_mlp_node", mutates_args=())
def _node_op(x: Tensor, w_up: Tensor, w_down: Tensor, b_up: Optional[Tensor], b_down: Optional[Tensor], offsets: Tensor,
             activation: str, activation_params: List[float], interleaved: bool, widths: List[int],
             all_rows_grouped: bool, save_h: bool, backend: str, backward_backend: str) -> tuple[Tensor, Tensor]:
    from .grouped_gemm import check_offsets

    check_offsets("grouped_mlp", offsets, x.shape[0])
    act = _activation_of(activation, activation_params, interleaved)
    return backends.get_kernel("grouped_mlp_node", backend)(x, w_up, w_down, b_up, b_down, offsets, act, widths,
                                                             all_rows_grouped, save_h)


@_node_op.register_fake
def _(x, w_up, w_down, b_up, b_down, offsets, activation, activation_params, interleaved, widths, all_rows_grouped,
      save_h, backend, backward_backend):
    m = 2 if is_gated(activation) else 1
    f = max(widths) if widths else w_down.shape[2]
    return x.new_empty(x.shape), x.new_empty((x.shape[0], m * f) if save_h else (0,))


@torch.library.custom_op("fastmoe::grouped_mlp_node_backward", mutates_args=())
def _node_backward_op(grad_y: Tensor, x: Tensor, w_up: Tensor, w_down: Tensor, b_up: Optional[Tensor],
                      b_down: Optional[Tensor], offsets: Tensor, h: Tensor, activation: str,
                      activation_params: List[float], interleaved: bool, widths: List[int],
                      backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    act = _activation_of(activation, activation_params, interleaved)
    return backends.get_kernel("grouped_mlp_node_backward", backend)(grad_y, x, w_up, w_down, b_up, b_down, offsets, h,
                                                                      act, widths)


@_node_backward_op.register_fake
def _backward_fake(grad_y, x, w_up, w_down, b_up, b_down, offsets, h, activation, activation_params, interleaved,
                   widths, backend):
    def like(t):
        return torch.empty_like(t) if t is not None else x.new_empty(0)

    return torch.empty_like(x), torch.empty_like(w_up), torch.empty_like(w_down), like(b_up), like(b_down)


@torch.library.custom_op("fastmoe::grouped_mlp_node_backward_consuming_h", mutates_args=("h",))
def _node_backward_consuming_h_op(grad_y: Tensor, x: Tensor, w_up: Tensor, w_down: Tensor, b_up: Optional[Tensor],
                                  b_down: Optional[Tensor], offsets: Tensor, h: Tensor, activation: str,
                                  activation_params: List[float], interleaved: bool, widths: List[int],
                                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """grouped_mlp_node_backward that may overwrite h with dh (_variants.DH_INTO_H: h is dead after it)."""
    act = _activation_of(activation, activation_params, interleaved)
    return backends.get_kernel("grouped_mlp_node_backward", backend)(grad_y, x, w_up, w_down, b_up, b_down, offsets, h,
                                                                      act, widths, dh_buffer=h)


_node_backward_consuming_h_op.register_fake(_backward_fake)


def _setup(ctx, inputs, output):
    x, w_up, w_down, b_up, b_down, offsets, activation, params, interleaved, widths, _grouped, _save, _fwd, bwd = inputs
    ctx.save_for_backward(x, w_up, w_down, b_up, b_down, offsets, output[1])
    ctx.activation, ctx.widths, ctx.backend = (activation, params, interleaved), widths, bwd
    # h is saved, never differentiated: autograd would otherwise fill a zero gradient of its size
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, _grad_h):
    x, w_up, w_down, b_up, b_down, offsets, h = ctx.saved_tensors
    if grad_y is None:  # no gradient reached y (grads are not materialised)
        return (None,) * 14
    op = _node_backward_consuming_h_op if _variants.DH_INTO_H else _node_backward_op
    grads = op(grad_y.contiguous(), x, w_up, w_down, b_up, b_down, offsets, h, *ctx.activation, ctx.widths, ctx.backend)
    grad_x, grad_w_up, grad_w_down, grad_b_up, grad_b_down = grads
    return (grad_x, grad_w_up, grad_w_down, grad_b_up if b_up is not None else None,
            grad_b_down if b_down is not None else None, *([None] * 9))


_node_op.register_autograd(_backward, setup_context=_setup)


def node_backends(x: Tensor, backend: Optional[str]) -> tuple[str, str]:
    """The backends of the node's forward and backward (resolved together: h is the forward's own)."""
    return (backends.resolve("grouped_mlp_node", backend, x.device, x.dtype),
            backends.resolve("grouped_mlp_node_backward", backend, x.device, x.dtype))


def grouped_mlp_node(x: Tensor, w_up: Tensor, w_down: Tensor, offsets: Tensor, activation: Activation,
                     b_up: Optional[Tensor] = None, b_down: Optional[Tensor] = None, *, widths=None,
                     backend: Optional[str] = None, all_rows_grouped: bool = False) -> Tensor:
    """The experts' MLP over grouped rows as one autograd node (see the module docstring). Arguments
    are checked by the caller (``grouped_mlp``)."""
    forward, backward = node_backends(x, backend)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (x, w_up, w_down, b_up, b_down))
    y, _ = _node_op(x.contiguous(), w_up, w_down, b_up, b_down, offsets, activation.name,
                    [activation.alpha, activation.limit], activation.interleaved, list(widths) if widths else [],
                    bool(all_rows_grouped), needs_grad, forward, backward)
    return y
