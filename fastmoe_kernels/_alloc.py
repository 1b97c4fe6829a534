"""Output allocation for kernel launchers, with a poison mode for tests.

Kernels write their outputs into buffers from :func:`empty`. With poisoning on
(``FASTMOE_POISON=1`` or :func:`set_poison`), new buffers are filled with NaN (floats) or
``INT_POISON`` (integers) first, so an element a kernel forgot to write — or an unwritten row that
a consumer wrongly reads — shows up in the tests instead of passing by luck.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

INT_POISON = -7777
_poison: Optional[bool] = None


def poison_enabled() -> bool:
    if _poison is not None:
        return _poison
    return os.environ.get("FASTMOE_POISON", "0") == "1"


def set_poison(enabled: Optional[bool]) -> None:
    global _poison
    _poison = enabled


def empty(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.empty(*shape, dtype=dtype, device=device)
    if poison_enabled() and t.numel():
        t.fill_(float("nan") if t.is_floating_point() else INT_POISON)
    return t
