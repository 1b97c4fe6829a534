"""One benchmark test: time a target with pytest-benchmark (or run it once when benchmarking is
disabled), record a tidy row, and check that the numbers are sane.

pytest-benchmark takes a fixed number of rounds, so the rounds come from a pilot: three runs
(which are also the warm-up) estimate the spread, and the rounds are what the median's confidence
interval needs to reach the grid's target (the boxplot-notch rule: half-width ≈ 1.57·IQR/√n),
within the time this target may take. The row's interval is then computed from the samples
pytest-benchmark took, and says whether the target was met.
"""
from __future__ import annotations

import math

import pytest

from fastmoe_kernels.bench import machine
from fastmoe_kernels.bench.runner import EFFORT, check_sane, make_row
from fastmoe_kernels.bench.timing import measure, summarize, synchronize

PILOT = 3
MIN_TOTAL = 9


def planned_rounds(pilot, target_rel_ci: float, min_reps: int, cap_s) -> int:
    iqr = 0.8 * (pilot.p80_ms - pilot.p20_ms)  # p20–p80 spans 60% of the samples, the IQR 50%
    # Twice the notch rule's count: three runs underestimate a spread more often than not.
    wanted = 2 * (1.57 * iqr / (target_rel_ci * pilot.median_ms)) ** 2 if pilot.median_ms > 0 else min_reps
    wanted = max(wanted, MIN_TOTAL - PILOT)  # below 9 samples the exact interval is the whole range
    affordable = math.inf if cap_s is None else cap_s * 1e3 / max(pilot.median_ms, 1e-3)
    return int(max(min(min_reps, max(1, affordable)), min(wanted, affordable, 200), 1))


def run_target(benchmark, bench_session, target_key):
    case, op, impl, mode = target_key
    target = bench_session.target(case, op, impl, mode)
    if target is None:
        bench_session.budget.done()
        pytest.skip(f"{impl}: {bench_session.why_missing(impl)}")
    device = bench_session.device
    effort = EFFORT[bench_session.grid]
    threads = bench_session.guard.threads
    bench_session.guard.observe()
    if benchmark.disabled:
        timing = measure(target.run, device, warmup=0, min_reps=1, max_reps=1)
    else:
        def synced():
            target.run()
            synchronize(device)

        cap = bench_session.budget.next_cap()
        # At least one warm-up of its own: the first call compiles and autotunes, and a pilot that
        # caught it would plan the rounds from a spread that is not the kernel's.
        for _ in range(max(1, effort["warmup"] - PILOT)):
            synced()
        pilot = measure(target.run, device, warmup=0, min_reps=PILOT, max_reps=PILOT)
        rounds = planned_rounds(pilot, effort["target_rel_ci"], effort["min_reps"], cap)
        benchmark.pedantic(synced, rounds=rounds, warmup_rounds=0, iterations=1)
        # The pilot ran after the warm-up: its samples count too.
        timing = summarize(pilot.samples + [s * 1e3 for s in benchmark.stats.stats.data], effort["target_rel_ci"])
        benchmark.extra_info.update(case=case.name, op=op, impl=impl, mode=mode, ci_low_ms=timing.ci_low_ms,
                                    ci_high_ms=timing.ci_high_ms, threads=bench_session.guard.threads)
    others = bench_session.guard.observe()
    if bench_session.guard.loaded(others):
        bench_session.guard.lower(others)  # later targets run with fewer threads; this one is flagged
    row = make_row(case, target, timing, threads=threads, others_load=others, peak_mem_mb=None,
                   env=bench_session.env)
    bench_session.record(row, target)
    problems = check_sane([row])
    assert not problems, problems
    assert math.isfinite(row.median_ms)
    return row
