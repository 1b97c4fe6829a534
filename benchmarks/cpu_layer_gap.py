"""Where a CPU training step of the experts goes beyond the GEMMs, against a plain torch._grouped_mm
pipeline on the same weights and routing (the tuning issue's CPU question).

Both run one thread, side by side in one process, interleaved, on the quick grid's base case (or
``--case``): ours is ``GroupedExperts.forward_tokens`` on the default CPU backend (the plan, the C++
gather, torch's grouped matmul, the activation, the C++ combine); the baseline sorts the assignments
and calls torch._grouped_mm twice (``bench.baselines.TorchGroupedMMExperts``). A profile of ours (CPU
activity) gives the time per operator and the host's own time per layer call.

    python benchmarks/cpu_layer_gap.py [--reps 30] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from torch.profiler import ProfilerActivity, profile

    from fastmoe_kernels import MoELayer, ops, set_value_checks
    from fastmoe_kernels.bench.baselines import TorchGroupedMMExperts

    torch.manual_seed(0)
    layer = MoELayer(d_model=256, d_ff=128, num_experts=32, top_k=4)
    experts = layer.experts
    x = torch.randn(args.tokens, 256, requires_grad=True)
    g = torch.randn(args.tokens, 256)
    with torch.no_grad():
        route = layer.router(x)
    idx, weight = route.expert_idx, route.weight.detach()
    baseline = TorchGroupedMMExperts(experts)

    def ours():
        plan = ops.make_plan(idx, 32)
        experts.forward_tokens(x, plan, weight).backward(g)

    def theirs():
        baseline(x, idx, weight).backward(g)

    set_value_checks(None)
    times = {"ours": [], "torch._grouped_mm": []}
    for fn in (ours, theirs):
        for _ in range(3):
            fn()
    for _ in range(args.reps):
        for name, fn in (("ours", ours), ("torch._grouped_mm", theirs)):
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    result = {name: dict(median_ms=statistics.median(t), p20_ms=sorted(t)[len(t) // 5], p80_ms=sorted(t)[4 * len(t) // 5])
              for name, t in times.items()}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            ours()
    table = sorted(((e.key, e.count / 5, e.self_cpu_time_total / 1e3 / 5) for e in prof.key_averages()
                    if e.self_cpu_time_total > 0), key=lambda r: -r[2])[:25]
    result["ours_by_op"] = [dict(op=k, calls=c, self_ms=t) for k, c, t in table]
    text = "\n".join([f"{n}: {r['median_ms']:.2f} ms (p20–p80 {r['p20_ms']:.2f}–{r['p80_ms']:.2f})"
                      for n, r in result.items() if n != "ours_by_op"] + ["", "| op | calls | self ms |", "|---|---:|---:|"]
                     + [f"| `{r['op'][:70]}` | {r['calls']:.0f} | {r['self_ms']:.3f} |" for r in result["ours_by_op"]])
    print(text)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cpu_layer_gap.json").write_text(json.dumps(result, indent=1))
        (out / "cpu_layer_gap.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
