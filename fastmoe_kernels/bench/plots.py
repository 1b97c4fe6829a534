"""PNG plots of a results set: one per sweep (time with its p20–p80 spread as error bars, and the
rate against the roofline), the per-op breakdown of the base case, peak memory against top-k.

Every implementation has one colour in every plot (``color_of``); the layer is drawn solid and the
experts-only measurement dashed, in the implementation's colour.
"""
from __future__ import annotations

import hashlib
import pathlib
from collections import defaultdict
from typing import Dict, List, Mapping

from .sweeps import OP_ORDER, OUR_IMPLS, SWEEPS, Sweep, in_sweep, is_decode, x_sort_key, x_value

_FIXED = {
    "torch": "#1f77b4", "triton": "#d62728", "triton-unfused": "#ff9896", "triton-fused": "#8c1515", "cuda": "#2ca02c",
    "cuda-unfused": "#98df8a", "cpp": "#9467bd",
    "naive-loop": "#7f7f7f", "torch._grouped_mm": "#ff7f0e", "hf-eager": "#8c564b", "hf-batched_mm": "#e377c2",
    "hf-grouped_mm": "#bcbd22", "hf-deepgemm": "#17becf", "hf-sonicmoe": "#393b79", "dense": "#000000",
}
_SPARE = ["#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1"]
OP_COLORS = dict(zip(OP_ORDER, ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948"]))


def color_of(impl: str) -> str:
    """The implementation's colour: fixed for the known ones, a stable hash of the name otherwise."""
    if impl in _FIXED:
        return _FIXED[impl]
    return _SPARE[int(hashlib.sha1(impl.encode()).hexdigest(), 16) % len(_SPARE)]


def _series(rows: List[Mapping[str, object]], sweep: Sweep, mode: str) -> Dict[tuple, list]:
    """(op, impl) → [(x, median, p20, p80, dense_ratio)]: our layers and every experts baseline."""
    out = defaultdict(list)
    for r in in_sweep(rows, sweep.name):
        if r["mode"] != mode or r["op"] not in ("layer", "experts"):
            continue
        if r["op"] == "experts" and r["impl"] in OUR_IMPLS:
            continue  # ours are shown as whole layers; the experts-only rows are in the tables
        out[(r["op"], r["impl"])].append((x_value(r, sweep), float(r["median_ms"]), float(r["p20_ms"]),
                                          float(r["p80_ms"]), r.get("dense_ratio"), r.get("gbps")))
    return out


def _plot_sweep(plt, rows, sweep: Sweep, folder: pathlib.Path):
    decode = is_decode(sweep.name)
    mode = "fwd" if decode else "fwd+bwd"
    series = _series(rows, sweep, mode)
    if not series:
        return None
    categories = sorted({p[0] for pts in series.values() for p in pts}, key=x_sort_key)
    position = {c: i for i, c in enumerate(categories)}
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (op, impl), pts in sorted(series.items()):
        pts.sort(key=lambda p: x_sort_key(p[0]))
        xs = [p[0] if sweep.numeric else position[p[0]] for p in pts]
        style = dict(color=color_of(impl), marker="o", linestyle="-" if op == "layer" else "--", capsize=3,
                     label=f"{op}:{impl}")
        ax_t.errorbar(xs, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]], **style)
        rates = [(x, 100 * float(p[4])) for x, p in zip(xs, pts) if p[4]]
        if rates:
            ax_r.plot([x for x, _ in rates], [y for _, y in rates], color=style["color"], marker="o",
                      linestyle=style["linestyle"], label=style["label"])
    for ax, ylabel in ((ax_t, f"{mode} time (ms), p20–p80 bars"),
                       (ax_r, "% of the copy bandwidth" if decode else "% of a dense GEMM's rate")):
        ax.set_xlabel(sweep.label)
        ax.set_ylabel(ylabel)
        if sweep.numeric:
            ax.set_xscale("log", base=2)
        else:
            ax.set_xticks(range(len(categories)))
            ax.set_xticklabels([str(c) for c in categories], rotation=20 if sweep.name == "models" else 0)
        ax.grid(True, alpha=0.3)
    ax_t.set_yscale("log")
    ax_t.legend(fontsize=7)
    first = rows[0]
    fig.suptitle(f"sweep: {sweep.name} — {sweep.budget} ({first['device']})", fontsize=9)
    fig.tight_layout()
    path = folder / f"sweep_{sweep.name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_ops(plt, rows, case: str, sweep: str, folder: pathlib.Path):
    ops = [r for r in rows if r["case"] == case and r["sweep"] == sweep and r["op"] in OP_ORDER]
    if not ops:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        impls = sorted({r["impl"] for r in ops if r["mode"] == mode})
        bottom = [0.0] * len(impls)
        for op in OP_ORDER:
            heights = [next((float(r["median_ms"]) for r in ops if r["impl"] == i and r["op"] == op and r["mode"] == mode),
                            0.0) for i in impls]
            ax.bar(impls, heights, bottom=bottom, label=op, color=OP_COLORS[op])
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_title(f"per-op time, {mode}")
        ax.set_ylabel("ms")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"op breakdown on {case}")
    fig.tight_layout()
    path = folder / "ops_breakdown.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_memory(plt, rows, folder: pathlib.Path):
    mem = [r for r in rows if r.get("peak_mem_mb") not in (None, "") and r["op"] == "experts"
           and r["sweep"] in ("top_k", "base")]
    if not mem:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = defaultdict(set)
    for r in mem:
        series[r["impl"]].add((int(r["top_k"]), float(r["peak_mem_mb"])))
    for name, pts in sorted(series.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, color=color_of(name))
    ax.set_xlabel("top-k")
    ax.set_ylabel("peak memory of fwd+bwd (MiB)")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = folder / "memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(rows: List[Mapping[str, object]], folder: pathlib.Path, base: str, base_sweep: str) -> List[pathlib.Path]:
    """Write the plots; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = [_plot_sweep(plt, rows, sweep, folder) for sweep in SWEEPS.values()]
    written += [_plot_ops(plt, rows, base, base_sweep, folder), _plot_memory(plt, rows, folder)]
    return [p for p in written if p is not None]
