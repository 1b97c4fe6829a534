"""The routed experts with fp8 GEMMs (``MoEConfig(fp8_recipe="blockwise")``).

``moe_mlp_fp8(x [T, d], plan, weight, w_up, w_down, activation)`` is, by definition,
``unpermute(act(grouped_gemm_fp8(permute(x)) + b_up) → grouped_gemm_fp8(·) + b_down, weight)``:
the router, the gather, the activation, the biases and the weighted combine run in the input's
precision, only the four products (two forward, and each one's dgrad and wgrad) in fp8.

The gather is fused with the quantisation: a row's 1×128 tiles depend on that row only, so the up
projection quantises each *token* once and its kernel reads the e4m3 rows by index — the same
numbers as quantising the permuted copy (``T`` rows instead of ``T·k``, and no permuted copy of x at
all; its wgrad gathers x the same way). The input gradient of the gathered product is the sum over a
token's rows, a gather like ``permute``'s backward (deterministic, fp32).

The activation is fused the same way: the down projection takes the pre-activation h, its row
quantiser (forward) and column quantiser (wgrad) compute act(h) as they read it, rounded to h's dtype
first (the value a stored act(h) would hold), and its dgrad's epilogue writes dh from the gradient
of act(h) and h. Neither act(h) nor its gradient is ever stored, and only h is kept for the
backward: per layer 2·R·f fewer saved elements than the composition (act(h), and the gate's
activation that autograd keeps for a gated product), about 400 MB at Qwen3-30B-A3B's shape with
16,384 tokens in bf16. Equal to the specification up to the activation's own rounding: an fp32
difference in act(h) can move one element across an e4m3 rounding boundary.

Homogeneous experts only (one width: the 128×128 weight blocks of a packed heterogeneous layout
would straddle experts); :class:`~fastmoe_kernels.config.MoEConfig` says so.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..activations import Activation
from .fp8_moe_node import fused_quantisers_apply, moe_mlp_fp8_node
from .fp8_references import (activated_backward_reference, activated_forward_reference, gathered_backward_reference,
                             gathered_forward_reference)
from .grouped_gemm_fp8 import apply_fp8_gemm, grouped_gemm_fp8
from .permute import unpermute
from .plan import DispatchPlan


backends.register("grouped_gemm_fp8_gathered", "torch")(gathered_forward_reference)
backends.register("grouped_gemm_fp8_gathered_backward", "torch")(gathered_backward_reference)
backends.register("grouped_gemm_fp8_activated", "torch")(activated_forward_reference)
backends.register("grouped_gemm_fp8_activated_backward", "torch")(activated_backward_reference)


def _expert_of_rows(offsets: Tensor, num_rows: int) -> Tensor:
    """The expert of each row, E for rows after the last group (no host sync)."""
    rows = torch.arange(num_rows, device=offsets.device)
    return torch.searchsorted(offsets[1:].to(torch.int64), rows, right=True)


def _add_bias(h: Tensor, bias: Optional[Tensor], expert_of_row: Optional[Tensor]) -> Tensor:
    """``h[r] + bias[expert_of_row[r]]`` in h's dtype; rows outside every group (expert E) get none."""
    if bias is None:
        return h
    padded = torch.cat([bias.to(h.dtype), bias.new_zeros(1, bias.shape[1], dtype=h.dtype)])
    return h + padded[expert_of_row]


def _experts_for_bias(offsets: Tensor, num_rows: int, b_up: Optional[Tensor], b_down: Optional[Tensor]):
    """The expert of each row, computed once for both biases (None without biases)."""
    return _expert_of_rows(offsets, num_rows) if b_up is not None or b_down is not None else None


def gathered_gemm_fp8(x: Tensor, plan: DispatchPlan, w: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """``grouped_gemm_fp8(permute(x, plan), w, plan.offsets)``, each token quantised once."""
    return apply_fp8_gemm(x, w, plan.offsets, src=plan.src, row=plan.row, backend=backend)


def activated_gemm_fp8(h: Tensor, w: Tensor, offsets: Tensor, act: Activation, *,
                       backend: Optional[str] = None) -> Tensor:
    """``grouped_gemm_fp8(apply_activation(h, act), w, offsets)``: the activation is computed where
    the quantisers read it (rounded to h's dtype first, as a stored act(h) would be) and its backward
    in the dgrad's epilogue; only h is kept for the backward."""
    return apply_fp8_gemm(h, w, offsets, activation=act, backend=backend)


def grouped_mlp_fp8(x: Tensor, w_up: Tensor, w_down: Tensor, offsets: Tensor, act: Activation,
                    b_up: Optional[Tensor] = None, b_down: Optional[Tensor] = None, *,
                    backend: Optional[str] = None) -> Tensor:
    """Expert-grouped rows in and out (``grouped_mlp`` with fp8 products; homogeneous experts)."""
    rows_expert = _experts_for_bias(offsets, x.shape[0], b_up, b_down)
    h = _add_bias(grouped_gemm_fp8(x, w_up, offsets, backend=backend), b_up, rows_expert)
    return _add_bias(activated_gemm_fp8(h, w_down, offsets, act, backend=backend), b_down, rows_expert)


def moe_mlp_fp8(x: Tensor, plan: DispatchPlan, weight: Tensor, w_up: Tensor, w_down: Tensor, act: Activation,
                b_up: Optional[Tensor] = None, b_down: Optional[Tensor] = None, *,
                backend: Optional[str] = None) -> Tensor:
    """Tokens in, tokens out (see the module docstring); with FASTMOE_FP8_QUANTISERS=fused one node
    whose quantisers run in the kernels producing their inputs (ops/fp8_moe_node.py: the same numbers)."""
    if fused_quantisers_apply(w_down, act, b_up, b_down):
        return moe_mlp_fp8_node(x, plan, weight, w_up, w_down, act, backend=backend)
    rows_expert = _experts_for_bias(plan.offsets, plan.num_rows, b_up, b_down)
    h = _add_bias(gathered_gemm_fp8(x, plan, w_up, backend=backend), b_up, rows_expert)
    y = _add_bias(activated_gemm_fp8(h, w_down, plan.offsets, act, backend=backend), b_down, rows_expert)
    return unpermute(y, plan, weight, backend=backend)
