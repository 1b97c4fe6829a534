"""Peak memory of a training step of the experts, counted on a CPU: the Triton backend's host code runs
with its real allocations and every Triton kernel stubbed (launched, not run).

What it counts is what ``torch.cuda.max_memory_allocated`` would on a GPU for the benchmark's
"experts" target (``bench/targets.py``: the routed experts' forward and backward at fixed routing, the
experts' ``.grad`` allocated within the step, the inputs and weights existing before it): every
allocation the step's host code makes, from torch's profiler's memory timeline (each allocation and
free on the CPU allocator, inside ops too; CUDA's caching allocator keeps a freed block for reuse but
does not count it as allocated either). Tensors are allocated, never written by a kernel, so the
weights and buffers of a DeepSeek-V3 layer take address space, not memory (``torch.empty`` of an
untouched page costs none); the torch operations between kernels (the separate activation, the casts)
do run, on whatever the stubs left in memory. Meta tensors cannot do this: they run the torch
reference, not the Triton backend's host code.

    python -m fastmoe_kernels.bench.memory_accounting [--cases Qwen3-30B-A3B,...] [--fused] [--out DIR]

Environment flags select the variants as in the A/B (``FASTMOE_WGRAD_FP32=1`` and
``FASTMOE_UP_ACTIVATION=separate``: the kernels the first H100 run measured).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys
from typing import Dict, List, Optional

GIB = 2 ** 30


@contextlib.contextmanager
def stubbed_triton_kernels():
    """Every Triton launch returns at once (the interpreter's entry point: CPU tensors), and value
    checks are off (they would read what no kernel wrote)."""
    from triton.runtime.interpreter import InterpretedFunction

    from fastmoe_kernels import set_value_checks

    real = InterpretedFunction.run
    InterpretedFunction.run = lambda self, *args, **kwargs: None
    set_value_checks(False)
    try:
        yield
    finally:
        InterpretedFunction.run = real
        set_value_checks(None)


def allocation_peak(fn) -> Dict[str, float]:
    """``fn()``'s peak of live bytes allocated within it, and what is still allocated when it returns:
    the running sum over the profiler's memory timeline (every allocation and free, inside ops too)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        fn()
    timeline = MemoryProfile(prof.profiler.kineto_results).timeline
    live = peak = 0
    for _, action, _, size in timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return dict(peak_bytes=float(peak), end_bytes=float(live), events=len(timeline))


def experts_step_peak(case, fused: Optional[bool] = False) -> Dict[str, float]:
    """Peak bytes of one training step of ``case``'s routed experts on the triton backend (kernels
    stubbed), as the benchmark's "experts" fwd+bwd target runs it, beyond the inputs and weights."""
    import torch

    from fastmoe_kernels import MoELayer, ops

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("memory_accounting: set TRITON_INTERPRET=1 (the triton backend on CPU tensors)")
    from fastmoe_kernels import _alloc

    _alloc.set_poison(False)  # a poison fill would write (and commit) every buffer
    torch.manual_seed(0)
    with torch.device("meta"):
        layer = MoELayer(case.config(fused_experts=fused), dtype=case.torch_dtype)
    # Real CPU storage, never written (address space only), in place of the meta parameters.
    layer = layer.to_empty(device="cpu")
    T, d, E = case.tokens, case.d_model, case.num_experts
    x = torch.empty(T, d, dtype=case.torch_dtype).requires_grad_()
    grad = torch.empty(T, d, dtype=case.torch_dtype)
    # Fixed, balanced routing (the benchmark routes once, before timing): token t to experts t·k … t·k+k-1.
    idx = (torch.arange(T * case.top_k) % E).view(T, case.top_k).to(torch.int32)
    weight = torch.full((T, case.top_k), 1.0 / case.top_k)
    plan = ops.make_plan(idx, E, None, layer.config.drop_policy, weight, layer.config.pad_to_capacity, backend="torch")
    experts = layer.experts
    params = list(experts.parameters())

    def step():
        y = experts.forward_tokens(x, plan, weight, backend="triton", fused=fused)
        y.backward(grad)

    try:
        with stubbed_triton_kernels():
            out = allocation_peak(step)
    finally:
        _alloc.set_poison(None)
    out["weights_bytes"] = float(sum(p.numel() * p.element_size() for p in params))
    for p in params:
        p.grad = None
    return out


# The first H100 run's measured peaks of the same target (benchmarks/results/h100-2026-11-24/README.md,
# "ours: experts (triton)", fwd+bwd, GiB beyond what existed before the step), with the kernels it ran:
# the composition, fp32 weight gradients and a cast, the activation as torch ops.
H100_MEASURED_GIB = {"Qwen3-30B-A3B": 4.1, "OLMoE": 3.3, "Mixtral-8x7B": 8.5}
H100_FLAGS = {"FASTMOE_WGRAD_FP32": "1", "FASTMOE_UP_ACTIVATION": "separate"}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="Qwen3-30B-A3B,Mixtral-8x7B,OLMoE,gpt-oss-20b,DeepSeek-V3")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--fused", action="store_true", help="the fused path (default: the composition)")
    p.add_argument("--out", default=None, help="write memory.json here")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from .grids import model_cases

    cases = {c.label: c for c in model_cases(tokens=args.tokens)}
    rows = []
    for label in args.cases.split(","):
        try:
            r = experts_step_peak(cases[label], fused=True if args.fused else False)
        except RuntimeError as exc:
            # Linux's overcommit heuristic refuses one allocation larger than this machine's memory
            # and swap (an fp32 copy of DeepSeek-V3's up projections, 28 GiB): not counted here.
            if "can't allocate memory" not in str(exc):
                raise
            rows.append(dict(case=label, fused=args.fused, error=str(exc).splitlines()[-1][:300]))
            print(f"{label}: not counted: one allocation exceeds this machine's memory ({rows[-1]['error']})",
                  flush=True)
            continue
        r.update(case=label, fused=args.fused, peak_gib=r["peak_bytes"] / GIB, weights_gib=r["weights_bytes"] / GIB,
                 flags={k: v for k, v in os.environ.items() if k.startswith("FASTMOE_")})
        rows.append(r)
        print(f"{label}: peak {r['peak_gib']:.2f} GiB beyond the inputs ({r['weights_gib']:.2f} GiB of weights; "
              f"{r['events']} allocations and frees)", flush=True)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "memory.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
