"""The fp8 routed experts as one autograd node, their quantisers fused into the kernels that produce
the quantised tensors (issue 35, item 2: ``FASTMOE_FP8_QUANTISERS=fused``; default "separate").

``moe_mlp_fp8`` (ops/fp8_mlp.py) is three ops — the gathered up projection, the activated down
projection, the weighted combine — and each fp8 operand that passes from one to the next is written
in the layer's dtype and quantised again by a pass that reads it back. Inside one node
(triton_backend/fp8_fused.py):

- forward: act(h) is row-quantised in the up projection's epilogue (h is still written: the backward
  reads it), not by a pass over h;
- backward: the combine's input gradient ``w·g[token]`` is never written — its row and column
  quantisers read g and the routing weights; dh is quantised by rows and by columns in the down
  projection's dgrad epilogue and never written in the layer's dtype.

The numbers are the separate path's, bit for bit (the same roundings in the same order): the torch
emulation stays the specification and nothing in it changes. Counted from the code
(``bench.predictions.fp8_quantiser_bytes``; bf16, 16,384 tokens), the traffic removed: Qwen3-30B-A3B
0.40 GB of the forward and 2.68 GB of a training step (h read 0.40; the gather of ``w·g``, its read
and write 1.07; dh written and read back twice 1.21), Mixtral-8x7B 1.88 and 8.05 GB (dh 5.64 of it),
and 4 launches per step; at the H100's copy rate, 0.9 of the 18.4 ms and 2.8 of the 82.7 ms fp8 steps
the first run measured (benchmarks/results/model-2026-12-07/predictions.md). What the bytes do not
price: the dgrad's tile is fixed at 128×128 and its epilogue computes dh twice, the gated up
projection's at 64×256 (the A/B "fp8 fused quantisers" measures both paths).

``FASTMOE_FP8_QUANTISERS=fused-folded`` changes the recipe where the issue asks for it: the down
projection's dgrad reads the *tokens'* gradient quantised once per token (T rows instead of R = T·k)
and folds each row's routing weight into its row scale, instead of quantising each weighted copy
``w·g`` rounded to the layer's dtype (its wgrad still reads ``w·g``: its column tiles mix rows of
different weights). The specification changes with it (``fp8.grouped_gemm_fp8_folded_dgrad_reference``,
the node's torch backend); the rounding difference is the layer dtype's rounding of ``w·g`` and the
order of the scale products. Another 0.70 GB less per Qwen3 step (the quantiser's R − T rows, read and
written), 0.20 GB at Mixtral. Accuracy: benchmarks/results/cpu-2026-12-07-fp8-accuracy-folded/.

Where it applies: the triton backend with fp8 kernels, experts without biases (the biases are added
between the products, in the layer's dtype), and f a multiple of 128 for a gated activation with
gate and up halves side by side (each dgrad tile's up columns must be one row-scaling tile of dh);
elsewhere the separate path runs, which computes the same numbers.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .. import backends
from .._variants import flag
from ..activations import Activation, apply_activation
from ..fp8 import (TILE, backward_expected, grouped_gemm_fp8_backward_reference,
                   grouped_gemm_fp8_folded_dgrad_reference)
from .fp8_references import (activated_backward_reference, activated_forward_reference, gathered_backward_reference,
                             gathered_forward_reference)
from .grouped_gemm import check_offsets
from .grouped_gemm_fp8 import _warn_emulation, compute_capability
from .permute import combine_reference, unpermute_backward_reference
from .plan import DispatchPlan

# "fused-folded": the same node with the routing weight folded into the output gradient's row scales for the
# down projection's dgrad (a change of the recipe's rounding: see fp8.grouped_gemm_fp8_folded_dgrad_reference).
QUANTISERS = flag("FASTMOE_FP8_QUANTISERS", "separate", ("separate", "fused", "fused-folded"))


def _activation_of(name: str, params: List[float]) -> Activation:
    return Activation(name, params[0], params[1], bool(params[2]))


# ---- the specification: the separate path's three ops, composed -----------------------------------------
def moe_mlp_fp8_node_reference(x, weight, w_up, w_down, offsets, src, row, assignment, activation: Activation):
    """(tokens out, h, y): the gathered up projection, the activated down projection, the weighted combine."""
    h = gathered_forward_reference(x, w_up, offsets, src)
    y = activated_forward_reference(h, w_down, offsets, activation)
    return combine_reference(y, row, weight), h, y


def moe_mlp_fp8_node_backward_reference(grad_out, x, weight, w_up, w_down, offsets, src, row, assignment, h, y,
                                        activation: Activation, folded: bool):
    """(dx, d weight fp32, dW_up, dW_down): each op's backward reference in turn; ``folded``: the down
    projection's dgrad from the tokens' quantised gradient, the routing weight in its row scales
    (:func:`~fastmoe_kernels.fp8.grouped_gemm_fp8_folded_dgrad_reference`; its wgrad as before)."""
    grad_y, grad_weight = unpermute_backward_reference(grad_out, y, row, weight, assignment)
    if folded:
        a, activation_vjp = torch.func.vjp(lambda t: apply_activation(t, activation), h)
        _, grad_w_down = grouped_gemm_fp8_backward_reference(grad_y, a, w_down, offsets)
        valid = assignment >= 0
        row_weight = torch.where(valid, weight.reshape(-1)[torch.where(valid, assignment, 0).long()], 0.0)
        grad_a = grouped_gemm_fp8_folded_dgrad_reference(grad_out, src, row_weight, w_down, offsets, h.dtype)
        (grad_h,) = activation_vjp(grad_a)
    else:
        grad_h, grad_w_down = activated_backward_reference(grad_y, h, w_down, offsets, activation)
    grad_rows, grad_w_up = gathered_backward_reference(grad_h, x, w_up, offsets, src)
    grad_x = combine_reference(grad_rows, row, grad_rows.new_empty(0, dtype=torch.float32))
    return grad_x, grad_weight.float(), grad_w_up, grad_w_down


backends.register("moe_mlp_fp8_node", "torch")(moe_mlp_fp8_node_reference)
backends.register("moe_mlp_fp8_node_backward", "torch")(moe_mlp_fp8_node_backward_reference)


# ---- the op -----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastmoe::moe_mlp_fp8_node", mutates_args=())
def _node_op(x: Tensor, weight: Tensor, w_up: Tensor, w_down: Tensor, offsets: Tensor, src: Tensor, row: Tensor,
             assignment: Tensor, act_name: str, act_params: List[float], folded: bool, backend: str,
             backward_backend: str) -> tuple[Tensor, Tensor, Tensor]:
    check_offsets("moe_mlp_fp8", offsets, src.shape[0])  # inside the op, where torch.compile does not trace it
    return backends.get_kernel("moe_mlp_fp8_node", backend)(x, weight, w_up, w_down, offsets, src, row, assignment,
                                                            _activation_of(act_name, act_params))


@_node_op.register_fake
def _(x, weight, w_up, w_down, offsets, src, row, assignment, act_name, act_params, folded, backend,
      backward_backend):
    R = src.shape[0]
    return x.new_empty(x.shape), x.new_empty((R, w_up.shape[1])), x.new_empty((R, w_down.shape[1]))


@torch.library.custom_op("fastmoe::moe_mlp_fp8_node_backward", mutates_args=())
def _node_backward_op(grad_out: Tensor, x: Tensor, weight: Tensor, w_up: Tensor, w_down: Tensor, offsets: Tensor,
                      src: Tensor, row: Tensor, assignment: Tensor, h: Tensor, y: Tensor, act_name: str,
                      act_params: List[float], folded: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return backends.get_kernel("moe_mlp_fp8_node_backward", backend)(
        grad_out, x, weight, w_up, w_down, offsets, src, row, assignment, h, y, _activation_of(act_name, act_params),
        folded)


@_node_backward_op.register_fake
def _(grad_out, x, weight, w_up, w_down, offsets, src, row, assignment, h, y, act_name, act_params, folded, backend):
    return (torch.empty_like(x), weight.new_empty(weight.shape, dtype=torch.float32), torch.empty_like(w_up),
            torch.empty_like(w_down))


def _setup(ctx, inputs, output):
    x, weight, w_up, w_down, offsets, src, row, assignment, act_name, act_params, folded, _, backward_backend = inputs
    _, h, y = output
    ctx.save_for_backward(x, weight, w_up, w_down, offsets, src, row, assignment, h, y)
    ctx.activation, ctx.backend, ctx.weight_dtype = (act_name, act_params, folded), backward_backend, weight.dtype
    ctx.mark_non_differentiable(h, y)  # saved for the backward, never differentiated
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_h, _grad_y):
    x, weight, w_up, w_down, offsets, src, row, assignment, h, y = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 13
    grad_x, grad_weight, grad_w_up, grad_w_down = _node_backward_op(
        grad_out.contiguous(), x, weight, w_up, w_down, offsets, src, row, assignment, h, y, *ctx.activation,
        ctx.backend)
    return (grad_x, grad_weight.to(ctx.weight_dtype), grad_w_up, grad_w_down) + (None,) * 9


_node_op.register_autograd(_backward, setup_context=_setup)


def fused_quantisers_apply(w_down: Tensor, activation: Activation, b_up: Optional[Tensor],
                           b_down: Optional[Tensor]) -> bool:
    """Whether ``moe_mlp_fp8`` takes the node (see the module docstring)."""
    if QUANTISERS == "separate" or b_up is not None or b_down is not None:
        return False
    return not (activation.gated and not activation.interleaved and w_down.shape[2] % TILE)


def moe_mlp_fp8_node(x: Tensor, plan: DispatchPlan, weight: Tensor, w_up: Tensor, w_down: Tensor,
                     activation: Activation, *, backend: Optional[str] = None) -> Tensor:
    """``moe_mlp_fp8(x, plan, weight, w_up, w_down, activation)`` as one node (arguments checked by it)."""
    cc = compute_capability(x.device)
    forward = backends.resolve("moe_mlp_fp8_node", backend, x.device, x.dtype, cc=cc)
    backward = backends.resolve("moe_mlp_fp8_node_backward", backend, x.device, x.dtype, cc=cc)
    if "torch" in (forward, backward):
        _warn_emulation(x.device)
    params = [float(activation.alpha), float(activation.limit), float(activation.interleaved)]
    args = (x.contiguous(), weight.contiguous(), w_up, w_down, plan.offsets, plan.src, plan.row, plan.assignment,
            activation.name, params, QUANTISERS == "fused-folded", forward, backward)
    if torch.compiler.is_compiling():
        return _node_op(*args)[0]
    # The weight cache writes the dgrad's layout in the forward's pass when a backward will follow.
    token = backward_expected.set(torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, w_up, w_down)))
    try:
        return _node_op(*args)[0]
    finally:
        backward_expected.reset(token)
