"""The sweeps. Each varies one axis around a base configuration while holding a stated budget:

- ``experts``: E = 8 … 256 at fixed k and f — fixed active parameters, total grows with E;
- ``top_k``: k = 1 … 16 at fixed E and f — fixed total parameters, sparsity E/k falls;
- ``expert_size``: f from d/16 to 4·d at fixed total parameters (E·f constant, k fixed);
- ``granularity``: split each expert into G smaller ones (E·G experts, k·G active, f/G wide) —
  fixed total *and* active parameters (Krajewski et al. 2024's granularity);
- ``tokens``, ``d_model``, ``dtype``, ``capacity`` (dropless vs capacity factors) and ``shared``
  (shared experts on/off at fixed active parameters).

Grids: "smoke" (one tiny case per sweep: CI runs every benchmark once), "quick" (a few minutes on a
2-core CPU), "full" (GPU sizes, including the fine-grained T=16384, d=2048, f=768, E=128, k=8 case).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, List

from .cases import BenchCase

GRIDS = ("smoke", "quick", "full")


def _base(grid: str) -> BenchCase:
    if grid == "full":
        return BenchCase("base", tokens=16384, d_model=2048, d_ff=768, num_experts=128, top_k=8)
    if grid == "quick":
        return BenchCase("base", tokens=1024, d_model=256, d_ff=128, num_experts=32, top_k=4, dtype="float32")
    return BenchCase("base", tokens=64, d_model=64, d_ff=32, num_experts=8, top_k=2, dtype="float32")


def _axes(grid: str) -> Dict[str, list]:
    if grid == "full":
        return {
            "experts": [8, 16, 32, 64, 128, 256],
            "top_k": [1, 2, 4, 8, 16],
            "expert_size": [1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 1, 2, 4],  # f / d
            "granularity": [1, 2, 4, 8],
            "tokens": [4096, 16384, 65536],
            "d_model": [1024, 2048, 4096],
            "dtype": ["bfloat16", "float16"],
            "capacity": [1.0, 1.25, 2.0],
            "shared": [1],
        }
    if grid == "quick":
        return {
            "experts": [8, 32, 128],
            "top_k": [1, 4, 16],
            "expert_size": [1 / 16, 1 / 2, 4],
            "granularity": [1, 4],
            "tokens": [256, 2048],
            "d_model": [128, 512],
            "dtype": ["bfloat16"],
            "capacity": [1.0, 2.0],
            "shared": [1],
        }
    return {"experts": [16], "top_k": [1], "expert_size": [1 / 4], "granularity": [2], "tokens": [32], "d_model": [32],
            "dtype": ["bfloat16"], "capacity": [1.25], "shared": [1]}


def build_grid(grid: str) -> List[BenchCase]:
    """All cases of a grid (the base case once, then each sweep's variations)."""
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    base = _base(grid)
    axes = _axes(grid)
    d = base.d_model
    cases: List[BenchCase] = [base]
    total_expert_width = base.num_experts * base.d_ff  # E·f held fixed by expert_size
    for E in axes["experts"]:
        cases.append(replace(base, sweep="experts", num_experts=E, top_k=min(base.top_k, E)))
    for k in axes["top_k"]:
        cases.append(replace(base, sweep="top_k", top_k=min(k, base.num_experts)))
    for ratio in axes["expert_size"]:
        f = max(8, int(round(d * ratio / 8)) * 8)
        E = max(base.top_k, total_expert_width // f)
        cases.append(replace(base, sweep="expert_size", d_ff=f, num_experts=E))
    coarse = replace(base, num_experts=max(2, base.num_experts // 16), top_k=max(1, base.top_k // 8), d_ff=base.d_ff * 8)
    for G in axes["granularity"]:
        cases.append(replace(coarse, sweep="granularity", num_experts=coarse.num_experts * G,
                             top_k=min(coarse.top_k * G, coarse.num_experts * G), d_ff=max(8, coarse.d_ff // G)))
    for T in axes["tokens"]:
        cases.append(replace(base, sweep="tokens", tokens=T))
    for dm in axes["d_model"]:
        cases.append(replace(base, sweep="d_model", d_model=dm, d_ff=max(8, base.d_ff * dm // d)))
    for dt in axes["dtype"]:
        cases.append(replace(base, sweep="dtype", dtype=dt))
    for cf in axes["capacity"]:
        cases.append(replace(base, sweep="capacity", capacity_factor=cf))
    for n in axes["shared"]:
        # One shared expert of k routed experts' width replaces one routed slot: same active params.
        cases.append(replace(base, sweep="shared", num_shared_experts=n, shared_d_ff=base.d_ff, top_k=max(1, base.top_k - n)))
    return cases
