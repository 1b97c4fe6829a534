"""One benchmark test: time a target with pytest-benchmark (or run it once when benchmarking is
disabled), record a tidy row, and check that the numbers are sane."""
from __future__ import annotations

import math

import pytest

from fastmoe_kernels.bench.env import environment
from fastmoe_kernels.bench.runner import EFFORT, ResultRow, check_sane
from fastmoe_kernels.bench.timing import Timing, measure, synchronize


def run_target(benchmark, bench_session, target_key):
    case, op, impl, mode = target_key
    target = bench_session.target(case, op, impl, mode)
    if target is None:
        pytest.skip(f"{impl}: {bench_session.why_missing(impl)}")
    device = bench_session.device
    if benchmark.disabled:
        timing = measure(target.run, device, warmup=0, reps=1)
    else:
        warmup, reps, _ = EFFORT[bench_session.grid]

        def synced():
            target.run()
            synchronize(device)

        benchmark.pedantic(synced, rounds=reps, warmup_rounds=warmup, iterations=1)
        stats = benchmark.stats.stats
        timing = Timing(stats.median * 1e3, stats.q1 * 1e3, stats.q3 * 1e3, stats.rounds)
        benchmark.extra_info.update(case=case.name, op=op, impl=impl, mode=mode)
    seconds = timing.median_ms / 1e3
    row = ResultRow(
        **{k: v for k, v in case.as_dict().items() if k in ResultRow.__dataclass_fields__},
        op=op, impl=impl, mode=mode, median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
        reps=timing.reps, tflops=target.flops / seconds / 1e12 if target.flops else None,
        gbps=target.bytes / seconds / 1e9 if target.bytes else None, peak_mem_mb=None,
        env=environment(device),
    )
    bench_session.rows.append(row)
    problems = check_sane([row])
    assert not problems, problems
    assert math.isfinite(row.median_ms)
    return row
