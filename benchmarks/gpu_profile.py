"""Per-kernel profile of the MoE layer on a GPU (torch.profiler), against the device's measured ceilings.

For each case (default: the Qwen3-30B-A3B and Mixtral-8x7B layers at 16,384 bf16 tokens) and mode
(forward, forward+backward), after warm-up (compilation, autotuning): every kernel's device time per
step, its share of the step and, for the grouped GEMMs and the row gather/combine, its achieved
TFLOP/s or GB/s against the dense bf16 GEMM rate and the copy bandwidth measured here first.

The GEMM FLOPs per kernel name follow the launches of the path that ran (R = tokens·k rows, m = 2
when gated; up = 2·R·d·m·f, down = 2·R·f·d): fused — up projection: up; grouped matmul: down
(forward) + up (dgrad of the up projection); activation backward: down (its dgrad); wgrad: down + up.
Composition — grouped matmul: up + down forward, the same again for the two dgrads; wgrad: down + up.
Where no plan's launch counts match the profile's, rates are left blank.

    python benchmarks/gpu_profile.py [--cases Qwen3-30B-A3B,Mixtral-8x7B] [--backend triton] [--out DIR]
"""
from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import shutil
import sys
from typing import Dict, List, Optional, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the other benchmarks/ scripts

from fastmoe_kernels.bench.grids import model_cases, tiny_model_cases
from fastmoe_kernels.bench.timing import measure
from fastmoe_kernels.layer import MoELayer

DEFAULT_CASES = "Qwen3-30B-A3B,Mixtral-8x7B"


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TIMED_REPS = [10, 3]  # (timed, warm-up) runs of each step; a dry run takes (1, 1)


def median_ms(fn, reps: int = 10, warmup: int = 3) -> float:
    """The median of ``reps`` CUDA-event timings after ``warmup`` runs (the benchmark's own timer)."""
    return measure(fn, DEVICE, warmup=warmup, min_reps=reps, max_reps=reps).median_ms


def measure_ceilings(device: torch.device) -> Dict[str, float]:
    """The copy bandwidth (bytes read + written) and the dense bf16 GEMM rate, on random data."""
    from gpu_ceilings import copy_and_dense

    return copy_and_dense(device, small=device.type != "cuda")


def gemm_flop_plans(case, mode: str) -> Dict[str, Dict[str, Tuple[int, float]]]:
    """Per path, kernel name → (launches per step, FLOPs per step) of the grouped GEMMs."""
    R, d, f = case.tokens * case.top_k, case.d_model, case.d_ff
    m = 2 if case.gated else 1
    up, down = 2.0 * R * d * m * f, 2.0 * R * f * d  # one pass of each projection
    if mode == "fwd":
        return {"fused": {"_up_projection_kernel": (1, up), "_grouped_matmul_kernel": (1, down)},
                "composition": {"_grouped_matmul_kernel": (2, up + down)}}
    return {"fused": {"_up_projection_kernel": (1, up), "_grouped_matmul_kernel": (2, down + up),
                      # the up projection's wgrad in two launches when gated (gate and up halves)
                      "_activation_backward_kernel": (1, down), "_grouped_wgrad_kernel": (1 + m, down + up)},
            # forward up and down, dgrad of down and of up; the two wgrads
            "composition": {"_grouped_matmul_kernel": (4, 2 * (up + down)), "_grouped_wgrad_kernel": (2, up + down)}}


def launches_match(kernel: str, calls: float, name: str, launches: int) -> bool:
    """Whether a profiled kernel (its name, launches per step) is a plan's ``name`` launched ``launches`` times."""
    return name in kernel and abs(calls - launches) < 1e-6


def gemm_flops(case, mode: str, calls: Dict[str, float]) -> Dict[str, Tuple[int, float]]:
    """The plan whose launch counts match the profile's (``calls``: name → launches per step)."""
    for plan in gemm_flop_plans(case, mode).values():
        if all(any(launches_match(k, c, name, n) for k, c in calls.items()) for name, (n, _) in plan.items()):
            return plan
    return {}


def row_bytes(case) -> Dict[str, float]:
    """Bytes per launch of the row movers, when they run (bf16 rows of d): gather reads and writes R
    rows; combine reads R rows and writes T."""
    R, T, d, eb = case.tokens * case.top_k, case.tokens, case.d_model, case.elem_bytes()
    return {"_gather_kernel": 2.0 * R * d * eb, "_combine_kernel": (R + T) * d * eb}


def step(layer: MoELayer, x: torch.Tensor, g: torch.Tensor, mode: str):
    if mode == "fwd":
        with torch.no_grad():
            return layer(x)
    y = layer(x)
    y.backward(g)
    for p in layer.parameters():
        p.grad = None
    return None


def kernel_table(prof, steps: int) -> List[dict]:
    rows = []
    for evt in prof.key_averages():
        device_us = getattr(evt, "self_device_time_total", None)
        if device_us is None:
            device_us = evt.self_cuda_time_total
        if device_us <= 0 or evt.key.startswith(("ProfilerStep", "cudaDeviceSynchronize")):
            continue
        if getattr(evt, "device_type", None) is not None and "CUDA" not in str(evt.device_type):
            continue
        rows.append(dict(kernel=evt.key, calls=evt.count / steps, ms=device_us / 1e3 / steps))
    rows.sort(key=lambda r: -r["ms"])
    return rows


def host_table(prof, steps: int, top: int = 25) -> List[dict]:
    """The host's own time per step by operator (self CPU time: Python and launch work, not the time
    spent waiting inside a child op), the ops that leave the device idle between kernels."""
    rows = [dict(op=e.key, calls=e.count / steps, self_cpu_ms=e.self_cpu_time_total / 1e3 / steps)
            for e in prof.key_averages() if e.self_cpu_time_total > 0 and not e.key.startswith("ProfilerStep")]
    rows.sort(key=lambda r: -r["self_cpu_ms"])
    return rows[:top]


def device_gaps(trace_path: pathlib.Path, steps: int) -> Dict[str, float]:
    """Per step: the device's busy time, and its idle time between kernels attributed to the host
    operator that was running when each gap began (the innermost CPU op spanning the gap's start)."""
    events = json.load(open(trace_path))["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e["ts"])
    ops = [e for e in events if e.get("cat") in ("cpu_op", "python_function") and "dur" in e]
    gaps: Dict[str, float] = {}
    busy = 0.0
    for prev, nxt in zip(kernels, kernels[1:]):
        busy += prev["dur"]
        start, gap = prev["ts"] + prev["dur"], nxt["ts"] - (prev["ts"] + prev["dur"])
        if gap <= 0:
            continue
        spanning = [o for o in ops if o["ts"] <= start <= o["ts"] + o["dur"]]
        owner = min(spanning, key=lambda o: o["dur"])["name"] if spanning else "(no host op)"
        gaps[owner] = gaps.get(owner, 0.0) + gap / 1e3 / steps
    out = dict(sorted(gaps.items(), key=lambda kv: -kv[1])[:20])
    out["(device busy)"] = busy / 1e3 / steps
    return out


def profile_case(case, backend: str, mode: str, steps: int, ceilings: Dict[str, float], out: pathlib.Path,
                 cpu_activity: bool = False) -> dict:
    device = DEVICE
    torch.manual_seed(0)
    layer = MoELayer(case.config(), device=device, dtype=case.torch_dtype, backend=backend)
    x = torch.randn(case.tokens, case.d_model, device=device).to(case.torch_dtype).requires_grad_(mode != "fwd")
    g = torch.randn(case.tokens, case.d_model, device=device).to(case.torch_dtype)
    step_ms = median_ms(lambda: step(layer, x, g, mode), reps=TIMED_REPS[0], warmup=TIMED_REPS[1])
    activities = ([ProfilerActivity.CUDA] if device.type == "cuda" else []) + \
        ([ProfilerActivity.CPU] if cpu_activity or device.type != "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(layer, x, g, mode)
        if device.type == "cuda":
            torch.cuda.synchronize()
    trace = out / f"trace-{case.label}-{mode}.json"
    prof.export_chrome_trace(str(trace))
    host = host_table(prof, steps) if ProfilerActivity.CPU in activities else []
    gaps = device_gaps(trace, steps) if ProfilerActivity.CPU in activities and device.type == "cuda" else {}
    with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    rows = kernel_table(prof, steps)
    total = sum(r["ms"] for r in rows)
    flops, moved = gemm_flops(case, mode, {r["kernel"]: r["calls"] for r in rows}), row_bytes(case)
    for r in rows:
        r["share"] = r["ms"] / total if total else 0.0
        name = next((n for n, (launches, _) in flops.items() if launches_match(r["kernel"], r["calls"], n, launches)), None)
        if name:
            r["TFLOPs"] = flops[name][1] / (r["ms"] * 1e9)
            r["of_dense"] = r["TFLOPs"] / ceilings["dense_bf16_TFLOPs"]
        mover = next((n for n in moved if n in r["kernel"]), None)
        if mover:
            r["GBps"] = moved[mover] * r["calls"] / (r["ms"] * 1e6)
            r["of_copy"] = r["GBps"] / ceilings["copy_GBps"]
    layer_flops = case.expert_flops(mode == "fwd+bwd")
    del layer, x, g
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(case=case.label, mode=mode, backend=backend, step_ms=step_ms, kernel_ms=total,
                layer_TFLOPs=layer_flops / (step_ms * 1e9), kernels=rows, host=host, gaps=gaps)


def tuned_configs() -> Dict[str, Dict[str, str]]:
    """Every autotuned Triton kernel's chosen config per autotune key (what the timings ran with)."""
    import triton

    from fastmoe_kernels import triton_backend as tb

    chosen = {}
    for module_name in ("up_projection", "grouped_gemm", "activation_backward", "wgrad", "fp8"):
        module = getattr(__import__(f"{tb.__name__}.{module_name}", fromlist=["_"]), "__dict__")
        for name, obj in module.items():
            if isinstance(obj, triton.runtime.autotuner.Autotuner) and getattr(obj, "cache", None):
                chosen[name] = {str(key): str(config) for key, config in obj.cache.items()}
    return chosen


def markdown(results: List[dict], ceilings: Dict[str, float], device_name: str) -> str:
    lines = [f"# Per-kernel profile on {device_name}", "",
             f"Ceilings measured in the same run: copy {ceilings['copy_GBps']:.0f} GB/s (read + write, 1 GiB fp32), "
             f"dense bf16 GEMM {ceilings['dense_bf16_TFLOPs']:.0f} TFLOP/s (8192³, random data).", ""]
    for r in results:
        lines += [f"## {r['case']} — {r['mode']} ({r['backend']} backend)", "",
                  f"Step {r['step_ms']:.3f} ms (median of 10, CUDA events), kernels {r['kernel_ms']:.3f} ms per step "
                  f"(profiler); the layer at {r['layer_TFLOPs']:.0f} TFLOP/s of expert FLOPs.", "",
                  "| kernel | calls/step | ms/step | share | TFLOP/s | % dense | GB/s | % copy |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for k in r["kernels"]:
            def cell(key, fmt, scale=1.0):
                return format(k[key] * scale, fmt) if key in k else ""
            lines.append(f"| `{k['kernel'][:80]}` | {k['calls']:.0f} | {k['ms']:.3f} | {100 * k['share']:.1f}% | "
                         f"{cell('TFLOPs', '.0f')} | {cell('of_dense', '.0f', 100)} | {cell('GBps', '.0f')} | "
                         f"{cell('of_copy', '.0f', 100)} |")
        lines.append("")
        if r.get("gaps"):
            lines += ["Device idle between kernels, per step, by the host operator running when each gap began:", "",
                      "| host op | idle ms/step |", "|---|---:|"]
            lines += [f"| `{op[:80]}` | {ms:.3f} |" for op, ms in r["gaps"].items()]
            lines.append("")
        if r.get("host"):
            lines += ["Host time per step by operator (self CPU time):", "", "| op | calls/step | self CPU ms/step |",
                      "|---|---:|---:|"]
            lines += [f"| `{h['op'][:80]}` | {h['calls']:.0f} | {h['self_cpu_ms']:.3f} |" for h in r["host"]]
            lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=DEFAULT_CASES)
    p.add_argument("--backend", default="triton")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="gpu-profile")
    p.add_argument("--cpu-activity", action="store_true",
                   help="record the host too: its time per operator, and the device's idle gaps attributed to it")
    p.add_argument("--ceilings", default=None, help="a ceilings.json (gpu_ceilings.py) instead of measuring them here")
    p.add_argument("--dry-run", action="store_true", help="tiny stand-ins of the cases, any device")
    args = p.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = DEVICE
    if args.dry_run:
        TIMED_REPS[:] = [1, 1]
    if args.ceilings:
        found = json.loads(pathlib.Path(args.ceilings).read_text())
        ceilings = {k: found[k] for k in ("copy_GBps", "dense_bf16_TFLOPs")}
        ceilings.update({k: found[k] for k in ("fill_GBps", "latency_us") if found.get(k) is not None})
    else:
        ceilings = measure_ceilings(device)
    print(f"ceilings: {ceilings}", flush=True)
    labels = args.cases.split(",")
    all_cases = tiny_model_cases() if args.dry_run else model_cases(tokens=args.tokens)
    cases = [c for c in all_cases if c.label in labels]
    results = []
    for case in cases:
        for mode in ("fwd", "fwd+bwd"):
            try:
                results.append(profile_case(case, args.backend, mode, args.steps, ceilings, out, args.cpu_activity))
                r = results[-1]
                print(f"{case.label} {mode}: step {r['step_ms']:.3f} ms, {r['layer_TFLOPs']:.0f} TFLOP/s", flush=True)
            except Exception as exc:  # report and go on to the next case
                print(f"{case.label} {mode}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    text = markdown(results, ceilings, torch.cuda.get_device_name(0) if device.type == "cuda" else device.type)
    (out / "profile.md").write_text(text)
    configs = tuned_configs()
    (out / "profile.json").write_text(json.dumps(dict(ceilings=ceilings, results=results, configs=configs), indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
