"""Input validation shared by the ops and modules.

Every public entry point checks what it is given and raises an error that names the argument and
what was expected. Checks that must read tensor *values* (expert ids in range, finite logits,
monotone offsets) synchronise the device; they are on by default and can be switched off for
production runs with ``FASTMOE_CHECKS=0`` or :func:`set_value_checks` — kernels still never read
or write out of bounds without them (they clamp or skip), but bad input then gives undefined values.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

import torch

_value_checks: Optional[bool] = None


def value_checks_enabled() -> bool:
    """Whether checks that read tensor values (and so synchronise the device) run."""
    if _value_checks is not None:
        return _value_checks
    return os.environ.get("FASTMOE_CHECKS", "1").strip().lower() not in ("0", "false", "off", "no")


def set_value_checks(enabled: Optional[bool]) -> None:
    """Force value checks on or off; ``None`` returns to the ``FASTMOE_CHECKS`` environment variable."""
    global _value_checks
    _value_checks = enabled


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accum_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 for half/bf16/fp32 data, fp64 when any input is fp64 (tests and gradcheck run in fp64)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
INDEX_DTYPES = (torch.int32, torch.int64)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    where: str,
    name: str,
    t,
    *,
    ndim: Optional[int] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    shape: Optional[tuple] = None,
    device: Optional[torch.device] = None,
) -> None:
    """Raise TypeError/ValueError naming ``where`` and ``name`` if ``t`` is not as expected.

    ``shape`` entries that are None are not checked.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        expected = f"[{', '.join('?' if s is None else str(s) for s in shape)}]" if shape else f"{ndim}-D"
        raise ValueError(f"{where}: `{name}` must be {expected}, got shape {list(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{where}: `{name}` must have dtype {_dtype_names(dtypes)}, got {t.dtype}")
    if shape is not None:
        ok = len(shape) == t.dim() and all(s is None or s == d for s, d in zip(shape, t.shape))
        if not ok:
            expected = ", ".join("?" if s is None else str(s) for s in shape)
            raise ValueError(f"{where}: `{name}` must have shape [{expected}], got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{where}: `{name}` is on {t.device} but must be on {device} like the other inputs")


def check_int(where: str, name: str, value, *, low: Optional[int] = None, high: Optional[int] = None) -> None:
    """Raise if ``value`` is not an int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{where}: `{name}` must be an int, got {type(value).__name__}")
    if isinstance(value, torch.SymInt):
        return
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{where}: `{name}` must be in [{lo}, {hi}], got {value}")


def check_choice(where: str, name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{where}: `{name}` must be one of {choices}, got {value!r}")


def check_ids_in_range(where: str, name: str, ids: torch.Tensor, upper: int, allow_unassigned: bool = False) -> None:
    """Value check: every entry of ``ids`` lies in [0, upper) (or is -1 when ``allow_unassigned``)."""
    if not value_checks_enabled() or ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)
    low = -1 if allow_unassigned else 0
    if lo.item() < low or hi.item() >= upper:
        allowed = f"[0, {upper}) or -1 (no expert)" if allow_unassigned else f"[0, {upper})"
        raise ValueError(f"{where}: `{name}` must hold ids in {allowed}, found values in [{lo.item()}, {hi.item()}]")


def check_finite(where: str, name: str, t: torch.Tensor) -> None:
    """Value check: no NaN or Inf in ``t``."""
    if not value_checks_enabled() or t.numel() == 0:
        return
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{where}: `{name}` contains {bad} NaN/Inf values; router logits must be finite")
