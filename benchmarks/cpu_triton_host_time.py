"""Host time of the Triton backend per call, on the CPU: its host code runs (Python, torch's dispatch, the
small torch ops between kernels, allocations) with every Triton kernel stubbed (launched, not run: the
interpreter's entry returns at once), at a model's structure (experts, top-k, activation) and tiny widths,
so what is timed is what a GPU would wait on when the host is behind. Triton's own launcher (argument
binding, cache lookup: ~15-30 µs per launch on a GPU host) is not in it; its launches are counted.

    python benchmarks/cpu_triton_host_time.py [--experts 128 --top-k 8] [--reps 200] [--json F]
    (PYTHONPATH=<another checkout> to measure that one)

Targets: "layer" (router, plan, experts, aux loss) and "experts" (the routed experts at a fixed plan,
the benchmark's headline target); each forward (no grad kept) and forward + backward; fused_experts
None (the layer's default), False (the composition) and True (the fused path).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend on CPU tensors (kernels stubbed below)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from fastmoe_kernels import MoELayer, _alloc  # noqa: E402
from fastmoe_kernels.bench.memory_accounting import stubbed_triton_kernels  # noqa: E402

# aten ops that launch no device kernel (views, metadata, allocation).
NO_KERNEL = {"aten::view", "aten::reshape", "aten::as_strided", "aten::empty", "aten::empty_strided", "aten::t",
             "aten::transpose", "aten::detach", "aten::alias", "aten::expand", "aten::unsqueeze", "aten::squeeze",
             "aten::select", "aten::slice", "aten::split", "aten::chunk", "aten::narrow", "aten::permute",
             "aten::resolve_conj", "aten::resolve_neg", "aten::view_as", "aten::_reshape_alias", "aten::lift_fresh",
             "aten::to", "aten::contiguous", "aten::new_empty", "aten::empty_like", "aten::_unsafe_view",
             "aten::unbind", "aten::matmul", "aten::linear", "aten::numpy_T", "aten::is_nonzero", "aten::item",
             "aten::_local_scalar_dense", "aten::result_type", "aten::set_", "aten::flatten", "aten::unflatten"}


def _calls(layer: MoELayer, x: torch.Tensor, target: str, backward: bool):
    if target == "layer":
        def run():
            y = layer(x)
            if backward:
                y.sum().backward()
        return run
    from fastmoe_kernels import ops
    route = layer.router(x, backend="triton")
    plan = ops.make_plan(route.expert_idx, layer.config.num_experts, None, layer.config.drop_policy, route.weight,
                         layer.config.pad_to_capacity, backend="triton")
    weight = route.weight.detach()

    def run():
        y = layer.experts.forward_tokens(x, plan, weight, backend="triton", fused=layer.config.fused_experts)
        if backward:
            y.sum().backward()
    return run


def measure(experts: int, top_k: int, activation: str, fused, target: str, backward: bool, reps: int) -> dict:
    torch.manual_seed(0)
    layer = MoELayer(d_model=64, d_ff=32, num_experts=experts, top_k=top_k, activation=activation,
                     fused_experts=fused, backend="triton").train()
    x = torch.randn(64, 64, requires_grad=backward)
    run = _calls(layer, x, target, backward)
    launches = collections.Counter()
    stub = lambda self, *a, **k: launches.update([self.fn.__name__])  # noqa: E731
    _alloc.set_poison(False)
    with stubbed_triton_kernels():
        InterpretedFunction.run = stub
        context = torch.enable_grad() if backward else torch.no_grad()
        with context:
            for _ in range(5):
                run()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                run()
                times.append((time.perf_counter() - t0) * 1e6)
            launches.clear()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run()
    _alloc.set_poison(None)
    # Top-level aten ops only (an op's own sub-ops are not separate launches from the host's view).
    ops = collections.Counter()
    for e in prof.events():
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if e.name.startswith("aten::") and parent is None and e.name not in NO_KERNEL:
            ops[e.name] += 1
    q = statistics.quantiles(times, n=5)
    return dict(experts=experts, top_k=top_k, activation=activation, fused=fused, target=target,
                pass_="fwd+bwd" if backward else "fwd", median_us=statistics.median(times), p20_us=q[0], p80_us=q[-1],
                triton_launches=sum(launches.values()), kernel_ops=sum(ops.values()),
                launches_by_kernel=dict(launches), kernel_ops_by_name=dict(ops))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--activation", default="swiglu")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--fused", default="none,false,true", help="fused_experts settings: none, false, true")
    p.add_argument("--targets", default="experts,layer")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for target in args.targets.split(","):
        for fused_name in args.fused.split(","):
            fused = {"none": None, "false": False, "true": True}[fused_name]
            for backward in (False, True):
                r = measure(args.experts, args.top_k, args.activation, fused, target, backward, args.reps)
                rows.append(r)
                print(f"{target:8s} fused={fused_name:5s} {r['pass_']:8s} {r['median_us']:8.0f} µs "
                      f"(p20-p80 {r['p20_us']:.0f}-{r['p80_us']:.0f}); {r['triton_launches']} Triton launches, "
                      f"{r['kernel_ops']} torch kernel ops", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
