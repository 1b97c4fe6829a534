"""The answer first: what a token costs at each point of each sweep, against a dense layer, and what
that means for the design rules `fastmoe-design` ranks by.

"× dense" is the layer's time over the time of one dense GEMM doing the same FLOPs, measured in the
same run (1 / dense_ratio): the price of the MoE's routing and grouping per FLOP.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional

from .sweeps import SWEEPS, Sweep, best_ours, is_decode, points, x_value

Row = Mapping[str, object]


def _us_per_token(row: Optional[Row]) -> Optional[float]:
    return float(row["median_ms"]) * 1e3 / int(row["tokens"]) if row else None


def _spread(row: Optional[Row]) -> Optional[str]:
    if not row:
        return None
    t = int(row["tokens"])
    return f"{float(row['p20_ms']) * 1e3 / t:.3g}–{float(row['p80_ms']) * 1e3 / t:.3g}"


def _times_dense(row: Optional[Row]) -> Optional[float]:
    ratio = row.get("dense_ratio") if row else None
    return 1 / float(ratio) if ratio else None


def cost_table(rows: List[Row], sweep: Sweep) -> List[Dict[str, object]]:
    """Per point: our best layer's training-step and inference cost per token, × dense, × the base."""
    table = []
    base_train = None
    for p in points(rows, sweep):
        train, infer = best_ours(rows, p["case"], "fwd+bwd"), best_ours(rows, p["case"], "fwd")
        entry = {
            sweep.label: x_value(p, sweep), "total_params": p["total_params"], "active_params": p["active_params"],
            "train_us_per_token": _us_per_token(train), "train_p20_p80": _spread(train),
            "train_x_dense": _times_dense(train), "train_impl": train["impl"] if train else None,
            "infer_us_per_token": _us_per_token(infer), "infer_p20_p80": _spread(infer),
            "infer_x_dense": _times_dense(infer) if not is_decode(sweep.name) else None,
            "infer_gbps": infer.get("gbps") if infer else None,
            "infer_pct_of_copy": 100 * float(infer["dense_ratio"]) if is_decode(sweep.name) and infer and
            infer.get("dense_ratio") else None,
            "_is_base": _is_base(rows, p),
        }
        if entry["_is_base"]:
            base_train = entry["train_us_per_token"]
        table.append(entry)
    for entry in table:
        t = entry["train_us_per_token"]
        entry["train_x_base"] = t / base_train if t and base_train else None
    return table


def _is_base(rows: List[Row], point: Row) -> bool:
    return any(r["sweep"] == "base" and r["case"] == point["case"] for r in rows)


def _cost(table: List[Dict[str, object]], sweep: Sweep, where) -> Optional[float]:
    for entry in table:
        if where(entry[sweep.label]):
            return entry["train_us_per_token"]
    return None


def _ends(table: List[Dict[str, object]]):
    costs = [e for e in table if e["train_us_per_token"]]
    return (costs[0], costs[-1]) if len(costs) >= 2 else (None, None)


def design_implications(rows: List[Row]) -> List[str]:
    """One sentence per design rule the measurements bear on, with the numbers behind it."""
    out: List[str] = []
    tables = {name: cost_table(rows, s) for name, s in SWEEPS.items() if s.name in {r.get("sweep") for r in rows}}

    lo, hi = _ends(tables.get("experts", []))
    if lo:
        label = SWEEPS["experts"].label
        growth = hi["train_us_per_token"] / lo["train_us_per_token"]
        doublings = math.log2(hi[label] / lo[label]) if hi[label] > lo[label] else 1
        per_doubling = growth ** (1 / doublings) - 1
        verdict = ("more experts are nearly free here, so the ranking by total parameters (Liew et al.) stands"
                   if per_doubling <= 0.10 else
                   "with `--results` and `--step-time-ms` the design tool drops the many-expert candidates first: "
                   "its ranking by total parameters now pays for them")
        out.append(f"**Total parameters through more experts** (fixed active): E {lo[label]} → {hi[label]} costs "
                   f"×{growth:.2f} per token in a training step ({100 * per_doubling:+.0f}% per doubling of E); {verdict}.")
    lo, hi = _ends(tables.get("top_k", []))
    if lo:
        label = SWEEPS["top_k"].label
        k_ratio = hi[label] / lo[label]
        growth = hi["train_us_per_token"] / lo["train_us_per_token"]
        per_flop = growth / k_ratio
        out.append(f"**Lower sparsity E/k** (fixed total): k {lo[label]} → {hi[label]} multiplies FLOPs by "
                   f"{k_ratio:g} and the time per token by {growth:.2f} (×{per_flop:.2f} per FLOP); the design tool's "
                   f"preference for larger k costs {'less' if per_flop < 1 else 'more'} than its FLOPs say.")
    gran = tables.get("granularity", [])
    lo, hi = _ends(gran)
    if lo:
        label = SWEEPS["granularity"].label
        growth = hi["train_us_per_token"] / lo["train_us_per_token"]
        verdict = ("finer experts are nearly free: the granularity target G* = 8 needs no correction"
                   if growth <= 1.15 else
                   "finer experts cost time at equal FLOPs: under a step-time budget the design tool's granularity "
                   "tie-break (closest to G* = 8) should yield to coarser experts")
        out.append(f"**Granularity** (fixed total and active): G {lo[label]} → {hi[label]} costs ×{growth:.2f} per "
                   f"token; {verdict}.")
    cap = tables.get("capacity", [])
    dropless = _cost(cap, SWEEPS["capacity"], lambda x: x == "dropless")
    capped = [e["train_us_per_token"] for e in cap if e[SWEEPS["capacity"].label] != "dropless" and e["train_us_per_token"]]
    if dropless and capped:
        ratio = dropless / min(capped)
        out.append(f"**Dropless routing**: ×{ratio:.2f} the time of the fastest capacity factor measured; the rule "
                   f"'prefer dropless' (Slicing and Dicing) {'costs little here' if ratio <= 1.15 else 'has a price here that a step-time budget sees'}.")
    shared = tables.get("shared", [])
    if len(shared) >= 2 and all(e["train_us_per_token"] for e in shared):
        ratio = shared[-1]["train_us_per_token"] / shared[0]["train_us_per_token"]
        out.append(f"**A shared expert** (fixed active) costs ×{ratio:.2f} per token against routing that slot; "
                   f"the design tool keeps it a second-order option.")
    fp8 = tables.get("fp8", [])
    base_cost = _cost(fp8, SWEEPS["fp8"], lambda x: not str(x).startswith("fp8"))
    fp8_entry = next((e for e in fp8 if str(e[SWEEPS["fp8"].label]).startswith("fp8") and e["train_us_per_token"]), None)
    if base_cost and fp8_entry:
        speedup = base_cost / fp8_entry["train_us_per_token"]
        emulated = fp8_entry["train_impl"] in ("torch", "cpp")
        out.append(f"**FP8 experts** (blockwise e4m3): the training step runs at ×{speedup:.2f} the speed of the base "
                   f"precision ({fp8_entry['train_impl']}); "
                   + ("this is the fp32 emulation (no fp8 kernel here), a cost of checking the recipe, not of fp8 "
                      "training." if emulated else
                      "the design tool's FLOP budget stretches by that factor for the routed experts."))
    return out


def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


HEADERS = {
    "total_params": "total params", "active_params": "active params", "train_us_per_token": "train µs/token",
    "train_p20_p80": "p20–p80", "train_x_dense": "× dense", "train_x_base": "× base", "train_impl": "fastest",
    "infer_us_per_token": "infer µs/token", "infer_p20_p80": "p20–p80", "infer_x_dense": "× dense",
    "infer_gbps": "GB/s", "infer_pct_of_copy": "% of copy",
}


def _params(n) -> str:
    n = float(n)
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def cost_markdown(rows: List[Row]) -> List[str]:
    """The report's first section: one cost table per sweep, then the design implications."""
    present = {r.get("sweep") for r in rows}
    parts = ["## What each configuration costs", "",
             "Our fastest implementation at each point, per token: a training step (forward+backward) and "
             "inference (forward), with their p20–p80 spread; **× dense** is the time over one dense GEMM of the "
             "same FLOPs measured in the same run; **× base** compares with the sweep's base point.", ""]
    for name, sweep in SWEEPS.items():
        if name not in present:
            continue
        table = cost_table(rows, sweep)
        if is_decode(name):
            cols = [sweep.label, "active_params", "infer_us_per_token", "infer_p20_p80", "infer_gbps", "infer_pct_of_copy"]
        else:
            cols = [sweep.label, "total_params", "active_params", "train_us_per_token", "train_p20_p80",
                    "train_x_dense", "train_x_base", "train_impl", "infer_us_per_token", "infer_p20_p80", "infer_x_dense"]
        parts += [f"### {name}: {sweep.budget}", "", "| " + " | ".join(HEADERS.get(c, c) for c in cols) + " |",
                  "|" + "---|" * len(cols)]
        for entry in table:
            mark = " (base)" if entry["_is_base"] and not is_decode(name) and name != "models" else ""
            cells = [(_params(entry[c]) if c.endswith("_params") else fmt(entry[c])) + (mark if c == sweep.label else "")
                     for c in cols]
            parts.append("| " + " | ".join(cells) + " |")
        parts.append("")
    implications = design_implications(rows)
    if implications:
        parts += ["### What this means for the design rules (`fastmoe-design --results`)", ""]
        parts += [f"- {line}" for line in implications] + [""]
    return parts
