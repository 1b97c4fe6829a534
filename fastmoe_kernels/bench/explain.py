"""The kernel model against a GPU run's profile: predicted and measured time of every GEMM launch.

For each profiled case and mode (``gpu_profile.py``'s traces, ``trace-<case>-<mode>.json.gz``), the
launches of the path that ran are rebuilt from the case's shape (``launch_plans``), each with the tile
its trace records: the trace gives every launch's threads per program, shared memory, registers and
grid; the tile sizes are the configuration of the kernel's list whose shared memory (a pipelined K
loop's buffers, or an unpipelined loop's epilogue tile) and grid match them — where several do, the
autotuner kept the fastest, and so does the model. Each launch's measured time is the median over the
profiled steps.

    python -m fastmoe_kernels.bench.explain benchmarks/results/h100-2026-11-24 [--fill-gbps X] [--out DIR]
"""
from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import statistics
import sys
from dataclasses import dataclass, replace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from .grids import model_cases
from .kernel_model import Device, H100_SXM, Launch, Prediction, Tile, device_named, infer_ceiling, predict
from .launch_plans import ACT_BWD, MATMUL, UP, WGRAD, StepShape, step_launches

GEMM_KERNELS = (MATMUL, UP, ACT_BWD, WGRAD)
# The launches that a run without a measured ceiling reads it off (``kernel_model.infer_ceiling``), in
# the order they are read (each with those before it), as (profile folder, case, mode, launch):
# - fill: the longest K loop of one program per SM with a light epilogue and no HBM limit — Mixtral's
#   down projection in the forward of the composition (K = 14,336: 224 steps per tile);
# - latency: an unpipelined K loop with no register-path work — the first run's fused path's gathered
#   up-projection weight gradient at Mixtral (its twin ``up.wgrad.up`` and Qwen3's two are predictions);
# - prologue: the fused down projection's weight gradient at Mixtral (act(h) rebuilt, G scaled per step;
#   Qwen3's is the prediction).
REFERENCES = {
    "fill_gbps": ("3-followup-profile", "Mixtral-8x7B", "fwd+bwd", "down"),
    "latency_us": ("2-profile", "Mixtral-8x7B", "fwd+bwd", "up.wgrad.gate"),
    "prologue_gelems": ("2-profile", "Mixtral-8x7B", "fwd+bwd", "down.wgrad"),
}
CEILING_WORDS = {"fill_gbps": ("fill rate", "GB/s", "{:.0f}"), "latency_us": ("latency", "µs", "{:.3f}"),
                 "prologue_gelems": ("register-path rate", "G elements/s", "{:.0f}")}
# The ceilings' names in a profile.json (gpu_ceilings.py) where they differ from the Device field.
MEASURED_AS = {"fill_gbps": "fill_GBps", "latency_us": "latency_us", "prologue_gelems": "prologue_Gelems"}


@dataclass
class TracedLaunch:
    kernel: str
    ms: float          # median over the profiled steps
    threads: int
    smem: int
    regs: int
    grid: Tuple[int, ...]


def gemm_events(path: pathlib.Path) -> List[dict]:
    """The grouped-GEMM kernel events of a profiler trace, in launch order."""
    data = json.load(gzip.open(path))
    return [e for e in data["traceEvents"] if e.get("cat") == "kernel" and e.get("name") in GEMM_KERNELS]


def per_step(events: List[dict], per_step_count: int) -> List[TracedLaunch]:
    """One traced launch per position within a step, its time the median over the steps."""
    steps = len(events) // per_step_count
    out = []
    for i in range(per_step_count):
        these = [events[s * per_step_count + i] for s in range(steps)]
        a = these[0]["args"]
        out.append(TracedLaunch(these[0]["name"], statistics.median(e["dur"] for e in these) / 1e3,
                                int(a["block"][0]), int(a["shared memory"]), int(a["registers per thread"]),
                                tuple(a["grid"])))
    return out


def candidate_tiles(kernel: str, rows_per_expert: Optional[int] = None) -> List[Tile]:
    """The tile lists the kernels' autotuners choose from (``triton_backend._gemm``); with
    ``rows_per_expert`` (the M_BUCKET key) the forward GEMMs' decode tiles as the autotuner offers them
    there (``_gemm.for_rows_per_expert``)."""
    from ..triton_backend import _gemm

    if kernel == WGRAD:
        return [Tile(m, n, k, w, s) for m, k, n, w, s in _gemm.WGRAD_TILES]
    decode = rows_per_expert is not None and _gemm.offers_decode_tiles(rows_per_expert)
    return [Tile(m, n, k, w, s) for m, n, k, w, s in _gemm.MATMUL_TILES + (_gemm.DECODE_TILES if decode else [])]


def _footprints(launch: Launch, tile: Tile) -> Dict[str, int]:
    """Shared memory a tile needs: pipelined (its stages of operand buffers) or not (one stage, or the
    epilogue's fp32 tile if larger)."""
    e = launch.elem_bytes
    if launch.kind == "wgrad":
        step = (launch.a_mats * tile.BM * tile.BK + tile.BM * tile.BN) * e
        out_tile = tile.BK * tile.BN * 4
    else:
        step = launch.ab_pairs * (tile.BM * tile.BK + launch.b_mats * tile.BK * tile.BN) * e
        out_tile = tile.BM * tile.BN * 4
    return {"pipelined": tile.stages * step, "unpipelined": max(step, out_tile)}


def _grid_fits(launch: Launch, tile: Tile, grid: Tuple[int, ...]) -> bool:
    if launch.kind != "wgrad":
        return True
    k_tiles = -(-launch.K // tile.BK)
    n_tiles = -(-launch.N // tile.BN)
    return k_tiles * n_tiles == grid[0]


def tile_from_trace(device: Device, launch: Launch, traced: TracedLaunch) -> Tuple[Tile, bool]:
    """(tile with the trace's registers and shared memory, pipelined?) for ``launch``: the candidate
    matching the trace's warps, grid and shared memory (within the 1 KiB of barriers the compiler
    adds); the model's fastest where several match; the launch's own tile where none does."""
    matches = []
    for tile in candidate_tiles(launch.kernel):
        if tile.threads != traced.threads or not _grid_fits(launch, tile, traced.grid):
            continue
        for kind, size in _footprints(launch, tile).items():
            if 0 <= traced.smem - size <= 1024:
                matches.append((replace(tile, regs=traced.regs, smem=traced.smem, group=launch.tile.group),
                                kind == "pipelined"))
    if not matches:
        return replace(launch.tile, regs=traced.regs, smem=traced.smem), launch.pipelined
    pipelined_first = sorted(matches, key=lambda m: not m[1])  # a pipelined match over an unpipelined one
    if launch.pipelined is False:
        pipelined_first = [m for m in matches if not m[1]] or pipelined_first
    else:
        pipelined_first = [m for m in matches if m[1]] or pipelined_first
    return min(pipelined_first, key=lambda m: predict(device, replace(launch, tile=m[0], pipelined=m[1])).ms)


@dataclass
class Row:
    profile: str
    case: str
    mode: str
    prediction: Prediction
    measured_ms: float
    reference: Optional[str] = None  # the ceiling (a Device field) read off this launch, if any

    @property
    def ratio(self) -> float:
        return self.prediction.ms / self.measured_ms


def _path(folder: str, mode: str) -> str:
    """The path a profile's training steps ran: the fused kernels in the first H100 profile
    (``2-profile``), the composition with a separate activation after its policy change
    (``3-followup-profile``), today's composition in a later session's profile; every forward the
    fused kernels."""
    if mode == "fwd":
        return "fused"
    if folder.startswith("2-"):
        return "fused"
    return "composition-separate" if folder.startswith("3-") else "composition"


def traced_launches(run: pathlib.Path, folder: str, device: Device,
                    only: Optional[Tuple[str, str]] = None) -> Iterator[Tuple[str, str, Launch, float]]:
    """(case, mode, launch with the trace's tile, measured ms) for each GEMM launch profiled in ``folder``
    in step order; with ``only`` = (case, mode) that trace's alone."""
    cases = {c.label: c for c in model_cases()}
    for trace in sorted((run / folder).glob("trace-*.json.gz")):
        label, mode = trace.name[len("trace-"):-len(".json.gz")].rsplit("-", 1)
        if only is not None and (label, mode) != only:
            continue
        launches = step_launches(StepShape.of_case(cases[label]), _path(folder, mode), mode)
        traced = per_step(gemm_events(trace), len(launches))
        for launch, t in zip(launches, traced):
            assert t.kernel == launch.kernel, (trace.name, launch.label, t.kernel)
            tile, pipelined = tile_from_trace(device, launch, t)
            yield label, mode, replace(launch, tile=tile, pipelined=pipelined), t.ms


def explain_folder(run: pathlib.Path, folder: str, device: Device,
                   references: Dict[str, Tuple[str, str, str, str]] = REFERENCES) -> List[Row]:
    by_key = {key: ceiling for ceiling, key in references.items()}
    return [Row(folder, label, mode, predict(device, launch), ms,
                reference=by_key.get((folder, label, mode, launch.label)))
            for label, mode, launch, ms in traced_launches(run, folder, device)]


def ceilings_of(run: pathlib.Path, folder: str) -> Dict[str, float]:
    data = json.loads((run / folder / "profile.json").read_text())
    return data["ceilings"]


def _measured_device(device: Device, ceil: Dict[str, float]) -> Device:
    return device.with_ceilings(dense_tflops=ceil["dense_bf16_TFLOPs"], copy_gbps=ceil["copy_GBps"],
                                **{field: ceil.get(name) for field, name in MEASURED_AS.items()})


def read_off(run: pathlib.Path, device: Device, given: Dict[str, float],
             references: Dict[str, Tuple[str, str, str, str]] = REFERENCES) -> Tuple[Dict[str, float], Dict[str, str]]:
    """The ceilings the run's reference folders did not measure, each read off its reference launch in
    ``references``' order (with the measured ones, ``given`` and those read before it), and a sentence
    for each one read."""
    found, notes = dict(given), {}
    for ceiling, (folder, case, mode, label) in references.items():
        if not (run / folder).is_dir():
            continue
        dev = _measured_device(device, ceilings_of(run, folder)).with_ceilings(**found)
        if ceiling in found or getattr(dev, ceiling) is not None:
            continue
        # only the reference's own trace, up to its launch
        launch, ms = next((l, ms) for _, _, l, ms in traced_launches(run, folder, dev, only=(case, mode))
                          if l.label == label)
        found[ceiling] = infer_ceiling(dev, launch, ms, ceiling)
        word, unit, fmt = CEILING_WORDS[ceiling]
        notes[ceiling] = (f"{word} {fmt.format(found[ceiling])} {unit}: not measured in this run, read off one "
                          f"launch ({case} {mode} `{label}` of {folder})")
    return found, notes


def explain_run(run: pathlib.Path, folders: Sequence[str] = ("3-followup-profile", "2-profile"),
                fill_gbps: Optional[float] = None, device: Device = H100_SXM) -> Tuple[List[Row], Device, str]:
    """Every profiled launch of ``run`` predicted against its measurement, and the device the model
    used (its ceilings from each folder's profile.json; the fill rate as given; a ceiling the run did not
    measure read off its ``REFERENCES`` launch, whose ratio is then 1 by construction)."""
    given = {"fill_gbps": fill_gbps} if fill_gbps is not None else {}
    found, notes = read_off(run, device, given, {c: r for c, r in REFERENCES.items() if r[0] in folders})
    rows: List[Row] = []
    for folder in folders:
        dev = _measured_device(device, ceilings_of(run, folder)).with_ceilings(**found)
        rows += explain_folder(run, folder, dev, {c: REFERENCES[c] for c in notes})
        device = dev
    note = "; ".join(notes.values()) + ("; every other row is a prediction" if notes else "")
    return rows, device, note


def markdown(rows: List[Row], device: Device, note: str) -> str:
    lines = [f"Device model: {device.name}, {device.sms} SMs, L2 {device.l2_bytes / 2**20:.0f} MiB; dense "
             f"{device.dense_tflops:.0f} TFLOP/s and copy {device.copy_gbps:.0f} GB/s as measured in the run"
             + (f"; {note}." if note else "."),
             "", "| profile | case | mode | launch | tile (from the trace) | prog/SM | bound | predicted ms | "
             "measured ms | ratio |", "|---|---|---|---|---|---:|---|---:|---:|---:|"]
    for r in rows:
        p = r.prediction
        t = p.launch.tile
        tile = t.describe() + ("" if p.launch.pipelined else " unpipelined")
        ref = f" (reference: {CEILING_WORDS[r.reference][0]})" if r.reference else ""
        lines.append(f"| {r.profile} | {r.case} | {r.mode} | `{p.launch.label}`{ref} | {tile} | {p.programs_per_sm} | "
                     f"{p.bound} | {p.ms:.3f} | {r.measured_ms:.3f} | {r.ratio:.2f} |")
    within = [r for r in rows if not r.reference and abs(r.ratio - 1) <= 0.25]
    lines += ["", f"{len(within)} of {sum(not r.reference for r in rows)} predicted launches within 25% of their "
                  "measured time."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a results folder with *-profile/ subfolders (trace-*.json.gz, profile.json)")
    p.add_argument("--folders", default="3-followup-profile,2-profile")
    p.add_argument("--fill-gbps", type=float, default=None)
    p.add_argument("--device", default=None, help="device name (default: the H100 of the first run)")
    p.add_argument("--out", default=None, help="write explanation.md and explanation.json here")
    args = p.parse_args(argv)
    device = device_named(args.device) if args.device else H100_SXM
    rows, dev, note = explain_run(pathlib.Path(args.run), args.folders.split(","), args.fill_gbps, device)
    text = markdown(rows, dev, note)
    print(text)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "explanation.md").write_text(text + "\n")
        (out / "explanation.json").write_text(json.dumps(
            [dict(profile=r.profile, case=r.case, mode=r.mode, launch=r.prediction.launch.label,
                  kernel=r.prediction.launch.kernel, tile=r.prediction.launch.tile.describe(),
                  pipelined=r.prediction.launch.pipelined, bound=r.prediction.bound,
                  predicted_ms=r.prediction.ms, measured_ms=r.measured_ms, ratio=r.ratio, reference=r.reference)
             for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
