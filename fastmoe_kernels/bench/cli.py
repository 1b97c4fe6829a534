"""``fastmoe-bench``: measure what each MoE configuration costs on this machine.

Runs the sweeps on the device present (the "gpu" grid on a GPU, within 15 minutes on an H100; the
"quick" grid on a CPU, within 5 minutes on 2 idle cores), with a progress bar and its ETA, and
writes results.csv / results.json, the plots, and report.md to ``--out``; then prints the headline
table. The time budget spreads the remaining time over the remaining targets; ``--grid full`` is
the long GPU grid and has none. ``--from-results FILE`` is the report command: it measures nothing and
redraws the plots and report of an existing results file (e.g. one copied back from a GPU run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
from typing import Dict, List, Optional

import torch

from .._checks import set_value_checks
from .checks import flag_rows
from .grids import GRIDS, build_grid, default_grid
from .report import HEADLINE_COLUMNS, as_dicts, format_table, headline, markdown, plot_all
from .runner import EFFORT, OPS_POLICIES, PartialWriter, check_sane, run_grid, write_rows


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastmoe-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=GRIDS, default=None,
                   help="smoke (seconds), quick (the CPU default, ≤ 5 min), gpu (the GPU default, ≤ 15 min) or full "
                        "(the long GPU grid, unbounded)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="output folder (default: fastmoe-bench-out/<date>)")
    p.add_argument("--backends", default=None, help="comma-separated subset of torch,triton,cuda,cpp")
    p.add_argument("--sweeps", default=None, help="comma-separated sweeps to run (default: all)")
    p.add_argument("--ops", choices=OPS_POLICIES, default="base",
                   help="per-op breakdown: on the base case and the model shapes (default), every case, or none")
    p.add_argument("--no-ops", action="store_true", help="the same as --ops none")
    p.add_argument("--threads", default="auto",
                   help="CPU threads: auto (one per core no other process is using, measured at the start and "
                        "lowered if the machine gets busy) or a number")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="time budget of the run (default: the grid's — 4.5 min quick, 14 min gpu; none for full)")
    p.add_argument("--case-order", default=None, metavar="LABELS",
                   help="comma-separated model labels measured first, in this order (a budget cut keeps them)")
    p.add_argument("--no-baselines", action="store_true", help="skip the baselines")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--tune", nargs="?", const="", default=None, metavar="PATH",
                   help="write this device's tuning table from the run (default PATH: the package's "
                        "fastmoe_kernels/tuned/<device>.json): the autotuned tiles, and per layer shape whether the "
                        "fused kernels or a composition (and which GEMM backend) was fastest")
    p.add_argument("--from-results", metavar="FILE", default=None,
                   help="measure nothing: redraw the plots and report.md of an existing results.csv/.json into --out")
    return p.parse_args(argv)


def report_only(path: str, out: pathlib.Path) -> int:
    """The report command: plots, report.md and the headline table of an existing results file."""
    from .runner import read_rows

    rows = read_rows(pathlib.Path(path))
    if not rows:
        print(f"fastmoe-bench: no rows in {path}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    skipped_file = pathlib.Path(path).with_name("skipped.json")
    skipped = json.loads(skipped_file.read_text()) if skipped_file.is_file() else {}
    plots = plot_all(rows, out)
    (out / "report.md").write_text(markdown(rows, plots, skipped, out))
    print(format_table(headline(rows), HEADLINE_COLUMNS))
    print(f"\nwrote {out / 'report.md'} and {len(plots)} plots")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.from_results:
        return report_only(args.from_results, pathlib.Path(args.out or pathlib.Path(args.from_results).parent))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    grid = args.grid or default_grid(device.type)
    out = pathlib.Path(args.out or f"fastmoe-bench-out/{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    cases = build_grid(grid)
    if args.sweeps:
        wanted = set(args.sweeps.split(",")) | {"base"}
        cases = [c for c in cases if c.sweep in wanted]
    if args.case_order:
        first = args.case_order.split(",")
        cases.sort(key=lambda c: first.index(c.label) if c.label in first else len(first))  # stable: the rest as built
    skipped: Dict[str, str] = {}

    def log(message: str) -> None:
        print(message, file=sys.stderr)
        if message.startswith("skip"):
            name, _, why = message.partition(": ")
            skipped[name.replace("skipping backend ", "backend ").replace("skipped ", "")] = why

    budget = EFFORT[grid]["budget_s"] if args.budget_minutes is None else args.budget_minutes * 60
    print(f"fastmoe-bench: {len(cases)} cases ({grid} grid) on {device}"
          + (f", budget {budget / 60:.1f} min" if budget else "") + f"; writing to {out}", file=sys.stderr)
    partial = PartialWriter(out)
    set_value_checks(False)  # value checks synchronise the device; production runs turn them off too
    try:
        rows = run_grid(cases, device, backends=args.backends.split(",") if args.backends else None, effort=grid,
                        ops="none" if args.no_ops else args.ops, with_baselines=not args.no_baselines,
                        threads=args.threads, budget_s=budget, progress_bar=not args.quiet, log=log, on_row=partial)
    finally:
        set_value_checks(None)
    problems = check_sane(rows)
    table = as_dicts(rows)
    flagged = flag_rows(table)
    paths = write_rows(table, out)
    partial.finish()
    plots = [] if args.no_plots else plot_all(table, out)
    (out / "report.md").write_text(markdown(table, plots, skipped, out))
    (out / "skipped.json").write_text(json.dumps(skipped, indent=1))
    print()
    print(f"Headline — base case, forward+backward, {table[0]['device'] if table else device}:")
    print(format_table(headline(table), HEADLINE_COLUMNS))
    print(f"\nwrote {paths['csv']}, {paths['json']}, {out / 'report.md'} and {len(plots)} plots")
    if args.tune is not None:
        from .tune import write_table
        from ..tuning import device_name

        tuned = write_table(table, pathlib.Path(args.tune) if args.tune else None, device_name(device),
                            source=str(out))
        print(f"wrote the tuning table {tuned}")
    if flagged:
        print(f"{len(flagged)} points flagged by the consistency checks (see report.md, 'Suspect points')",
              file=sys.stderr)
    if problems:
        print("implausible numbers:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
