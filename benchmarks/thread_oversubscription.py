"""Why `fastmoe-bench` picks its CPU threads: the base-case torch layer (forward+backward) timed with
1 and 2 threads, on an idle machine and beside another 2-thread torch job, each in a fresh process;
and once after the same process ran every target (ops and baselines included) of six other cases.

    python benchmarks/thread_oversubscription.py --out benchmarks/results/<dir>

Writes README.md with the table (median and p20–p80 in ms). Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import subprocess
import sys
import time

TIME_ONE = r"""
import sys, torch
from fastmoe_kernels._checks import set_value_checks
from fastmoe_kernels.bench.grids import build_grid
from fastmoe_kernels.bench.targets import build_targets
from fastmoe_kernels.bench.timing import measure
torch.set_num_threads(int(sys.argv[1]))
set_value_checks(False)
case = build_grid("quick")[0]
cpu = torch.device("cpu")
target = next(t for t in build_targets(case, cpu, ["torch"], with_ops=False, with_baselines=False)
              if t.op == "layer" and t.mode == "fwd+bwd")
if len(sys.argv) > 2:  # first leave behind whatever state every target of six other cases leaves
    for other in [c for c in build_grid("quick") if c.sweep in ("experts", "d_model", "dtype") and c != case]:
        for t in build_targets(other, cpu, ["torch", "cpp"], with_ops=True, with_baselines=True):
            t.run()
m = measure(target.run, cpu, warmup=1, min_reps=9, max_reps=9)
print(f"{m.median_ms:.1f} {m.p20_ms:.1f} {m.p80_ms:.1f}")
"""

COMPETITOR = r"""
import time, torch
torch.set_num_threads(2)
a = torch.randn(256, 256)
end = time.time() + 120
while time.time() < end:
    for _ in range(50):
        a = torch.tanh(a @ a * 0.01)
"""


def time_layer(threads: int, after_other_cases: bool = False) -> str:
    argv = [sys.executable, "-c", TIME_ONE, str(threads)] + (["after"] if after_other_cases else [])
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    median, p20, p80 = out.stdout.split()
    return f"{median} ({p20}–{p80})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = []
    for load in ("idle", "beside a 2-thread torch job"):
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR]) if load != "idle" else None
        try:
            if competitor:
                time.sleep(2)
            # Beside another job the slowdown is bimodal (the two processes' barriers fall into step or
            # not): three fresh processes each.
            repeats = 1 if competitor is None else 3
            rows.append((load, "; ".join(time_layer(1) for _ in range(repeats)),
                         "; ".join(time_layer(2) for _ in range(repeats))))
        finally:
            if competitor:
                competitor.kill()
                competitor.wait()
    rows.append(("idle, after every target of six other cases in the same process", "–", time_layer(2, True)))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    table = "\n".join(f"| {load} | {one} | {two} |" for load, one, two in rows)
    (out / "README.md").write_text(f"""# CPU threads against another job: why `fastmoe-bench` takes one thread per free core

Measured {datetime.date.today()} on {platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}, by
`python benchmarks/thread_oversubscription.py --out {out}`: the quick grid's base case (T=1024, d=256,
f=128, E=32, k=4, fp32), torch layer forward+backward, each timing in a fresh process (1 warm-up, 9 runs,
median and p20–p80 in ms; three processes each beside the other job).

| machine | 1 thread | 2 threads |
|---|---|---|
{table}

State left by earlier cases does not slow a case (last row); another process on our cores does:
torch's CPU kernels are OpenMP parallel regions whose threads wait for each other at every barrier; when
another process holds a core, the displaced thread stalls every barrier until the scheduler runs it again.
With no more threads than free cores nothing waits that way, so `--threads auto` takes one thread per
free core and lowers the count when the load monitor sees other processes take cores mid-run.
""")
    print((out / "README.md").read_text())


if __name__ == "__main__":
    main()
