"""Launch helpers shared by the Triton kernels (host side)."""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch
import triton

from .. import backends


def interpreted() -> bool:
    """True when kernels run in Triton's CPU interpreter (tests on machines without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else triton.next_power_of_2(int(n))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device, max_tiles: int) -> int:
    """Programs of a persistent launch: enough to fill every SM twice, never more than the tiles."""
    if device.type != "cuda":
        return max(1, min(4, max_tiles))
    return max(1, min(2 * _sm_count(device.index or 0), max_tiles))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 data multiply in full fp32 unless torch itself allows TF32 for matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def register(kernel: str) -> Callable[[Callable], Callable]:
    """Register ``fn`` as the triton implementation of ``kernel`` (float64 runs the reference)."""
    return backends.register_accelerated(kernel, "triton")


ACTIVATION_CODES = {"none": 0, "swiglu": 1, "geglu": 2, "gelu": 3, "relu": 4}
