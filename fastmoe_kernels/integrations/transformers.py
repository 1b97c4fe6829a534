"""Hugging Face transformers integration.

1. ``"fastmoe"`` is a transformers experts implementation, registered when this module is imported
   (transformers has no plugin entry points; ``import fastmoe_kernels`` also imports this module
   when transformers is already loaded). Any model whose experts use ``@use_experts_implementation``
   then runs them on our kernels::

       import fastmoe_kernels.integrations.transformers  # registers "fastmoe"
       model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="fastmoe")
       # or: model.set_experts_implementation("fastmoe")

   It follows the interface's conventions: ``gate_up_proj [E, 2f, d]`` (``[E, d, 2f]`` when
   ``is_transposed``), ``up_proj`` for non-gated experts, biases, expert-parallel sentinels (ids ≥ the
   local expert count mean "another rank's expert" and are dropped). What the experts apply between
   their projections is found by running it (:mod:`fastmoe_kernels.hf_gate`): SwiGLU, GeGLU (erf or
   tanh), gpt-oss's clamped SwiGLU (interleaved or not, with biases), clamped SwiGLU, and plain
   SiLU/GELU/ReLU/ReLU² run fused in our kernels, reading the weights in place. Anything else — another
   ``_apply_gate`` or activation, a post-expert norm — runs our gather, grouped GEMMs and combine
   around the model's own function in PyTorch: correct, slower, and logged once per class.

2. ``from_transformers(block)`` converts a transformers sparse-MoE block — router, experts, shared
   experts — into an ``MoELayer`` with the same weights and routing (softmax or DeepSeek-V3's
   sigmoid with bias and group limiting, top-k renormalisation, routed scaling, Qwen2-MoE's gated
   shared expert, the activations above), for our dispatch modes and losses;
   ``to_transformers(layer, block)`` copies the weights back. Our router computes its logits in
   fp32 by default; ``router_precision="source"`` computes them as the block's router does (in the
   input's dtype for Mixtral-like bf16 routers), so that routing matches it exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from ..hf_gate import fused_activation, gate_function
from ..hf_layout import expert_weights
from ..ops import grouped_gemm, make_plan, moe_mlp, permute, unpermute

NAME = "fastmoe"


# ---- the experts-interface implementation --------------------------------------------------------
def fastmoe_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers ``ExpertsInterface`` implementation: ``(x [S, d], ids [S, k], weights [S, k]) → [S, d]``."""
    E = self.num_experts
    ids = top_k_index
    if getattr(self, "_is_expert_parallel", False):
        ids = torch.where((ids >= 0) & (ids < E), ids, -1)  # sentinels: another rank's expert
    plan = make_plan(ids, E)
    w_up, w_down, b_up, b_down = expert_weights(self)
    activation = fused_activation(self)
    if activation is not None:
        return moe_mlp(hidden_states, plan, top_k_weights, w_up, w_down, activation, b_up, b_down)
    return _generic_experts(self, hidden_states, plan, top_k_weights, w_up, w_down, b_up, b_down)


def _generic_experts(module, x, plan, weight, w_up, w_down, b_up, b_down) -> torch.Tensor:
    """Our gather, grouped GEMMs and combine around the module's own gate function (and post-expert
    norm): for what the fused kernels do not compute."""
    h = grouped_gemm(permute(x, plan), w_up, plan.offsets, trans_b=True, bias=b_up)
    y = grouped_gemm(gate_function(module)(h), w_down, plan.offsets, trans_b=True, bias=b_down)
    if getattr(module, "has_post_expert_norm", False):
        y = module.post_expert_norm(y)
    return unpermute(y, plan, weight)


def register() -> None:
    """Register ``"fastmoe"`` as a transformers experts implementation (idempotent; importing this
    module already did)."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as exc:
        raise ImportError("fastmoe_kernels.integrations.transformers needs transformers >= 5 "
                          "(pip install fastmoe_kernels[transformers])") from exc
    ExpertsInterface.register(NAME, fastmoe_experts_forward)


def _register_if_installed() -> None:
    try:
        register()
    except ImportError:  # transformers missing or too old: the conversions below still work
        pass


# ---- block conversion ------------------------------------------------------------------------------
def from_transformers(block: nn.Module, **overrides):
    """An ``MoELayer`` with the block's weights and routing (``MoELayer.from_transformers``)."""
    from ..layer import MoELayer

    return MoELayer.from_transformers(block, **overrides)


def to_transformers(layer, block: nn.Module) -> nn.Module:
    """Copy ``layer``'s weights into the transformers ``block`` (``MoELayer.to_transformers``)."""
    return layer.to_transformers(block)


_register_if_installed()
