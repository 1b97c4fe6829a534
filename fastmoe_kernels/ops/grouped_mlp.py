"""grouped_mlp: every expert's MLP over its rows — up projection, activation, down projection.

``grouped_mlp(x [R, d], w_up, w_down, offsets [E+1], activation) → [R, d]``.

Weights (out × in, like nn.Linear and Hugging Face's experts):
- homogeneous: ``w_up [E, m·f, d]`` (m = 2 for gated activations, rows ``[gate | up]``),
  ``w_down [E, d, f]``; biases ``b_up [E, m·f]``, ``b_down [E, d]``.
- heterogeneous (``widths`` = the f_e of each expert): ``w_up [m·Σf, d]`` — the gate rows of all
  experts, expert 0 first, then (gated only) their up rows — and ``w_down [d, Σf]``; biases
  ``b_up [m·Σf]`` in the same order, ``b_down [E, d]``.

It composes ``grouped_gemm`` (each product on the backend resolution picks) and the activation; the
fused form of the experts, with the activation in the GEMM epilogue, is ``moe_mlp``.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from ..activations import apply_activation, apply_gated, is_gated
from .grouped_gemm import grouped_gemm


def grouped_mlp(
    x: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    offsets: Tensor,
    activation: str = "swiglu",
    b_up: Optional[Tensor] = None,
    b_down: Optional[Tensor] = None,
    *,
    widths: Optional[Sequence[int]] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Apply expert e's MLP to rows ``offsets[e]:offsets[e+1]`` of ``x``. Differentiable."""
    if widths is None:
        h = grouped_gemm(x, w_up, offsets, trans_b=True, bias=b_up, backend=backend)
        a = apply_activation(h, activation)
        return grouped_gemm(a, w_down, offsets, trans_b=True, bias=b_down, backend=backend)
    widths = list(widths)
    total = sum(widths)
    packed_n = dict(trans_b=True, widths=widths, packed="n", backend=backend)
    if is_gated(activation):
        gate = grouped_gemm(x, w_up[:total], offsets, bias=None if b_up is None else b_up[:total], **packed_n)
        up = grouped_gemm(x, w_up[total:], offsets, bias=None if b_up is None else b_up[total:], **packed_n)
        a = apply_gated(gate, up, activation)
    else:
        a = apply_activation(grouped_gemm(x, w_up, offsets, bias=b_up, **packed_n), activation)
    # Past its own width a row of `a` is act(0)·0 = 0 (or act(0) = 0), and packed="k" ignores it anyway.
    return grouped_gemm(a, w_down, offsets, trans_b=True, bias=b_down, widths=widths, packed="k", backend=backend)
