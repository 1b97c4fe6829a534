"""Consistency checks on measured rows: flag the points that cannot be true or cannot be trusted.

A point is flagged, never dropped: the report lists every flag and marks the flagged cells. What is
checked (each comparison needs the two medians' 95% confidence intervals to be disjoint and the
gap past ``MARGIN``, so noise alone does not raise a flag):

- ``wide spread``: p80/p20 above ``WIDE_SPREAD``;
- ``imprecise``: the median's 95% confidence interval is wider than ±``IMPRECISE`` of it (the
  time cap came first; ``converged`` in the results says whether the grid's own target was met);
- ``loaded``: other processes kept so many cores busy that our threads had to wait for them;
- ``fwd > fwd+bwd``: a forward slower than the training step that contains it;
- ``layer < experts``: a whole layer faster than its own experts (the layer adds the router);
- ``not monotonic``: time falling as tokens, d_model or top-k grow (more work, same everything else);
- ``few samples``: two runs only (the time cap came first): no interval is claimed;
- ``jump``: one of our backends' time relative to the torch backend's, at one point of a sweep,
  more than ``JUMP``× away from its median relative time over the sweep's other points (the
  baselines are left out, and so are the sweeps that change E: a per-expert Python loop's cost
  against ours does change with E).
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Dict, Iterable, List, Mapping, MutableMapping, Optional, Tuple

from .sweeps import OUR_IMPLS, SWEEPS, is_decode

WIDE_SPREAD = 1.5
IMPRECISE = 0.10
MARGIN = 0.10
JUMP = 4.0
# Sweeps that change E: the torch backend's grouped GEMM loops over experts in Python, so any
# backend's time relative to it changes with E for a reason.
E_VARYING = ("experts", "expert_size", "granularity", "models")
MONOTONIC_SWEEPS = {"tokens": "tokens", "d_model": "d_model", "top_k": "top_k",
                    **{name: "tokens" for name in SWEEPS if is_decode(name)}}

Row = MutableMapping[str, object]


def _num(row: Mapping[str, object], key: str) -> Optional[float]:
    value = row.get(key)
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def clearly_less(a: Mapping[str, object], b: Mapping[str, object]) -> bool:
    """Whether ``a`` is faster than ``b`` beyond noise: disjoint intervals and a gap past the margin."""
    a_hi = _num(a, "ci_high_ms") or _num(a, "median_ms")
    b_lo = _num(b, "ci_low_ms") or _num(b, "median_ms")
    return a_hi < b_lo and float(a["median_ms"]) < (1 - MARGIN) * float(b["median_ms"])


def _flag(row: Row, text: str) -> None:
    have = [f for f in str(row.get("flags") or "").split("; ") if f]
    if text not in have:
        row["flags"] = "; ".join(have + [text])


def flag_noise(rows: Iterable[Row]) -> None:
    for r in rows:
        p20, p80 = _num(r, "p20_ms"), _num(r, "p80_ms")
        if p20 and p80 and p80 / p20 > WIDE_SPREAD:
            _flag(r, f"wide spread (p80/p20 {p80 / p20:.1f})")
        lo, hi, median = _num(r, "ci_low_ms"), _num(r, "ci_high_ms"), _num(r, "median_ms")
        reps = int(r.get("reps") or 0)
        if 1 < reps < 3:
            _flag(r, f"few samples ({reps})")
        if lo is not None and hi is not None and median and reps > 1 and \
                (hi - lo) / 2 > IMPRECISE * median:
            _flag(r, f"imprecise (median ±{50 * (hi - lo) / median:.0f}%)")
        others, threads, cores = _num(r, "others_load"), _num(r, "threads"), _num(r, "cores")
        on_cpu = str(r.get("device", "")).startswith("CPU")
        if others is not None and threads and cores and (
                (on_cpu and others + threads > cores + 0.5) or (not on_cpu and others > cores - 1)):
            _flag(r, f"loaded ({others:.1f} of {cores:.0f} cores busy elsewhere)")


def _by(rows: Iterable[Row], *keys: str) -> Dict[Tuple, List[Row]]:
    out: Dict[Tuple, List[Row]] = defaultdict(list)
    for r in rows:
        out[tuple(r.get(k) for k in keys)].append(r)
    return out


def flag_containment(rows: List[Row]) -> None:
    """fwd ≤ fwd+bwd for one op, and layer ≥ experts for one implementation."""
    # Per sweep: a base point reported under several sweeps is a row in each, and each gets the flag.
    for (sweep, case, op, impl), group in _by(rows, "sweep", "case", "op", "impl").items():
        modes = {r["mode"]: r for r in group}
        if "fwd" in modes and "fwd+bwd" in modes and clearly_less(modes["fwd+bwd"], modes["fwd"]):
            _flag(modes["fwd"], "fwd > fwd+bwd")
            _flag(modes["fwd+bwd"], "fwd > fwd+bwd")
    for (sweep, case, impl, mode), group in _by(rows, "sweep", "case", "impl", "mode").items():
        ops = {r["op"]: r for r in group}
        if "layer" in ops and "experts" in ops and clearly_less(ops["layer"], ops["experts"]):
            _flag(ops["layer"], "layer < experts")


def flag_monotonic(rows: List[Row]) -> None:
    for sweep, axis in MONOTONIC_SWEEPS.items():
        # The layer and the experts do more work as the axis grows; route, plan and the copy need not.
        sel = [r for r in rows if r.get("sweep") == sweep and r.get("op") in ("layer", "experts")]
        for key, series in _by(sel, "op", "impl", "mode").items():
            series = sorted(series, key=lambda r: float(r[axis]))
            for smaller, larger in zip(series, series[1:]):
                if float(larger[axis]) > float(smaller[axis]) and clearly_less(larger, smaller):
                    _flag(larger, f"not monotonic (faster than at {axis}={smaller[axis]})")


def flag_jumps(rows: List[Row], reference: str = "torch") -> None:
    for sweep, sel in _by(rows, "sweep").items():
        if sweep in E_VARYING:
            continue
        ref = {(r["case"], r["op"], r["mode"]): float(r["median_ms"]) for r in sel if r.get("impl") == reference}
        for (op, impl, mode), series in _by(sel, "op", "impl", "mode").items():
            if impl == reference or impl not in OUR_IMPLS:
                continue
            ratios = [(r, float(r["median_ms"]) / ref[(r["case"], op, mode)]) for r in series
                      if ref.get((r["case"], op, mode))]
            if len(ratios) < 3:
                continue
            for r, ratio in ratios:
                others = statistics.median(x for other, x in ratios if other is not r)
                if ratio > JUMP * others or ratio < others / JUMP:
                    _flag(r, f"jump ({ratio:.2g}x {reference} here, {others:.2g}x elsewhere in the sweep)")


def flag_rows(rows: List[Row]) -> List[str]:
    """Set every row's ``flags``; returns one line per flagged row."""
    for r in rows:
        r["flags"] = ""
    flag_noise(rows)
    flag_containment(rows)
    flag_monotonic(rows)
    flag_jumps(rows)
    seen = set()
    lines = []
    for r in rows:
        if not r["flags"]:
            continue
        line = f"{r['case']} {r['op']}/{r['impl']}/{r['mode']}: {r['flags']}"
        if line not in seen:  # a base point reported under several sweeps is listed once
            seen.add(line)
            lines.append(line)
    return lines
