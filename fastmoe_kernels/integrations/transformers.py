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

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from ..ops import make_plan, moe_mlp

NAME = "fastmoe"


# ---- the experts-interface implementation --------------------------------------------------------
def _activation_of(module) -> str:
    """Our activation name for the module's ``act_fn`` (gated or not)."""
    act = getattr(module, "act_fn", None)
    cls = type(act).__name__ if act is not None else "None"
    approximate = getattr(act, "approximate", "none")
    if cls in ("SiLU", "SiLUActivation"):
        base = "silu"
    elif cls in ("GELU", "GELUActivation") and approximate in (None, "none"):
        base = "gelu"
    elif cls == "ReLU":
        base = "relu"
    else:
        raise NotImplementedError(
            f"fastmoe experts: activation {cls} (approximate={approximate!r}) of {type(module).__name__} is not "
            "supported; supported: SiLU and exact GELU (gated or not), ReLU (not gated)")
    gated = getattr(module, "has_gate", True)
    if gated:
        if base == "relu":
            raise NotImplementedError("fastmoe experts: gated ReLU (ReGLU) is not supported")
        return "swiglu" if base == "silu" else "geglu"
    if base == "silu":
        raise NotImplementedError("fastmoe experts: non-gated SiLU is not supported")
    return base


def _check_supported(module) -> None:
    from transformers.integrations.moe import _default_apply_gate

    if getattr(module, "has_post_expert_norm", False):
        raise NotImplementedError(f"fastmoe experts: {type(module).__name__} applies a post-expert norm, which fastmoe "
                                  "does not support")
    gate_fn = getattr(type(module), "_apply_gate", _default_apply_gate)
    if getattr(module, "has_gate", True) and gate_fn is not _default_apply_gate:
        raise NotImplementedError(
            f"fastmoe experts: {type(module).__name__} overrides _apply_gate (a custom gating function, e.g. "
            "gpt-oss's clamped SwiGLU); fastmoe supports the standard act(gate) * up only")


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """Rows [g0, u0, g1, u1, …] along dim 1 → [g0, g1, … | u0, u1, …] (differentiable copy)."""
    E, two_f = t.shape[0], t.shape[1]
    rest = t.shape[2:]
    return t.reshape(E, two_f // 2, 2, *rest).transpose(1, 2).reshape(E, two_f, *rest)


def expert_weights(module) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(w_up [E, m·f, d], w_down [E, d, f], b_up, b_down) of a transformers experts module in our layout,
    as views (copies only for interleaved gate/up)."""
    gated = getattr(module, "has_gate", True)
    up = module.gate_up_proj if gated else module.up_proj
    down = module.down_proj
    if getattr(module, "is_transposed", False):
        up, down = up.transpose(1, 2), down.transpose(1, 2)
    b_up = b_down = None
    if getattr(module, "has_bias", False):
        b_up = module.gate_up_proj_bias if gated else module.up_proj_bias
        b_down = module.down_proj_bias
    if gated and not getattr(module, "is_concatenated", True):
        up = _deinterleave(up)
        b_up = _deinterleave(b_up) if b_up is not None else None
    return up, down, b_up, b_down


def fastmoe_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers ``ExpertsInterface`` implementation: ``(x [S, d], ids [S, k], weights [S, k]) → [S, d]``."""
    _check_supported(self)
    activation = _activation_of(self)
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
@dataclass
class _BlockParts:
    router: nn.Module
    experts: nn.Module
    shared: Optional[nn.Module]
    shared_gate: Optional[nn.Module]


def _parts(block: nn.Module) -> _BlockParts:
    experts = getattr(block, "experts", None)
    router = getattr(block, "gate", None)
    if experts is None or router is None or not hasattr(router, "weight"):
        raise TypeError(f"from_transformers: {type(block).__name__} is not a transformers sparse-MoE block "
                        "(expected `.gate` with a `.weight` and `.experts`)")
    if getattr(router, "bias", None) is not None:
        raise NotImplementedError(f"from_transformers: {type(router).__name__} adds a bias to the router logits; "
                                  "not supported")
    _check_supported(experts)
    shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    return _BlockParts(router, experts, shared, getattr(block, "shared_expert_gate", None))


def from_transformers(block: nn.Module, **overrides):
    """An ``MoELayer`` with the block's weights and routing; ``overrides`` set other MoEConfig fields
    (e.g. ``capacity_factor``, ``aux_loss_coeff``)."""
    from ..config import MoEConfig
    from ..layer import MoELayer

    p = _parts(block)
    router, experts = p.router, p.experts
    E, d = router.weight.shape
    w_up, w_down, b_up, b_down = expert_weights(experts)
    f = w_down.shape[2]
    sigmoid = hasattr(router, "e_score_correction_bias")
    fields = dict(
        d_model=d, d_ff=f, num_experts=E, top_k=router.top_k, activation=_activation_of(experts),
        bias=b_up is not None,
        score_func="sigmoid" if sigmoid else "softmax",
        normalize_topk=bool(getattr(router, "norm_topk_prob", True)),
        routed_scaling_factor=float(getattr(router, "routed_scaling_factor", 1.0)),
        expert_bias=sigmoid,
        router_jitter=float(getattr(block, "jitter_noise", 0.0) or 0.0),
    )
    groups = getattr(router, "n_group", None) or getattr(router, "num_group", None)
    if groups and groups > 1:
        fields.update(num_groups=int(groups), topk_groups=int(router.topk_group))
    if p.shared is not None:
        fields.update(num_shared_experts=1, shared_d_ff=p.shared.gate_proj.out_features,
                      shared_expert_gate=p.shared_gate is not None)
    fields.update(overrides)
    layer = MoELayer(MoEConfig(**fields), device=router.weight.device, dtype=w_up.dtype)
    with torch.no_grad():
        layer.router.weight.copy_(router.weight)
        if sigmoid:
            layer.router.expert_bias.copy_(router.e_score_correction_bias.float())
        layer.experts.w_up.copy_(w_up)
        layer.experts.w_down.copy_(w_down)
        if b_up is not None:
            layer.experts.b_up.copy_(b_up)
            layer.experts.b_down.copy_(b_down)
        if p.shared is not None:
            s = layer.shared_experts
            s.w_up.copy_(torch.cat([p.shared.gate_proj.weight, p.shared.up_proj.weight]))
            s.w_down.copy_(p.shared.down_proj.weight)
            if p.shared_gate is not None:
                s.w_gate.copy_(p.shared_gate.weight)
    return layer


def to_transformers(layer, block: nn.Module) -> nn.Module:
    """Copy ``layer``'s weights into the transformers ``block`` (same layout conventions, in place)."""
    p = _parts(block)
    experts = p.experts
    with torch.no_grad():
        p.router.weight.copy_(layer.router.weight)
        if hasattr(p.router, "e_score_correction_bias") and layer.router.expert_bias is not None:
            p.router.e_score_correction_bias.copy_(layer.router.expert_bias)
        gated = getattr(experts, "has_gate", True)
        up = layer.experts.w_up
        b_up = layer.experts.b_up
        if gated and not getattr(experts, "is_concatenated", True):
            E, two_f = up.shape[0], up.shape[1]
            up = up.reshape(E, 2, two_f // 2, -1).transpose(1, 2).reshape(E, two_f, -1)
            if b_up is not None:
                b_up = b_up.reshape(E, 2, two_f // 2).transpose(1, 2).reshape(E, two_f)
        down = layer.experts.w_down
        if getattr(experts, "is_transposed", False):
            up, down = up.transpose(1, 2), down.transpose(1, 2)
        (experts.gate_up_proj if gated else experts.up_proj).copy_(up)
        experts.down_proj.copy_(down)
        if getattr(experts, "has_bias", False):
            (experts.gate_up_proj_bias if gated else experts.up_proj_bias).copy_(b_up)
            experts.down_proj_bias.copy_(layer.experts.b_down)
        if p.shared is not None:
            f_s = p.shared.gate_proj.out_features
            w = layer.shared_experts.w_up
            p.shared.gate_proj.weight.copy_(w[:f_s])
            p.shared.up_proj.weight.copy_(w[f_s:])
            p.shared.down_proj.weight.copy_(layer.shared_experts.w_down)
            if p.shared_gate is not None:
                p.shared_gate.weight.copy_(layer.shared_experts.w_gate)
    return block
