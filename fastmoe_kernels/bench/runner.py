"""Run a grid of cases within a time budget: time every target, watch the machine's load, derive
rates and roofline ratios, write tidy rows."""
from __future__ import annotations

import csv
import json
import math
import pathlib
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, Iterable, List, Optional, Set

import torch

from . import machine
from .cases import BenchCase
from .env import environment
from .grids import measured_key
from .report import as_dicts
from .targets import Target, build_targets, kernel_backends
from .sweeps import IMPL_VARIANTS
from .timing import Timing, measure, peak_memory_mb

# Per grid: warm-up runs, fewest timed runs, the confidence target (half-width of the median's 95%
# interval, relative), the most seconds of timed runs per target, and the whole run's budget in
# seconds (None: unbounded). The budget shrinks the per-target cap as the run goes.
EFFORT = {
    "smoke": dict(warmup=0, min_reps=1, target_rel_ci=math.inf, max_seconds=None, budget_s=None),
    "quick": dict(warmup=1, min_reps=5, target_rel_ci=0.05, max_seconds=1.5, budget_s=270.0),
    "gpu": dict(warmup=3, min_reps=10, target_rel_ci=0.02, max_seconds=2.0, budget_s=840.0),
    "full": dict(warmup=3, min_reps=10, target_rel_ci=0.02, max_seconds=4.0, budget_s=None),
}
# Op targets per backend (route 2, plan 1, permute 2, up 2, down 2, unpermute 2) and their dense twins.
OPS_PER_BACKEND = 11
OP_ROOFLINES = 4
OPS_POLICIES = ("base", "all", "none")


@dataclass
class ResultRow:
    """One measurement: a case × implementation × op × mode, with its spread and the environment."""

    sweep: str
    case: str
    label: str
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
    score_func: str
    inference_only: bool
    total_params: int
    active_params: int
    op: str
    impl: str
    mode: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    ci_low_ms: float
    ci_high_ms: float
    reps: int
    converged: bool
    tflops: Optional[float]
    gbps: Optional[float]
    peak_mem_mb: Optional[float]
    threads: int
    others_load: Optional[float]   # cores other processes kept busy while this was timed
    dense_ratio: Optional[float] = None
    flags: str = ""                # suspect-point flags, filled by checks.flag_rows
    fp8_recipe: Optional[str] = None  # the experts' GEMMs in fp8 ("blockwise"), else in `dtype`
    env: Dict[str, str] = field(default_factory=dict)

    def flat(self) -> Dict[str, object]:
        out = asdict(self)
        out.update(out.pop("env"))
        return out


def make_row(case: BenchCase, target: Target, timing: Timing, *, threads: int, others_load: Optional[float],
             peak_mem_mb: Optional[float], env: Dict[str, str]) -> ResultRow:
    seconds = timing.median_ms / 1e3
    fields = {k: v for k, v in case.as_dict().items() if k in ResultRow.__dataclass_fields__}
    return ResultRow(
        **fields, op=target.op, impl=target.impl, mode=target.mode, median_ms=timing.median_ms,
        p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, ci_low_ms=timing.ci_low_ms, ci_high_ms=timing.ci_high_ms,
        reps=timing.reps, converged=timing.converged,
        tflops=target.flops / seconds / 1e12 if target.flops and seconds > 0 else None,
        gbps=target.bytes / seconds / 1e9 if target.bytes and seconds > 0 else None,
        peak_mem_mb=peak_mem_mb, threads=threads, others_load=others_load, env=env)


def set_roofline_ratios(rows: List[ResultRow], roof_of: Dict[tuple, Optional[str]]) -> None:
    """Each row's rate as a fraction of its roofline's, measured in the same case: FLOP/s against a
    dense GEMM, or bytes/s against the copy. ``roof_of``: (op, impl, mode) → the roofline op."""
    dense = {(r.case, r.op, r.mode): r for r in rows if r.impl == "dense"}
    for r in rows:
        roof = roof_of.get((r.op, r.impl, r.mode))
        ref = (dense.get((r.case, roof, r.mode)) or dense.get((r.case, roof, "fwd"))) if roof else None
        if ref is None:
            continue
        if ref.op == "copy":
            r.dense_ratio = r.gbps / ref.gbps if r.gbps and ref.gbps else None
        elif r.tflops and ref.tflops:
            r.dense_ratio = r.tflops / ref.tflops


def rooflines(targets: List[Target]) -> Dict[tuple, Optional[str]]:
    return {(t.op, t.impl, t.mode): t.roofline for t in targets}


class Budget:
    """The run's time budget spread over the targets still to time: each target's cap is what is
    left divided by what is left to do, within [floor, the grid's cap]."""

    def __init__(self, seconds: Optional[float], targets: int, cap: Optional[float], floor: float = 0.2):
        self.deadline = None if seconds is None else time.perf_counter() + seconds
        self.remaining = max(1, targets)
        self.cap_s = cap
        self.floor = floor

    def replan(self, delta: int) -> None:
        self.remaining = max(1, self.remaining + delta)

    def next_cap(self) -> Optional[float]:
        if self.deadline is None:
            return self.cap_s
        # Most targets stop well before their cap (their interval narrows first), so each may take twice
        # its share; the deadline pulls the caps in if the run falls behind.
        share = 2 * (self.deadline - time.perf_counter()) / self.remaining
        cap = max(self.floor, share)
        return min(cap, self.cap_s) if self.cap_s is not None else cap

    def done(self, n: int = 1) -> None:
        self.remaining = max(1, self.remaining - n)


class ThreadGuard:
    """The CPU threads the run uses, lowered when other processes take cores mid-run."""

    def __init__(self, device: torch.device, requested: str, log: Callable[[str], None]):
        self.device = device
        self.auto = requested == "auto"
        self.log = log
        self.initial_others = machine.sample_others(0.5)
        self.threads = machine.choose_threads(requested, device, self.initial_others)
        if device.type == "cpu":
            torch.set_num_threads(self.threads)
        self.mark = machine.snapshot()
        self.last_others: Optional[float] = self.initial_others

    def observe(self) -> Optional[float]:
        """Other processes' load since the last reading, over a window of at least MIN_WINDOW_S: a
        short target is read together with the ones before it."""
        now = machine.snapshot()
        others = machine.others_busy_cores(self.mark, now)
        if others is not None:
            self.mark, self.last_others = now, others
        return self.last_others

    def loaded(self, others: Optional[float]) -> bool:
        if others is None:
            return False
        if self.device.type == "cpu":
            return machine.oversubscribed(others, self.threads)
        return others > machine.usable_cores() - 1  # the host that launches the kernels is saturated

    def lower(self, others: Optional[float]) -> bool:
        """Fewer threads after a loaded measurement; whether the target should be timed again."""
        if not (self.auto and self.device.type == "cpu" and self.threads > 1):
            return False
        fewer = min(self.threads - 1, machine.free_cores(others))
        self.log(f"warning: other processes kept {others:.1f} of {machine.usable_cores()} cores busy: "
                 f"{self.threads} → {fewer} threads for the rest of the run")
        self.threads = fewer
        torch.set_num_threads(fewer)
        return True


def time_target(target: Target, device: torch.device, effort: dict, cap: Optional[float],
                guard: ThreadGuard) -> tuple:
    """(timing, other processes' load) for one target; timed again with fewer threads when the
    machine turned out to be loaded."""
    while True:
        guard.observe()  # closes the window before this target when it is long enough
        timing = measure(target.run, device, warmup=effort["warmup"], min_reps=effort["min_reps"],
                         target_rel_ci=effort["target_rel_ci"], max_seconds=cap)
        others = guard.observe()
        if not (guard.loaded(others) and guard.lower(others)):
            return timing, others


def release_memory(device: torch.device) -> None:
    """Give the previous case's (or a failed attempt's) cached device memory back before the next."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


OUT_OF_MEMORY = (torch.cuda.OutOfMemoryError, MemoryError) if hasattr(torch.cuda, "OutOfMemoryError") else (MemoryError,)


def planned_targets(case: BenchCase, backends: List[str], with_ops: bool, with_baselines: bool, baselines: int) -> int:
    """How many targets ``build_targets`` will give for a case (for the progress bar and the budget)."""
    modes = 1 if case.inference_only else 2
    variants = len(backends) + sum(b in backends for b, _ in IMPL_VARIANTS.values())
    n = variants * 2 * modes + (1 if case.inference_only else 1 * modes)
    if with_ops and case.breaks_down_ops:
        n += len(backends) * OPS_PER_BACKEND + OP_ROOFLINES
    if with_baselines and case.compares_baselines:
        n += baselines * modes
    if "triton" in backends:  # the CUDA-graphed layer (triton runs on GPUs only)
        n += len(case.graphed_modes())
    return n


def cases_with_ops(cases: List[BenchCase], policy: str) -> Set[BenchCase]:
    """Measured keys whose ops are broken down: every case, none, or the base and the model shapes."""
    if policy not in OPS_POLICIES:
        raise ValueError(f"ops must be one of {OPS_POLICIES}, got {policy!r}")
    if policy == "none":
        return set()
    return {measured_key(c) for c in cases if policy == "all" or c.sweep in ("base", "models")}


def run_case(case: BenchCase, device: torch.device, backend_names: List[str], effort: dict, budget: Budget,
             guard: ThreadGuard, *, with_ops: bool, with_baselines: bool, skips: Dict[str, str],
             env: Dict[str, str], planned: int, progress: Optional[Callable[[str], None]] = None,
             tick: Optional[Callable[[], None]] = None, on_row: Optional[Callable[[ResultRow], None]] = None
             ) -> List[ResultRow]:
    release_memory(device)
    try:
        targets = build_targets(case, device, backend_names, with_ops=with_ops, with_baselines=with_baselines,
                                skips=skips)
    except OUT_OF_MEMORY as exc:  # the case does not fit this device: said in the report, the run goes on
        skips[f"case {case.name}"] = f"out of memory while building its targets: {str(exc)[:160]}"
        release_memory(device)
        budget.replan(-planned)
        return []
    budget.replan(len(targets) - planned)
    rows: List[ResultRow] = []
    for target in targets:
        if progress:
            progress(f"{case.name} {target.op}/{target.impl}/{target.mode}")
        try:
            timing, others = time_target(target, device, effort, budget.next_cap(), guard)
            peak = peak_memory_mb(target.run, device) if target.track_memory else None
        except OUT_OF_MEMORY as exc:
            skips[f"{target.op}/{target.impl}/{target.mode} on {case.name}"] = f"out of memory: {str(exc)[:160]}"
            release_memory(device)
            budget.done()
            continue
        rows.append(make_row(case, target, timing, threads=guard.threads, others_load=others, peak_mem_mb=peak, env=env))
        if on_row:
            on_row(rows[-1])
        budget.done()
        if tick:
            tick()
    set_roofline_ratios(rows, rooflines(targets))
    return rows


def run_grid(cases: Iterable[BenchCase], device: torch.device, *, backends: Optional[List[str]] = None,
             effort: str = "quick", ops: str = "base", with_baselines: bool = True, threads: str = "auto",
             budget_s: Optional[float] = -1.0, progress_bar: bool = True, log=print,
             on_row: Optional[Callable[[ResultRow], None]] = None) -> List[ResultRow]:
    """Rows for every case of ``cases``; a configuration that recurs (the base point of each sweep,
    a model shape equal to the base) is measured once and reported under each of its sweeps.
    ``budget_s`` < 0 takes the grid's budget, None none."""
    cases = list(cases)
    plan = EFFORT[effort]
    names, skipped = kernel_backends(device, backends)
    for name, why in skipped.items():
        log(f"skipping backend {name}: {why}")
    guard = ThreadGuard(device, threads, log)
    if device.type == "cpu":
        others = guard.initial_others
        log(f"CPU threads: {guard.threads} of {machine.usable_cores()} cores"
            + (f" (other processes busy on {others:.1f})" if others is not None else " (load unknown)"))
    env = environment(device)
    ops_keys = cases_with_ops(cases, ops)
    unique: Dict[BenchCase, BenchCase] = {}
    for case in cases:
        unique.setdefault(measured_key(case), case)
    baselines_guess = 5
    planned = {key: planned_targets(c, names, key in ops_keys, with_baselines, baselines_guess) for key, c in unique.items()}
    budget = Budget(plan["budget_s"] if budget_s is not None and budget_s < 0 else budget_s, sum(planned.values()),
                    plan["max_seconds"])
    bar = _progress_bar(sum(planned.values()), progress_bar)
    rows: List[ResultRow] = []
    skips: Dict[str, str] = {}
    measured: Dict[BenchCase, List[ResultRow]] = {}
    for case in cases:
        key = measured_key(case)
        if key not in measured:
            measured[key] = run_case(
                case, device, names, plan, budget, guard, with_ops=key in ops_keys, with_baselines=with_baselines,
                skips=skips, env=env, planned=planned[key],
                progress=(lambda s: bar.set_postfix_str(s[-60:], refresh=False)) if bar else None,
                tick=(lambda: bar.update(1)) if bar else None, on_row=on_row)
            if bar is not None:
                bar.total += len(measured[key]) - planned[key]
                bar.refresh()
        rows += [replace(r, sweep=case.sweep, label=case.label, case=case.name) for r in measured[key]]
    if bar is not None:
        bar.close()
    for name, why in sorted(skips.items()):
        log(f"skipped {name}: {why}")
    return rows


def _progress_bar(total: int, wanted: bool):
    """A tqdm bar over the targets (its ETA assumes the remaining targets cost what the past ones did)."""
    if not wanted:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="fastmoe-bench", unit="target", file=sys.stderr,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} targets [{elapsed}<{remaining}] {postfix}")


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


def write_rows(rows: List, folder: pathlib.Path) -> Dict[str, pathlib.Path]:
    """results.csv and results.json of ResultRows or of their flat dicts (with flags set)."""
    folder.mkdir(parents=True, exist_ok=True)
    flat = as_dicts(rows)
    paths = {"csv": folder / "results.csv", "json": folder / "results.json"}
    with open(paths["csv"], "w", newline="") as fh:
        if flat:
            writer = csv.DictWriter(fh, fieldnames=list(flat[0]))
            writer.writeheader()
            writer.writerows(flat)
    paths["json"].write_text(json.dumps(flat, indent=1))
    return paths


class PartialWriter:
    """Appends each row to ``results.partial.csv`` as it is measured, so that a run cut short (a
    time limit, a crash) leaves what it measured; ``fastmoe-bench --from-results`` reports it."""

    def __init__(self, folder: Optional[pathlib.Path]):
        self.path = None if folder is None else pathlib.Path(folder) / "results.partial.csv"
        self.fields: Optional[List[str]] = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)

    def __call__(self, row: ResultRow) -> None:
        if self.path is None:
            return
        flat = row.flat()
        with open(self.path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.fields or list(flat))
            if self.fields is None:
                self.fields = list(flat)
                writer.writeheader()
            writer.writerow(flat)

    def finish(self) -> None:
        """The complete results were written: the partial file is no longer needed."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


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
                    row[key] = "" if key == "flags" else None
                    continue
                if value in ("True", "False"):
                    row[key] = value == "True"
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
