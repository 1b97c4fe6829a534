"""The ``grouped_mlp_node`` op's Triton kernels (host side): the composition's experts as one autograd
node (see ``ops/grouped_mlp_node.py``).

Forward: ``grouped_up``'s kernel (a = act(h), h kept for training), then the down projection.
Backward: the dH kernel over ``G @ W_down`` (no gather, no routing weight: the composition's combine
applied it) writes dh, in W_up's row order for homogeneous experts, and ``a = act(h)``; dW_down from
(a, G) with plain loads; then ``grouped_up``'s backward from dh (one GEMM and one weight gradient over
2f where dh is in W_up's row order).
"""
from __future__ import annotations

import torch

from .._alloc import empty
from ._common import register
from .activation_backward import activation_backward, epilogue_split
from .grouped_gemm import grouped_gemm_triton
from .grouped_up import grouped_up_triton, up_backward_from_dh
from .moe_mlp import _cast, _matrices, _vectors
from .wgrad import grouped_wgrad


@register("grouped_mlp_node")
def grouped_mlp_node_triton(x, w_up, w_down, b_up, b_down, offsets, activation, widths, all_rows_grouped, save_h):
    a, h = grouped_up_triton(x, w_up, b_up, offsets, activation, widths, all_rows_grouped, save_h)
    return grouped_gemm_triton(a, w_down, offsets, True, b_down, widths, "k" if widths else ""), h


@register("grouped_mlp_node_backward")
def grouped_mlp_node_backward_triton(grad_y, x, w_up, w_down, b_up, b_down, offsets, h, activation, widths,
                                     dh_buffer=None):
    # ``dh_buffer``: h itself, given up by the op layer (FASTMOE_DH_INTO_H=on); used where dh's layout is
    # h's [gate | up], i.e. unless dh goes in gpt-oss's interleaved weight order.
    dt = x.dtype
    gated = activation.gated
    R = x.shape[0]
    f = max(widths) if widths else w_down.shape[2]
    offsets = offsets.to(torch.int32)
    if grad_y.dtype != dt:  # (an aten::to even when it is a no-op)
        grad_y = grad_y.to(dt)
    w_down_c = _cast(w_down, dt)
    in_weight_order = not widths  # homogeneous: dh in W_up's row order (interleaved for gpt-oss)
    dh_interleaved = in_weight_order and activation.interleaved
    dh = dh_buffer if dh_buffer is not None and not dh_interleaved else empty(R, (2 if gated else 1) * f, dtype=dt,
                                                                               device=x.device)
    a = empty(R, f, dtype=dt, device=x.device)
    activation_backward(grad_y, None, 1, None, w_down_c, _matrices(w_down_c, widths, "down", f), offsets, h, dh, None,
                        activation=activation, dh_interleaved=dh_interleaved, a_out=a,
                        split=epilogue_split(True))
    grad_w_down = empty(w_down.shape, dtype=w_down.dtype, device=x.device)
    grad_b_down = empty(b_down.shape, dtype=b_down.dtype, device=x.device) if b_down is not None else None
    grouped_wgrad(a, grad_y, offsets, grad_w_down, _matrices(grad_w_down, widths, "down", f), True,
                  grad_bias=grad_b_down, bias_vecs=_vectors(grad_b_down, widths, "down", f))
    del a  # freed before the up projection's gradients
    grad_x, grad_w_up, grad_b_up = up_backward_from_dh(dh, x, w_up, b_up, offsets, activation, widths,
                                                       dh_in_weight_order=in_weight_order)
    return grad_x, grad_w_up, grad_w_down, grad_b_up, grad_b_down if grad_b_down is not None else x.new_empty(0)
