"""The fused expert MLP (host side): three launches forward, six backward.

Forward:  a = act(x[src] @ W_upᵀ)            (up_projection: gather + activation epilogue; h kept if training)
          y_slot[assignment] = a @ W_downᵀ     (grouped_matmul, scattered into assignment order, [T·k, d])
          out[t] = Σ_j w[t,j] · y_slot[t·k+j]  (combine; dropped slots are never read)
Backward: dh = act'(h) · w · (g[src] @ W_down), and Σ_n (g[src] @ W_down) · act(h) per row = the
          routing-weight gradient (activation_backward); dW_down = act(h)ᵀ (w·g[src]) (activation
          recomputed in the wgrad prologue); dW_up = x[src]ᵀ dh; dx = Σ_j ([dgate | dup] @ [W_gate; W_up])[slot].
Saved for backward: x, the routing and h — never the permuted x or the expert outputs.
``activation`` is an ``activations.Activation``; interleaved gate/up weights (gpt-oss) are read in
place (every other row), h always holds [gate | up].

Variants kept selectable for the GPU session's A/B (environment, read once; the defaults are what the
first H100 run measured):
- ``FASTMOE_DOWN_OUTPUT``: "scatter" (the down projection writes each row to its assignment slot) or
  "rows" (it writes contiguous expert-order rows, plain stores, and the combine reads them by row).
- ``FASTMOE_FUSED_BACKWARD``: "recompute" (above) or "stored": the dH kernel also writes
  ``A_s = w · act(h)`` (``act(h)`` with a down bias, whose gradient needs w·G), so every GEMM after it
  has plain operands — dW_down from (A_s, g[src]), dW_up one weight gradient over dh's 2f columns
  (dh written in W_up's row order, interleaved for gpt-oss), dx one GEMM over 2f into expert-order rows,
  then the combine by row (SonicMoE's order of the work, on our kernels). Its dH epilogue is split by
  even/odd columns (``FASTMOE_DH_EPILOGUE``). Costs an [R, f] buffer during the backward.
- ``FASTMOE_UP_WGRAD_X``: with "stored", the up projection's weight gradient gathers x's rows on load
  ("gather") or reads a materialised x[src] ("permuted": one gather pass, then plain loads).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .._variants import flag
from .._alloc import empty
from ._common import register
from ._layout import packed_cols, packed_rows, packed_vectors, stacked, stacked_vectors
from .activation_backward import activation_backward, epilogue_split, partial_rows_needed
from .grouped_gemm import grouped_matmul
from .permute import combine, gather, row_values
from .up_projection import up_projection
from .wgrad import grouped_wgrad


DOWN_OUTPUT = flag("FASTMOE_DOWN_OUTPUT", "scatter", ("scatter", "rows"))
FUSED_BACKWARD = flag("FASTMOE_FUSED_BACKWARD", "recompute", ("recompute", "stored"))
UP_WGRAD_X = flag("FASTMOE_UP_WGRAD_X", "gather", ("gather", "permuted"))


def _matrices(t: torch.Tensor, widths: List[int], part: str, f: int, interleaved: bool = False):
    """The ExpertMatrices of one part ("gate", "up", "down") of a weight-shaped tensor; gate and up rows
    alternate when ``interleaved`` (read in place, every other row)."""
    if part == "down":
        return packed_cols(t, widths) if widths else stacked(t)
    if widths:
        return packed_rows(t, widths, 0 if part == "gate" else sum(widths))
    if interleaved:
        return stacked(t, 0 if part == "gate" else 1, f, row_step=2)
    return stacked(t, 0 if part == "gate" else f, f)


def _vectors(t: Optional[torch.Tensor], widths: List[int], part: str, f: int, interleaved: bool = False):
    """The ExpertVectors of one part of a bias-shaped tensor (None without bias)."""
    if t is None:
        return None
    if part == "down":
        return stacked_vectors(t)
    if widths:
        return packed_vectors(t, widths, 0 if part == "gate" else sum(widths))
    if interleaved:
        return stacked_vectors(t, 0 if part == "gate" else 1, step=2)
    return stacked_vectors(t, 0 if part == "gate" else f)


def _hidden_width(w_down: torch.Tensor, widths: List[int]) -> int:
    return max(widths) if widths else w_down.shape[2]


def _cast(t: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


@register("moe_mlp")
def moe_mlp_forward(x, w_up, w_down, b_up, b_down, weight, row, assignment, offsets, activation, widths, save):
    T, d = x.shape
    k = row.shape[1]
    R = assignment.shape[0]
    gated, il = activation.gated, activation.interleaved
    # Cast first: the layouts describe the tensors the kernels read.
    w_up, w_down, b_up, b_down = (_cast(t, x.dtype) for t in (w_up, w_down, b_up, b_down))
    f = _hidden_width(w_down, widths)
    offsets = offsets.to(torch.int32)
    h = empty(R, (2 if gated else 1) * f, dtype=x.dtype, device=x.device) if save else None  # [gate | up]
    a = empty(R, f, dtype=x.dtype, device=x.device)
    up_projection(
        x, assignment, k, w_up, _matrices(w_up, widths, "gate", f, il),
        _matrices(w_up, widths, "up", f, il) if gated else None, offsets, a, activation=activation, bias=b_up,
        gate_bias=_vectors(b_up, widths, "gate", f, il), up_bias=_vectors(b_up, widths, "up", f, il) if gated else None,
        h=h,
    )
    down = dict(b=w_down, n_out=d, bias=b_down, bias_vecs=_vectors(b_down, widths, "down", f), num_rows=R)
    h_out = h if h is not None else x.new_empty(0)
    if DOWN_OUTPUT == "rows":
        # Expert-order rows, plain stores; the combine gathers them by the plan's row (rows no group owns
        # are zeros, so a row index pointing there reads nothing stale).
        y_rows = empty(R, d, dtype=x.dtype, device=x.device)
        grouped_matmul(a, _matrices(w_down, widths, "down", f), True, offsets, y_rows, zero_outside=True, **down)
        return combine(y_rows, row, weight), h_out
    y_slots = empty(T * k, d, dtype=x.dtype, device=x.device)
    grouped_matmul(a, _matrices(w_down, widths, "down", f), True, offsets, y_slots, c_row_index=assignment, **down)
    return combine(y_slots, row, weight, assignment=assignment), h_out


@register("moe_mlp_backward")
def moe_mlp_backward(grad_out, x, w_up, w_down, b_up, b_down, weight, row, assignment, offsets, h, activation, widths,
                     dh_buffer=None):
    # ``dh_buffer``: h itself, given up by the op layer (FASTMOE_DH_INTO_H=on); the stored backward writes dh
    # there where dh's layout is h's (h is dead after the dH kernel: A_s replaces it for dW_down), the
    # recomputing one never (its dW_down rebuilds act(h) from h).
    T, d = x.shape
    k = row.shape[1]
    R = assignment.shape[0]
    gated, il = activation.gated, activation.interleaved
    dt = x.dtype
    param_dtypes = [t.dtype if t is not None else None for t in (w_up, w_down, b_up, b_down)]
    w_up_c, w_down_c, b_down_c = (_cast(t, dt) for t in (w_up, w_down, b_down))
    f = _hidden_width(w_down, widths)
    offsets = offsets.to(torch.int32)
    grad_out = grad_out.to(dt)
    weight_flat = weight.reshape(-1)
    stored = FUSED_BACKWARD == "stored"
    # With "stored" and homogeneous experts dh is written in W_up's row order (interleaved for gpt-oss):
    # dW_up and dx are then one plain GEMM over its 2f columns each.
    one_up_matrix = stored and not widths

    # dh and the routing-weight gradient's partial sums, from g[src] @ W_down ("stored": and A_s).
    dh_interleaved = one_up_matrix and il
    if stored and dh_buffer is not None and not dh_interleaved:
        dh = dh_buffer
    else:
        dh = empty(R, (2 if gated else 1) * f, dtype=dt, device=x.device)
    partial = empty(partial_rows_needed(f), R, dtype=torch.float32, device=x.device)
    a_scaled = stored and b_down is None  # a down bias's gradient is Σ w·g: then G is scaled, not A
    a_down = empty(R, f, dtype=dt, device=x.device) if stored else None
    activation_backward(grad_out, assignment, k, weight_flat, w_down_c, _matrices(w_down_c, widths, "down", f),
                        offsets, h, dh, partial, activation=activation, dh_interleaved=dh_interleaved,
                        a_out=a_down, a_scaled=a_scaled, split=epilogue_split(stored))
    row_partials = partial  # [P, R]: the routing-weight gradient per row is their sum
    if b_down is not None:
        # The down bias is part of each expert's output: its share of the weight gradient.
        grad_row = partial.sum(0) if partial.shape[0] else torch.zeros(R, dtype=torch.float32, device=x.device)
        expert_of_row = torch.searchsorted(offsets[1:], torch.arange(R, device=x.device, dtype=torch.int32), right=True)
        expert_of_row = expert_of_row.clamp(max=offsets.shape[0] - 2)
        src_ok = (assignment >= 0) & (assignment < T * k)  # like the kernels: an index out of range reads nothing
        src = torch.where(src_ok, assignment // k, 0).long()
        grad_row = grad_row + torch.where(src_ok, (grad_out.float()[src] * b_down_c.float()[expert_of_row]).sum(-1), 0.0)
        row_partials = grad_row[None]
    grad_weight = row_values(row_partials, row, assignment, weight.dtype)

    # dW_down, db_down.
    # Weight gradients are written in the parameters' dtypes: one program reduces each element, so
    # storing its fp32 sum rounded is the cast a separate pass would make, without an fp32 copy of the
    # experts (28 GiB for DeepSeek-V3's up projections, the out-of-memory of the first H100 run).
    grad_w_down = empty(w_down.shape, dtype=param_dtypes[1], device=x.device)
    grad_b_down = empty(b_down.shape, dtype=param_dtypes[3], device=x.device) if b_down is not None else None
    down = dict(g_row_index=assignment, g_row_div=k, grad_bias=grad_b_down,
                bias_vecs=_vectors(grad_b_down, widths, "down", f))
    down_mats = _matrices(grad_w_down, widths, "down", f)
    if stored:
        grouped_wgrad(a_down, grad_out, offsets, grad_w_down, down_mats, True, scale=None if a_scaled else weight_flat,
                      **down)
        a_down = None  # freed before the up projection's gradients
    else:
        # The activation recomputed from h in the prologue, G scaled by the routing weight on load.
        grouped_wgrad(h, grad_out, offsets, grad_w_down, down_mats, True, scale=weight_flat, activation_of_a=activation,
                      up_col=f, **down)

    # dW_up (one over 2f, or the gate and up halves), db_up.
    grad_w_up = empty(w_up.shape, dtype=param_dtypes[0], device=x.device)
    grad_b_up = empty(b_up.shape, dtype=param_dtypes[2], device=x.device) if b_up is not None else None
    if stored and UP_WGRAD_X == "permuted":
        x_a, x_rows = gather(x, assignment, R, div=k), {}
    else:
        x_a, x_rows = x, dict(a_row_index=assignment, a_row_div=k)
    if one_up_matrix:
        grouped_wgrad(x_a, dh, offsets, grad_w_up, stacked(grad_w_up), True, grad_bias=grad_b_up,
                      bias_vecs=stacked_vectors(grad_b_up) if grad_b_up is not None else None, **x_rows)
    else:
        for half in (("gate", "up") if gated else ("gate",)):
            col = f if half == "up" else 0
            grouped_wgrad(x_a, dh[:, col:col + f], offsets, grad_w_up, _matrices(grad_w_up, widths, half, f, il), True,
                          grad_bias=grad_b_up, bias_vecs=_vectors(grad_b_up, widths, half, f, il), **x_rows)
    x_a = None

    # dx = Σ_j (dh @ W_up)[slot], with [dgate | dup] @ [W_gate; W_up] in one accumulator.
    second = dict(second=_matrices(w_up_c, widths, "up", f, il), a2_col=f) if gated and not one_up_matrix else {}
    up_mats = stacked(w_up_c) if one_up_matrix else _matrices(w_up_c, widths, "gate", f, il)
    if stored:
        # Expert-order rows, plain stores, then the combine by row.
        dx_rows = empty(R, d, dtype=dt, device=x.device)
        grouped_matmul(dh, up_mats, False, offsets, dx_rows, b=w_up_c, n_out=d, zero_outside=True, num_rows=R, **second)
        grad_x = combine(dx_rows, row, None)
    else:
        dx_slots = empty(T * k, d, dtype=dt, device=x.device)
        grouped_matmul(dh, up_mats, False, offsets, dx_slots, b=w_up_c, n_out=d, c_row_index=assignment, num_rows=R,
                       **second)
        grad_x = combine(dx_slots, row, None, assignment=assignment)
    biases = [grad_b_up if grad_b_up is not None else x.new_empty(0),
              grad_b_down if grad_b_down is not None else x.new_empty(0)]
    return (grad_x, grad_w_up, grad_w_down, *biases, grad_weight)
