"""From result rows to what people read: PNG plots, a Markdown report, the headline table."""
from __future__ import annotations

import pathlib
from collections import defaultdict
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

OP_ORDER = ["route", "plan", "permute", "grouped_up", "grouped_down", "unpermute"]
# Our implementations as the results name them: each backend, and Triton with the experts unfused.
OUR_IMPLS = ("torch", "triton", "triton-unfused", "cuda", "cpp")
SWEEP_AXES = {  # sweep → (row field on the x axis, label, log scale)
    "experts": ("num_experts", "number of experts E (fixed active params)", True),
    "top_k": ("top_k", "top-k (sparsity E/k falls; fixed total params)", True),
    "expert_size": ("d_ff", "expert width d_ff (fixed total params)", True),
    "granularity": ("num_experts", "experts after splitting each into G (fixed total and active params)", True),
    "tokens": ("tokens", "tokens per batch", True),
    "d_model": ("d_model", "d_model", True),
    "capacity": ("capacity_factor", "capacity factor", False),
}


def _rows(rows: Iterable) -> List[Dict[str, object]]:
    out = []
    for r in rows:
        out.append(dict(r) if isinstance(r, Mapping) else r.flat())
    return out


def base_case(rows: List[Dict[str, object]]) -> Optional[str]:
    for r in rows:
        if r["sweep"] == "base":
            return r["case"]
    return rows[0]["case"] if rows else None


def _base_sweep(rows: List[Dict[str, object]]) -> Optional[str]:
    return "base" if any(r["sweep"] == "base" for r in rows) else (rows[0]["sweep"] if rows else None)


def headline(rows: Iterable, mode: str = "fwd+bwd") -> List[Dict[str, object]]:
    """Per implementation, on the base case: layer and experts time, TFLOP/s, fraction of dense."""
    rows = _rows(rows)
    case, sweep = base_case(rows), _base_sweep(rows)
    table = []
    for r in rows:
        if r["case"] == case and r["sweep"] == sweep and r["mode"] == mode and r["op"] in ("layer", "experts"):
            table.append({k: r[k] for k in ("op", "impl", "median_ms", "tflops", "dense_ratio", "peak_mem_mb")})
    best_baseline = min((t["median_ms"] for t in table if t["op"] == "experts" and t["impl"] not in
                         OUR_IMPLS), default=None)
    for t in table:
        t["vs_best_baseline"] = (best_baseline / t["median_ms"]) if (best_baseline and t["op"] == "experts") else None
    table.sort(key=lambda t: (t["op"], t["median_ms"]))
    return table


def format_table(table: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in table]
    return "\n".join(lines)


def plot_all(rows: Iterable, folder: pathlib.Path) -> List[pathlib.Path]:
    """Write the plots; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(rows)
    folder.mkdir(parents=True, exist_ok=True)
    written: List[pathlib.Path] = []
    for sweep, (field, label, log) in SWEEP_AXES.items():
        sel = [r for r in rows if r["sweep"] == sweep and r["op"] in ("layer", "experts") and r["mode"] == "fwd+bwd"
               and r[field] is not None]
        if not sel:
            continue
        fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(12, 4.5))
        series = defaultdict(list)
        for r in sel:
            if r["op"] == "layer" or r["impl"] not in OUR_IMPLS:
                series[f"{r['op']}:{r['impl']}"].append((r[field], r["median_ms"], r["dense_ratio"]))
        for name, pts in sorted(series.items()):
            pts.sort()
            xs = [p[0] for p in pts]
            ax_t.plot(xs, [p[1] for p in pts], marker="o", label=name)
            if any(p[2] for p in pts):
                ax_r.plot(xs, [100 * (p[2] or 0) for p in pts], marker="o", label=name)
        for ax, ylabel in ((ax_t, "fwd+bwd time (ms)"), (ax_r, "% of a dense GEMM's rate")):
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            if log:
                ax.set_xscale("log", base=2)
            ax.grid(True, alpha=0.3)
        ax_t.set_yscale("log")
        ax_t.legend(fontsize=7)
        fig.suptitle(f"sweep: {sweep} ({rows[0]['device']}, {rows[0]['dtype']})")
        fig.tight_layout()
        path = folder / f"sweep_{sweep}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    case, sweep = base_case(rows), _base_sweep(rows)
    ops = [r for r in rows if r["case"] == case and r["sweep"] == sweep and r["op"] in OP_ORDER]
    if ops:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
            impls = sorted({r["impl"] for r in ops if r["mode"] == mode})
            bottom = [0.0] * len(impls)
            for op in OP_ORDER:
                heights = [next((r["median_ms"] for r in ops if r["impl"] == i and r["op"] == op and r["mode"] == mode), 0.0)
                           for i in impls]
                ax.bar(impls, heights, bottom=bottom, label=op)
                bottom = [b + h for b, h in zip(bottom, heights)]
            ax.set_title(f"per-op time, {mode}")
            ax.set_ylabel("ms")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"op breakdown on {case}")
        fig.tight_layout()
        path = folder / "ops_breakdown.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    mem = [r for r in rows if r["peak_mem_mb"] is not None and r["op"] == "experts" and r["sweep"] in ("top_k", "base")]
    if mem:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series = defaultdict(list)
        for r in mem:
            series[r["impl"]].append((r["top_k"], r["peak_mem_mb"]))
        for name, pts in sorted(series.items()):
            pts = sorted(set(pts))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("top-k")
        ax.set_ylabel("peak memory of fwd+bwd (MiB)")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = folder / "memory.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def markdown(rows: Iterable, plots: Sequence[pathlib.Path], skipped: Mapping[str, str], folder: pathlib.Path) -> str:
    rows = _rows(rows)
    if not rows:
        return "# fastmoe-bench\n\nNo results.\n"
    env = rows[0]
    parts = [
        "# fastmoe-bench report",
        "",
        f"Device: **{env['device']}** — torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']} — {env['date']}.",
        "",
        "Times are medians after warm-up (CUDA events on GPUs), inputs rotated between runs. `fwd` runs without "
        "autograd (inference), `fwd+bwd` is a training step. FLOPs count the expert MLPs (6·T·k·d·f forward, "
        "18·T·k·d·f forward+backward, gated); `dense_ratio` is the rate as a fraction of a dense GEMM of the same "
        "FLOPs measured in the same run. Value checks (`FASTMOE_CHECKS`) are off, as in production runs.",
        "",
        "## Headline (base case, forward+backward)",
        "",
        format_table(headline(rows), ["op", "impl", "median_ms", "tflops", "dense_ratio", "vs_best_baseline", "peak_mem_mb"]),
        "",
        "## Headline (base case, forward)",
        "",
        format_table(headline(rows, "fwd"), ["op", "impl", "median_ms", "tflops", "dense_ratio", "vs_best_baseline"]),
        "",
    ]
    for sweep in SWEEP_AXES:
        sel = [r for r in rows if r["sweep"] == sweep and r["op"] == "layer" and r["mode"] == "fwd+bwd"]
        if not sel:
            continue
        parts += [f"## Sweep: {sweep} (layer, fwd+bwd)", "",
                  format_table(sorted(sel, key=lambda r: (r["case"], r["median_ms"])),
                               ["case", "impl", "median_ms", "tflops", "dense_ratio", "total_params", "active_params"]), ""]
    if skipped:
        parts += ["## Skipped", ""] + [f"- **{k}**: {v}" for k, v in sorted(skipped.items())] + [""]
    if plots:
        parts += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(folder).as_posix()})" for p in plots] + [""]
    return "\n".join(parts)
