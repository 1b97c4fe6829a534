"""Run a grid of cases: time every target, derive rates and roofline ratios, write tidy rows."""
from __future__ import annotations

import csv
import json
import math
import pathlib
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, Iterable, List, Optional

import torch

from .cases import BenchCase
from .env import environment
from .targets import build_targets, kernel_backends
from .timing import measure, peak_memory_mb

# (warm-up runs, timed runs, seconds cap per target) per grid
EFFORT = {"smoke": (1, 1, None), "quick": (1, 5, 2.0), "full": (3, 20, 4.0)}


@dataclass
class ResultRow:
    """One measurement: a case × implementation × op × mode, with the environment."""

    sweep: str
    case: str
    tokens: int
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    sparsity: float
    dtype: str
    capacity_factor: Optional[float]
    num_shared_experts: int
    shared_d_ff: Optional[int]
    activation: str
    total_params: int
    active_params: int
    op: str
    impl: str
    mode: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    tflops: Optional[float]
    gbps: Optional[float]
    peak_mem_mb: Optional[float]
    dense_ratio: Optional[float] = None
    env: Dict[str, str] = field(default_factory=dict)

    def flat(self) -> Dict[str, object]:
        out = asdict(self)
        out.update(out.pop("env"))
        return out


def run_case(case: BenchCase, device: torch.device, backend_names: List[str], effort: str, *, with_ops: bool = True,
             with_baselines: bool = True, skips: Optional[Dict[str, str]] = None, env: Optional[Dict[str, str]] = None,
             progress: Optional[Callable[[str], None]] = None) -> List[ResultRow]:
    warmup, reps, cap = EFFORT[effort]
    env = env or environment(device)
    rows: List[ResultRow] = []
    for target in build_targets(case, device, backend_names, with_ops=with_ops, with_baselines=with_baselines, skips=skips):
        if progress:
            progress(f"{case.name} {target.op}/{target.impl}/{target.mode}")
        timing = measure(target.run, device, warmup=warmup, reps=reps, max_seconds=cap)
        seconds = timing.median_ms / 1e3
        rows.append(ResultRow(
            **{k: v for k, v in case.as_dict().items() if k in ResultRow.__dataclass_fields__},
            op=target.op, impl=target.impl, mode=target.mode, median_ms=timing.median_ms, p20_ms=timing.p20_ms,
            p80_ms=timing.p80_ms, reps=timing.reps,
            tflops=target.flops / seconds / 1e12 if target.flops and seconds > 0 else None,
            gbps=target.bytes / seconds / 1e9 if target.bytes and seconds > 0 else None,
            peak_mem_mb=peak_memory_mb(target.run, device) if target.track_memory else None,
            dense_ratio=None, env=env,
        ))
        rows[-1].roofline = target.roofline  # type: ignore[attr-defined]  (resolved below)
    dense = {(r.op, r.mode): r.tflops for r in rows if r.impl == "dense"}
    for r in rows:
        roof = getattr(r, "roofline", None)
        if roof and r.tflops and dense.get((roof, r.mode)):
            r.dense_ratio = r.tflops / dense[(roof, r.mode)]
    return rows


def run_grid(cases: Iterable[BenchCase], device: torch.device, *, backends: Optional[List[str]] = None,
             effort: str = "quick", with_ops: bool = True, with_baselines: bool = True,
             progress_bar: bool = True, log=print) -> List[ResultRow]:
    cases = list(cases)
    names, skipped = kernel_backends(device, backends)
    for name, why in skipped.items():
        log(f"skipping backend {name}: {why}")
    env = environment(device)
    rows: List[ResultRow] = []
    skips: Dict[str, str] = {}
    bar = None
    if progress_bar:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(cases), desc="fastmoe-bench", unit="case", file=sys.stderr)
        except ImportError:
            bar = None
    measured: Dict[BenchCase, List[ResultRow]] = {}
    for case in cases:
        # A configuration that recurs in several sweeps (the base point of each) is measured once.
        key = replace(case, sweep="")
        if key not in measured:
            measured[key] = run_case(case, device, names, effort, with_ops=with_ops, with_baselines=with_baselines,
                                     skips=skips, env=env,
                                     progress=(lambda s: bar.set_postfix_str(s[-60:], refresh=False)) if bar else None)
        rows += [replace(r, sweep=case.sweep) for r in measured[key]]
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    for name, why in sorted(skips.items()):
        log(f"skipped {name}: {why}")
    return rows


def check_sane(rows: Iterable[ResultRow]) -> List[str]:
    """Problems with a set of rows: non-finite or non-positive times, impossible rates."""
    problems = []
    for r in rows:
        where = f"{r.case} {r.op}/{r.impl}/{r.mode}"
        if not (math.isfinite(r.median_ms) and r.median_ms > 0):
            problems.append(f"{where}: time {r.median_ms}")
        if r.tflops is not None and not (0 < r.tflops < 1e4):
            problems.append(f"{where}: {r.tflops} TFLOP/s")
        if r.gbps is not None and not (0 < r.gbps < 1e5):
            problems.append(f"{where}: {r.gbps} GB/s")
    return problems


def write_rows(rows: List[ResultRow], folder: pathlib.Path) -> Dict[str, pathlib.Path]:
    folder.mkdir(parents=True, exist_ok=True)
    flat = [r.flat() for r in rows]
    paths = {"csv": folder / "results.csv", "json": folder / "results.json"}
    with open(paths["csv"], "w", newline="") as fh:
        if flat:
            writer = csv.DictWriter(fh, fieldnames=list(flat[0]))
            writer.writeheader()
            writer.writerows(flat)
    paths["json"].write_text(json.dumps(flat, indent=1))
    return paths


def read_rows(path: pathlib.Path) -> List[Dict[str, object]]:
    """Rows of a results.csv / results.json as dicts with numbers parsed."""
    path = pathlib.Path(path)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    rows = []
    with open(path) as fh:
        for raw in csv.DictReader(fh):
            row: Dict[str, object] = {}
            for key, value in raw.items():
                if value in ("", "None"):
                    row[key] = None
                    continue
                try:
                    row[key] = int(value)
                except ValueError:
                    try:
                        row[key] = float(value)
                    except ValueError:
                        row[key] = value
            rows.append(row)
    return rows
