"""The A/B of every selectable variant the open issues built, at the shapes each concerns, with the
kernel model's predictions beside the measurements (benchmarks/results/model-2026-12-07-latency/predictions.json).

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
PREDICTIONS = HERE / "results" / "model-2026-12-07-latency" / "predictions.json"

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
    tokens: Optional[int] = None            # the cases' tokens, when not the A/B's (--tokens): decode

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
    # The training issue's part B (defaults unchanged until these measure faster).
    Variant("node backward", "the composition's two nodes and torch's activation backward → one node, the "
            "activation's backward in the dH epilogue (split)",
            ("Qwen3-30B-A3B", "Mixtral-8x7B"), ("fwd+bwd",), False,
            a={"env": {"FASTMOE_MLP_BACKWARD": "separate"}},
            b={"env": {"FASTMOE_MLP_BACKWARD": "epilogue", "FASTMOE_DH_EPILOGUE": "split"}},
            prediction="node backward"),
    Variant("activation backward", "the composition's dh by torch.func.vjp's elementwise ops → one elementwise "
            "kernel writing dh into h's buffer (no [R, 2f] temporaries)",
            ("Qwen3-30B-A3B", "Mixtral-8x7B"), ("fwd+bwd",), False,
            a={"env": {"FASTMOE_ACTIVATION_BACKWARD": "torch"}},
            b={"env": {"FASTMOE_ACTIVATION_BACKWARD": "kernel-in-place"}},
            prediction="activation backward kernel"),
    Variant("node dh into h", "the node's dh in a new [R, 2f] buffer → in h's (a memory change: the CPU count "
            "predicts Mixtral's step peak 7.00 → 5.25 GiB, the same time)",
            ("Mixtral-8x7B", "Qwen3-30B-A3B"), ("fwd+bwd",), False,
            a={"env": {"FASTMOE_MLP_BACKWARD": "epilogue", "FASTMOE_DH_EPILOGUE": "split"}},
            b={"env": {"FASTMOE_MLP_BACKWARD": "epilogue", "FASTMOE_DH_EPILOGUE": "split", "FASTMOE_DH_INTO_H": "on"}}),
    Variant("fused dh into h", "the fused stored backward's dh in a new [R, 2f] buffer → in h's (a memory change: "
            "the CPU count predicts Mixtral's step peak 6.73 → 4.98 GiB, the same time)",
            ("Mixtral-8x7B", "Qwen3-30B-A3B"), ("fwd+bwd",), True,
            a={"env": {"FASTMOE_FUSED_BACKWARD": "stored", "FASTMOE_DOWN_OUTPUT": "rows"}},
            b={"env": {"FASTMOE_FUSED_BACKWARD": "stored", "FASTMOE_DOWN_OUTPUT": "rows", "FASTMOE_DH_INTO_H": "on"}}),
    Variant("node dH epilogue", "the node's dH epilogue whole → split by even/odd columns",
            ("Qwen3-30B-A3B", "Mixtral-8x7B"), ("fwd+bwd",), False,
            a={"env": {"FASTMOE_MLP_BACKWARD": "epilogue", "FASTMOE_DH_EPILOGUE": "whole"}},
            b={"env": {"FASTMOE_MLP_BACKWARD": "epilogue", "FASTMOE_DH_EPILOGUE": "split"}}),
    Variant("fused stored backward", "the fused path's recomputing backward → A_s stored by the dH kernel, plain "
            "dW_down, one dW_up over 2f, one plain dx, contiguous down rows",
            ("Qwen3-30B-A3B", "Mixtral-8x7B"), ("fwd+bwd",), True,
            a={"env": {"FASTMOE_FUSED_BACKWARD": "recompute", "FASTMOE_DOWN_OUTPUT": "scatter"}},
            b={"env": {"FASTMOE_FUSED_BACKWARD": "stored", "FASTMOE_DOWN_OUTPUT": "rows"}},
            prediction="fused stored backward"),
    Variant("dW_up x", "the stored backward's dW_up gathering x on load → from a materialised x[src]",
            ("Qwen3-30B-A3B", "Mixtral-8x7B"), ("fwd+bwd",), True,
            a={"env": {"FASTMOE_FUSED_BACKWARD": "stored", "FASTMOE_UP_WGRAD_X": "gather"}},
            b={"env": {"FASTMOE_FUSED_BACKWARD": "stored", "FASTMOE_UP_WGRAD_X": "permuted"}}),
    Variant("router GEMM", "the fp32 router logits on CUDA cores (torch, with x cast to fp32) → on tensor cores at "
            "fp32's accuracy (tf32 for bf16 operands, tf32x3 otherwise; x read as bf16)",
            ("Qwen3-30B-A3B", "Mixtral-8x7B"), ("fwd+bwd",), None,
            a={"env": {"FASTMOE_ROUTER_GEMM": "torch"}}, b={"env": {"FASTMOE_ROUTER_GEMM": "tensor-cores"}}),
    Variant("fp8 weight cache", "the fp8 weights quantised on every call (and again, transposed, in the backward) → "
            "once per weight version, both layouts in one pass",
            ("Qwen3-30B-A3B fp8", "Mixtral-8x7B fp8"), ("fwd", "fwd+bwd"), None,
            a={"env": {"FASTMOE_FP8_WEIGHT_CACHE": "off"}}, b={"env": {"FASTMOE_FP8_WEIGHT_CACHE": "on"}}),
    Variant("fp8 wide tiles", "the fp8 product's tiles at most 128 columns (one weight block) → 256-column tiles "
            "offered too (two block scales per K step; 64×256 compiles without spills on sm_90)",
            ("Mixtral-8x7B fp8", "Qwen3-30B-A3B fp8"), ("fwd", "fwd+bwd"), None,
            a={"env": {"FASTMOE_FP8_TILES": "narrow"}}, b={"env": {"FASTMOE_FP8_TILES": "wide"}}),
    Variant("fp8 fused quantisers", "h, the combine's gradient w·g and dh each written in bf16 and quantised by a "
            "pass that reads them back → quantised in the kernels producing them (one fp8 node: act(h) in the up "
            "projection's epilogue, dh by rows and columns in the dgrad's; the same numbers)",
            ("Mixtral-8x7B fp8", "Qwen3-30B-A3B fp8"), ("fwd", "fwd+bwd"), None,
            a={"env": {"FASTMOE_FP8_QUANTISERS": "separate"}}, b={"env": {"FASTMOE_FP8_QUANTISERS": "fused"}}),
    Variant("fp8 folded routing weight", "the fused node's dgrad from each weighted copy w·g quantised → from each "
            "token's gradient quantised once, the routing weight in the row scales (a rounding change: "
            "benchmarks/results/cpu-2026-12-07-fp8-accuracy-folded/)",
            ("Qwen3-30B-A3B fp8", "Mixtral-8x7B fp8"), ("fwd+bwd",), None,
            a={"env": {"FASTMOE_FP8_QUANTISERS": "fused"}}, b={"env": {"FASTMOE_FP8_QUANTISERS": "fused-folded"}}),
    Variant("decode tiles", "the forward's grouped GEMMs at 1 token with today's tiles (≥ 32 rows) → with the "
            "decode tiles offered (16 rows, 32-128 columns, deep K; M_BUCKET ≤ 16)",
            ("Mixtral-8x7B", "gpt-oss-20b", "Qwen3-30B-A3B"), ("fwd",), None,
            a={"env": {"FASTMOE_DECODE_TILES": "off"}}, b={"env": {"FASTMOE_DECODE_TILES": "on"}}, tokens=1),
    Variant("down output rows", "the fused down projection scattering rows to their slots → contiguous rows, "
            "the combine reading them by row",
            ("Qwen3-30B-A3B", "Mixtral-8x7B"), ("fwd",), True,
            a={"env": {"FASTMOE_DOWN_OUTPUT": "scatter"}}, b={"env": {"FASTMOE_DOWN_OUTPUT": "rows"}}),
    Variant("TMA stores", "the up projection's act(h) and the grouped matmul's contiguous output tiles by "
            "pointer stores → by TMA stores that the next tile's K loop overlaps (an expert's last, partial tile "
            "by pointer stores; h's halves stay pointer stores: see 'TMA stores with h')",
            ("Qwen3-30B-A3B", "Mixtral-8x7B"), ("fwd", "fwd+bwd"), False,
            a={"env": {"FASTMOE_C_STORES": "pointer"}}, b={"env": {"FASTMOE_C_STORES": "tma"}},
            prediction="TMA stores"),
    Variant("TMA stores with h", "the up projection's h halves by pointer stores → by TMA boxes through act(h)'s "
            "staging tile (FASTMOE_C_STORES=tma → tma+h; each box waits for the previous one on Triton 3.6)",
            ("Qwen3-30B-A3B", "Mixtral-8x7B"), ("fwd+bwd",), False,
            a={"env": {"FASTMOE_C_STORES": "tma"}}, b={"env": {"FASTMOE_C_STORES": "tma+h"}},
            prediction="TMA stores with h"),
    Variant("deep pipelines", "the forward GEMMs' autotuners offered 4-stage Hopper tiles beside the 3-stage ones "
            "(FASTMOE_DEEP_PIPELINES=off → on; the model predicts the 3-stage ones kept)",
            ("Qwen3-30B-A3B", "Mixtral-8x7B"), ("fwd",), False,
            a={"env": {"FASTMOE_DEEP_PIPELINES": "off"}}, b={"env": {"FASTMOE_DEEP_PIPELINES": "on"}},
            prediction="deep pipelines"),
    Variant("TMA weights", "the forward's grouped GEMMs loading weight tiles by pointer → by TMA boxes of one "
            "3-D descriptor per weight (triton_backend/_tma.py)",
            ("Mixtral-8x7B", "Qwen3-30B-A3B"), ("fwd",), None,
            a={"env": {"FASTMOE_B_LOADS": "pointer"}}, b={"env": {"FASTMOE_B_LOADS": "tma"}}),
]


def default_env() -> Dict[str, str]:
    """Each A/B flag's default (the package's registry, ``fastmoe_kernels._variants.FLAGS``): a setting
    that spells out a default is the default, so variants whose A or B is today's default share one
    measurement of it (each distinct setting is measured once per case and mode)."""
    import fastmoe_kernels.ops  # noqa: F401 - the modules that read the flags
    import fastmoe_kernels.triton_backend  # noqa: F401
    from fastmoe_kernels._variants import FLAGS

    return {name: default for name, (default, _) in FLAGS.items()}


# The order the A/B runs in when its budget cannot hold every variant: the open changes whose defaults
# wait on it (part B), then the part-A choices it confirms.
PRIORITY = ("node backward", "activation backward", "fused stored backward", "wgrad tile and order", "tile order", "up activation",
            "router GEMM", "decode tiles", "TMA stores", "TMA stores with h", "deep pipelines", "TMA weights", "fp8 weight cache", "fp8 fused quantisers", "fp8 folded routing weight", "fp8 wide tiles", "node dH epilogue", "node dh into h", "fused dh into h", "wgrad dtype", "down output rows", "dW_up x", "trusted plans")


def setting_key(variant: Variant, setting: str) -> tuple:
    """What a measurement under ``setting`` depends on besides the case and mode: the non-default
    environment, the pins, the layer's path and whether value checks run."""
    chosen = variant.a if setting == "a" else variant.b
    defaults = default_env()
    env = tuple(sorted((k, v) for k, v in chosen.get("env", {}).items() if defaults.get(k) != v))
    pins = json.dumps({k: v for k, v in chosen.items() if k != "env"}, sort_keys=True)
    return env, pins, variant.fused, variant.name == "trusted plans", variant.tokens


def _cases(tokens: int, dry_run: bool, variant_tokens: Optional[int] = None):
    """The model cases by label: at ``variant_tokens`` when the variant sets them (a dry run's tiny
    cases too), else at ``tokens`` (a dry run: the tiny cases' own)."""
    from dataclasses import replace

    from fastmoe_kernels.bench.grids import model_cases, tiny_model_cases

    cases = tiny_model_cases() if dry_run else model_cases(tokens=variant_tokens or tokens)
    if dry_run and variant_tokens:
        cases = [replace(c, tokens=variant_tokens) for c in cases]
    return {c.label: c for c in cases}


def measure_case(case, mode: str, fused: Optional[bool], device: torch.device, checks: bool, reps: int,
                 warmup: int = 2) -> dict:
    from fastmoe_kernels import set_value_checks
    from fastmoe_kernels.bench.targets import forget_fp8_weights
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
        forget_fp8_weights()  # a weight update follows each step (see bench.targets)

    cuda = device.type == "cuda"
    if cuda:  # the step's peak beyond the weights and inputs (the memory count's quantity: .grad included)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    set_value_checks(None if checks else False)
    try:
        t = measure(step, device, warmup=warmup, min_reps=reps, max_reps=reps)
    finally:
        set_value_checks(None)
    peak_gib = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 30 if cuda else None
    del layer
    if cuda:
        torch.cuda.empty_cache()
    return dict(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, peak_gib=peak_gib)


def _pairs(variant: Variant, dry_run: bool) -> List[Tuple[str, str]]:
    """The (case, mode) pairs a variant measures. A dry run checks the script, not the numbers: the
    first case in the variant's first mode, one timed step (variants sharing a setting share it)."""
    pairs = [(c, m) for c in variant.cases for m in variant.modes]
    return pairs[:1] if dry_run else pairs


def run_settings(variant: Variant, setting: str, tokens: int, device: torch.device, dry_run: bool,
                 pairs: Optional[List[Tuple[str, str]]] = None) -> List[dict]:
    """The (case, mode) ``pairs`` (default: all) of ``variant`` under one setting, in this process (pins
    switched here)."""
    from fastmoe_kernels.triton_backend import _common

    pins = {} if variant.env_flag else (variant.a if setting == "a" else variant.b)
    if dry_run:
        pins = {k: dict(TINY, **{g: v[g] for g in ("GROUP_M", "GROUP_K") if g in v}) for k, v in pins.items()}
    cases = _cases(tokens, dry_run, variant.tokens)
    rows = []
    saved = dict(_common.pinned_configs)
    _common.pinned_configs.update(pins)
    try:
        for label, mode in (pairs if pairs is not None else _pairs(variant, dry_run)):
            r = measure_case(cases[label], mode, variant.fused, device, variant.name == "trusted plans",
                             reps=1 if dry_run else 10, warmup=1 if dry_run else 2)
            rows.append(dict(variant=variant.name, setting=setting, case=label, mode=mode, tokens=cases[label].tokens,
                             **r))
    finally:
        _common.pinned_configs.clear()
        _common.pinned_configs.update(saved)
    return rows


def _in_fresh_process(variant: Variant, setting: str, tokens: int, dry_run: bool, timeout: float,
                      pairs: List[Tuple[str, str]]) -> List[dict]:
    env = dict(os.environ, **(variant.a if setting == "a" else variant.b)["env"])
    cmd = [sys.executable, __file__, "--worker", variant.name, "--setting", setting, "--tokens", str(tokens),
           "--pairs", json.dumps(pairs)]
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


def _peaks(a: dict, b: dict) -> str:
    if a.get("peak_gib") is None or b.get("peak_gib") is None:  # (a CPU run has no device peak)
        return "–"
    return f"{a['peak_gib']:.2f} → {b['peak_gib']:.2f}"


def markdown(rows: List[dict]) -> str:
    lines = ["| variant | case | mode | A (ms, p20–p80) | B (ms, p20–p80) | B/A speed-up | model's GEMM speed-up | "
             "peak A → B (GiB) |", "|---|---|---|---|---|---:|---:|---:|"]
    by = {}
    for r in rows:
        by.setdefault((r["variant"], r["case"], r["mode"]), {})[r["setting"]] = r
    for (name, case, mode), s in by.items():
        if "a" not in s or "b" not in s:
            continue
        a, b = s["a"], s["b"]
        model = s["b"].get("model") or {}
        n = a.get("tokens")
        tokens = f" @ {n} token{'s' if n != 1 else ''}" if n and n < 1024 else ""  # decode
        lines.append(f"| {name} | {case}{tokens} | {mode} | {a['median_ms']:.3f} ({a['p20_ms']:.3f}–{a['p80_ms']:.3f}) | "
                     f"{b['median_ms']:.3f} ({b['p20_ms']:.3f}–{b['p80_ms']:.3f}) | {a['median_ms'] / b['median_ms']:.2f} | "
                     f"{model.get('speedup', float('nan')):.2f} | {_peaks(a, b)} |")
    return "\n".join(lines)


def _prefetch_concurrently(variants: List[Variant], tokens: int, measured: Dict[tuple, dict]) -> None:
    """A dry run's environment-flag settings, each in its fresh process, all at once (one per core):
    it checks that every setting runs, not its time, so nothing is lost by sharing the CPU."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = {}
    for v in variants:
        for setting in ("a", "b"):
            key = setting_key(v, setting)
            if v.env_flag and key not in jobs:
                jobs[key] = (v, setting)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = {key: pool.submit(_in_fresh_process, v, setting, tokens, True, 900.0, _pairs(v, True))
                   for key, (v, setting) in jobs.items()}
    for key, future in futures.items():
        v, setting = jobs[key]
        try:
            measured.update({(key, r["case"], r["mode"]): r for r in future.result()})
        except Exception as exc:  # reported by the main loop's retry, serially
            print(f"ab: {v.name} {setting}: concurrent dry run failed ({type(exc).__name__}); retrying alone",
                  flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--variants", default=None, help="comma-separated variant names (default: all)")
    p.add_argument("--budget-s", type=float, default=600.0)
    p.add_argument("--dry-run", action="store_true", help="tiny fp32 shapes on any device (the interpreter on a CPU)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--setting", default=None, help=argparse.SUPPRESS)
    p.add_argument("--pairs", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker:
        variant = next(v for v in VARIANTS if v.name == args.worker)
        pairs = [tuple(p) for p in json.loads(args.pairs)] if args.pairs else None
        print(json.dumps(run_settings(variant, args.setting, args.tokens, device, args.dry_run, pairs)))
        return 0
    deadline = time.monotonic() + args.budget_s
    wanted = args.variants.split(",") if args.variants else [v.name for v in VARIANTS]
    rows: List[dict] = []
    failures = []
    measured: Dict[tuple, dict] = {}  # (setting_key, case, mode) → its row (shared by the variants using it)
    chosen = sorted((v for v in VARIANTS if v.name in wanted), key=lambda v: PRIORITY.index(v.name))
    if args.dry_run:
        _prefetch_concurrently(chosen, args.tokens, measured)
    for variant in chosen:
        for setting in ("a", "b"):
            key = setting_key(variant, setting)
            pairs = _pairs(variant, args.dry_run)
            missing = [p for p in pairs if (key, *p) not in measured]
            left = deadline - time.monotonic()
            if missing and left < 5:
                failures.append(f"{variant.name} {setting}: out of budget")
                continue
            if missing:
                try:
                    got = (_in_fresh_process(variant, setting, args.tokens, args.dry_run, left, missing)
                           if variant.env_flag else run_settings(variant, setting, args.tokens, device, args.dry_run,
                                                                 missing))
                except Exception as exc:  # one variant's failure is a result, not the end of the A/B
                    failures.append(f"{variant.name} {setting}: {type(exc).__name__}: {str(exc)[-500:]}")
                    continue
                measured.update({(key, r["case"], r["mode"]): r for r in got})
            shared = f" ({len(pairs) - len(missing)} shared with an earlier variant's setting)" if len(missing) < len(
                pairs) else ""
            got = [dict(measured[(key, *p)], variant=variant.name, setting=setting,
                        model=predicted(variant, p[0], p[1])) for p in pairs if (key, *p) in measured]
            rows += got
            print(f"ab: {variant.name} {setting}: " + ", ".join(f"{r['case']} {r['mode']} {r['median_ms']:.3f} ms"
                                                             for r in got) + shared, flush=True)
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
