"""The fused expert MLP (host side): four grouped-matmul launches forward, six backward.

Forward:  a = act(x[src] @ W_upᵀ)            (gather + activation epilogue; h kept if training)
          y_slot[assignment] = a @ W_downᵀ     (scatter into assignment order, [T·k, d])
          out[t] = Σ_j w[t,j] · y_slot[t·k+j]  (combine; dropped slots are never read)
Backward: dh = act'(h) · w · (g[src] @ W_down), and Σ_n (g[src] @ W_down) · act(h) per row = the
          routing-weight gradient (one epilogue); dW_down = act(h)ᵀ (w·g[src]) (activation
          recomputed in the prologue); dW_up = x[src]ᵀ dh; dx = Σ_j (dh @ W_up)[slot].
Saved for backward: x, the routing and h — never the permuted x or the expert outputs.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton

from .._alloc import empty

from .. import backends
from ..activations import is_gated
from ._common import ACTIVATION_CODES
from ._layout import packed_cols, packed_rows, packed_vectors, stacked, stacked_vectors
from .grouped_gemm import grouped_matmul, grouped_wgrad
from .permute import combine

# The smallest BN among the grouped-matmul configs: bounds the number of N tiles of the partial
# routing-weight gradients, whatever config the autotuner picks.
_MIN_BN = 16


class _Layout:
    """Expert matrices and bias vectors of the up (gate, up) and down weights of one call."""

    def __init__(self, w_up, w_down, b_up, b_down, widths: List[int], gated: bool):
        self.f_max = max(widths) if widths else w_down.shape[2]
        if widths:
            total = sum(widths)
            self.gate = packed_rows(w_up, widths, 0)
            self.up = packed_rows(w_up, widths, total) if gated else None
            self.down = packed_cols(w_down, widths)
            self.b_gate = packed_vectors(b_up, widths, 0) if b_up is not None else None
            self.b_up = packed_vectors(b_up, widths, total) if (b_up is not None and gated) else None
        else:
            f = self.f_max
            self.gate = stacked(w_up, 0, f)
            self.up = stacked(w_up, f, f) if gated else None
            self.down = stacked(w_down)
            self.b_gate = stacked_vectors(b_up, 0) if b_up is not None else None
            self.b_up = stacked_vectors(b_up, f) if (b_up is not None and gated) else None
        self.b_down = stacked_vectors(b_down) if b_down is not None else None


def _cast(t: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


def moe_mlp_forward(x, w_up, w_down, b_up, b_down, weight, row, assignment, offsets, activation, widths, save):
    T, d = x.shape
    k = row.shape[1]
    R = assignment.shape[0]
    gated = is_gated(activation)
    dt = x.dtype
    w_up, w_down, b_up, b_down = (_cast(t, dt) for t in (w_up, w_down, b_up, b_down))
    lay = _Layout(w_up, w_down, b_up, b_down, widths, gated)
    f = lay.f_max
    offsets = offsets.to(torch.int32)
    h = empty(R, (2 if gated else 1) * f, dtype=dt, device=x.device) if save else x.new_empty(0)
    a = empty(R, f, dtype=dt, device=x.device)
    grouped_matmul(
        x, w_up, lay.gate, True, offsets, a, n_out=f, a_index=assignment, a_div=k,
        bias=b_up, vecs=lay.b_gate, mats2=lay.up, vecs2=lay.b_up, second_b=1 if gated else 0,
        epilogue=1, act=ACTIVATION_CODES[activation], gated=gated, h=h if save else None, up_col=f, store_h=save,
    )
    y_slots = empty(T * k, d, dtype=dt, device=x.device)
    grouped_matmul(a, w_down, lay.down, True, offsets, y_slots, n_out=d, c_index=assignment,
                   bias=b_down, vecs=lay.b_down, num_rows=R)
    return combine(y_slots, row, weight, ordered=True), h


def moe_mlp_backward(grad_out, x, w_up, w_down, b_up, b_down, weight, row, assignment, offsets, h, activation, widths):
    T, d = x.shape
    k = row.shape[1]
    R = assignment.shape[0]
    gated = is_gated(activation)
    act = ACTIVATION_CODES[activation]
    dt = x.dtype
    param_dtypes = [t.dtype if t is not None else None for t in (w_up, w_down, b_up, b_down)]
    w_up_c, w_down_c, b_up_c, b_down_c = (_cast(t, dt) for t in (w_up, w_down, b_up, b_down))
    lay = _Layout(w_up_c, w_down_c, b_up_c, b_down_c, widths, gated)
    f = lay.f_max
    offsets = offsets.to(torch.int32)
    grad_out = grad_out.to(dt)
    weight_flat = weight.reshape(-1)

    # dh (and the routing-weight gradient partials) from g[src] @ W_down.
    dh = empty(R, (2 if gated else 1) * f, dtype=dt, device=x.device)
    partial = torch.zeros(triton.cdiv(f, _MIN_BN), R, dtype=torch.float32, device=x.device)
    grouped_matmul(
        grad_out, w_down_c, lay.down, False, offsets, dh, n_out=f, a_index=assignment, a_div=k,
        epilogue=2, act=act, gated=gated, h=h, up_col=f, scale=weight_flat, scale_index=assignment, partial=partial,
    )
    grad_row = partial.sum(0)
    if b_down is not None:
        expert_of_row = torch.searchsorted(offsets[1:], torch.arange(R, device=x.device, dtype=torch.int32), right=True)
        expert_of_row = expert_of_row.clamp(max=offsets.shape[0] - 2)
        src = torch.where(assignment >= 0, assignment // k, 0).long()
        grad_row = grad_row + (grad_out.float()[src] * b_down_c.float()[expert_of_row]).sum(-1)
    grad_weight = torch.where(row >= 0, grad_row[row.clamp(min=0).long()], 0.0).to(weight.dtype)

    # dW_down (activation recomputed from h), db_down.
    grad_w_down = empty(w_down.shape, dtype=torch.float32, device=x.device)
    grad_b_down = empty(b_down.shape, dtype=torch.float32, device=x.device) if b_down is not None else None
    grouped_wgrad(
        h, grad_out, offsets, grad_w_down, _layout_of(grad_w_down, widths, "down", f), True,
        g_index=assignment, g_div=k, scale=weight_flat, a_act=act, gated=gated, up_col=f,
        grad_bias=grad_b_down, vecs=stacked_vectors(grad_b_down) if grad_b_down is not None else None,
    )

    # dW_up (gate and up halves), db_up.
    grad_w_up = empty(w_up.shape, dtype=torch.float32, device=x.device)
    grad_b_up = empty(b_up.shape, dtype=torch.float32, device=x.device) if b_up is not None else None
    for half in (("gate", "up") if gated else ("gate",)):
        col = f if half == "up" else 0
        grouped_wgrad(
            x, dh[:, col:col + f], offsets, grad_w_up, _layout_of(grad_w_up, widths, half, f), True,
            a_index=assignment, a_div=k,
            grad_bias=grad_b_up, vecs=_bias_layout_of(grad_b_up, widths, half, f) if grad_b_up is not None else None,
        )

    # dx = Σ_j (dh @ W_up)[slot], with [dgate | dup] @ [W_gate; W_up] in one accumulator.
    dx_slots = empty(T * k, d, dtype=dt, device=x.device)
    grouped_matmul(
        dh, w_up_c, lay.gate, False, offsets, dx_slots, n_out=d, c_index=assignment, num_rows=R,
        mats2=lay.up, second_b=2 if gated else 0, a_up_col=f,
    )
    grad_x = combine(dx_slots, row, None, ordered=True)
    cast = [grad_w_up.to(param_dtypes[0]), grad_w_down.to(param_dtypes[1]),
            grad_b_up.to(param_dtypes[2]) if grad_b_up is not None else x.new_empty(0),
            grad_b_down.to(param_dtypes[3]) if grad_b_down is not None else x.new_empty(0)]
    return (grad_x, *cast, grad_weight)


def _layout_of(t, widths, part, f):
    """The ExpertMatrices of one part ("gate", "up", "down") of a weight-shaped tensor."""
    if part == "down":
        return packed_cols(t, widths) if widths else stacked(t)
    if widths:
        return packed_rows(t, widths, 0 if part == "gate" else sum(widths))
    return stacked(t, 0 if part == "gate" else f, f)


def _bias_layout_of(t, widths, part, f):
    if widths:
        return packed_vectors(t, widths, 0 if part == "gate" else sum(widths))
    return stacked_vectors(t, 0 if part == "gate" else f)


def _register():
    backends.register_kernel("moe_mlp", "triton")(moe_mlp_forward)
    backends.register_kernel("moe_mlp_backward", "triton")(moe_mlp_backward)


_register()
