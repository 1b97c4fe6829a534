"""How Hugging Face transformers lays out MoE blocks, read into our layout and written back.

Duck-typed (transformers is never imported here; :mod:`.hf_gate` finds what the experts compute):
the experts module of the experts interface
(``gate_up_proj [E, 2f, d]`` or transposed ``[E, d, 2f]``, gate and up concatenated or interleaved,
``up_proj`` for non-gated experts, biases) and a sparse-MoE block (``.gate`` router with ``.weight``,
``.experts``, optional shared experts and shared-expert gate). ``MoELayer.from_transformers`` and
``.to_transformers`` and the ``fastmoe`` experts implementation build on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from .activations import ACTIVATIONS, PARAMETRIC, Activation
from .hf_gate import identify


def deinterleave(t: torch.Tensor) -> torch.Tensor:
    """Rows [g0, u0, g1, u1, …] along dim 1 → [g0, g1, … | u0, u1, …] (a differentiable copy)."""
    E, two_f = t.shape[0], t.shape[1]
    rest = t.shape[2:]
    return t.reshape(E, two_f // 2, 2, *rest).transpose(1, 2).reshape(E, two_f, *rest)


def interleave(t: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`deinterleave`: [g | u] along dim 1 → [g0, u0, g1, u1, …]."""
    E, two_f = t.shape[0], t.shape[1]
    rest = t.shape[2:]
    return t.reshape(E, 2, two_f // 2, *rest).transpose(1, 2).reshape(E, two_f, *rest)


def expert_weights(module) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(w_up [E, m·f, d], w_down [E, d, f], b_up, b_down) of a transformers experts module, as views
    (gate and up rows stay as the module holds them: concatenated or interleaved)."""
    gated = getattr(module, "has_gate", True)
    up = module.gate_up_proj if gated else module.up_proj
    down = module.down_proj
    if getattr(module, "is_transposed", False):
        up, down = up.transpose(1, 2), down.transpose(1, 2)
    b_up = b_down = None
    if getattr(module, "has_bias", False):
        b_up = module.gate_up_proj_bias if gated else module.up_proj_bias
        b_down = module.down_proj_bias
    return up, down, b_up, b_down


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
    shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    return _BlockParts(router, experts, shared, getattr(block, "shared_expert_gate", None))


def block_router_weight(block: nn.Module) -> torch.Tensor:
    """The router's ``[E, d]`` weight of a sparse-MoE block (checking that it is one)."""
    return _parts(block).router.weight


def block_activation(experts: nn.Module) -> Activation:
    """The activation of a block's experts, which MoELayer must be able to hold."""
    name = type(experts).__name__
    if getattr(experts, "has_post_expert_norm", False):
        raise NotImplementedError(
            f"from_transformers: {name} applies a norm after each expert, which MoELayer has not; the model still "
            "runs on fastmoe's kernels with experts_implementation='fastmoe'")
    act = identify(experts)
    if act is None:
        raise NotImplementedError(
            f"from_transformers: the gate function of {name} is none of MoELayer's activations "
            f"({', '.join(ACTIVATIONS)}, with their alpha/limit); the model still runs on fastmoe's kernels with "
            "experts_implementation='fastmoe'")
    return act


def _activation_fields(act: Activation) -> dict:
    fields = dict(activation=act.name)
    if act.name in PARAMETRIC:
        fields.update(activation_alpha=act.alpha, activation_limit=act.limit)
    return fields


def source_router_precision(router: nn.Module) -> str:
    """``"input"`` when the router computes its logits in its (low-precision) weights' dtype, as
    Mixtral's and Qwen's bf16 routers do; ``"fp32"`` when it casts up first (DeepSeek-V3)."""
    weight = router.weight
    if weight.dtype in (torch.float32, torch.float64):
        return "fp32"
    with torch.no_grad():
        out = router(torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=weight.device))
    logits = out[0] if isinstance(out, (tuple, list)) else out
    return "input" if logits.dtype == weight.dtype else "fp32"


def config_fields(block: nn.Module, **overrides) -> dict:
    """MoEConfig fields of an MoELayer with the block's shape and routing; ``overrides`` win
    (``router_precision="source"``: as the block's router computes, see :func:`source_router_precision`)."""
    p = _parts(block)
    router, experts = p.router, p.experts
    E, d = router.weight.shape
    w_up, w_down, b_up, b_down = expert_weights(experts)
    f = w_down.shape[2]
    sigmoid = hasattr(router, "e_score_correction_bias")
    fields = dict(
        d_model=d, d_ff=f, num_experts=E, top_k=router.top_k, **_activation_fields(block_activation(experts)),
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
    if fields.get("router_precision") == "source":
        fields["router_precision"] = source_router_precision(router)
    return fields


def load_block(layer, block: nn.Module) -> None:
    """Copy the block's weights into ``layer`` (an MoELayer built from :func:`config_fields`)."""
    p = _parts(block)
    router = p.router
    sigmoid = hasattr(router, "e_score_correction_bias")
    w_up, w_down, b_up, b_down = expert_weights(p.experts)
    if block_activation(p.experts).interleaved:  # MoELayer holds [gate | up]
        w_up = deinterleave(w_up)
        b_up = deinterleave(b_up) if b_up is not None else None
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


def store_block(layer, block: nn.Module) -> nn.Module:
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
        if block_activation(experts).interleaved:
            up = interleave(up)
            b_up = interleave(b_up) if b_up is not None else None
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
