"""grouped_mlp: every expert's MLP over its rows — up projection, activation, down projection.

``grouped_mlp(x [R, d], w_up, w_down, offsets [E+1], activation) → [R, d]``.

Weights (out × in, like nn.Linear and Hugging Face's experts):
- homogeneous: ``w_up [E, m·f, d]`` (m = 2 for gated activations, rows ``[gate | up]``),
  ``w_down [E, d, f]``; biases ``b_up [E, m·f]``, ``b_down [E, d]``.
- heterogeneous (``widths`` = the f_e of each expert): ``w_up [m·Σf, d]`` — the gate rows of all
  experts, expert 0 first, then (gated only) their up rows — and ``w_down [d, Σf]``; biases
  ``b_up [m·Σf]`` in the same order, ``b_down [E, d]``.

It composes ``grouped_up`` (the up projection with the activation in its epilogue, where a backend has
that kernel; else ``grouped_gemm`` and the activation) and ``grouped_gemm`` (each product on the
backend resolution picks); the fused form of the whole experts, gather and combine included, is
``moe_mlp``.
"""
from __future__ import annotations

import os

from typing import List, Optional, Sequence, Tuple

from torch import Tensor

from .._variants import flag
from .._checks import FLOAT_DTYPES, check_tensor
from ..activations import Activation, ActivationLike, apply_activation, apply_gated, as_activation
from .. import backends
from ..tuning import rows_bucket
from .grouped_gemm import grouped_gemm
from .grouped_mlp_node import grouped_mlp_node, node_backends
from .grouped_up import grouped_up, grouped_up_backends


def check_expert_weights(where: str, x: Tensor, w_up: Tensor, w_down: Tensor, b_up: Optional[Tensor],
                         b_down: Optional[Tensor], activation: ActivationLike, widths: Optional[Sequence[int]],
                         num_experts: int) -> Tuple[Activation, Optional[List[int]]]:
    """Check the experts' weights against ``x [·, d]`` and the expert count (layouts in the module
    docstring); return the activation and the widths as a list (None when homogeneous). Errors name
    the argument."""
    try:
        act = as_activation(activation)
    except ValueError as exc:
        raise ValueError(f"{where}: `activation`: {exc}") from None
    m = 2 if act.gated else 1
    d = x.shape[1]
    E = num_experts
    for name, t in (("w_up", w_up), ("w_down", w_down), ("b_up", b_up), ("b_down", b_down)):
        if t is not None:
            check_tensor(where, name, t, dtypes=FLOAT_DTYPES, device=x.device)
    if widths is None:
        check_tensor(where, "w_up", w_up, ndim=3, shape=(E, None, d))
        if w_up.shape[1] % m:
            raise ValueError(f"{where}: `w_up` of a gated activation must be [E, 2·f, d], got {list(w_up.shape)}")
        f = w_up.shape[1] // m
        check_tensor(where, "w_down", w_down, ndim=3, shape=(E, d, f))
        up_bias_shape = (E, m * f)
    else:
        widths = list(widths)
        if len(widths) != E or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in widths):
            raise ValueError(f"{where}: `widths` must be {E} ints >= 0 (one per expert), got {widths!r}")
        if act.interleaved:
            raise ValueError(f"{where}: interleaved gate/up weights need homogeneous experts (`widths` None)")
        total = sum(widths)
        check_tensor(where, "w_up", w_up, ndim=2, shape=(m * total, d))
        check_tensor(where, "w_down", w_down, ndim=2, shape=(d, total))
        up_bias_shape = (m * total,)
    if b_up is not None:
        check_tensor(where, "b_up", b_up, ndim=len(up_bias_shape), shape=up_bias_shape)
    if b_down is not None:
        check_tensor(where, "b_down", b_down, ndim=2, shape=(E, d))
    return act, widths


# The separate activation (a GEMM, then torch's elementwise ops), kept selectable for the GPU session's
# A/B (read once, at import).
UP_ACTIVATION = flag("FASTMOE_UP_ACTIVATION", "epilogue", ("epilogue", "separate"))


# The composition's backward: "separate" (grouped_up's node, whose backward runs the activation's
# derivative as torch elementwise ops, then the down projection's own node) or "epilogue" (one node for
# both, the derivative in the epilogue of the down projection's input gradient: ops/grouped_mlp_node.py).
# Kept selectable for the GPU session's A/B; read once, at import.
MLP_BACKWARD = flag("FASTMOE_MLP_BACKWARD", "separate", ("separate", "epilogue"))


def _one_node(x: Tensor, backend) -> bool:
    """Whether the experts run as one node (FASTMOE_MLP_BACKWARD=epilogue) on the backend of grouped_up."""
    return MLP_BACKWARD == "epilogue" and node_backends(x, backend) == grouped_up_backends(x, backend)


def _activation_in_epilogue(x: Tensor, w_up: Tensor, widths, backend, all_rows_grouped: bool) -> bool:
    """Whether the up projection runs with its activation fused: where ``grouped_up`` has a kernel and the
    up projection's own GEMM would run on that kernel's backend (a composition on torch's grouped
    matmul, the cuda backend's, stays one)."""
    if UP_ACTIVATION != "epilogue":
        return False
    forward, _ = grouped_up_backends(x, backend)
    if forward == "torch":
        return False
    K, N = x.shape[1], (w_up.shape[1] if widths is None else sum(widths))
    gemm = backends.resolve("grouped_gemm", backend, x.device, x.dtype, packed="" if widths is None else "n", k_dim=K,
                            n_dim=N, element_size=x.element_size(), num_experts=len(widths) if widths else w_up.shape[0],
                            rows=rows_bucket(x.shape[0]), dtype_name=str(x.dtype).replace("torch.", ""),
                            all_rows_grouped=all_rows_grouped)
    return gemm == forward


def grouped_mlp(
    x: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    offsets: Tensor,
    activation: ActivationLike = "swiglu",
    b_up: Optional[Tensor] = None,
    b_down: Optional[Tensor] = None,
    *,
    widths: Optional[Sequence[int]] = None,
    backend: Optional[str] = None,
    all_rows_grouped: bool = False,
) -> Tensor:
    """Apply expert e's MLP to rows ``offsets[e]:offsets[e+1]`` of ``x``. Differentiable.

    ``all_rows_grouped``: every row is in a group (see ``grouped_gemm``); rows outside the groups are
    then left undefined instead of zeros."""
    where = "grouped_mlp"
    check_tensor(where, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(where, "offsets", offsets, ndim=1, device=x.device)
    act, widths = check_expert_weights(where, x, w_up, w_down, b_up, b_down, activation, widths, offsets.shape[0] - 1)
    grouping = dict(backend=backend, all_rows_grouped=all_rows_grouped)
    if _activation_in_epilogue(x, w_up, widths, backend, all_rows_grouped):
        if _one_node(x, backend):
            return grouped_mlp_node(x, w_up, w_down, offsets, act, b_up, b_down, widths=widths, **grouping)
        # One launch with the activation in the up projection's epilogue (h kept for the backward).
        a = grouped_up(x, w_up, offsets, act, b_up, widths=widths, backend=backend, all_rows_grouped=all_rows_grouped)
        if widths is None:
            return grouped_gemm(a, w_down, offsets, trans_b=True, bias=b_down, **grouping)
        return grouped_gemm(a, w_down, offsets, trans_b=True, bias=b_down, widths=widths, packed="k", **grouping)
    if widths is None:
        h = grouped_gemm(x, w_up, offsets, trans_b=True, bias=b_up, **grouping)
        a = apply_activation(h, act)
        return grouped_gemm(a, w_down, offsets, trans_b=True, bias=b_down, **grouping)
    total = sum(widths)
    packed_n = dict(trans_b=True, widths=widths, packed="n", backend=backend)
    if act.gated:
        gate = grouped_gemm(x, w_up[:total], offsets, bias=None if b_up is None else b_up[:total], **packed_n)
        up = grouped_gemm(x, w_up[total:], offsets, bias=None if b_up is None else b_up[total:], **packed_n)
        a = apply_gated(gate, up, act)
    else:
        a = apply_activation(grouped_gemm(x, w_up, offsets, bias=b_up, **packed_n), act)
    # Past its own width a row of `a` is act(0)·0 = 0 (or act(0) = 0), and packed="k" ignores it anyway.
    return grouped_gemm(a, w_down, offsets, trans_b=True, bias=b_down, widths=widths, packed="k", backend=backend)
