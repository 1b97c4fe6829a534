"""Expert activations: the specification every backend follows.

Gated activations take the up projection's ``gate`` and ``up`` halves and return
``act(gate) · up_fn(up)``; the others return ``act(h)``. The halves are ``[gate | up]`` (concatenated,
our layout) or alternate row by row (interleaved: gpt-oss's weights, read in place).

| name | gated | act(x) | up_fn(u) |
|---|---|---|---|
| ``swiglu`` | yes | x'·σ(α·x'), x' = min(x, limit) (α = 1, no limit by default: SiLU) | clamp(u, −limit, limit) |
| ``swiglu_oai`` | yes | the same (α = 1.702, limit = 7 by default: gpt-oss) | clamp(u, −limit, limit) + 1 |
| ``geglu`` / ``geglu_tanh`` | yes | GELU, exact (erf) / tanh approximation | u |
| ``silu``, ``gelu``, ``gelu_tanh``, ``relu``, ``relu2`` | no | SiLU, GELU (erf / tanh), ReLU, ReLU² | – |

GELU in ``gelu``/``geglu`` is the exact (erf) form, as in Shazeer (2020), "GLU Variants Improve
Transformer"; the ``_tanh`` variants are the approximation Gemma uses. ``swiglu`` with a limit is
DeepSeek-V4's / GLM-5's clamped SwiGLU; ``swiglu_oai`` is gpt-oss's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

GATED_ACTIVATIONS = ("swiglu", "swiglu_oai", "geglu", "geglu_tanh")
PLAIN_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2")
ACTIVATIONS = GATED_ACTIVATIONS + PLAIN_ACTIVATIONS
PARAMETRIC = ("swiglu", "swiglu_oai")  # the ones that take alpha and limit
DEFAULTS = {"swiglu": (1.0, math.inf), "swiglu_oai": (1.702, 7.0)}


@dataclass(frozen=True)
class Activation:
    """An expert activation: its name, parameters, and how the up projection holds gate and up."""

    name: str
    alpha: float = 1.0
    limit: float = math.inf
    interleaved: bool = False

    def __post_init__(self) -> None:
        if self.name not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {self.name!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"activation: `alpha` must be a finite number > 0, got {self.alpha}")
        if not self.limit > 0:  # inf is allowed: no clamp
            raise ValueError(f"activation: `limit` must be > 0 (inf for none), got {self.limit}")
        if self.name not in PARAMETRIC and (self.alpha != 1.0 or self.limit != math.inf):
            raise ValueError(f"activation: {self.name!r} takes no alpha or limit")
        if self.interleaved and not self.gated:
            raise ValueError(f"activation: {self.name!r} is not gated: it has no gate/up halves to interleave")

    @property
    def gated(self) -> bool:
        return self.name in GATED_ACTIVATIONS

    @property
    def up_offset(self) -> float:
        return 1.0 if self.name == "swiglu_oai" else 0.0


ActivationLike = Union[str, Activation]


def as_activation(activation: ActivationLike, alpha=None, limit=None) -> Activation:
    """An :class:`Activation` from a name (with its default parameters, or the given ones) or itself."""
    if isinstance(activation, Activation):
        return activation
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS} or an Activation, got {activation!r}")
    default_alpha, default_limit = DEFAULTS.get(activation, (1.0, math.inf))
    return Activation(activation, default_alpha if alpha is None else float(alpha),
                      default_limit if limit is None else float(limit))


def is_gated(activation: ActivationLike) -> bool:
    return as_activation(activation).gated


def gate_fn(x: Tensor, act: Activation) -> Tensor:
    """act(x) of the table above (on the gate half, for gated activations)."""
    name = act.name
    if name in ("swiglu", "swiglu_oai", "silu"):
        if act.limit != math.inf:
            x = x.clamp(max=act.limit)
        return x * torch.sigmoid(x * act.alpha) if act.alpha != 1.0 else F.silu(x)
    if name in ("geglu", "gelu"):
        return F.gelu(x)
    if name in ("geglu_tanh", "gelu_tanh"):
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    return F.relu(x).square()  # relu2


def up_fn(u: Tensor, act: Activation) -> Tensor:
    """up_fn(u) of the table above."""
    if act.limit != math.inf:
        u = u.clamp(-act.limit, act.limit)
    return u + 1.0 if act.up_offset else u


def split_gate_up(h: Tensor, act: Activation) -> tuple[Tensor, Tensor]:
    """The gate and up halves of ``h [..., 2f]``, concatenated or interleaved."""
    if act.interleaved:
        return h[..., 0::2], h[..., 1::2]
    return h.chunk(2, dim=-1)


def apply_activation(h: Tensor, activation: ActivationLike) -> Tensor:
    """``act(h)``, or for gated activations ``act(gate) · up_fn(up)`` from the halves of ``h``."""
    act = as_activation(activation)
    if act.gated:
        gate, up = split_gate_up(h, act)
        return gate_fn(gate, act) * up_fn(up, act)
    return gate_fn(h, act)


def apply_gated(gate: Tensor, up: Tensor, activation: ActivationLike) -> Tensor:
    """``act(gate) · up_fn(up)`` for a gated activation given its two halves separately."""
    act = as_activation(activation)
    return gate_fn(gate, act) * up_fn(up, act)
