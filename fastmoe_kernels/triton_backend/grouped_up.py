"""The ``grouped_up`` op's Triton kernels (host side): the composition's up projection with the
activation in its epilogue, and its backward.

Forward: ``up_projection`` over rows already in expert order (no gather), writing ``a = act(h)`` and
``h = [gate | up]`` (the kernel's layout whatever the weights' row order). Backward: ``dh`` from ``h``
and the gradient of ``a`` (torch's elementwise ops for now: the training issue's part B moves them
into the down projection's input-gradient epilogue); ``dx = [dgate | dup] @ [W_gate; W_up]`` in one
grouped matmul (over 2f when W_up's rows are [gate | up] in order; with two A/B pairs for interleaved
or packed halves); ``dW_up`` and ``db_up`` by the grouped weight gradient (one over dh's 2f columns, or
one per half), stored in the parameters' dtypes.
"""
from __future__ import annotations

import torch

from .._alloc import empty
from ..activations import Activation, apply_activation
from .._variants import ACTIVATION_BACKWARD  # the flag (its values and predicted effect: there)
from ._common import register
from .activation_grad import activation_grad
from ._layout import stacked, stacked_vectors
from .grouped_gemm import grouped_matmul
from .moe_mlp import _cast, _matrices, _vectors
from .up_projection import up_projection
from .wgrad import grouped_wgrad



def _up_width(w_up: torch.Tensor, widths, gated: bool) -> int:
    return max(widths) if widths else w_up.shape[1] // (2 if gated else 1)


@register("grouped_up")
def grouped_up_triton(x, w_up, b_up, offsets, activation: Activation, widths, all_rows_grouped, save_h):
    gated, il = activation.gated, activation.interleaved
    w_up, b_up = _cast(w_up, x.dtype), _cast(b_up, x.dtype)
    R = x.shape[0]
    f = _up_width(w_up, widths, gated)
    # The kernel writes the groups' rows; rows outside every group are zeros unless the caller has none.
    alloc = empty if all_rows_grouped else torch.zeros
    a = alloc(R, f, dtype=x.dtype, device=x.device)
    # h only when the backward needs it (inference writes act(h) alone).
    h = alloc(R, (2 if gated else 1) * f, dtype=x.dtype, device=x.device) if save_h else None
    up_projection(
        x, None, 1, w_up, _matrices(w_up, widths, "gate", f, il), _matrices(w_up, widths, "up", f, il) if gated else None,
        offsets.to(torch.int32), a, activation=activation, bias=b_up, gate_bias=_vectors(b_up, widths, "gate", f, il),
        up_bias=_vectors(b_up, widths, "up", f, il) if gated else None, h=h,
    )
    return a, h if h is not None else x.new_empty(0)


@register("grouped_up_backward")
def grouped_up_backward_triton(grad_a, x, w_up, b_up, offsets, h, activation: Activation, widths, dh_buffer=None):
    # dh from h ([gate | up], whatever the weights' order) and the gradient of a. ``dh_buffer``: where dh
    # may be written (h itself, given up by the op layer), used by the kernel. The grouped_mlp node
    # (FASTMOE_MLP_BACKWARD=epilogue) moves this into the down projection's input-gradient epilogue instead.
    concatenated = Activation(activation.name, activation.alpha, activation.limit)
    grad_a = grad_a if grad_a.dtype == h.dtype else grad_a.to(h.dtype)
    if ACTIVATION_BACKWARD == "torch":
        dh = _torch_activation_grad(grad_a, h, concatenated)
    else:
        dh = activation_grad(grad_a.contiguous(), h, concatenated,
                             dh_buffer if dh_buffer is not None else torch.empty_like(h))
    return up_backward_from_dh(dh, x, w_up, b_up, offsets.to(torch.int32), activation, widths,
                               dh_in_weight_order=not widths and not activation.interleaved)


def _torch_activation_grad(grad_a, h, concatenated: Activation):
    """dh by torch.func.vjp (autograd is off inside a custom op)."""
    _, vjp = torch.func.vjp(lambda t: apply_activation(t, concatenated), h)
    (dh,) = vjp(grad_a)
    # The recomputed activation and what vjp saved ([R, f] tensors each) are freed before the GEMMs
    # allocate dx and dW_up (the CPU memory count, benchmarks/results/cpu-2026-12-03-memory/: Mixtral's
    # step 9.38 → 9.13 GiB; the vjp's own temporaries are the rest of its excess).
    del _, vjp
    return dh.contiguous()


def up_backward_from_dh(dh, x, w_up, b_up, offsets, activation: Activation, widths, *, dh_in_weight_order: bool):
    """``(grad_x, grad_w_up, grad_b_up or empty)`` from dh [R, m·f]: [gate | up], or in W_up's own row
    order (``dh_in_weight_order``: [gate | up] rows, or interleaved ones with dh interleaved alike)."""
    gated, il = activation.gated, activation.interleaved
    w_up_c = _cast(w_up, x.dtype)
    f = _up_width(w_up, widths, gated)
    R = x.shape[0]
    grad_x = empty(R, x.shape[1], dtype=x.dtype, device=x.device)
    grad_w_up = empty(w_up.shape, dtype=w_up.dtype, device=x.device)
    grad_b_up = empty(b_up.shape, dtype=b_up.dtype, device=x.device) if b_up is not None else None
    if dh_in_weight_order:
        # dh's columns are W_up's rows in order: dx is one GEMM over 2f and dW_up one weight gradient
        # over dh's 2f columns (x read once).
        grouped_matmul(dh, stacked(w_up_c), False, offsets, grad_x, b=w_up_c, n_out=x.shape[1], zero_outside=True,
                       num_rows=R)
        grouped_wgrad(x, dh, offsets, grad_w_up, stacked(grad_w_up), True, grad_bias=grad_b_up,
                      bias_vecs=stacked_vectors(grad_b_up) if grad_b_up is not None else None)
        return grad_x, grad_w_up, grad_b_up if grad_b_up is not None else x.new_empty(0)
    # Interleaved rows or packed widths: the halves are separate matrices (two A/B pairs; a wgrad each).
    grouped_matmul(dh, _matrices(w_up_c, widths, "gate", f, il), False, offsets, grad_x, b=w_up_c, n_out=x.shape[1],
                   second=_matrices(w_up_c, widths, "up", f, il) if gated else None, a2_col=f, zero_outside=True,
                   num_rows=R)
    for half in (("gate", "up") if gated else ("gate",)):
        col = f if half == "up" else 0
        grouped_wgrad(x, dh[:, col:col + f], offsets, grad_w_up, _matrices(grad_w_up, widths, half, f, il), True,
                      grad_bias=grad_b_up, bias_vecs=_vectors(grad_b_up, widths, half, f, il))
    return grad_x, grad_w_up, grad_b_up if grad_b_up is not None else x.new_empty(0)
