"""Expert activations. Gated ones (SwiGLU, GeGLU) take ``[gate | up]`` halves of the up projection.

GELU here is the exact (erf) form in both GELU and GeGLU, as in Shazeer (2020), "GLU Variants
Improve Transformer"; SwiGLU uses SiLU.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .config import ACTIVATIONS, GATED_ACTIVATIONS

_ELEMENTWISE = {"swiglu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "relu": F.relu}


def is_gated(activation: str) -> bool:
    return activation in GATED_ACTIVATIONS


def apply_activation(h: Tensor, activation: str) -> Tensor:
    """``act(h)``, or for gated activations ``act(gate) * up`` with ``[gate | up] = h`` split in half."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    fn = _ELEMENTWISE[activation]
    if is_gated(activation):
        gate, up = h.chunk(2, dim=-1)
        return fn(gate) * up
    return fn(h)


def apply_gated(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    """``act(gate) * up`` for a gated activation given its two halves separately."""
    return _ELEMENTWISE[activation](gate) * up
