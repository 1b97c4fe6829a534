"""Per-device tuning tables: what was measured fastest on a device, as data the package reads.

A table (``fastmoe_kernels/tuned/<device>.json``, written by ``fastmoe-bench --tune``) holds, for
one device as torch names it (an H100 and an H200 have different tables) and one Triton version:

- ``kernels``: per Triton kernel and autotune key (the key's argument values and the operand dtype),
  the tile configuration the autotuner measured fastest. A launch whose key is in the table runs
  that configuration without autotuning; any other key autotunes as before, with the autotuner's
  timings cached on disk across processes (``triton.autotune(cache_results=True)``).
- ``gemms``: per grouped-GEMM shape (K, N, experts, rows bucket, dtype), the backend whose product
  was fastest ("triton", or "cuda": torch's grouped matmul), read by ``backend="auto"``.
- ``layers``: per layer shape and mode (``fwd`` / ``fwd+bwd``), whether the fused expert kernels or
  the composition was fastest (read by ``fused=None``), with every measured time.

A table made with another Triton version is ignored (one log line says so): tiles tuned for one
compiler are not evidence for another. ``FASTMOE_TUNING=off`` ignores every table; a path reads
that file for every device instead. This module imports nothing of the package (like ``backends``).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

SCHEMA = 1
TUNED_DIR = pathlib.Path(__file__).with_name("tuned")
logger = logging.getLogger("fastmoe_kernels")


def device_slug(device_name: str) -> str:
    """A table's file stem for a device name: ``NVIDIA H100 80GB HBM3`` → ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def rows_bucket(num_rows) -> int:
    """Rows rounded up to a power of two: one measurement serves every batch of about that size. Under
    ``torch.compile`` it is 0, which matches the largest measured bucket of the same shape: a graph
    (one for every size with dynamic shapes) must not be specialised on the size by a look-up."""
    if torch.compiler.is_compiling() or isinstance(num_rows, torch.SymInt):
        return 0
    n = max(1, int(num_rows))
    return 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class LayerShape:
    """What identifies a layer measurement."""

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    activation: str
    dtype: str
    tokens_bucket: int

    @classmethod
    def of(cls, d_model, d_ff, num_experts, top_k, activation, dtype, tokens) -> "LayerShape":
        return cls(int(d_model), int(d_ff), int(num_experts), int(top_k), str(activation),
                   str(dtype).replace("torch.", ""), rows_bucket(tokens))


@dataclass
class Table:
    device: str
    triton: str
    kernels: Dict[str, List[dict]] = field(default_factory=dict)
    gemms: List[dict] = field(default_factory=list)
    layers: List[dict] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)

    # ---- reading ------------------------------------------------------------------------------
    def kernel_config(self, kernel: str, key: Dict[str, Any]) -> Optional[dict]:
        """The config measured fastest for ``kernel`` at ``key``, or None."""
        for entry in self.kernels.get(kernel, ()):
            if entry["key"] == key:
                return entry["config"]
        return None

    def gemm_backend(self, k_dim: int, n_dim: int, num_experts: int, rows: int, dtype: str) -> Optional[str]:
        key = dict(K=int(k_dim), N=int(n_dim), E=int(num_experts), rows_bucket=rows_bucket(rows) if rows else 0,
                   dtype=dtype)
        entry = _match(self.gemms, lambda e: e["key"], key, "rows_bucket")
        return None if entry is None else entry["backend"]

    def layer_entry(self, shape: LayerShape, mode: str) -> Optional[dict]:
        return _match(self.layers, lambda e: dict(e["shape"], mode=e["mode"]), dict(vars(shape), mode=mode),
                      "tokens_bucket")

    # ---- writing ------------------------------------------------------------------------------
    def as_json(self) -> dict:
        return dict(schema=SCHEMA, device=self.device, triton=self.triton, meta=self.meta, kernels=self.kernels,
                    gemms=self.gemms, layers=self.layers)

    def save(self, path: pathlib.Path) -> pathlib.Path:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_json(), indent=1, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_json(cls, data: dict) -> "Table":
        if data.get("schema") != SCHEMA:
            raise ValueError(f"tuning table: schema {data.get('schema')!r}, this package reads schema {SCHEMA}")
        return cls(device=data["device"], triton=data["triton"], kernels=data.get("kernels", {}),
                   gemms=data.get("gemms", []), layers=data.get("layers", []), meta=data.get("meta", {}))


def _match(entries: List[dict], key_of, wanted: dict, size_field: str) -> Optional[dict]:
    """The entry whose key equals ``wanted``; with ``wanted[size_field]`` 0 (a symbolic size), the one of
    the largest size among those equal in every other field."""
    if wanted[size_field]:
        return next((e for e in entries if key_of(e) == wanted), None)
    others = {k: v for k, v in wanted.items() if k != size_field}
    same = [e for e in entries if {k: v for k, v in key_of(e).items() if k != size_field} == others]
    return max(same, key=lambda e: key_of(e)[size_field], default=None)


def triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _source() -> Optional[str]:
    value = os.environ.get("FASTMOE_TUNING", "auto").strip()
    if value.lower() in ("off", "0", "false", "no"):
        return None
    return value


@functools.lru_cache(maxsize=None)
def _load(device_name: str, source: str, triton: Optional[str]) -> Optional[Table]:
    path = pathlib.Path(source) if source.lower() != "auto" else TUNED_DIR / f"{device_slug(device_name)}.json"
    if not path.is_file():
        return None
    try:
        table = Table.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        logger.warning("fastmoe_kernels: tuning table %s is unreadable (%s); autotuning instead", path, exc)
        return None
    if source.lower() == "auto" and table.device != device_name:
        return None
    if table.triton != triton:
        logger.info("fastmoe_kernels: tuning table %s was measured with Triton %s, this is Triton %s: ignored, "
                    "kernels autotune", path.name, table.triton, triton)
        return None
    return table


def table_for(device_name: str) -> Optional[Table]:
    """The tuning table of ``device_name`` for this Triton, or None (no table, stale, or tables off)."""
    source = _source()
    if source is None:
        return None
    return _load(device_name, source, triton_version())


def forget() -> None:
    """Read the tables again at the next use (after writing one, or changing FASTMOE_TUNING)."""
    _load.cache_clear()
    _device_names.cache_clear()


@functools.lru_cache(maxsize=None)
def _device_names(device_type: str, index: int) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name(index)
    return device_type


def device_name(device: Optional[torch.device] = None) -> str:
    """The name a table is looked up by: torch's CUDA device name, or the device type ("cpu")."""
    device = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda":
        return _device_names("cuda", device.index if device.index is not None else torch.cuda.current_device())
    return _device_names(device.type, 0)


def current_table(device: Optional[torch.device] = None) -> Optional[Table]:
    return table_for(device_name(device))


def _fused_choice(device_type: str, device_index: int, shape: tuple, mode: str) -> Optional[bool]:
    table = current_table(torch.device(device_type, device_index) if device_type == "cuda" else torch.device(device_type))
    entry = table.layer_entry(LayerShape(*shape), mode) if table is not None else None
    return None if entry is None else bool(entry["fused"])


# torch.compile evaluates the look-up once per call site and keeps the answer (no file reads traced).
_fused_choice_traced = torch.compiler.assume_constant_result(_fused_choice)


def fused_choice(device: torch.device, shape: LayerShape, mode: str) -> Optional[bool]:
    """Whether the fused expert kernels were fastest for this layer shape and mode on this device
    (None: not measured)."""
    args = (device.type, device.index if device.index is not None else 0, tuple(vars(shape).values()), mode)
    if torch.compiler.is_compiling():
        return _fused_choice_traced(*args)
    return _fused_choice(*args)


def gemm_order(default: Tuple[str, ...]):
    """An ``AUTO_PREFERENCE`` order for the grouped GEMMs on CUDA: the table's fastest backend for
    the call's shape first, then ``default``."""

    def order(k_dim: int = 0, n_dim: int = 0, num_experts: int = 0, rows: int = 0, dtype_name: str = "", **_):
        table = current_table() if torch.cuda.is_available() else None
        best = table.gemm_backend(k_dim, n_dim, num_experts, rows, dtype_name) if table is not None and num_experts \
            else None
        return default if best is None else (best,) + tuple(b for b in default if b != best)

    return order
