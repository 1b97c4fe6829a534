"""The selectable variants kept for the GPU session's A/B: environment flags read once, at import,
each with its default and the values it accepts, in one registry (``FLAGS``) that the A/B script
(``benchmarks/gpu_ab.py``) and its test read. A value outside a flag's choices is an error naming the
flag, never a silent fallback to the default."""
from __future__ import annotations

import os
from typing import Dict, Tuple

FLAGS: Dict[str, Tuple[str, Tuple[str, ...]]] = {}  # name → (default, accepted values)


def flag(name: str, default: str, choices: Tuple[str, ...], doc: str = "") -> str:
    """The value of environment flag ``name`` (lower-cased, stripped; ``default`` when unset)."""
    if default not in choices:
        raise AssertionError(f"{name}: default {default!r} not among {choices}")
    FLAGS[name] = (default, tuple(choices))
    value = os.environ.get(name, default).strip().lower()
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
