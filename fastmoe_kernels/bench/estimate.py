"""How long a grid takes on a GPU, estimated from its case counts × repetitions — an estimate, not a
measurement: no session has had a GPU to time it on yet.

    python -m fastmoe_kernels.bench.estimate --grid gpu [--tflops 300] [--pytest]

The model: every target runs ``runs`` times (warm-up + timed); a layer or experts target costs its
FLOPs at ``tflops`` plus kernel-launch overhead, the Python-loop baselines (naive loop, Hugging Face
eager) a few launches per expert; an op moves its bytes at ``gbps``; every case pays a set-up
(weights, baselines' probes, Triton's autotuning of new shapes), and the first case the Triton
kernels' compilation.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, List, Optional

from .cases import BenchCase
from .grids import GRIDS, build_grid, measured_key
from .runner import OPS_PER_BACKEND, cases_with_ops
from .sweeps import IMPL_VARIANTS

LOOP_BASELINES = ("naive-loop", "hf-eager")
FAST_BASELINES = ("torch._grouped_mm", "hf-grouped_mm")


@dataclass
class GpuModel:
    tflops: float = 300.0          # achieved bf16 rate of a layer's GEMMs (H100 dense peak ≈ 990)
    gbps: float = 2000.0           # achieved bandwidth of the data-movement ops
    launch_ms: float = 0.3         # a forward's launches and host work; a training step pays twice
    per_expert_ms: float = 0.06    # the loop baselines' launches per expert, forward
    runs: int = 16                 # warm-up and pilot (6) + timed runs
    setup_s: float = 10.0          # per case: weights, baseline probes, Triton autotuning of new shapes
    compile_s: float = 150.0       # once: Triton compiles every kernel variant's configs


def _target_ms(case: BenchCase, op: str, impl: str, mode: str, m: GpuModel) -> float:
    train = mode == "fwd+bwd"
    passes = 3 if train else 1
    if op in ("layer", "experts"):
        ms = case.expert_flops(train) / (m.tflops * 1e9) + m.launch_ms * (2 if train else 1)
        if impl in LOOP_BASELINES:
            ms += m.per_expert_ms * case.num_experts * passes
        return ms
    if op in ("dense_gemm", "dense_up", "dense_down"):
        return case.expert_flops(train) / (1.5 * m.tflops * 1e9)
    moved = case.rows * case.d_model * case.elem_bytes() * 2 * passes
    return moved / (m.gbps * 1e6) + 0.05 * passes


def estimate_seconds(grid: str, model: Optional[GpuModel] = None, *, backends=("torch", "triton", "cuda"),
                     baselines: List[str] = ("naive-loop", "torch._grouped_mm", "hf-eager", "hf-grouped_mm"),
                     ops: str = "base") -> Dict[str, float]:
    """Seconds the grid's targets, set-ups and compilation take under ``model``, and the counts."""
    m = model or GpuModel()
    cases = build_grid(grid)
    unique = {measured_key(c): c for c in cases}
    with_ops = cases_with_ops(cases, ops)
    impls = list(backends) + [v for v, (b, _) in IMPL_VARIANTS.items() if b in backends]
    total_ms, targets = 0.0, 0
    for key, case in unique.items():
        modes = ("fwd",) if case.inference_only else ("fwd", "fwd+bwd")
        work = [("layer", i) for i in impls] + [("experts", i) for i in impls]
        if case.compares_baselines:
            work += [("experts", b) for b in baselines]
        work += [("dense_gemm", "dense")] if not case.inference_only else []
        for op, impl in work:
            for mode in modes:
                total_ms += _target_ms(case, op, impl, mode, m) * m.runs
                targets += 1
        if "triton" in backends:  # the CUDA-graphed layer
            for mode in case.graphed_modes():
                total_ms += _target_ms(case, "layer", "triton", mode, m) * m.runs
                targets += 1
        if key in with_ops and case.breaks_down_ops:
            n_ops = len(backends) * OPS_PER_BACKEND
            total_ms += n_ops * _target_ms(case, "permute", "torch", "fwd+bwd", m) * m.runs
            targets += n_ops
    seconds = total_ms / 1e3 + len(unique) * m.setup_s + m.compile_s
    return {"seconds": seconds, "cases": len(unique), "targets": targets}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", choices=GRIDS, default="gpu")
    p.add_argument("--tflops", type=float, default=GpuModel.tflops)
    p.add_argument("--pytest", action="store_true", help="pytest benchmarks/: the ops of every case")
    args = p.parse_args(argv)
    est = estimate_seconds(args.grid, GpuModel(tflops=args.tflops), ops="all" if args.pytest else "base")
    print(f"{args.grid} grid{' (pytest benchmarks/)' if args.pytest else ''}: {est['cases']} cases, "
          f"{est['targets']} targets, ≈ {est['seconds'] / 60:.1f} min at {args.tflops:g} TFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
