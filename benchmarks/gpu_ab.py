"""The A/B of every selectable variant the open issues built, at the shapes each concerns, with the
kernel model's predictions beside the measurements (benchmarks/results/model-2026-12-02/predictions.json).

A variant is either configs pinned per kernel (tile orders, tiles: ``_common.pinned_configs``, switched
in this process) or an environment flag read at import (a fresh process per setting). Each measurement
is the layer's step at a model shape (bf16, 16,384 tokens by default): the forward under no_grad, or a
forward+backward, on the path the variant concerns, median of CUDA-event timings after warm-up.

    python benchmarks/gpu_ab.py --out DIR [--tokens 16384] [--variants a,b] [--dry-run]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

HERE = pathlib.Path(__file__).resolve().parent
PREDICTIONS = HERE / "results" / "model-2026-12-02" / "predictions.json"

MATMUL = dict(BM=128, BN=256, BK=64, num_warps=8, num_stages=3)
UP = dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)
WGRAD_OLD = dict(BM=64, BK=128, BN=128, GROUP_K=1, num_warps=8, num_stages=3)
WGRAD_NEW = dict(BM=64, BK=128, BN=256, GROUP_K=8, num_warps=8, num_stages=3)
TINY = dict(BM=16, BN=16, BK=16, num_warps=1, num_stages=1)  # the interpreter's (a dry run)


@dataclass
class Variant:
    name: str
    what: str
    cases: Tuple[str, ...]
    modes: Tuple[str, ...]
    fused: Optional[bool]                   # the layer's fused_experts for the measurement
    a: Dict[str, object] = field(default_factory=dict)   # pins (kernel → config) or {"env": {VAR: value}}
    b: Dict[str, object] = field(default_factory=dict)
    prediction: Optional[str] = None        # the predictions.json change this tests

    @property
    def env_flag(self) -> bool:
        return "env" in self.a


VARIANTS = [
    Variant("tile order", "GROUP_M 1 → 8 in the grouped matmul and the up projection (pinned tiles)",
            ("Mixtral-8x7B", "Qwen3-30B-A3B"), ("fwd", "fwd+bwd"), None,
            a={"_grouped_matmul_kernel": dict(MATMUL, GROUP_M=1), "_up_projection_kernel": dict(UP, GROUP_M=1)},
            b={"_grouped_matmul_kernel": dict(MATMUL, GROUP_M=8), "_up_projection_kernel": dict(UP, GROUP_M=8)},
            prediction="grouped tile order"),
    Variant("wgrad tile and order", "64×128×128 row-major → 64×128×256 (output 128×256), GROUP_K 8",
            ("Mixtral-8x7B", "Qwen3-30B-A3B"), ("fwd+bwd",), False,
            a={"_grouped_wgrad_kernel": WGRAD_OLD}, b={"_grouped_wgrad_kernel": WGRAD_NEW}, prediction="wgrad rework"),
    Variant("wgrad dtype", "fp32 weight gradients + a cast pass → stored in the parameters' bf16",
            ("Qwen3-30B-A3B", "Mixtral-8x7B"), ("fwd+bwd",), False,
            a={"env": {"FASTMOE_WGRAD_FP32": "1"}}, b={"env": {"FASTMOE_WGRAD_FP32": "0"}},
            prediction="wgrad in the parameters' dtype"),
    Variant("up activation", "the composition's SwiGLU as torch ops → in the up projection's epilogue",
            ("Qwen3-30B-A3B", "Mixtral-8x7B"), ("fwd", "fwd+bwd"), False,
            a={"env": {"FASTMOE_UP_ACTIVATION": "separate"}}, b={"env": {"FASTMOE_UP_ACTIVATION": "epilogue"}}),
    Variant("trusted plans", "every value check run → the package's own plans and ids trusted (checks on, async)",
            ("Qwen3-30B-A3B",), ("fwd", "fwd+bwd"), False,
            a={"env": {"FASTMOE_TRUST_VALUES": "0"}}, b={"env": {"FASTMOE_TRUST_VALUES": "1"}}),
]


def _cases(tokens: int, dry_run: bool):
    from fastmoe_kernels.bench.grids import model_cases, tiny_model_cases

    return {c.label: c for c in (tiny_model_cases() if dry_run else model_cases(tokens=tokens))}


def measure_case(case, mode: str, fused: Optional[bool], device: torch.device, checks: bool, reps: int,
                 warmup: int = 2) -> dict:
    from fastmoe_kernels import set_value_checks
    from fastmoe_kernels.bench.timing import measure
    from fastmoe_kernels.layer import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(case.config(fused_experts=fused), device=device, dtype=case.torch_dtype, backend="triton")
    x = torch.randn(case.tokens, case.d_model, device=device).to(case.torch_dtype).requires_grad_(mode != "fwd")
    g = torch.randn_like(x)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return layer(x)
        layer(x).backward(g)
        for p in layer.parameters():
            p.grad = None

    set_value_checks(None if checks else False)
    try:
        t = measure(step, device, warmup=warmup, min_reps=reps, max_reps=reps)
    finally:
        set_value_checks(None)
    del layer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms)


def run_settings(variant: Variant, setting: str, tokens: int, device: torch.device, dry_run: bool) -> List[dict]:
    """Every (case, mode) of ``variant`` under one setting, in this process (pins switched here)."""
    from fastmoe_kernels.triton_backend import _common

    pins = {} if variant.env_flag else (variant.a if setting == "a" else variant.b)
    if dry_run:
        pins = {k: dict(TINY, **{g: v[g] for g in ("GROUP_M", "GROUP_K") if g in v}) for k, v in pins.items()}
    cases = _cases(tokens, dry_run)
    rows = []
    saved = dict(_common.pinned_configs)
    _common.pinned_configs.update(pins)
    # A dry run checks the script, not the numbers: one case and mode per variant, one timed step.
    pairs = [(c, m) for c in variant.cases for m in variant.modes][:1 if dry_run else None]
    try:
        for label, mode in pairs:
            r = measure_case(cases[label], mode, variant.fused, device, variant.name == "trusted plans",
                             reps=1 if dry_run else 10, warmup=1 if dry_run else 2)
            rows.append(dict(variant=variant.name, setting=setting, case=label, mode=mode, **r))
    finally:
        _common.pinned_configs.clear()
        _common.pinned_configs.update(saved)
    return rows


def _in_fresh_process(variant: Variant, setting: str, tokens: int, dry_run: bool, timeout: float) -> List[dict]:
    env = dict(os.environ, **(variant.a if setting == "a" else variant.b)["env"])
    cmd = [sys.executable, __file__, "--worker", variant.name, "--setting", setting, "--tokens", str(tokens)]
    if dry_run:
        cmd.append("--dry-run")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-1500:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def predicted(variant: Variant, case: str, mode: str) -> Optional[dict]:
    if variant.prediction is None or not PREDICTIONS.is_file():
        return None
    for r in json.loads(PREDICTIONS.read_text())["changes"]:
        if r["change"].startswith(variant.prediction) and r["case"] == case and r["mode"] == mode:
            return dict(today_ms=r["today_ms"], predicted_ms=r["predicted_ms"], speedup=r["speedup"])
    return None


def markdown(rows: List[dict]) -> str:
    lines = ["| variant | case | mode | A (ms, p20–p80) | B (ms, p20–p80) | B/A speed-up | model's GEMM speed-up |",
             "|---|---|---|---|---|---:|---:|"]
    by = {}
    for r in rows:
        by.setdefault((r["variant"], r["case"], r["mode"]), {})[r["setting"]] = r
    for (name, case, mode), s in by.items():
        if "a" not in s or "b" not in s:
            continue
        a, b = s["a"], s["b"]
        model = s["b"].get("model") or {}
        lines.append(f"| {name} | {case} | {mode} | {a['median_ms']:.3f} ({a['p20_ms']:.3f}–{a['p80_ms']:.3f}) | "
                     f"{b['median_ms']:.3f} ({b['p20_ms']:.3f}–{b['p80_ms']:.3f}) | {a['median_ms'] / b['median_ms']:.2f} | "
                     f"{model.get('speedup', float('nan')):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--variants", default=None, help="comma-separated variant names (default: all)")
    p.add_argument("--budget-s", type=float, default=600.0)
    p.add_argument("--dry-run", action="store_true", help="tiny fp32 shapes on any device (the interpreter on a CPU)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--setting", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker:
        variant = next(v for v in VARIANTS if v.name == args.worker)
        print(json.dumps(run_settings(variant, args.setting, args.tokens, device, args.dry_run)))
        return 0
    deadline = time.monotonic() + args.budget_s
    wanted = args.variants.split(",") if args.variants else [v.name for v in VARIANTS]
    rows: List[dict] = []
    failures = []
    for variant in (v for v in VARIANTS if v.name in wanted):
        for setting in ("a", "b"):
            left = deadline - time.monotonic()
            if left < 5:
                failures.append(f"{variant.name} {setting}: out of budget")
                continue
            try:
                got = (_in_fresh_process(variant, setting, args.tokens, args.dry_run, left) if variant.env_flag
                       else run_settings(variant, setting, args.tokens, device, args.dry_run))
            except Exception as exc:  # one variant's failure is a result, not the end of the A/B
                failures.append(f"{variant.name} {setting}: {type(exc).__name__}: {str(exc)[-500:]}")
                continue
            for r in got:
                r["model"] = predicted(variant, r["case"], r["mode"])
            rows += got
            print(f"ab: {variant.name} {setting}: " + ", ".join(f"{r['case']} {r['mode']} {r['median_ms']:.3f} ms"
                                                             for r in got), flush=True)
    text = markdown(rows) + ("\n\nNot measured:\n" + "\n".join(f"- {f}" for f in failures) if failures else "")
    print(text, flush=True)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ab.json").write_text(json.dumps(dict(rows=rows, failures=failures, variants=[
            dict(name=v.name, what=v.what, a=v.a, b=v.b) for v in VARIANTS]), indent=1))
        (out / "ab.md").write_text(text + "\n")
    return 1 if failures and not rows else 0


if __name__ == "__main__":
    sys.exit(main())
