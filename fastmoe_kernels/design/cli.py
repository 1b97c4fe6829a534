"""``fastmoe-design``: ranked MoE configurations for a memory and a cost budget, with the rules
applied and, given a fastmoe-bench results file, this GPU's measured layer cost.

    fastmoe-design --memory-gb 80 --active-params 3e9
    fastmoe-design --memory-gb 640 --bytes-per-param 16 --active-params 2e9 --results results.csv --step-time-ms 900
    fastmoe-design --preset deepseek-v3          # account a published model
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..bench.report import format_table
from .presets import PRESETS, preset
from .rules import recommend


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastmoe-design", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory-gb", type=float, help="memory for the weights (bounds total parameters)")
    p.add_argument("--total-params", type=float, help="or bound total parameters directly")
    p.add_argument("--bytes-per-param", type=float, default=2.0, help="2 for bf16 inference, ~16 for Adam training")
    p.add_argument("--active-params", type=float, help="bound on active parameters per token")
    p.add_argument("--flops-per-token", type=float, help="bound on forward FLOPs per token")
    p.add_argument("--results", help="a fastmoe-bench results.csv/.json: shows measured layer cost")
    p.add_argument("--tokens-per-step", type=int, default=1 << 20, help="tokens per training step (cost estimate)")
    p.add_argument("--step-time-ms", type=float, help="bound on the estimated MoE time of a step (needs --results)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--granularity", type=float, default=8.0, help="target G* = 4·d/d_expert (default 8)")
    p.add_argument("--band", type=float, default=0.02, help="total-parameter tie band (default 2%%)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--preset", help=f"account a published model instead: {', '.join(sorted(PRESETS))}")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.preset:
        acc = preset(args.preset, seq_len=args.seq_len)
        print(f"{args.preset}: {acc.summary()}")
        for name, value in acc.breakdown.items():
            print(f"  {name:17s} {value / 1e9:9.3f}B total  {acc.active_breakdown[name] / 1e9:9.3f}B active")
        return 0
    results = None
    if args.results:
        from ..bench.runner import read_rows

        results = read_rows(args.results)
    try:
        rec = recommend(memory_gb=args.memory_gb, max_total_params=args.total_params,
                        max_active_params=args.active_params, max_flops_per_token=args.flops_per_token,
                        bytes_per_param=args.bytes_per_param, results=results, tokens_per_step=args.tokens_per_step,
                        max_step_ms=args.step_time_ms, seq_len=args.seq_len, vocab_size=args.vocab,
                        target_granularity=args.granularity, band=args.band, top=args.top)
    except ValueError as exc:
        print(f"fastmoe-design: {exc}", file=sys.stderr)
        return 2
    print(f"{rec.feasible} of {rec.considered} configurations fit the budgets.\n")
    if not rec.candidates:
        print("No configuration fits: loosen a budget.")
        return 1
    columns = ["layers", "d_model", "E", "k", "d_ff", "shared", "total_B", "active_B", "GFLOP/tok", "s=E/k", "G=4d/f"]
    if results is not None:
        columns += ["TFLOP/s", "moe_ms/step"]
    print(format_table([c.row() for c in rec.candidates], columns))
    print(f"\nNear-optimal band ({len(rec.band)} configurations within {args.band:.0%} of the largest total): "
          + "; ".join(f"L{c.args['n_layers']} d{c.args['d_model']} E{c.args['num_experts']} k{c.args['top_k']}"
                      for c in rec.band[:8]) + (" …" if len(rec.band) > 8 else ""))
    print("\nRules applied (a synthesis of the studies, in this order):")
    for name, text in rec.rules:
        print(f"  - {name}: {text}")
    for note in rec.notes:
        print(f"  * {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
