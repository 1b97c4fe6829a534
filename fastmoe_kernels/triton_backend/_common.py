"""Launch helpers shared by the Triton kernels (host side)."""
from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import Callable, Optional

import torch
import triton

from .. import backends, tuning


@functools.lru_cache(maxsize=None)
def _dummy_index(device: str) -> torch.Tensor:
    return torch.empty(0, dtype=torch.int32, device=device)


def dummy_index(device: torch.device) -> torch.Tensor:
    """An empty int32 tensor standing for an index argument a launch does not use (one per device,
    not an allocation per call)."""
    return _dummy_index(str(device))


def interpreted() -> bool:
    """True when kernels run in Triton's CPU interpreter (tests on machines without a GPU)."""
    return backends.triton_interpreted()


# Host arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are ConstexprFunctions (Triton
# 3.6 and 3.9), ~1-3 µs a call on the host, and a launch makes several.
def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def rows_per_expert_bucket(num_rows: int, num_experts: int) -> int:
    """The grouped GEMMs' ``M_BUCKET`` autotune key: the mean rows per expert, rounded up to a power
    of two, so one tuned config serves every batch of about the same load."""
    return next_pow2(max(1, num_rows // max(num_experts, 1)))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device, max_tiles: int) -> int:
    """Programs of a persistent launch: enough to fill every SM twice, never more than the tiles."""
    if device.type != "cuda":
        return max(1, min(4, max_tiles))
    return max(1, min(2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()), max_tiles))


def persistent_grid(device: torch.device, num_rows: int, num_cols: int, num_groups: int, extra_row_tiles: int = 0):
    """The autotuner's grid of a persistent grouped launch over ``num_rows`` rows in ``num_groups``
    groups and ``num_cols`` columns: each group can start a partial BM tile, hence the ``+ num_groups``
    row tiles (plus ``extra_row_tiles``, e.g. for rows outside every group)."""

    def grid(meta):
        row_tiles = cdiv(num_rows, meta["BM"]) + num_groups + extra_row_tiles
        return (persistent_programs(device, row_tiles * cdiv(num_cols, meta["BN"])),)

    return grid


# Opt-in shared memory per block by compute capability (bytes), for targets without a device to ask.
SHARED_MEMORY_BY_ARCH = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


@functools.lru_cache(maxsize=None)
def _device_shared_memory(index: int) -> int:
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    return int(props["max_shared_mem"])


# Set by tools that compile for a GPU this machine does not have (tests/triton_compile.py).
shared_memory_override: Optional[int] = None


def shared_memory_limit() -> int:
    """Shared memory one program may use on the current device (no limit in the interpreter)."""
    if shared_memory_override is not None:
        return shared_memory_override
    if interpreted():
        return 1 << 30
    return _device_shared_memory(torch.cuda.current_device())


def fp32_matmul_uses_tf32() -> bool:
    """Whether torch lets fp32 matmuls use TF32, read through the API that torch itself uses.

    ``torch.backends.cuda.matmul.fp32_precision`` reflects both the new API and the legacy
    ``allow_tf32`` / ``set_float32_matmul_precision``; reading the legacy flag after a user set the new
    API raises ("mix of the legacy and new APIs"), so it is read only where the new one is missing.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 data multiply in full fp32 unless torch allows TF32 for fp32 matmuls."""
    if dtype == torch.float32 and not fp32_matmul_uses_tf32():
        return "ieee"
    return "tf32"


def on_device(device: torch.device):
    """Make ``device`` current for a launch: Triton launches on the current device and stream, not on
    the device of the tensors it is given (tensors on cuda:1 with cuda:0 current would fault)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device.index)


def _first_device(args) -> Optional[torch.device]:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def register(kernel: str, *, applies: Optional[Callable[..., Optional[str]]] = None) -> Callable[[Callable], Callable]:
    """Register ``fn`` as the triton implementation of ``kernel``: CUDA tensors (CPU tensors too, which
    ``backends.availability`` allows only under the interpreter), fp16/bf16/fp32 data; every launch
    runs on the device of its first tensor argument."""
    devices = ("cuda", "cpu")

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def launch_on_tensor_device(*args, **kwargs):
            device = _first_device(args)
            with on_device(device) if device is not None else contextlib.nullcontext():
                return fn(*args, **kwargs)

        backends.register(kernel, "triton", devices=devices, dtypes=backends.KERNEL_FLOAT_DTYPES,
                          applies=applies)(launch_on_tensor_device)
        return fn

    return wrap


ACTIVATION_CODES = {"swiglu": 1, "swiglu_oai": 1, "silu": 1, "geglu": 2, "gelu": 3, "relu": 4, "geglu_tanh": 5,
                    "gelu_tanh": 5, "relu2": 6}


def activation_args(act) -> dict:
    """The kernels' activation arguments for an ``activations.Activation``: ACT (constexpr), alpha,
    limit and the up factor's offset (runtime floats)."""
    return dict(ACT=ACTIVATION_CODES[act.name], alpha=float(act.alpha), limit=float(act.limit),
                up_offset=float(act.up_offset))


# ---- autotuned launches through the tuning table -----------------------------------------------
# What each table-driven or pinned launch ran, for tests and the A/B report: kernel name → config.
tuned_launches: dict = {}
# Configs pinned per kernel for every key (the GPU session's A/B of tile orders and tiles): kernel name
# → config dict; from FASTMOE_PIN_CONFIGS (JSON, read once) or set by the A/B tool. Pinned beats the table.
pinned_configs: dict = json.loads(os.environ.get("FASTMOE_PIN_CONFIGS") or "{}")


def autotune_key(kernel, all_args: dict) -> dict:
    """A launch's key in the tuning table: the values of the kernel's autotune ``key`` arguments and
    the dtype of its first tensor argument (the operand; Triton's own key adds every tensor's dtype,
    which the operand's decides for these kernels)."""
    key = {name: all_args[name] for name in kernel.keys if name in all_args}
    dtype = next((str(v.dtype) for v in all_args.values() if isinstance(v, torch.Tensor)), None)
    return dict(key, dtype=dtype)


def kernel_name(kernel) -> str:
    fn = kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn.__name__


def launch(kernel, grid, *args, **kwargs):
    """Launch the autotuned ``kernel``: with the tuning table's config for this key and device when
    there is one (no autotuning, no benchmarking), else through its autotuner."""
    all_args = {**dict(zip(kernel.arg_names, args)), **kwargs}
    config = pinned_configs.get(kernel_name(kernel))
    if config is None:
        device = next((v.device for v in all_args.values() if isinstance(v, torch.Tensor)), None)
        table = tuning.current_table(device) if device is not None else None
        config = table.kernel_config(kernel_name(kernel), autotune_key(kernel, all_args)) if table is not None else None
    if config is None:
        return kernel[grid](*args, **kwargs)
    meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    tuned_launches[kernel_name(kernel)] = dict(config)
    launch_grid = grid(dict(all_args, **meta)) if callable(grid) else grid
    return kernel.fn[launch_grid](*args, **kwargs, **meta, num_warps=config["num_warps"],
                                  num_stages=config["num_stages"])
