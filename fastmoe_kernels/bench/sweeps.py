"""What the report knows about each sweep: its x axis, its fixed budget, and how to read rows of it.

Shared by the plots, the Markdown report and the design summary, so the three agree on every
sweep's axis and on which implementations are ours.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

# Our implementations as the results name them: each backend with its defaults (``fused=None``), and
# the fusion choices spelled out for the A/B that the tuning table is written from: Triton with the
# experts unfused (the composition) and fused, and the cuda backend's composition (torch's grouped
# matmul for the GEMMs).
IMPL_VARIANTS = {"triton-unfused": ("triton", False), "triton-fused": ("triton", True), "cuda-unfused": ("cuda", False)}
OUR_IMPLS = ("torch", "triton", "triton-unfused", "triton-fused", "cuda", "cuda-unfused", "cpp")
# The triton layer replayed from CUDA graphs (the model shapes, GPUs only): beside the eager rows in the
# tables and plots, never "ours" in a comparison with the baselines (they run eagerly).
GRAPHED_IMPL = "triton-graphed"
# The decode sweeps at real models' layers (GPU grids): sweep name → the model case's label.
# The fp8 twins read the weight cache's e4m3 weights (the FP8 issue's item 4).
DECODE_MODELS = {"decode-qwen3": "Qwen3-30B-A3B", "decode-mixtral": "Mixtral-8x7B", "decode-gpt-oss": "gpt-oss-20b",
                 "decode-mixtral-fp8": "Mixtral-8x7B fp8", "decode-qwen3-fp8": "Qwen3-30B-A3B fp8"}


def impl_backend(impl: str):
    """(backend, fused) of one of our implementation names."""
    return IMPL_VARIANTS.get(impl, (impl, None))
OP_ORDER = ["route", "plan", "permute", "grouped_up", "grouped_down", "unpermute"]


@dataclass(frozen=True)
class Sweep:
    name: str
    axis: str            # the row field on the x axis
    label: str           # the axis's name in plots and tables
    budget: str          # what the sweep holds fixed
    numeric: bool = True  # False: categories (dtype, capacity, shared, models)


SWEEPS: Dict[str, Sweep] = {s.name: s for s in [
    Sweep("experts", "num_experts", "experts E", "fixed active parameters (k and f fixed): total parameters grow with E"),
    Sweep("top_k", "top_k", "top-k", "fixed total parameters (E and f fixed): active parameters and FLOPs grow with k"),
    Sweep("expert_size", "d_ff", "expert width f", "fixed total parameters (E·f fixed, k fixed)"),
    Sweep("granularity", "top_k", "granularity G (the top-1 expert split in G; = k)",
          "fixed total and active parameters (E·f and k·f fixed)"),
    Sweep("tokens", "tokens", "tokens per batch", "fixed model (one layer's weights)"),
    Sweep("d_model", "d_model", "d_model (f scaled with it)", "fixed E, k and f/d"),
    Sweep("dtype", "dtype", "dtype", "fixed configuration", numeric=False),
    Sweep("capacity", "capacity_factor", "capacity factor", "fixed configuration; dropless is the base", numeric=False),
    Sweep("shared", "num_shared_experts", "shared experts",
          "fixed active parameters (a shared expert replaces a routed slot)", numeric=False),
    Sweep("decode", "tokens", "tokens (inference only)", "fixed model: weight reads dominate; rate in GB/s"),
    *[Sweep(name, "tokens", f"tokens (inference only), {label}",
            f"{label}'s layer: weight reads dominate; rate in GB/s on the hit experts' bytes")
      for name, label in DECODE_MODELS.items()],
    Sweep("fp8", "fp8_recipe", "expert GEMMs", "fixed configuration: the base's dtype, or fp8 blockwise "
          "(emulated where no fp8 kernel runs: CPU, GPUs before sm_89)", numeric=False),
    Sweep("models", "label", "model", "each model's own layer shape at 16,384 tokens, bf16", numeric=False),
]}


def is_decode(name: str) -> bool:
    """A decode sweep (inference at few tokens, rated against the copy bandwidth)."""
    return name == "decode" or name.startswith("decode-")


def x_value(row: Mapping[str, object], sweep: Sweep):
    value = row.get(sweep.axis)
    if sweep.name == "capacity":
        return "dropless" if value in (None, "", "None") else f"cf {float(value):g}"
    if sweep.name == "models":
        return row.get("label") or row.get("case")
    if sweep.name == "fp8":
        return f"fp8 {value}" if value not in (None, "", "None") else str(row.get("dtype"))
    return value


def x_sort_key(value):
    if value == "dropless":
        return (0, 0.0, "")
    if isinstance(value, (int, float)):
        return (1, float(value), "")
    return (2, 0.0, str(value))


def in_sweep(rows: List[Mapping[str, object]], sweep: str) -> List[Mapping[str, object]]:
    return [r for r in rows if r.get("sweep") == sweep]


def best_ours(rows: List[Mapping[str, object]], case: str, mode: str, op: str = "layer") -> Optional[Mapping[str, object]]:
    """Our fastest implementation of ``op`` on a case."""
    mine = [r for r in rows if r["case"] == case and r["op"] == op and r["mode"] == mode and r["impl"] in OUR_IMPLS]
    return min(mine, key=lambda r: float(r["median_ms"])) if mine else None


def points(rows: List[Mapping[str, object]], sweep: Sweep) -> List[Mapping[str, object]]:
    """One representative row per point of the sweep (its case), in axis order."""
    seen: Dict[str, Mapping[str, object]] = {}
    for r in in_sweep(rows, sweep.name):
        seen.setdefault(r["case"], r)
    return sorted(seen.values(), key=lambda r: x_sort_key(x_value(r, sweep)))
