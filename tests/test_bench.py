"""The benchmark harness on a tiny grid on the CPU: sweeps hold their stated budgets, baselines
compute the same function as our experts, every file is written and the plots open."""
import dataclasses
import json
import math
import random
import subprocess
import sys
import time

import pytest
import torch

from fastmoe_kernels.bench import BenchCase
from fastmoe_kernels.bench.baselines import build_baselines
from fastmoe_kernels.bench.cli import main as bench_main
from fastmoe_kernels.bench import checks, machine
from fastmoe_kernels.bench.grids import build_grid, measured_key
from fastmoe_kernels.bench.plots import color_of
from fastmoe_kernels.bench.report import headline
from fastmoe_kernels.bench.runner import check_sane, read_rows, run_grid
from fastmoe_kernels.bench.timing import Rotation, measure, median_ci, summarize
from fastmoe_kernels.layer import MoELayer
from tolerances import tol


@pytest.mark.parametrize("grid", ["smoke", "quick", "gpu", "full"])
def test_sweeps_hold_their_stated_budgets(grid):
    cases = build_grid(grid)
    base = next(c for c in cases if c.sweep == "base")
    by = lambda s: [c for c in cases if c.sweep == s]
    assert {c.params()["active_params"] - c.d_model * c.num_experts for c in by("experts")} == \
        {base.params()["active_params"] - base.d_model * base.num_experts}
    assert len({c.num_experts * c.d_ff for c in by("top_k")}) == 1
    assert len({c.num_experts * c.d_ff for c in by("expert_size")}) <= 2  # rounding of E to an integer
    gran = by("granularity")
    assert len({c.num_experts * c.d_ff for c in gran}) == 1 and len({c.top_k * c.d_ff for c in gran}) == 1
    assert {c.num_shared_experts * c.shared_d_ff + c.top_k * c.d_ff for c in by("shared") if c.shared_d_ff} == \
        {base.top_k * base.d_ff}
    # Every sweep holds the base point itself; the capacity sweep holds dropless.
    for sweep in ("experts", "top_k", "expert_size", "granularity", "tokens", "d_model", "dtype", "capacity", "shared",
                  "fp8"):
        assert measured_key(base) in {measured_key(c) for c in by(sweep)}, sweep
    # The fp8 sweep is the base and its fp8 twin, nothing else changed.
    assert [c.fp8_recipe for c in by("fp8")] == [None, "blockwise"]
    assert measured_key(by("fp8")[1]) == dataclasses.replace(measured_key(base), fp8_recipe="blockwise")
    assert None in {c.capacity_factor for c in by("capacity")} and any(c.capacity_factor for c in by("capacity"))
    decode = by("decode")
    assert decode and all(c.inference_only and c.tokens <= 256 for c in decode) and min(c.tokens for c in decode) == 1
    if grid in ("gpu", "full"):
        assert base.tokens == 16384 and base.d_model == 2048 and base.d_ff == 768 and base.num_experts == 128
        assert [c.tokens for c in decode][-1] == 256
        shape = lambda c: (c.d_model, c.d_ff, c.num_experts, c.top_k)
        models = {c.label: c for c in by("models")}
        assert set(models) == {"Qwen3-30B-A3B", "OLMoE", "Mixtral-8x7B", "DeepSeek-V3", "gpt-oss-20b",
                               "Mixtral-8x7B fp8", "Qwen3-30B-A3B fp8"}
        for name in ("Mixtral-8x7B", "Qwen3-30B-A3B"):  # the fp8 speed target's shapes, beside their bf16 selves
            twin = models[f"{name} fp8"]
            assert twin.fp8_recipe == "blockwise" and shape(twin) == shape(models[name])
        assert shape(models["Mixtral-8x7B"]) == (4096, 14336, 8, 2) and shape(models["OLMoE"]) == (2048, 1024, 64, 8)
        ds = models["DeepSeek-V3"]
        assert shape(ds) == (7168, 2048, 256, 8) and ds.num_shared_experts == 1 and ds.score_func == "sigmoid"
        assert ds.config().num_groups == 8 and ds.config().topk_groups == 4
        assert shape(models["gpt-oss-20b"]) == (2880, 2880, 32, 4)
        assert all(c.tokens == 16384 and c.dtype == "bfloat16" for c in models.values())
        # The decode sweeps at model shapes: each model's own layer, inference only, from 1 token.
        for sweep, label in (("decode-qwen3", "Qwen3-30B-A3B"), ("decode-mixtral", "Mixtral-8x7B"),
                             ("decode-gpt-oss", "gpt-oss-20b"), ("decode-mixtral-fp8", "Mixtral-8x7B fp8"),
                             ("decode-qwen3-fp8", "Qwen3-30B-A3B fp8")):
            points = by(sweep)
            assert points and all(c.inference_only and c.label == label and shape(c) == shape(models[label])
                                  and c.fp8_recipe == models[label].fp8_recipe for c in points), sweep
            assert min(c.tokens for c in points) == 1 and max(c.tokens for c in points) == (
                512 if grid == "full" else 1 if label.endswith("fp8") else 256)
    else:
        assert not by("models") and not any(c.sweep.startswith("decode-") for c in cases)


def test_every_grid_fits_its_budget_in_targets():
    """The default grids' sizes, so that a grid growing past its time budget is a deliberate change."""
    from fastmoe_kernels.bench.runner import cases_with_ops, planned_targets

    for grid, backends, most in (("quick", ["torch", "cpp"], 600), ("gpu", ["torch", "triton", "cuda"], 1400)):
        cases = build_grid(grid)
        unique = {measured_key(c): c for c in cases}
        ops = cases_with_ops(cases, "base")
        n = sum(planned_targets(c, backends, k in ops, True, 5) for k, c in unique.items())
        assert n <= most, (grid, n)


def test_case_accounting():
    c = BenchCase("base", tokens=10, d_model=8, d_ff=4, num_experts=4, top_k=2)
    assert c.routed_flops() == 6 * 10 * 2 * 8 * 4 and c.routed_flops(True) == 18 * 10 * 2 * 8 * 4
    assert c.params() == {"total_params": 4 * 3 * 8 * 4 + 8 * 4, "active_params": 2 * 3 * 8 * 4 + 8 * 4}
    # A forward's fewest bytes (bf16): 3 touched experts, the router, the tokens in and out; with the fp8
    # recipe the routed weights as the weight cache holds them (1 byte and a 4-byte scale per 128² block).
    always = 8 * 4 + 2 * 10 * 8
    assert c.forward_bytes(3) == (3 * 3 * 8 * 4 + always) * 2
    assert dataclasses.replace(c, fp8_recipe="blockwise").forward_bytes(3) == pytest.approx(
        3 * 3 * 8 * 4 * (1 + 4 / 128 ** 2) + always * 2)


def test_baselines_compute_our_function():
    torch.manual_seed(0)
    layer = MoELayer(d_model=32, d_ff=16, num_experts=6, top_k=2)
    x = torch.randn(40, 32)
    with torch.no_grad():
        route = layer.router(x)
        plan = layer.dispatcher.plan(route.expert_idx, route.weight)
        ours = layer.experts.forward_tokens(x, plan, route.weight)
        baselines = build_baselines(layer.experts, x, route.expert_idx, route.weight)
        ran = 0
        for name, fn in baselines.items():
            if callable(fn):
                torch.testing.assert_close(fn(x, route.expert_idx, route.weight), ours, **tol(torch.float32))
                ran += 1
    assert ran >= 4  # naive loop, torch._grouped_mm, hf eager / batched_mm / grouped_mm


def test_timing_medians_and_rotation():
    calls = []
    rot = Rotation(lambda i: i, 3)
    t = measure(lambda: calls.append(rot.next()), torch.device("cpu"), warmup=2, min_reps=5, max_reps=5)
    assert t.reps == 5 and t.median_ms >= 0 and t.p20_ms <= t.median_ms <= t.p80_ms
    assert t.ci_low_ms <= t.median_ms <= t.ci_high_ms
    assert calls == [0, 1, 2, 0, 1, 2, 0]


def test_median_confidence_interval_from_order_statistics():
    values = list(range(1, 101))  # n = 100: P(X ≤ 39) = 1.8% ≤ 2.5% < P(X ≤ 40) → the 40th and the 61st values
    assert median_ci(values) == (40, 61)
    assert median_ci(list(range(1, 9))) == (1, 8) and median_ci(list(range(1, 10))) == (2, 8)  # n=9: P(X≤1) = 2%
    assert median_ci([1, 2, 3]) == (1, 3)
    assert all(math.isnan(v) for v in median_ci([3.0, 1.0]))  # two runs bound nothing
    one = summarize([5.0], target_rel_ci=0.05)
    assert one.ci_rel == math.inf and not one.converged
    t = summarize([10.0] * 8, target_rel_ci=0.01)
    assert t.ci_rel == 0 and t.converged and t.spread == 1


def test_measure_repeats_until_the_interval_is_narrow_or_the_cap():
    steady = measure(lambda: None, torch.device("cpu"), warmup=0, min_reps=5, target_rel_ci=10.0)
    assert steady.reps == 5 and steady.converged
    rng = random.Random(0)
    noisy = lambda: time.sleep(rng.choice([0.001, 0.004]))
    capped = measure(noisy, torch.device("cpu"), warmup=0, min_reps=5, target_rel_ci=1e-6, max_seconds=0.15)
    assert not capped.converged and 5 <= capped.reps < 150
    slow = measure(lambda: time.sleep(0.05), torch.device("cpu"), warmup=1, min_reps=5, max_seconds=0.01)
    assert slow.reps == 1  # the warm-up alone exceeded the cap: one timed run, and it says so
    assert not slow.converged


def test_budget_spreads_what_is_left_over_what_is_left(monkeypatch):
    from fastmoe_kernels.bench import runner

    now = [100.0]
    monkeypatch.setattr(runner.time, "perf_counter", lambda: now[0])
    budget = runner.Budget(60.0, targets=30, cap=5.0, floor=0.2)
    assert budget.next_cap() == 4.0  # twice the share: most targets stop early, on their interval
    now[0] += 50.0
    budget.done(10)
    assert budget.next_cap() == 1.0
    budget.replan(+30)  # a case had more targets than planned
    assert budget.next_cap() == pytest.approx(20 / 50)
    now[0] += 100.0  # past the deadline: the floor still lets every target run
    assert budget.next_cap() == 0.2
    assert runner.Budget(None, 10, cap=4.0).next_cap() == 4.0


def test_harness_writes_every_file_and_plots_open(tmp_path):
    import matplotlib.image as mpimg

    out = tmp_path / "bench"
    assert bench_main(["--grid", "smoke", "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    sweeps = ["experts", "top_k", "expert_size", "granularity", "tokens", "d_model", "dtype", "capacity", "shared",
              "decode"]
    for name in ["results.csv", "results.json", "report.md", "skipped.json", "ops_breakdown.png"] + \
            [f"sweep_{s}.png" for s in sweeps]:
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        image = mpimg.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100
    rows = read_rows(out / "results.csv")
    assert rows and {"device", "torch", "triton", "cuda", "date", "cores", "median_ms", "p20_ms", "p80_ms", "ci_low_ms",
                     "ci_high_ms", "converged", "threads", "others_load", "flags", "dense_ratio"} <= set(rows[0])
    assert json.loads((out / "results.json").read_text())[0]["case"] == rows[0]["case"]
    ops = {r["op"] for r in rows}
    assert {"layer", "experts", "route", "plan", "permute", "grouped_up", "grouped_down", "unpermute",
            "dense_gemm", "copy"} <= ops
    impls = {r["impl"] for r in rows}
    assert {"torch", "naive-loop", "hf-eager", "dense"} <= impls
    report = (out / "report.md").read_text()
    assert "Headline" in report and "![sweep_experts]" in report and "Skipped" in report and "p20–p80" in report
    assert report.index("## What each configuration costs") < report.index("## Headline")  # the answer first
    for sweep in sweeps:
        assert f"### {sweep}:" in report and f"### Sweep: {sweep}" in report, sweep
    assert "dropless (base)" in report and "### What this means for the design rules" in report
    # The base point is reported in every sweep it belongs to, dropless among the capacity points.
    base = next(r["case"] for r in rows if r["sweep"] == "base")
    assert {r["sweep"] for r in rows if r["case"] == base} >= {"base", "tokens", "d_model", "capacity", "dtype", "shared"}
    decode = [r for r in rows if r["sweep"] == "decode"]
    assert {r["mode"] for r in decode} == {"fwd"} and all(r["gbps"] for r in decode if r["op"] in ("layer", "copy"))
    assert any(r["dense_ratio"] for r in decode if r["op"] == "layer")  # against the copy
    assert all(r["dense_ratio"] is None or 0 < r["dense_ratio"] < 10 for r in rows if r["sweep"] != "decode")
    assert all(r["threads"] >= 1 for r in rows)
    # The report command redraws everything from the results file alone.
    redrawn = tmp_path / "redrawn"
    assert bench_main(["--from-results", str(out / "results.csv"), "--out", str(redrawn)]) == 0
    assert (redrawn / "report.md").read_text().count("|") > 20 and (redrawn / "sweep_experts.png").is_file()


def test_run_grid_rows_are_sane_and_deduplicated():
    cases = [c for c in build_grid("smoke") if c.sweep in ("base", "experts")]
    rows = run_grid(cases, torch.device("cpu"), backends=["torch"], effort="smoke", ops="none",
                    with_baselines=False, progress_bar=False, log=lambda m: None)
    assert not check_sane(rows)
    table = headline(rows)
    assert [t["impl"] for t in table if t["op"] == "layer"] == ["torch"]
    assert all(math.isfinite(r.median_ms) for r in rows)


# ---- the machine's load and the thread count ---------------------------------------------------------


def _busy_child():
    return subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 30\nwhile time.time() < end: pass"])


@pytest.mark.skipif(machine.snapshot() is None, reason="needs /proc/stat (Linux)")
def test_a_busy_process_is_seen_and_costs_us_a_thread():
    child = _busy_child()
    try:
        time.sleep(0.3)
        others = machine.sample_others(0.5)
        assert others is not None and others >= 0.6  # one core spinning (more if the machine is busy anyway)
        threads = machine.choose_threads("auto", torch.device("cpu"), others)
        assert threads <= max(1, machine.usable_cores() - 1)
    finally:
        child.kill()
        child.wait()


def test_load_arithmetic_and_thread_choice(monkeypatch):
    start = machine.CpuSnapshot(busy_s=10.0, own_s=1.0, wall_s=0.0)
    end = machine.CpuSnapshot(busy_s=13.0, own_s=2.0, wall_s=1.0)  # 3 busy core-seconds, 1 of them ours
    assert machine.others_busy_cores(start, end) == pytest.approx(2.0)
    assert machine.others_busy_cores(start, start) is None and machine.others_busy_cores(None, end) is None
    monkeypatch.setattr(machine, "usable_cores", lambda: 4)
    assert machine.free_cores(0.0) == 4 and machine.free_cores(1.1) == 3 and machine.free_cores(1.3) == 2
    assert machine.free_cores(9.0) == 1  # a core busy for more than a fifth of the time counts as busy
    assert machine.free_cores(None) == 1  # load unknown: one thread
    cpu = torch.device("cpu")
    assert machine.choose_threads("auto", cpu, 0.05) == 4 and machine.choose_threads("3", cpu, 9.0) == 3
    for bad in ("0", "-1", "many"):
        with pytest.raises(ValueError, match="threads"):
            machine.choose_threads(bad, cpu, 0.0)
    assert machine.oversubscribed(1.7, 3) and not machine.oversubscribed(1.0, 3)


def test_thread_guard_lowers_threads_when_the_machine_gets_busy(monkeypatch):
    from fastmoe_kernels.bench.runner import ThreadGuard

    before = torch.get_num_threads()
    monkeypatch.setattr(machine, "usable_cores", lambda: 2)
    monkeypatch.setattr(machine, "sample_others", lambda window=0.5: 0.0)
    messages = []
    try:
        guard = ThreadGuard(torch.device("cpu"), "auto", messages.append)
        assert guard.threads == 2 and torch.get_num_threads() == 2
        assert not guard.loaded(0.3) and guard.loaded(1.2)
        assert guard.lower(1.2) and guard.threads == 1 and torch.get_num_threads() == 1
        assert "2 → 1 threads" in messages[-1]
        assert not guard.lower(1.9)  # one thread is the floor: the point is flagged instead
        fixed = ThreadGuard(torch.device("cpu"), "2", messages.append)
        assert not fixed.lower(1.5) and fixed.threads == 2  # an explicit count is the user's call
    finally:
        torch.set_num_threads(before)


# ---- consistency checks --------------------------------------------------------------------------------


def _row(**kw):
    row = dict(sweep="base", case="c", op="layer", impl="torch", mode="fwd+bwd", median_ms=10.0, p20_ms=9.9,
               p80_ms=10.1, ci_low_ms=9.95, ci_high_ms=10.05, reps=10, converged=True, threads=1, others_load=0.0,
               device="CPU (x)", cores="2", tokens=64, d_model=64, top_k=2, flags="")
    row.update(kw)
    return row


def test_consistent_rows_raise_no_flag():
    rows = [_row(mode="fwd", median_ms=4.0, p20_ms=3.9, p80_ms=4.1, ci_low_ms=3.95, ci_high_ms=4.05), _row(),
            _row(op="experts", median_ms=9.0, p20_ms=8.9, p80_ms=9.1, ci_low_ms=8.95, ci_high_ms=9.05)]
    rows += [_row(sweep="tokens", case=f"t{t}", tokens=t, median_ms=t / 10, p20_ms=t / 10, p80_ms=t / 10,
                  ci_low_ms=t / 10, ci_high_ms=t / 10) for t in (32, 64, 128)]
    assert checks.flag_rows(rows) == [] and all(r["flags"] == "" for r in rows)


def test_every_impossible_or_untrustworthy_point_is_flagged():
    fwd = _row(mode="fwd", median_ms=30.0, p20_ms=29.0, p80_ms=31.0, ci_low_ms=29.5, ci_high_ms=30.5)  # > fwd+bwd
    bwd = _row()
    experts = _row(op="experts", median_ms=20.0, p20_ms=19.0, p80_ms=21.0, ci_low_ms=19.5, ci_high_ms=20.5)
    wide = _row(case="w", p20_ms=5.0, p80_ms=20.0)
    loaded = _row(case="l", threads=2, others_load=1.2)
    unconverged = _row(case="u", converged=False, ci_low_ms=8.0, ci_high_ms=12.5)
    tokens = [_row(sweep="tokens", case=f"t{t}", tokens=t, median_ms=m, p20_ms=m, p80_ms=m, ci_low_ms=m, ci_high_ms=m)
              for t, m in ((32, 5.0), (64, 10.0), (128, 4.0))]
    jumps = [_row(sweep="d_model", case=f"d{d}", d_model=d, impl=impl, median_ms=m, p20_ms=m, p80_ms=m, ci_low_ms=m,
                  ci_high_ms=m)
             for d, torch_ms, cpp_ms in ((32, 10.0, 8.0), (64, 20.0, 16.0), (128, 40.0, 33.0), (256, 80.0, 900.0))
             for impl, m in (("torch", torch_ms), ("cpp", cpp_ms))]
    rows = [fwd, bwd, experts, wide, loaded, unconverged] + tokens + jumps
    lines = checks.flag_rows(rows)
    assert "fwd > fwd+bwd" in fwd["flags"] and "fwd > fwd+bwd" in bwd["flags"]
    assert "layer < experts" in bwd["flags"]
    assert "wide spread" in wide["flags"] and "loaded" in loaded["flags"] and "imprecise (median ±22%)" in unconverged["flags"]
    assert "not monotonic" in tokens[2]["flags"] and not tokens[1]["flags"]
    assert "jump" in jumps[-1]["flags"] and not any(r["flags"] for r in jumps[:-1])
    assert len(lines) == sum(1 for r in rows if r["flags"])
    # Noise alone does not flag: overlapping intervals, or a gap inside the margin.
    close = [_row(mode="fwd", median_ms=10.2, ci_low_ms=9.9, ci_high_ms=10.4), _row()]
    assert checks.flag_rows(close) == []


def test_each_implementation_keeps_one_colour():
    known = ["torch", "triton", "triton-unfused", "triton-fused", "cuda", "cuda-unfused", "cpp", "naive-loop", "torch._grouped_mm", "hf-eager",
             "hf-batched_mm", "hf-grouped_mm", "dense"]
    assert len({color_of(i) for i in known}) == len(known)
    assert color_of("hf-some-new-kernel") == color_of("hf-some-new-kernel")


def test_backend_variants_share_the_reference_weights():
    from fastmoe_kernels.bench.targets import _shared_variant

    reference = MoELayer(d_model=16, d_ff=8, num_experts=4, top_k=2)
    variant = _shared_variant(reference, "cpp", False)
    assert variant.backend == "cpp" and variant.config.fused_experts is False
    assert reference.backend != "cpp" and reference.config.fused_experts is None
    assert all(a is b for a, b in zip(reference.parameters(), variant.parameters()))
    x = torch.randn(8, 16)
    torch.testing.assert_close(variant(x), reference(x), **tol(torch.float32))


def test_pytest_benchmarks_report_every_sweep_with_ratios(tmp_path):
    """The pytest suite's own report path: rows under every sweep of their configuration, roofline
    ratios, flags, one pass per case."""
    out = tmp_path / "pb"
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "--grid", "smoke", "--benchmark-disable", "-q", "-p",
           "no:cacheprovider", "--bench-out", str(out), "-k", "base or capacity or decode"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = read_rows(out / "results.csv")
    base = next(r["case"] for r in rows if r["sweep"] == "base")
    assert {"base", "capacity"} <= {r["sweep"] for r in rows if r["case"] == base}
    assert any(r["dense_ratio"] for r in rows if r["op"] == "layer")
    assert any(r["dense_ratio"] for r in rows if r["sweep"] == "decode" and r["op"] == "layer")
    assert "flags" in rows[0] and (out / "report.md").is_file()


def test_flags_land_on_every_sweep_copy_and_skip_what_does_not_scale():
    fwd = _row(mode="fwd", median_ms=30.0, p20_ms=29.0, p80_ms=31.0, ci_low_ms=29.5, ci_high_ms=30.5)
    rows = [dict(fwd, sweep=s) for s in ("base", "tokens")] + [dict(_row(), sweep=s) for s in ("base", "tokens")]
    checks.flag_rows(rows)
    assert all("fwd > fwd+bwd" in r["flags"] for r in rows)  # the base point's copy in each sweep
    flat = [_row(sweep=sweep, op=op, case=f"c{x}", tokens=x, d_model=x, num_experts=8, median_ms=m, p20_ms=m,
                 p80_ms=m, ci_low_ms=m, ci_high_ms=m, impl=impl)
            for sweep in ("decode", "experts") for op in ("copy", "route")
            for x, m in ((1, 5.0), (8, 2.0), (64, 5.0), (256, 5.0)) for impl in ("dense", "torch", "cpp")]
    assert checks.flag_rows(flat) == []  # route/copy need not grow; E-varying sweeps have no jump check


def test_a_case_that_does_not_fit_is_skipped_and_the_run_goes_on(monkeypatch):
    from fastmoe_kernels.bench import runner

    real = runner.build_targets
    cases = [c for c in build_grid("smoke") if c.sweep in ("base", "experts")]

    def build(case, *args, **kwargs):
        if case.num_experts == 16:
            raise MemoryError("pretend: out of device memory")
        return real(case, *args, **kwargs)

    monkeypatch.setattr(runner, "build_targets", build)
    messages = []
    rows = run_grid(cases, torch.device("cpu"), backends=["torch"], effort="smoke", ops="none", with_baselines=False,
                    progress_bar=False, log=messages.append)
    assert rows and all(r.num_experts != 16 for r in rows)
    assert any("E16" in m and "out of memory" in m for m in messages)


def test_training_targets_drop_their_gradients_and_baselines_hold_no_weight_copy():
    from fastmoe_kernels.bench.targets import build_targets

    case = next(c for c in build_grid("smoke") if c.sweep == "base")
    targets = build_targets(case, torch.device("cpu"), ["torch"], with_ops=True, with_baselines=True)
    for t in targets:
        if t.mode == "fwd+bwd":
            t.run()
    layer = next(t for t in targets if t.op == "layer" and t.mode == "fwd+bwd")
    params = [c.cell_contents for c in layer.run.__closure__ if isinstance(c.cell_contents, list)][0]
    assert params and all(p.grad is None for p in params)
    reference = MoELayer(case.config())
    from fastmoe_kernels.bench.baselines import HFExperts

    hf = HFExperts(reference.experts, "eager")
    assert hf.module.gate_up_proj is reference.experts.w_up and hf.module.down_proj is reference.experts.w_down


def test_gpu_grid_estimate_stays_within_the_stated_15_minutes():
    from fastmoe_kernels.bench.estimate import GpuModel, estimate_seconds, main

    est = estimate_seconds("gpu", ops="all")
    assert est["cases"] == len({measured_key(c) for c in build_grid("gpu")}) and est["seconds"] < 15 * 60
    slower = estimate_seconds("gpu", GpuModel(tflops=100.0), ops="all")
    assert slower["seconds"] > est["seconds"]  # the model responds to the rate it assumes
    assert main(["--grid", "gpu", "--pytest"]) == 0


def test_planned_target_counts_match_what_is_built():
    """planned_targets (the budget's and the progress bar's count) is build_targets' twin: keep them equal."""
    from fastmoe_kernels.bench.runner import planned_targets
    from fastmoe_kernels.bench.targets import build_targets

    for case in {measured_key(c): c for c in build_grid("smoke")}.values():
        for with_ops in (False, True):
            built = build_targets(case, torch.device("cpu"), ["torch", "cpp"], with_ops=with_ops, with_baselines=False)
            assert len(built) == planned_targets(case, ["torch", "cpp"], with_ops, False, 0), (case.name, with_ops)


def test_the_model_shapes_are_graphed_once_and_their_graphs_need_a_gpu():
    """The triton layer replayed from CUDA graphs is timed at the model shapes (wherever that
    configuration appears: the GPU base is Qwen3's layer), in the modes its graphs can hold; on a
    machine without the triton backend's GPU path it is skipped with its reason, and the planned count
    stays build_targets' twin."""
    from fastmoe_kernels.bench.runner import planned_targets
    from fastmoe_kernels.bench.sweeps import GRAPHED_IMPL
    from fastmoe_kernels.bench.targets import build_targets

    cases = build_grid("gpu")
    base = next(c for c in cases if c.sweep == "base")
    models = {c.label: c for c in cases if c.sweep == "models"}
    assert base.graphed and measured_key(base) == measured_key(models["Qwen3-30B-A3B"])
    assert len({measured_key(c) for c in cases}) == len({dataclasses.replace(measured_key(c), graphed=False)
                                                         for c in cases})  # no configuration measured twice
    assert models["Mixtral-8x7B"].graphed_modes() == ("fwd", "fwd+bwd")
    assert models["DeepSeek-V3"].graphed_modes() == ("fwd",)  # 22.5 GB of experts: no second copy of a step
    assert models["Mixtral-8x7B fp8"].graphed_modes() == ()
    assert all(c.graphed_modes() == (() if c.fp8_recipe else ("fwd",)) for c in cases if c.sweep.startswith("decode-"))
    assert not any(c.graphed for c in build_grid("quick"))
    tiny = dataclasses.replace(next(c for c in build_grid("smoke") if c.sweep == "base"), graphed=True)
    skips = {}
    built = build_targets(tiny, torch.device("cpu"), ["torch", "cpp"], with_ops=False, with_baselines=False,
                          skips=skips)
    assert not any(t.impl == GRAPHED_IMPL for t in built) and "need a GPU" in skips[GRAPHED_IMPL]
    assert len(built) == planned_targets(tiny, ["torch", "cpp"], False, False, 0)
    assert planned_targets(tiny, ["triton"], False, False, 0) == planned_targets(
        dataclasses.replace(tiny, graphed=False), ["triton"], False, False, 0) + 2
