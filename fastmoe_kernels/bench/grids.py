"""The sweeps. Each varies one axis around a base configuration while holding a stated budget, and
each includes the base point itself (measured once, reported in every sweep):

- ``experts``: E at fixed k and f — fixed active parameters, total grows with E;
- ``top_k``: k at fixed E and f — fixed total parameters, sparsity E/k falls;
- ``expert_size``: f from d/16 to 4·d at fixed total parameters (E·f constant, k fixed);
- ``granularity``: the base's top-1 twin (E/k experts, f·k wide, one active) split into G smaller
  ones (G·E/k experts, G active, f·k/G wide) — fixed total *and* active parameters (Krajewski et
  al. 2024's granularity); G = k is the base;
- ``tokens``, ``d_model`` (f scaled with d), ``dtype``, ``capacity`` (dropless — the base — and
  capacity factors) and ``shared`` (one shared expert replacing one routed slot: fixed active
  parameters);
- ``decode``: 1 … 256 tokens, inference only, where reading the touched experts' weights dominates
  (reported in GB/s against the copy bandwidth measured in the same run);
- ``fp8``: the base with the experts' GEMMs in bf16 (the base) and in fp8 (``fp8_recipe="blockwise"``);
  in the GPU grids the Mixtral-8x7B shape gets its fp8 twin too (the issue's ≥ 1.6× target is set at
  the Qwen3 — the GPU base — and Mixtral shapes). Without fp8 kernels (CPU, GPUs before sm_89) the
  fp8 point times the fp32 emulation;
- ``decode-qwen3``, ``decode-mixtral``, ``decode-gpt-oss`` and the fp8 twins ``decode-mixtral-fp8``,
  ``decode-qwen3-fp8`` (GPU grids): those models' layers at 1–512
  tokens, inference only (the forward issue's decode targets: the rate on the hit experts' weights
  against the copy bandwidth);
- ``models`` (GPU grids): the MoE layers of Qwen3-30B-A3B, OLMoE, Mixtral-8x7B, DeepSeek-V3 (one
  shared expert, sigmoid routing in groups) and a gpt-oss-20b-like shape, at 16,384 tokens in bf16.

Grids: "smoke" (tiny: CI runs every benchmark once), "quick" (the CPU default: minutes on 2
cores), "gpu" (the GPU default: within 15 minutes on an H100), "full" (the long GPU grid: every
sweep at more points; only when asked for).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, List

from .cases import BenchCase
from .sweeps import DECODE_MODELS

GRIDS = ("smoke", "quick", "gpu", "full")


def default_grid(device_type: str) -> str:
    return "gpu" if device_type == "cuda" else "quick"


def model_cases(tokens: int = 16384, dtype: str = "bfloat16") -> List[BenchCase]:
    """The layer shapes of real MoE models (dimensions from their published configs)."""
    m = dict(sweep="models", tokens=tokens, dtype=dtype, graphed=True)
    return [
        BenchCase(**m, d_model=2048, d_ff=768, num_experts=128, top_k=8, label="Qwen3-30B-A3B"),
        BenchCase(**m, d_model=2048, d_ff=1024, num_experts=64, top_k=8, label="OLMoE"),
        BenchCase(**m, d_model=4096, d_ff=14336, num_experts=8, top_k=2, label="Mixtral-8x7B"),
        BenchCase(**m, d_model=4096, d_ff=14336, num_experts=8, top_k=2, fp8_recipe="blockwise",
                  label="Mixtral-8x7B fp8"),
        BenchCase(**m, d_model=2048, d_ff=768, num_experts=128, top_k=8, fp8_recipe="blockwise",
                  label="Qwen3-30B-A3B fp8"),
        BenchCase(**m, d_model=7168, d_ff=2048, num_experts=256, top_k=8, num_shared_experts=1, shared_d_ff=2048,
                  score_func="sigmoid", num_groups=8, topk_groups=4, routed_scaling_factor=2.5, label="DeepSeek-V3"),
        BenchCase(**m, d_model=2880, d_ff=2880, num_experts=32, top_k=4, activation="swiglu_oai", label="gpt-oss-20b"),
    ]


# The decode sweeps at model shapes (GPU grids; sweeps.DECODE_MODELS): each model's layer at few tokens.
DECODE_MODEL_TOKENS = {"gpu": [1, 16, 256], "full": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]}
# The fp8 twins in the GPU grid at 1 token, where reading the weights bounds the forward (the
# grid's 15-minute estimate, 886 s without them, holds no more).
FP8_DECODE_TOKENS = {"gpu": [1]}


def model_decode_cases(grid: str) -> List[BenchCase]:
    """The models' decode sweeps of ``grid`` (none outside the GPU grids: the weights are GBs)."""
    models = {c.label: c for c in model_cases()}
    tokens = lambda label: (FP8_DECODE_TOKENS.get(grid) or DECODE_MODEL_TOKENS.get(grid, [])
                            if models[label].fp8_recipe else DECODE_MODEL_TOKENS.get(grid, []))
    return [replace(models[label], sweep=sweep, tokens=t, inference_only=True)
            for sweep, label in DECODE_MODELS.items() for t in tokens(label)]


def tiny_model_cases() -> List[BenchCase]:
    """Stand-ins for the model cases with their names, activations and routing at tiny sizes in fp32:
    the GPU session's dry run on a CPU (Triton's interpreter; its bf16 products are wrong)."""
    tiny = dict(tokens=64, d_model=64, d_ff=32, dtype="float32", num_experts=8, top_k=2)
    out = []
    for case in model_cases():
        shared = dict(num_shared_experts=case.num_shared_experts, shared_d_ff=32 if case.num_shared_experts else None)
        groups = dict(num_groups=2, topk_groups=1) if case.num_groups else {}
        out.append(replace(case, **tiny, **shared, **groups))
    return out


def _base(grid: str) -> BenchCase:
    if grid in ("gpu", "full"):
        return BenchCase("base", tokens=16384, d_model=2048, d_ff=768, num_experts=128, top_k=8)
    if grid == "quick":
        return BenchCase("base", tokens=1024, d_model=256, d_ff=128, num_experts=32, top_k=4, dtype="float32")
    return BenchCase("base", tokens=64, d_model=64, d_ff=32, num_experts=8, top_k=2, dtype="float32")


def _axes(grid: str) -> Dict[str, list]:
    """Each axis's values; every list holds the base's own value (its point in that sweep)."""
    if grid == "full":
        return {
            "experts": [8, 16, 32, 64, 128, 256],
            "top_k": [1, 2, 4, 8, 16],
            "expert_size": [1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 1, 2, 4],  # f / d
            "granularity": [1, 2, 4, 8, 16],
            "tokens": [4096, 16384, 65536],
            "d_model": [1024, 2048, 4096],
            "dtype": ["bfloat16", "float16"],
            "capacity": [None, 1.0, 1.25, 2.0],
            "shared": [0, 1],
            "decode": [1, 2, 4, 8, 16, 32, 64, 128, 256],
            "fp8": [None, "blockwise"],
        }
    if grid == "gpu":
        return {
            "experts": [8, 32, 128, 256],
            "top_k": [1, 4, 8, 16],
            "expert_size": [1 / 8, 3 / 8, 1, 4],
            "granularity": [1, 2, 8],
            "tokens": [4096, 16384, 65536],
            "d_model": [1024, 2048, 4096],
            "dtype": ["bfloat16", "float16"],
            "capacity": [None, 1.0, 1.25],
            "shared": [0, 1],
            "decode": [1, 4, 16, 64, 256],
            "fp8": [None, "blockwise"],
        }
    if grid == "quick":
        return {
            "experts": [8, 32, 128],
            "top_k": [1, 4, 16],
            "expert_size": [1 / 16, 1 / 2, 4],
            "granularity": [1, 4],
            "tokens": [256, 1024, 2048],
            "d_model": [128, 256, 512],
            "dtype": ["float32", "bfloat16"],
            "capacity": [None, 1.0, 2.0],
            "shared": [0, 1],
            "decode": [1, 16, 256],
            "fp8": [None, "blockwise"],
        }
    return {"experts": [8, 16], "top_k": [1, 2], "expert_size": [1 / 4, 1 / 2], "granularity": [1, 2], "tokens": [32, 64],
            "d_model": [32, 64], "dtype": ["float32", "bfloat16"], "capacity": [None, 1.25], "shared": [0, 1],
            "decode": [1, 8], "fp8": [None, "blockwise"]}


def _sweep(base: BenchCase, axis: str, value) -> BenchCase:
    d = base.d_model
    if axis == "experts":
        return replace(base, sweep=axis, num_experts=value, top_k=min(base.top_k, value))
    if axis == "top_k":
        return replace(base, sweep=axis, top_k=min(value, base.num_experts))
    if axis == "expert_size":
        f = max(8, int(round(d * value / 8)) * 8)
        return replace(base, sweep=axis, d_ff=f, num_experts=max(base.top_k, base.num_experts * base.d_ff // f))
    if axis == "granularity":
        k = base.top_k  # the top-1 twin: E/k experts of width f·k
        return replace(base, sweep=axis, num_experts=base.num_experts // k * value, top_k=value,
                       d_ff=max(8, base.d_ff * k // value))
    if axis == "tokens":
        return replace(base, sweep=axis, tokens=value)
    if axis == "d_model":
        return replace(base, sweep=axis, d_model=value, d_ff=max(8, base.d_ff * value // d))
    if axis == "dtype":
        return replace(base, sweep=axis, dtype=value)
    if axis == "capacity":
        return replace(base, sweep=axis, capacity_factor=value)
    if axis == "shared":
        # n shared experts of a routed expert's width replace n routed slots: same active params.
        return replace(base, sweep=axis, num_shared_experts=value, shared_d_ff=base.d_ff if value else None,
                       top_k=max(1, base.top_k - value))
    if axis == "fp8":
        return replace(base, sweep=axis, fp8_recipe=value)
    if axis == "decode":
        return replace(base, sweep=axis, tokens=value, inference_only=True)
    raise ValueError(f"unknown sweep axis {axis!r}")


def build_grid(grid: str) -> List[BenchCase]:
    """All cases of a grid: the base case, then each sweep's points (the base point among them)."""
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    base = _base(grid)
    cases: List[BenchCase] = [base]
    for axis, values in _axes(grid).items():
        cases += [_sweep(base, axis, v) for v in values]
    if grid in ("gpu", "full"):
        cases += model_cases() + model_decode_cases(grid)
    # A configuration measured under a model's name is graphed wherever it appears (the GPU base is
    # Qwen3-30B-A3B's layer): its occurrences stay one measurement.
    unmarked = lambda c: replace(measured_key(c), graphed=False)
    graphed = {unmarked(c) for c in cases if c.graphed}
    return [replace(c, graphed=True) if unmarked(c) in graphed else c for c in cases]


def measured_key(case: BenchCase) -> BenchCase:
    """What identifies a measurement: the configuration, not the sweep or model it is reported under."""
    return replace(case, sweep="", label="")
