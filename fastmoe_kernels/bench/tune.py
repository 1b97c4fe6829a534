"""Writing a device's tuning table from a benchmark run (``fastmoe-bench --tune``).

Three parts, each from what the run measured (``fastmoe_kernels.tuning`` reads them):

- ``kernels``: every autotune key our Triton kernels met in this process and the config the
  autotuner found fastest (from the autotuners' own caches; keys launched from an older table keep
  their entry);
- ``layers``: per layer shape and mode, whether the fused expert kernels ("triton-fused") or the
  fastest composition ("triton-unfused", "cuda-unfused") was faster, with every time;
- ``gemms``: per grouped-GEMM shape of those layers, the backend of the faster composition ("cuda":
  torch's grouped matmul; "triton"), so that ``backend="auto"`` takes it.

Only our implementations' layer rows count (``op == "layer"``, each median with its interval); a
comparison needs both sides measured at the shape.
"""
from __future__ import annotations

import datetime
import pathlib
from typing import Dict, Iterable, List, Mapping, Optional

from .. import tuning
from ..activations import is_gated
from ..tuning import LayerShape, Table

FUSED, COMPOSITIONS = "triton-fused", {"triton-unfused": "triton", "cuda-unfused": "cuda"}
TUNED_MODULES = ("up_projection", "grouped_gemm", "activation_backward", "wgrad", "fp8")


def autotuned_entries() -> Dict[str, List[dict]]:
    """Kernel name → [{key, config}] for every key our autotuners have tuned in this process."""
    try:
        import importlib

        import triton
    except ImportError:
        return {}
    out: Dict[str, List[dict]] = {}
    for module_name in TUNED_MODULES:
        module = importlib.import_module(f"fastmoe_kernels.triton_backend.{module_name}")
        for name, tuner in vars(module).items():
            if not isinstance(tuner, triton.runtime.autotuner.Autotuner):
                continue
            for key, config in getattr(tuner, "cache", {}).items():
                out.setdefault(name, []).append(dict(key=_key_dict(tuner, key), config=config_dict(config)))
    return out


def _key_dict(tuner, key: tuple) -> dict:
    """Triton's key tuple (the key arguments' values, then every tensor argument's dtype) as the
    table's key: the key arguments by name and the first tensor's dtype (``_common.autotune_key``)."""
    names = [k for k in tuner.keys]
    values = dict(zip(names, key[:len(names)]))
    dtypes = key[len(names):]
    return dict(values, dtype=dtypes[0] if dtypes else None)


def config_dict(config) -> dict:
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _shape_of(row: Mapping) -> LayerShape:
    return LayerShape.of(row["d_model"], row["d_ff"], row["num_experts"], row["top_k"], row["activation"], row["dtype"],
                         row["tokens"])


def _comparable(row: Mapping) -> bool:
    """Rows the table can learn from: dropless, no shared experts (the layer entry is the routed
    experts' choice), bf16/fp16/fp32 (fp8 has its own path), and a measured median."""
    cf = row.get("capacity_factor")
    shared = row.get("num_shared_experts") or 0
    return (cf in (None, "", "None") and not int(shared) and not row.get("fp8_recipe")
            and row.get("median_ms") not in (None, ""))


def layer_entries(rows: Iterable[Mapping]) -> List[dict]:
    """One entry per (layer shape, mode) where the fused and a composition were both measured."""
    times: Dict[tuple, Dict[str, float]] = {}
    for r in rows:
        if r["op"] != "layer" or (r["impl"] != FUSED and r["impl"] not in COMPOSITIONS) or not _comparable(r):
            continue
        times.setdefault((_shape_of(r), r["mode"]), {})[r["impl"]] = float(r["median_ms"])
    out = []
    for (shape, mode), by_impl in sorted(times.items(), key=lambda kv: (repr(kv[0][0]), kv[0][1])):
        compositions = {i: t for i, t in by_impl.items() if i in COMPOSITIONS}
        if FUSED not in by_impl or not compositions:
            continue
        best_composition = min(compositions, key=compositions.get)
        out.append(dict(shape=vars(shape), mode=mode, fused=by_impl[FUSED] < compositions[best_composition],
                        composition=best_composition, times_ms=by_impl))
    return out


def gemm_entries(layers: List[dict]) -> List[dict]:
    """The grouped GEMMs of each measured composition (forward and input gradient of both projections)
    on the faster composition's backend, training steps first (their GEMMs include the backward's)."""
    out: Dict[tuple, dict] = {}
    for entry in sorted(layers, key=lambda e: e["mode"] != "fwd+bwd"):
        s = entry["shape"]
        rows = s["tokens_bucket"] * s["top_k"]
        m = 2 if is_gated(s["activation"]) else 1
        d, f = s["d_model"], s["d_ff"]
        backend = COMPOSITIONS[entry["composition"]]
        for k_dim, n_dim in ((d, m * f), (f, d), (d, f), (m * f, d)):
            key = dict(K=k_dim, N=n_dim, E=s["num_experts"], rows_bucket=tuning.rows_bucket(rows), dtype=s["dtype"])
            out.setdefault(tuple(sorted(key.items())), dict(key=key, backend=backend, layer=s, mode=entry["mode"]))
    return list(out.values())


def build_table(rows: List[Mapping], device_name: str, triton_version: str, *, source: str = "",
                existing: Optional[Table] = None) -> Table:
    """The device's table from a run's rows and this process's autotuners, over ``existing``'s entries."""
    table = existing or Table(device=device_name, triton=triton_version)
    kernels = {name: list(entries) for name, entries in table.kernels.items()}
    for name, entries in autotuned_entries().items():
        kept = [e for e in kernels.get(name, []) if all(e["key"] != n["key"] for n in entries)]
        kernels[name] = kept + entries
    layers = layer_entries(rows)
    layer_keys = {(tuple(sorted(e["shape"].items())), e["mode"]) for e in layers}
    layers += [e for e in table.layers if (tuple(sorted(e["shape"].items())), e["mode"]) not in layer_keys]
    meta = dict(table.meta, written=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    if source:
        meta["source"] = source
    return Table(device=device_name, triton=triton_version, kernels=kernels, gemms=gemm_entries(layers),
                 layers=layers, meta=meta)


def write_table(rows: List[Mapping], path: Optional[pathlib.Path], device_name: str, *, source: str = "") -> pathlib.Path:
    """Write (or update) the table of ``device_name`` at ``path`` (default: the package's tuned/)."""
    path = pathlib.Path(path) if path else tuning.TUNED_DIR / f"{tuning.device_slug(device_name)}.json"
    existing = None
    if path.is_file():
        import json

        old = Table.from_json(json.loads(path.read_text()))
        existing = old if old.device == device_name else None
    version = tuning.triton_version() or "none"
    if existing is not None and existing.triton != version:
        existing = None  # a table of another Triton is not merged into: its tiles are not evidence here
    table = build_table(rows, device_name, version, source=source, existing=existing)
    table.save(path)
    tuning.forget()
    return path
