"""Which backend "auto" should take for each kernel on a CPU: the torch reference against the cpp
backend (the csrc C++ kernels, and torch's grouped matmul for the GEMMs), op by op, side by side in
one run, one thread (so a busy second core cannot multiply the times).

    taskset -c 1 python benchmarks/cpu_kernel_choice.py --out benchmarks/results/cpu-<date>

Writes results.csv (every row of the benchmark harness, with p20/p80) and README.md (per kernel:
medians and their spread, and which backend wins in how many cases). The harness's op targets time
route (forward and backward), plan, permute, the two grouped GEMMs and unpermute; routing statistics,
the router by k and E, and the whole layer on "auto" are timed here directly.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import pathlib
import platform
import statistics
from collections import defaultdict

import torch

from fastmoe_kernels import backends, ops
from fastmoe_kernels._checks import set_value_checks
from fastmoe_kernels.bench.env import environment
from fastmoe_kernels.bench.grids import build_grid
from fastmoe_kernels.bench.runner import run_grid, write_rows
from fastmoe_kernels.bench.timing import measure

BACKENDS = ["torch", "cpp"]
SWEEPS = ("base", "experts", "top_k", "capacity")


def routing_stats_rows(cases, device):
    rows = []
    for case in cases:
        gen = torch.Generator().manual_seed(0)
        probs = torch.softmax(torch.randn(case.tokens, case.num_experts, generator=gen), -1)
        idx = torch.topk(probs, case.top_k, -1).indices.to(torch.int32)
        for backend in BACKENDS:
            t = measure(lambda: ops.routing_stats(probs, idx, backend=backend), device, warmup=3, reps=20, max_seconds=4)
            rows.append(dict(case=case.name, op="routing_stats", impl=backend, mode="fwd", median_ms=t.median_ms,
                             p20_ms=t.p20_ms, p80_ms=t.p80_ms))
    return rows


def route_sweep_rows(device):
    """The router's cost by k and E: the C++ router's k selection rounds against torch's sort."""
    rows = []
    for E in (32, 128, 256):
        for k in (2, 4, 6, 8, 12, 16):
            logits = torch.randn(1024, E, generator=torch.Generator().manual_seed(0))
            needs_grad = logits.clone().requires_grad_()
            for backend in BACKENDS:
                def train(backend=backend, k=k):
                    needs_grad.grad = None
                    _, w, p = ops.route_topk(needs_grad, k, return_probs=True, backend=backend)
                    (w.sum() + p.sum()).backward()

                for mode, fn in (("fwd", lambda backend=backend, k=k: ops.route_topk(logits, k, return_probs=True,
                                                                                     backend=backend)),
                                 ("fwd+bwd", train)):
                    t = measure(fn, device, warmup=3, reps=20, max_seconds=3)
                    rows.append(dict(case=f"E{E}-k{k}", op="route (k sweep)", impl=backend, mode=mode,
                                     median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, E=E, k=k))
    return rows


def route_table(rows) -> str:
    cells = defaultdict(dict)
    for r in rows:
        cells[(r["E"], r["k"], r["mode"])][r["impl"]] = r["median_ms"]
    lines = ["| E | k | torch / cpp fwd ms | speed-up of cpp | torch / cpp fwd+bwd ms | speed-up of cpp |",
             "|---|---|---|---|---|---|"]
    for E, k in sorted({(e, k) for e, k, _ in cells}):
        f, b = cells[(E, k, "fwd")], cells[(E, k, "fwd+bwd")]
        lines.append(f"| {E} | {k} | {f['torch']:.3f} / {f['cpp']:.3f} | {f['torch'] / f['cpp']:.2f}× | "
                     f"{b['torch']:.3f} / {b['cpp']:.3f} | {b['torch'] / b['cpp']:.2f}× |")
    return "\n".join(lines)


def layer_rows(cases, device):
    """The whole layer on "auto" beside the two backends it chooses from."""
    from fastmoe_kernels import MoELayer

    rows = []
    for case in cases:
        x = torch.randn(case.tokens, case.d_model, generator=torch.Generator().manual_seed(0))
        for backend in ("torch", "cpp", "auto"):
            layer = MoELayer(case.config(), backend=backend)

            def step(layer=layer):
                layer.zero_grad()
                layer(x).sum().backward()

            t = measure(step, device, warmup=2, reps=20, max_seconds=4)
            rows.append(dict(case=case.name, op="layer (auto)", impl=backend, mode="fwd+bwd", median_ms=t.median_ms,
                             p20_ms=t.p20_ms, p80_ms=t.p80_ms))
    return rows


def layer_table(rows) -> str:
    cells = defaultdict(dict)
    for r in rows:
        cells[r["case"]][r["impl"]] = r
    spread = lambda r: f"{r['median_ms']:.2f} ({r['p20_ms']:.2f}–{r['p80_ms']:.2f})"
    lines = ["| case | torch | cpp | auto |", "|---|---|---|---|"]
    for case, c in sorted(cells.items()):
        lines.append(f"| {case} | {spread(c['torch'])} | {spread(c['cpp'])} | {spread(c['auto'])} |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(rows) -> str:
    by_op = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        by_op[(r["op"], r["mode"])][r["case"]][r["impl"]] = r
    lines = ["| kernel (op, mode) | cases | cpp faster in | median speed-up of cpp (min–max) | torch / cpp ms at the base case (p20–p80) |",
             "|---|---|---|---|---|"]
    for (op, mode), cases in sorted(by_op.items()):
        ratios = [c["torch"]["median_ms"] / c["cpp"]["median_ms"] for c in cases.values() if {"torch", "cpp"} <= c.keys()]
        if not ratios:
            continue
        base = next((c for name, c in cases.items() if name.startswith("base")), next(iter(cases.values())))
        spread = lambda r: f"{r['median_ms']:.3f} ({r['p20_ms']:.3f}–{r['p80_ms']:.3f})"
        lines.append(f"| {op} ({mode}) | {len(ratios)} | {sum(x > 1 for x in ratios)} | {statistics.median(ratios):.2f}× "
                     f"({min(ratios):.2f}–{max(ratios):.2f}) | {spread(base['torch'])} / {spread(base['cpp'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ok, why = backends.availability("cpp", device)
    if not ok:
        raise SystemExit(f"the cpp backend is unavailable here: {why}")
    cases = [c for c in build_grid("quick") if c.sweep in SWEEPS]
    set_value_checks(False)
    rows = run_grid(cases, device, backends=BACKENDS, effort="full", ops="all", with_baselines=False, threads="1",
                    budget_s=None, progress_bar=False, log=lambda m: None)
    set_value_checks(None)
    write_rows(rows, out)
    (out / "results.json").unlink(missing_ok=True)  # the same rows as results.csv
    flat = [r.flat() for r in rows if r.impl in BACKENDS] + routing_stats_rows(cases, device)
    route = route_sweep_rows(device)
    layers = layer_rows([c for c in cases if c.sweep != "base"], device)
    with open(out / "extra.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "op", "impl", "mode", "median_ms", "p20_ms", "p80_ms", "E", "k"])
        writer.writeheader()
        for r in [r for r in flat if r["op"] == "routing_stats"] + route + layers:
            writer.writerow({k: r.get(k) for k in writer.fieldnames})
    env = environment(device)
    readme = f"""# CPU: torch reference against the cpp backend, kernel by kernel

Measured {datetime.date.today()} on {cpu_model()} ({os.cpu_count()} cores, one thread: `torch.set_num_threads(1)`,
the process pinned to one core), torch {env['torch']}, Python {platform.python_version()}, by
`python benchmarks/cpu_kernel_choice.py --out {out}` — the benchmark harness's op targets (3 warm-up runs, timed runs
until the median's 95% interval is within 2% or 4 s, medians with p20–p80) on the {len(cases)} cases of the quick grid's base, experts,
top-k and capacity sweeps (T=1024 tokens, d=256, f=128, fp32).

This is what `backends.AUTO_PREFERENCE["cpu"]` follows: "auto" takes `cpp` for a kernel where it is faster.
`results.csv` holds the harness rows, `extra.csv` the routing statistics, the router's k sweep and the layer
on "auto".

## Kernel by kernel

{table(flat)}

The GEMMs (`grouped_up`, `grouped_down`: torch's `_grouped_mm` in `cpp`, a loop of matmuls in `torch`) tie, op by
op and in the whole layer, within the run-to-run noise of a 2-core machine (compare the layer tables of two
runs). "auto" takes cpp's, one call for all
experts instead of a loop with a host read of the offsets, where they apply (homogeneous experts, fp32/bf16,
16-byte rows).

## The router by k and E

The C++ router selects k experts in k rounds over E scores (O(k·E) per token); the reference sorts the E scores
once. "auto" takes `cpp` for `k <= max(6, E // 16)`, the reference beyond:

{route_table(route)}

## The layer, forward+backward, on "auto"

"auto" is cpp but for the router at large k (k=16 of E=32 here):

{layer_table(layers)}
"""
    (out / "README.md").write_text(readme)
    print(readme)


if __name__ == "__main__":
    main()
