"""From result rows to what people read: the Markdown report (the answer first, then the evidence),
the headline table, and the plots (``plots.py``).

Every table carries the spread (p20–p80) and each point's flags (``checks.py``); the report opens
with warnings when the machine was loaded, spreads were wide, or checks flagged points.
"""
from __future__ import annotations

import pathlib
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from . import plots
from .checks import flag_rows
from .summary import cost_markdown, fmt
from .sweeps import OP_ORDER, OUR_IMPLS, SWEEPS, in_sweep, is_decode, x_sort_key, x_value

__all__ = ["OP_ORDER", "OUR_IMPLS", "base_case", "format_table", "headline", "markdown", "plot_all", "as_dicts"]

HEADLINE_COLUMNS = ["op", "impl", "median_ms", "p20–p80", "tflops", "dense_ratio", "vs_best_baseline", "peak_mem_mb",
                    "flags"]
MAX_LISTED_FLAGS = 40


def as_dicts(rows: Iterable) -> List[Dict[str, object]]:
    out = []
    for r in rows:
        out.append(dict(r) if isinstance(r, Mapping) else r.flat())
    return out


def base_case(rows: List[Mapping[str, object]]) -> Optional[str]:
    for r in rows:
        if r["sweep"] == "base":
            return r["case"]
    return rows[0]["case"] if rows else None


def _base_sweep(rows: List[Mapping[str, object]]) -> Optional[str]:
    return "base" if any(r["sweep"] == "base" for r in rows) else (rows[0]["sweep"] if rows else None)


def _spread_cell(r: Mapping[str, object]) -> str:
    return f"{float(r['p20_ms']):.3g}–{float(r['p80_ms']):.3g}"


def headline(rows: Iterable, mode: str = "fwd+bwd", case: Optional[str] = None) -> List[Dict[str, object]]:
    """Per implementation, on the base case (or ``case``): layer and experts time with its spread,
    TFLOP/s, fraction of dense, speed against the best baseline."""
    rows = as_dicts(rows)
    sweep = _base_sweep(rows) if case is None else None
    case = case or base_case(rows)
    table = []
    for r in rows:
        if r["case"] == case and (sweep is None or r["sweep"] == sweep) and r["mode"] == mode and r["op"] in ("layer", "experts"):
            if any(t["op"] == r["op"] and t["impl"] == r["impl"] for t in table):
                continue  # a model shape reported under two names
            entry = {k: r.get(k) for k in ("op", "impl", "median_ms", "tflops", "dense_ratio", "peak_mem_mb", "flags")}
            entry["p20–p80"] = _spread_cell(r)
            table.append(entry)
    best_baseline = min((t["median_ms"] for t in table if t["op"] == "experts" and t["impl"] not in OUR_IMPLS),
                        default=None)
    for t in table:
        t["vs_best_baseline"] = (best_baseline / t["median_ms"]) if best_baseline else None
    table.sort(key=lambda t: (t["op"], t["median_ms"]))
    return table


def format_table(table: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) if row.get(c) != "" else "" for c in columns) + " |" for row in table]
    return "\n".join(lines)


def plot_all(rows: Iterable, folder: pathlib.Path) -> List[pathlib.Path]:
    rows = as_dicts(rows)
    return plots.plot_all(rows, folder, base_case(rows), _base_sweep(rows)) if rows else []


def _warnings(rows: List[Dict[str, object]], flagged: List[str]) -> List[str]:
    out = []
    threads = sorted({int(r["threads"]) for r in rows if r.get("threads") not in (None, "")})
    def distinct(word):  # a base point is a row in every sweep: count each measurement once
        return list({(r["case"], r["op"], r["impl"], r["mode"]): r for r in rows if word in str(r.get("flags"))}.values())

    loaded, wide = distinct("loaded"), distinct("wide spread")
    if loaded:
        worst = max(float(r["others_load"]) for r in loaded)
        out.append(f"**The machine was loaded**: {len(loaded)} points were timed while other processes kept up to "
                   f"{worst:.1f} cores busy. Their times may be inflated; re-run on an idle machine.")
    if len(threads) > 1:
        out.append(f"**The thread count changed mid-run** ({' → '.join(map(str, threads[::-1]))}) after other "
                   f"processes took cores: compare points only at equal `threads`.")
    if wide:
        out.append(f"**Wide spread**: {len(wide)} points have p80/p20 above 1.5.")
    if flagged:
        out.append(f"**{len(flagged)} points are flagged** by the consistency checks (listed under "
                   f"[Suspect points](#suspect-points)).")
    return out


def _sweep_table(rows: List[Dict[str, object]], name: str) -> List[str]:
    sweep = SWEEPS[name]
    sel = [r for r in in_sweep(rows, name) if r["op"] in ("layer", "experts") or r["op"] in ("dense_gemm", "copy")]
    if not sel:
        return []
    sel.sort(key=lambda r: (x_sort_key(x_value(r, sweep)), r["mode"], r["op"], float(r["median_ms"])))
    table = [{**r, "point": x_value(r, sweep), "p20–p80": _spread_cell(r),
              "rate": r.get("gbps") if r["op"] == "copy" or is_decode(name) else r.get("tflops")} for r in sel]
    columns = ["point", "mode", "op", "impl", "median_ms", "p20–p80", "reps", "rate", "dense_ratio", "flags"]
    unit = "GB/s" if is_decode(name) else "TFLOP/s"
    return [f"### Sweep: {name} — {sweep.budget}", "",
            f"`rate` is {unit}; `dense_ratio` the rate over the {'copy' if is_decode(name) else 'dense GEMM'}'s "
            f"in the same case.", "", format_table(table, columns), ""]


def markdown(rows: Iterable, plot_paths: Sequence[pathlib.Path], skipped: Mapping[str, str], folder: pathlib.Path) -> str:
    rows = as_dicts(rows)
    if not rows:
        return "# fastmoe-bench\n\nNo results.\n"
    flagged = flag_rows(rows)
    env = rows[0]
    threads = sorted({str(r.get("threads")) for r in rows})
    parts = [
        "# fastmoe-bench report", "",
        f"Device: **{env['device']}** — torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']} — "
        f"{env['date']}. CPU threads: {', '.join(threads)} (of {env.get('cores', '?')} usable cores).", "",
        "Times are medians after warm-up (CUDA events on GPUs), inputs rotated between runs, repeated until the "
        "median's 95% confidence interval is narrow enough or the time cap is reached; the spread is p20–p80. "
        "`fwd` runs without autograd (inference), `fwd+bwd` is a training step. FLOPs count the expert MLPs "
        "(6·T·k·d·f forward, 18·T·k·d·f forward+backward, gated); `dense_ratio` is the rate as a fraction of a "
        "dense GEMM of the same FLOPs measured in the same run. Value checks are off, as in production runs.", "",
    ]
    warnings = _warnings(rows, flagged)
    if warnings:
        parts += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    parts += cost_markdown(rows)
    parts += ["## Headline (base case, forward+backward)", "", format_table(headline(rows), HEADLINE_COLUMNS), "",
              "## Headline (base case, forward)", "",
              format_table(headline(rows, "fwd"), [c for c in HEADLINE_COLUMNS if c != "peak_mem_mb"]), ""]
    models = sorted({(r["label"], r["case"]) for r in in_sweep(rows, "models")})
    for label, case in models:
        parts += [f"## {label} ({case}), forward+backward", "", format_table(headline(rows, case=case), HEADLINE_COLUMNS), ""]
    parts += ["## Every sweep", ""]
    for name in SWEEPS:
        parts += _sweep_table(rows, name)
    if flagged:
        parts += ["## Suspect points", ""] + [f"- {line}" for line in flagged[:MAX_LISTED_FLAGS]]
        if len(flagged) > MAX_LISTED_FLAGS:
            parts.append(f"- … and {len(flagged) - MAX_LISTED_FLAGS} more (the `flags` column of results.csv)")
        parts.append("")
    if skipped:
        parts += ["## Skipped", ""] + [f"- **{k}**: {v}" for k, v in sorted(skipped.items())] + [""]
    if plot_paths:
        parts += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(folder).as_posix()})" for p in plot_paths] + [""]
    return "\n".join(parts)
