"""The recommender: enumerate MoE transformer configurations, keep those within the budgets, and
rank them by the design studies' findings (DESIGN-RULES.md; a synthesis, and it says so):

1. Budgets — the constraint triad (Wan et al. 2026, arXiv 2603.21862): total parameters (memory),
   active parameters and FLOPs per token (inference / training cost), plus, with a results file, the
   measured MoE-layer time of a training step on this GPU.
2. Maximise total parameters (Liew et al. 2026, arXiv 2601.08215; "Slicing and Dicing" 2026):
   quality grows with N_total at every active budget; candidates within ``band`` (2%) tie.
3. Then minimise sparsity s = E/k, i.e. maximise k (Liew et al.), then prefer fewer experts at equal
   s (more experts forces a shallower/narrower model under the same memory).
4. Expert size from the active budget, not the total ("Slicing and Dicing"): the mapping used here
   is a target granularity G* = 4·d/d_expert (Krajewski et al. 2024's definition) — 8 by default,
   where Krajewski et al. put the optimum at small budgets and Zhao et al. 2025 (arXiv 2509.23678)
   find G_opt ≈ 7 roughly independent of scale — searched within [G*/2, 2·G*]; the last tie-break
   is closeness to G*.
5. Dropless routing over capacity-based ("Slicing and Dicing": a consistent gain); shared and
   heterogeneous experts are second-order knobs (same study; Zhao et al. find a flat optimum near a
   0.31 shared share) — offered, not ranked on.
6. Report the near-optimal band, not a single winner: it widens with scale (Wan et al.).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .accounting import Accounting, account, head_layout, round_to

RULES = [
    ("budgets", "kept configurations within every budget of the constraint triad (total params, active params, "
                "FLOPs/token) and the measured step-time budget — Wan et al. 2026 (arXiv 2603.21862)"),
    ("total", "ranked by total parameters, ties within the band — Liew et al. 2026 (arXiv 2601.08215); "
              "Slicing and Dicing 2026"),
    ("sparsity", "then by sparsity s = E/k ascending (larger top-k), then fewer experts at equal s — Liew et al. 2026"),
    ("expert size", "expert width from the active budget via a target granularity G* = 4d/d_expert (Krajewski et al. "
                    "2024, arXiv 2402.07871; Zhao et al. 2025, arXiv 2509.23678, secondary), searched in [G*/2, 2G*]"),
    ("routing", "dropless routing (capacity_factor=None) — Slicing and Dicing 2026: a consistent gain"),
    ("second order", "shared / heterogeneous experts have small effects — Slicing and Dicing 2026; a shared share "
                     "near 0.31 has a flat optimum — Zhao et al. 2025 (secondary)"),
    ("band", "the near-optimal band is reported, not one winner — Wan et al. 2026"),
]


@dataclass
class SearchSpace:
    n_layers: Sequence[int] = (8, 12, 16, 24, 32, 48, 64)
    d_model: Sequence[int] = (512, 768, 1024, 1536, 2048, 3072, 4096, 5120, 6144, 7168, 8192)
    num_experts: Sequence[int] = (8, 16, 32, 64, 128, 256)
    top_k: Sequence[int] = (1, 2, 4, 6, 8, 16)
    granularity_factors: Sequence[float] = (0.5, 1.0, 2.0)  # × the target granularity
    num_shared_experts: Sequence[int] = (0, 1)


@dataclass
class Candidate:
    args: Dict[str, object]
    accounting: Accounting
    granularity: float
    measured_tflops: Optional[float] = None
    est_moe_ms_per_step: Optional[float] = None

    def row(self) -> Dict[str, object]:
        a = self.accounting
        return {
            "layers": self.args["n_layers"], "d_model": self.args["d_model"], "E": self.args["num_experts"],
            "k": self.args["top_k"], "d_ff": self.args["d_ff"], "shared": self.args.get("num_shared_experts", 0),
            "total_B": a.total_params / 1e9, "active_B": a.active_params / 1e9,
            "GFLOP/tok": a.flops_per_token / 1e9, "s=E/k": a.sparsity, "G=4d/f": self.granularity,
            "TFLOP/s": self.measured_tflops, "moe_ms/step": self.est_moe_ms_per_step,
        }


@dataclass
class Recommendation:
    candidates: List[Candidate]
    band: List[Candidate]
    considered: int
    feasible: int
    rules: List[Tuple[str, str]] = field(default_factory=lambda: list(RULES))
    notes: List[str] = field(default_factory=list)


class MeasuredCost:
    """MoE-layer training (fwd+bwd) rate from a results file, interpolated between grid points.

    For a configuration, the rate (TFLOP/s) of the fastest implementation measured at each grid
    point is weighted by inverse distance in log space over (d_model, E, k, d_ff/d_model); the MoE
    time of a step is then ``n_moe_layers · 18·T·k·d·f / rate``.
    """

    def __init__(self, rows: Iterable[Mapping[str, object]]):
        best: Dict[Tuple, float] = {}
        for r in rows:
            if r.get("op") != "layer" or r.get("mode") != "fwd+bwd" or not r.get("tflops"):
                continue
            if "loaded" in str(r.get("flags") or ""):
                continue  # timed while other processes held our cores: not this machine's cost
            key = (int(r["d_model"]), int(r["num_experts"]), int(r["top_k"]), int(r["d_ff"]))
            best[key] = max(best.get(key, 0.0), float(r["tflops"]))
        self.points = best

    def __bool__(self) -> bool:
        return bool(self.points)

    def rate(self, d_model: int, num_experts: int, top_k: int, d_ff: float) -> Optional[float]:
        if not self.points:
            return None
        target = (math.log2(d_model), math.log2(num_experts), math.log2(top_k), math.log2(d_ff / d_model))
        weights = 0.0
        total = 0.0
        for (d, e, k, f), tflops in self.points.items():
            p = (math.log2(d), math.log2(e), math.log2(k), math.log2(f / d))
            dist = math.sqrt(sum((a - b) ** 2 for a, b in zip(p, target)))
            if dist < 1e-9:
                return tflops
            w = 1.0 / dist ** 2
            weights += w
            total += w * tflops
        return total / weights


def recommend(
    *,
    memory_gb: Optional[float] = None,
    max_total_params: Optional[float] = None,
    max_active_params: Optional[float] = None,
    max_flops_per_token: Optional[float] = None,
    bytes_per_param: float = 2.0,
    results: Optional[Iterable[Mapping[str, object]]] = None,
    tokens_per_step: int = 1 << 20,
    max_step_ms: Optional[float] = None,
    seq_len: int = 4096,
    vocab_size: int = 32000,
    target_granularity: float = 8.0,
    band: float = 0.02,
    top: int = 15,
    space: Optional[SearchSpace] = None,
) -> Recommendation:
    """Ranked configurations within the budgets (see the module docstring for the rules).

    ``memory_gb`` bounds total parameters through ``bytes_per_param`` (2 for bf16 weights at
    inference; ~16 for mixed-precision Adam training). ``results`` are rows of a fastmoe-bench
    results file; with ``max_step_ms`` they also bound the estimated MoE time of a training step of
    ``tokens_per_step`` tokens.
    """
    if memory_gb is None and max_total_params is None:
        raise ValueError("recommend: give `memory_gb` or `max_total_params` (the memory budget)")
    if max_active_params is None and max_flops_per_token is None:
        raise ValueError("recommend: give `max_active_params` or `max_flops_per_token` (the cost budget)")
    space = space or SearchSpace()
    total_budget = min(x for x in (max_total_params, memory_gb * 1e9 / bytes_per_param if memory_gb else None)
                       if x is not None)
    measured = MeasuredCost(results) if results is not None else None
    if max_step_ms is not None and not measured:
        raise ValueError("recommend: `max_step_ms` needs a results file with layer fwd+bwd rows")
    considered = 0
    feasible: List[Candidate] = []
    for d in space.d_model:
        heads = head_layout(d)
        for L in space.n_layers:
            for E in space.num_experts:
                for k in space.top_k:
                    if k > E:
                        continue
                    for factor in space.granularity_factors:
                        G = target_granularity * factor
                        f = round_to(4 * d / G, 64)
                        for shared in space.num_shared_experts:
                            considered += 1
                            args = dict(n_layers=L, d_model=d, vocab_size=vocab_size, num_experts=E, top_k=k, d_ff=f,
                                        num_shared_experts=shared, shared_d_ff=f if shared else None,
                                        seq_len=seq_len, **heads)
                            acc = account(**args)
                            if acc.total_params > total_budget:
                                continue
                            if max_active_params is not None and acc.active_params > max_active_params:
                                continue
                            if max_flops_per_token is not None and acc.flops_per_token > max_flops_per_token:
                                continue
                            cand = Candidate(args, acc, 4 * d / f)
                            if measured:
                                rate = measured.rate(d, E, k, f)
                                cand.measured_tflops = rate
                                flops = L * 18.0 * tokens_per_step * k * d * f
                                cand.est_moe_ms_per_step = flops / (rate * 1e12) * 1e3 if rate else None
                                if max_step_ms is not None and (cand.est_moe_ms_per_step or math.inf) > max_step_ms:
                                    continue
                            feasible.append(cand)
    ranked = rank(feasible, band, target_granularity)
    top_total = ranked[0].accounting.total_params if ranked else 0
    in_band = [c for c in ranked if c.accounting.total_params >= top_total * (1 - band)]
    notes = [
        f"memory budget: {total_budget / 1e9:.3g}B total parameters"
        + (f" ({memory_gb} GB at {bytes_per_param} bytes/param)" if memory_gb else ""),
        "use dropless routing (MoEConfig.capacity_factor=None) unless step-time variance forbids it",
    ]
    if measured is not None and not measured:
        notes.append("the results file has no layer fwd+bwd rows: no measured cost shown")
    return Recommendation(ranked[:top], in_band, considered, len(feasible), notes=notes)


def rank(candidates: List[Candidate], band: float, target_granularity: float) -> List[Candidate]:
    """Total parameters descending in tiers of ``band``; within a tier: s ascending, E ascending,
    granularity closest to the target."""
    by_total = sorted(candidates, key=lambda c: -c.accounting.total_params)
    tiers: List[List[Candidate]] = []
    for c in by_total:
        if tiers and c.accounting.total_params >= tiers[-1][0].accounting.total_params * (1 - band):
            tiers[-1].append(c)
        else:
            tiers.append([c])
    ranked: List[Candidate] = []
    for tier in tiers:
        ranked += sorted(tier, key=lambda c: (c.accounting.sparsity, c.args["num_experts"],
                                              abs(math.log(c.granularity / target_granularity)),
                                              -c.accounting.total_params))
    return ranked
