"""Compile the Triton kernels of the model cases in parallel, before a benchmark times them.

Triton compiles a kernel per constexpr set (E among them), and the autotuner compiles every config
that fits, one after the other, in the process that launches it: ~50 compiles per layer shape,
minutes for the GPU grid's model cases, all on one CPU core. This runs one process per case at once,
each doing a forward and a forward+backward of the layer (fused and unfused) at a few thousand
tokens, so that the compiled kernels land in Triton's on-disk cache (``TRITON_CACHE_DIR``) and the
benchmark's own autotuning only loads them. What these processes time is thrown away (they share
the GPU).

Each case is warmed under the defaults and under the A/B's environment-flag variants whose kernels the
defaults never launch (``VARIANT_ENV``: the training issue's part B and the forward issue's TMA stores
for the bf16 cases, the FP8 issue's fused quantisers and wide tiles for the fp8 cases), one process each.

    python benchmarks/gpu_prewarm.py [--tokens 4096] [--cases Qwen3-30B-A3B,...] [--variants default,node,...]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import List, Optional


# The flags (benchmarks/gpu_ab.py's variants) under which the layer launches kernels the defaults do not.
VARIANT_ENV = {
    "default": {},
    "node": {"FASTMOE_MLP_BACKWARD": "epilogue", "FASTMOE_DH_EPILOGUE": "split"},
    "stored": {"FASTMOE_FUSED_BACKWARD": "stored", "FASTMOE_DOWN_OUTPUT": "rows", "FASTMOE_ROUTER_GEMM": "tensor-cores"},
    "tma-stores": {"FASTMOE_C_STORES": "tma"},  # the forward issue's TMA stores (grouped matmul, act(h))
    "tma-stores-h": {"FASTMOE_C_STORES": "tma+h"},  # the same and the up projection's h halves
    "deep-pipelines": {"FASTMOE_DEEP_PIPELINES": "on"},  # the 4-stage Hopper tiles offered
    # the fp8 experts as one node with the quantisers fused (the FP8 issue), and its folded routing weight
    "fp8-fused": {"FASTMOE_FP8_QUANTISERS": "fused"},
    "fp8-folded": {"FASTMOE_FP8_QUANTISERS": "fused-folded"},
    "fp8-wide": {"FASTMOE_FP8_TILES": "wide"},
}
# Variants whose flags change only the fp8 cases' kernels, and the bf16-only ones: each case is warmed under
# the variants that change its kernels (and the defaults).
FP8_VARIANTS = {"fp8-fused", "fp8-folded", "fp8-wide"}


def applies(label: str, variant: str) -> bool:
    """Whether warming ``label`` under ``variant`` compiles anything its defaults do not."""
    return variant == "default" or (variant in FP8_VARIANTS) == label.endswith(" fp8")


def warm(label: str, tokens: int, dry_run: bool = False) -> None:
    import torch

    from fastmoe_kernels import ops
    from fastmoe_kernels.bench.grids import model_cases, tiny_model_cases
    from fastmoe_kernels.layer import MoELayer

    cases = tiny_model_cases() if dry_run else model_cases(tokens=tokens)
    case = next(c for c in cases if c.label == label)
    tokens = case.tokens if dry_run else tokens
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layer = MoELayer(case.config(), device=device, dtype=case.torch_dtype, backend="triton")
    x = torch.randn(tokens, case.d_model, device=device).to(case.torch_dtype).requires_grad_()
    for fused in (True, False):
        layer.config = layer.config.replace(fused_experts=fused)
        with torch.no_grad():
            layer(x)
        layer(x).float().square().mean().backward()
        # The benchmark's "experts" targets plan on the triton backend too.
        with torch.no_grad():
            route = layer.router(x)
            plan = ops.make_plan(route.expert_idx, case.num_experts, None, "probs", route.weight, False,
                                 backend="triton")
            layer.experts.forward_tokens(x, plan, route.weight, backend="triton", fused=fused)
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--cases", default=None, help="comma-separated model labels (default: all)")
    p.add_argument("--dry-run", action="store_true", help="tiny stand-ins of the cases, any device")
    p.add_argument("--variants", default=",".join(VARIANT_ENV), help=f"comma-separated, of {sorted(VARIANT_ENV)}")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a worker: warm this case
    args = p.parse_args(argv)
    if args.one:
        warm(args.one, args.tokens, args.dry_run)
        return 0
    from fastmoe_kernels.bench.grids import model_cases

    labels = args.cases.split(",") if args.cases else [c.label for c in model_cases()]
    start = time.perf_counter()
    extra = ["--dry-run"] if args.dry_run else []
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANT_ENV))
    if unknown:
        p.error(f"--variants: unknown {unknown}; known: {sorted(VARIANT_ENV)}")
    workers = {f"{label} ({variant})": subprocess.Popen(
        [sys.executable, __file__, "--one", label, "--tokens", str(args.tokens), *extra],
        env=dict(os.environ, **VARIANT_ENV[variant])) for label in labels for variant in variants
        if applies(label, variant)}
    failed = []
    for name, proc in workers.items():
        if proc.wait() != 0:
            failed.append(name)
    print(f"gpu_prewarm: {len(workers) - len(failed)} of {len(workers)} case variants compiled in "
          f"{time.perf_counter() - start:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
