"""Hugging Face transformers integration.

1. ``register()`` adds ``"fastmoe"`` to transformers' experts interface, so any model whose experts
   use ``@use_experts_implementation`` (Mixtral, Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V3, …) runs them
   on our kernels::

       from fastmoe_kernels.integrations import transformers as fm_hf
       fm_hf.register()
       model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="fastmoe")
       # or: model.set_experts_implementation("fastmoe")

   It follows the interface's conventions: ``gate_up_proj [E, 2f, d]`` (``[E, d, 2f]`` when
   ``is_transposed``) with gate and up concatenated, or interleaved (gate, up, gate, …) when
   ``is_concatenated`` is False; ``up_proj`` for non-gated experts; biases; expert-parallel
   sentinels (ids ≥ the local expert count mean "another rank's expert" and are dropped). Gated
   SiLU/GELU and plain GELU/ReLU experts are supported; a custom ``_apply_gate`` (gpt-oss's clamped
   SwiGLU), a post-expert norm or another activation raise ``NotImplementedError`` naming it.

2. ``from_transformers(block)`` converts a transformers sparse-MoE block — router, experts, shared
   experts — into an ``MoELayer`` with the same weights and routing (softmax or DeepSeek-V3's
   sigmoid with bias and group limiting, top-k renormalisation, routed scaling, Qwen2-MoE's gated
   shared expert), for our dispatch modes and losses; ``to_transformers(layer, block)`` copies the
   weights back.
"""
from __future__ import annotations

import torch
from torch import nn

from ..hf_layout import activation_name, check_supported, expert_weights
from ..ops import make_plan, moe_mlp

NAME = "fastmoe"


# ---- the experts-interface implementation --------------------------------------------------------
def fastmoe_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers ``ExpertsInterface`` implementation: ``(x [S, d], ids [S, k], weights [S, k]) → [S, d]``."""
    check_supported(self)
    activation = activation_name(self)
    E = self.num_experts
    ids = top_k_index.to(torch.int32)
    if getattr(self, "_is_expert_parallel", False):
        ids = torch.where((ids >= 0) & (ids < E), ids, -1)  # sentinels: another rank's expert
    plan = make_plan(ids, E)
    w_up, w_down, b_up, b_down = expert_weights(self)
    return moe_mlp(hidden_states, plan, top_k_weights, w_up, w_down, activation, b_up, b_down)


def register() -> None:
    """Register ``"fastmoe"`` as a transformers experts implementation (idempotent)."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as exc:
        raise ImportError("fastmoe_kernels.integrations.transformers needs transformers >= 5 "
                          "(pip install fastmoe_kernels[transformers])") from exc
    ExpertsInterface.register(NAME, fastmoe_experts_forward)


# ---- block conversion ------------------------------------------------------------------------------
def from_transformers(block: nn.Module, **overrides):
    """An ``MoELayer`` with the block's weights and routing (``MoELayer.from_transformers``)."""
    from ..layer import MoELayer

    return MoELayer.from_transformers(block, **overrides)


def to_transformers(layer, block: nn.Module) -> nn.Module:
    """Copy ``layer``'s weights into the transformers ``block`` (``MoELayer.to_transformers``)."""
    return layer.to_transformers(block)
