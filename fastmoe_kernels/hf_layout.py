"""How Hugging Face transformers lays out MoE blocks, read into our layout and written back.

Duck-typed (transformers is imported only to compare an experts module's gate function with its
default): the experts module of the experts interface
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


def activation_name(module) -> str:
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


def check_supported(module) -> None:
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # a transformers without the experts interface's default gate
        _default_apply_gate = None

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
    check_supported(experts)
    shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    return _BlockParts(router, experts, shared, getattr(block, "shared_expert_gate", None))


def block_router_weight(block: nn.Module) -> torch.Tensor:
    """The router's ``[E, d]`` weight of a sparse-MoE block (checking that it is one)."""
    return _parts(block).router.weight


def config_fields(block: nn.Module, **overrides) -> dict:
    """MoEConfig fields of an MoELayer with the block's shape and routing; ``overrides`` win."""
    p = _parts(block)
    router, experts = p.router, p.experts
    E, d = router.weight.shape
    w_up, w_down, b_up, b_down = expert_weights(experts)
    f = w_down.shape[2]
    sigmoid = hasattr(router, "e_score_correction_bias")
    fields = dict(
        d_model=d, d_ff=f, num_experts=E, top_k=router.top_k, activation=activation_name(experts),
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
    return fields


def load_block(layer, block: nn.Module) -> None:
    """Copy the block's weights into ``layer`` (an MoELayer built from :func:`config_fields`)."""
    p = _parts(block)
    router = p.router
    sigmoid = hasattr(router, "e_score_correction_bias")
    w_up, w_down, b_up, b_down = expert_weights(p.experts)
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
