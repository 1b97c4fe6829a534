"""grouped_up: the experts' up projection with the activation applied, ``a = act(x @ W_upᵀ + b)``.

``grouped_up(x [R, d], w_up, offsets [E+1], activation, b_up, *, widths) → a [R, f]`` (weights as in
:mod:`.grouped_mlp`; heterogeneous experts give ``[R, max f]``, zeros past each expert's width).
Rows outside every group are zeros (``all_rows_grouped``: left undefined, see ``grouped_gemm``).

It is ``apply_activation(grouped_gemm(x, w_up, offsets, trans_b=True, bias=b_up))`` by definition (the
reference composes exactly that). A backend that registers the kernel runs it as one launch with the
activation in the GEMM's epilogue, writing ``a`` and the pre-activation ``h`` that the backward needs
(no torch elementwise pass over the activation-sized tensors in the forward: on the first H100 run
the composition spent 1.7 ms of a 12.4 ms Qwen3 step and 8.4 ms at Mixtral on them, while the fused
up projection beat GEMM + SiLU + mul at both shapes). ``h`` is the backend's own (its layout is the
kernel's), consumed by the same backend's backward.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .. import backends
from .._variants import ACTIVATION_BACKWARD
from ..activations import Activation, apply_activation, apply_gated, is_gated
from .grouped_gemm import grouped_gemm_reference


# "kernel-in-place" (the flag and its predicted effect: _variants.ACTIVATION_BACKWARD): the backward gives h
# up as dh's buffer through an op that declares h mutated, so a second backward through a retained graph
# fails on h's version instead of reading dh as h.
ACTIVATION_KERNEL_IN_PLACE = ACTIVATION_BACKWARD == "kernel-in-place"


def _activation_of(name: str, params: List[float], interleaved: bool) -> Activation:
    return Activation(name, params[0], params[1], interleaved)


def grouped_up_reference(x, w_up, b_up, offsets, activation: Activation, widths: List[int], all_rows_grouped: bool,
                         save_h: bool = True):
    """``(a, h)``: the activation of the up projection, and its pre-activation (the weights' row order)."""
    w_up = w_up.to(x.dtype)
    b_up = None if b_up is None else b_up.to(x.dtype)
    if not widths:
        h = grouped_gemm_reference(x, w_up, offsets, True, b_up, [], "")
        return apply_activation(h, activation), h
    total = sum(widths)
    if not activation.gated:
        h = grouped_gemm_reference(x, w_up, offsets, True, b_up, widths, "n")
        return apply_activation(h, activation), h
    gate = grouped_gemm_reference(x, w_up[:total], offsets, True, None if b_up is None else b_up[:total], widths, "n")
    up = grouped_gemm_reference(x, w_up[total:], offsets, True, None if b_up is None else b_up[total:], widths, "n")
    return apply_gated(gate, up, activation), torch.cat([gate, up], dim=1)


def grouped_up_backward_reference(grad_a, x, w_up, b_up, offsets, h, activation: Activation, widths: List[int],
                                  dh_buffer=None):
    """Gradients ``(x, w_up, b_up or empty)`` of the reference forward's ``a``, in the inputs' dtypes
    (``dh_buffer``, where a backend may write dh, is not used: the reference recomputes)."""
    inputs = [t for t in (x, w_up, b_up) if t is not None]

    def output(*tensors):
        it = iter(tensors)
        args = [next(it) if t is not None else None for t in (x, w_up, b_up)]
        return grouped_up_reference(args[0], args[1], args[2], offsets, activation, widths, False)[0]

    _, vjp = torch.func.vjp(output, *inputs)  # torch.func: autograd is off inside a custom op
    grads = iter(vjp(grad_a))
    return tuple(next(grads) if t is not None else x.new_empty(0) for t in (x, w_up, b_up))


backends.register("grouped_up", "torch")(grouped_up_reference)
backends.register("grouped_up_backward", "torch")(grouped_up_backward_reference)


@torch.library.custom_op("fastmoe::grouped_up", mutates_args=())
def _grouped_up_op(x: Tensor, w_up: Tensor, b_up: Optional[Tensor], offsets: Tensor, activation: str,
                   activation_params: List[float], interleaved: bool, widths: List[int], all_rows_grouped: bool,
                   save_h: bool, backend: str, backward_backend: str) -> tuple[Tensor, Tensor]:
    from .grouped_gemm import check_offsets

    check_offsets("grouped_up", offsets, x.shape[0])
    act = _activation_of(activation, activation_params, interleaved)
    a, h = backends.get_kernel("grouped_up", backend)(x, w_up, b_up, offsets, act, widths, all_rows_grouped, save_h)
    return a, (h if save_h else x.new_empty(0))


def _hidden(w_up: Tensor, widths: List[int], gated: bool) -> int:
    if widths:
        return max(widths)
    return w_up.shape[1] // (2 if gated else 1)


@_grouped_up_op.register_fake
def _(x, w_up, b_up, offsets, activation, activation_params, interleaved, widths, all_rows_grouped, save_h, backend,
      backward_backend):
    gated = is_gated(activation)
    f = _hidden(w_up, widths, gated)
    h_shape = (x.shape[0], (2 if gated else 1) * f) if save_h else (0,)
    return x.new_empty((x.shape[0], f)), x.new_empty(h_shape)


@torch.library.custom_op("fastmoe::grouped_up_backward", mutates_args=())
def _grouped_up_backward_op(grad_a: Tensor, x: Tensor, w_up: Tensor, b_up: Optional[Tensor], offsets: Tensor,
                            h: Tensor, activation: str, activation_params: List[float], interleaved: bool,
                            widths: List[int], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    act = _activation_of(activation, activation_params, interleaved)
    return backends.get_kernel("grouped_up_backward", backend)(grad_a, x, w_up, b_up, offsets, h, act, widths)


@_grouped_up_backward_op.register_fake
def _(grad_a, x, w_up, b_up, offsets, h, activation, activation_params, interleaved, widths, backend):
    return torch.empty_like(x), torch.empty_like(w_up), (torch.empty_like(b_up) if b_up is not None else x.new_empty(0))


@torch.library.custom_op("fastmoe::grouped_up_backward_consuming_h", mutates_args=("h",))
def _grouped_up_backward_consuming_h_op(grad_a: Tensor, x: Tensor, w_up: Tensor, b_up: Optional[Tensor],
                                        offsets: Tensor, h: Tensor, activation: str, activation_params: List[float],
                                        interleaved: bool, widths: List[int],
                                        backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """grouped_up_backward that may overwrite h with dh (h is dead after it: ACTIVATION_KERNEL_IN_PLACE)."""
    act = _activation_of(activation, activation_params, interleaved)
    return backends.get_kernel("grouped_up_backward", backend)(grad_a, x, w_up, b_up, offsets, h, act, widths,
                                                               dh_buffer=h)


@_grouped_up_backward_consuming_h_op.register_fake
def _(grad_a, x, w_up, b_up, offsets, h, activation, activation_params, interleaved, widths, backend):
    return torch.empty_like(x), torch.empty_like(w_up), (torch.empty_like(b_up) if b_up is not None else x.new_empty(0))


def _setup(ctx, inputs, output):
    x, w_up, b_up, offsets, activation, params, interleaved, widths, _grouped, _save, _fwd, backward = inputs
    ctx.save_for_backward(x, w_up, b_up, offsets, output[1])
    ctx.activation, ctx.widths, ctx.backend = (activation, params, interleaved), widths, backward
    # h is saved, never differentiated: autograd would otherwise fill a zero gradient of its size
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_a, _grad_h):
    if grad_a is None:  # no gradient reached a (grads are not materialised)
        return (None,) * 12
    x, w_up, b_up, offsets, h = ctx.saved_tensors
    op = _grouped_up_backward_consuming_h_op if ACTIVATION_KERNEL_IN_PLACE else _grouped_up_backward_op
    grad_x, grad_w, grad_b = op(grad_a.contiguous(), x, w_up, b_up, offsets, h, *ctx.activation, ctx.widths,
                                ctx.backend)
    return grad_x, grad_w, (grad_b if b_up is not None else None), *([None] * 9)


_grouped_up_op.register_autograd(_backward, setup_context=_setup)


def grouped_up_backends(x: Tensor, backend: Optional[str]) -> tuple[str, str]:
    """The backends of the forward and of the backward (resolved together: h is the forward's own)."""
    return (backends.resolve("grouped_up", backend, x.device, x.dtype),
            backends.resolve("grouped_up_backward", backend, x.device, x.dtype))


def grouped_up(x: Tensor, w_up: Tensor, offsets: Tensor, activation: Activation, b_up: Optional[Tensor] = None, *,
               widths: Optional[Sequence[int]] = None, backend: Optional[str] = None,
               all_rows_grouped: bool = False) -> Tensor:
    """``act(x @ W_upᵀ + b)`` per expert group (see the module docstring). Differentiable in x, w_up and
    b_up. Arguments are checked by the caller (``grouped_mlp``)."""
    forward, backward = grouped_up_backends(x, backend)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_up, b_up))
    a, _ = _grouped_up_op(x.contiguous(), w_up, b_up, offsets, activation.name, [activation.alpha, activation.limit],
                          activation.interleaved, list(widths) if widths else [], bool(all_rows_grouped), needs_grad,
                          forward, backward)
    return a
