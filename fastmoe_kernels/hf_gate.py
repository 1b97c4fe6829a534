"""Which of our activations a transformers experts module computes, found by running it.

Between its up and down projections an experts module of transformers' experts interface applies
``module._apply_gate(h)`` (gated experts; the interface's default is ``act_fn(gate) · up``) or
``module.act_fn(h)`` (non-gated). Models override ``_apply_gate`` freely — gpt-oss clamps, scales by
α and adds 1 to ``up`` on interleaved halves; DeepSeek-V4 and GLM-5 clamp; Beam computes in fp32 —
and name their activation modules as they like. So rather than matching class names, we evaluate
the module's own function on a fixed fp64 probe and compare it with each of our activations (every
name, α and limit among the defaults and the module's ``alpha``/``swiglu_alpha``/``limit``/
``swiglu_limit``, halves concatenated or interleaved). The first that agrees to fp32 rounding runs
fused in our kernels. A module whose function matches none, or may depend on learned state (its
activation has parameters, or the module has parameters besides its projections), runs the generic
path instead: our grouped GEMMs around the module's own function.

The probe runs once per module (cached) and outside any torch.compile trace
(``torch.compiler.assume_constant_result``): a compiled model sees a constant.
"""
from __future__ import annotations

import logging
import math
import weakref
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from .activations import DEFAULTS, GATED_ACTIVATIONS, PARAMETRIC, PLAIN_ACTIVATIONS, Activation, apply_activation

# The parameters an experts module holds for its projections; any other may feed its gate function.
PROJECTION_PARAMETERS = {"gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias",
                         "down_proj_bias"}
ALPHA_ATTRIBUTES = ("alpha", "swiglu_alpha")
LIMIT_ATTRIBUTES = ("limit", "swiglu_limit")
PROBE_WIDTH = 64      # columns per half
PROBE_VALUES = 8192   # values in the probe, half spread wide, half fine near zero
MATCH_RTOL, MATCH_ATOL = 1e-5, 1e-6  # fp32 rounding passes; GELU tanh vs erf (~5e-4) does not

logger = logging.getLogger("fastmoe_kernels")
_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def _default_apply_gate():
    try:
        from transformers.integrations.moe import _default_apply_gate as default
    except ImportError:  # a transformers without the experts interface: nothing overrides it
        return None
    return default


def gate_function(module) -> Callable[[Tensor], Tensor]:
    """What the module applies between its up and down projections, as a function of ``h``."""
    if not getattr(module, "has_gate", True):
        return module.act_fn
    apply_gate = getattr(type(module), "_apply_gate", None)
    if apply_gate is None or apply_gate is _default_apply_gate():
        # The interface's default: act_fn(gate) · up, on the halves as the weights hold them.
        interleaved = not getattr(module, "is_concatenated", True)

        def default_gate(h: Tensor) -> Tensor:
            gate, up = (h[..., 0::2], h[..., 1::2]) if interleaved else h.chunk(2, dim=-1)
            return module.act_fn(gate) * up

        return default_gate
    return module._apply_gate


def _numbers(module, names) -> set:
    """The finite positive numbers the module (or its config) holds under ``names``."""
    found = set()
    for owner in (module, getattr(module, "config", None)):
        for name in names:
            value = getattr(owner, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
                found.add(float(value))
    return found


def _candidates(module, gated: bool, alphas: set, limits: set) -> Iterator[Activation]:
    """Our activations the module might compute, the unparametrised ones first."""
    alphas = [1.0, DEFAULTS["swiglu_oai"][0]] + sorted(alphas)
    limits = [math.inf, DEFAULTS["swiglu_oai"][1]] + sorted(limits)
    for name in GATED_ACTIVATIONS if gated else PLAIN_ACTIVATIONS:
        params = [(a, l) for a in dict.fromkeys(alphas) for l in dict.fromkeys(limits)] if name in PARAMETRIC \
            else [(1.0, math.inf)]
        for alpha, limit in params:
            for interleaved in ((False, True) if gated else (False,)):
                yield Activation(name, alpha, limit, interleaved)


def _probe(gated: bool, limits: set, device) -> Tensor:
    """A fixed fp64 input ``[rows, (2·)PROBE_WIDTH]``: values past every candidate clamp, and a fine
    grid near zero where the activations' shapes differ most; shuffled so gate and up halves differ."""
    span = max([40.0] + [3.0 * limit for limit in limits])
    half = PROBE_VALUES // 2
    values = torch.cat([torch.linspace(-span, span, half, dtype=torch.float64),
                        torch.linspace(-4.0, 4.0, half, dtype=torch.float64)])
    values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))]
    width = PROBE_WIDTH * (2 if gated else 1)
    return values.reshape(-1, width).to(device)


def _learned_state(module) -> bool:
    """Whether the gate function may read parameters that training changes (then no constant matches)."""
    act_fn = getattr(module, "act_fn", None)
    if isinstance(act_fn, torch.nn.Module) and any(True for _ in act_fn.parameters()):
        return True
    # A parametrized projection (PEFT's LoRA on the 3-D weights: torch.nn.utils.parametrize) holds its
    # tensor as parametrizations.<name>.original; it is still that projection.
    names = {name.split(".")[1] if name.startswith("parametrizations.") else name.split(".")[0]
             for name, _ in module.named_parameters()}
    return bool(names - PROJECTION_PARAMETERS - {"act_fn", "post_expert_norm"})


def identify(module) -> Optional[Activation]:
    """The activation the module computes, or None when it is none of ours (uncached)."""
    if _learned_state(module):
        return None
    gated = getattr(module, "has_gate", True)
    alphas, limits = _numbers(module, ALPHA_ATTRIBUTES), _numbers(module, LIMIT_ATTRIBUTES)
    weight = module.gate_up_proj if gated else module.up_proj
    device = weight.device if weight.device.type != "meta" else torch.device("cpu")
    h = _probe(gated, limits, device)
    try:
        with torch.no_grad():
            theirs = gate_function(module)(h)
    except Exception:  # a function that cannot take our probe cannot be matched either
        return None
    if not isinstance(theirs, Tensor) or theirs.shape != (h.shape[0], PROBE_WIDTH):
        return None
    theirs = theirs.to(torch.float64)
    for act in _candidates(module, gated, alphas, limits):
        if torch.allclose(theirs, apply_activation(h, act), rtol=MATCH_RTOL, atol=MATCH_ATOL):
            return act
    return None


def _encode(act: Optional[Activation]) -> str:
    return "" if act is None else f"{act.name} {act.alpha!r} {act.limit!r} {int(act.interleaved)}"


def _decode(key: str) -> Optional[Activation]:
    if not key:
        return None
    name, alpha, limit, interleaved = key.split()
    return Activation(name, float(alpha), float(limit), interleaved == "1")


def _log_generic_path(module) -> None:
    cls = type(module).__name__
    if cls in _LOGGED:
        return
    _LOGGED.add(cls)
    why = ("applies a norm after each expert" if getattr(module, "has_post_expert_norm", False)
           else "applies a gate function that is none of fastmoe's fused activations")
    logger.warning("fastmoe experts: %s %s; it runs fastmoe's gather, grouped GEMMs and combine around the "
                   "model's own function in PyTorch: correct, but slower than the fused path", cls, why)


_LOGGED: set = set()


@torch.compiler.assume_constant_result
def _fused_key(module) -> str:
    # A string, so that torch.compile bakes it into the graph as a constant.
    if module not in _CACHE:
        act = None if getattr(module, "has_post_expert_norm", False) else identify(module)
        if act is None:
            _log_generic_path(module)
        _CACHE[module] = _encode(act)
    return _CACHE[module]


def fused_activation(module) -> Optional[Activation]:
    """The activation our kernels run fused for the experts module, or None for the generic path
    (a post-expert norm, or a gate function none of ours matches). Cached per module; trace-safe."""
    return _decode(_fused_key(module))
