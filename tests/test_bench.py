"""The benchmark harness on a tiny grid on the CPU: sweeps hold their stated budgets, baselines
compute the same function as our experts, every file is written and the plots open."""
import json
import math

import pytest
import torch

from fastmoe_kernels.bench import BenchCase
from fastmoe_kernels.bench.baselines import build_baselines
from fastmoe_kernels.bench.cli import main as bench_main
from fastmoe_kernels.bench.grids import build_grid
from fastmoe_kernels.bench.report import headline
from fastmoe_kernels.bench.runner import check_sane, read_rows, run_grid
from fastmoe_kernels.bench.timing import Rotation, measure
from fastmoe_kernels.layer import MoELayer
from tolerances import tol


@pytest.mark.parametrize("grid", ["smoke", "quick", "full"])
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
    assert any(c.capacity_factor for c in by("capacity")) and any(c.num_shared_experts for c in by("shared"))
    if grid == "full":
        assert any(c.tokens == 16384 and c.d_model == 2048 and c.d_ff == 768 and c.num_experts == 128 and c.top_k == 8
                   for c in cases)


def test_case_accounting():
    c = BenchCase("base", tokens=10, d_model=8, d_ff=4, num_experts=4, top_k=2)
    assert c.routed_flops() == 6 * 10 * 2 * 8 * 4 and c.routed_flops(True) == 18 * 10 * 2 * 8 * 4
    assert c.params() == {"total_params": 4 * 3 * 8 * 4 + 8 * 4, "active_params": 2 * 3 * 8 * 4 + 8 * 4}


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
    t = measure(lambda: calls.append(rot.next()), torch.device("cpu"), warmup=2, reps=5)
    assert t.reps == 5 and t.median_ms >= 0 and t.p20_ms <= t.median_ms <= t.p80_ms
    assert calls == [0, 1, 2, 0, 1, 2, 0]


def test_harness_writes_every_file_and_plots_open(tmp_path):
    import matplotlib.image as mpimg

    out = tmp_path / "bench"
    assert bench_main(["--grid", "smoke", "--device", "cpu", "--out", str(out), "--quiet", "--sweeps",
                       "experts,top_k,capacity"]) == 0
    for name in ("results.csv", "results.json", "report.md", "skipped.json", "ops_breakdown.png", "sweep_experts.png",
                 "sweep_top_k.png", "sweep_capacity.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        image = mpimg.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100
    rows = read_rows(out / "results.csv")
    assert rows and {"device", "torch", "triton", "cuda", "date", "median_ms", "dense_ratio"} <= set(rows[0])
    assert json.loads((out / "results.json").read_text())[0]["case"] == rows[0]["case"]
    ops = {r["op"] for r in rows}
    assert {"layer", "experts", "route", "plan", "permute", "grouped_up", "grouped_down", "unpermute",
            "dense_gemm"} <= ops
    impls = {r["impl"] for r in rows}
    assert {"torch", "naive-loop", "hf-eager", "dense"} <= impls
    report = (out / "report.md").read_text()
    assert "Headline" in report and "![sweep_experts]" in report and "Skipped" in report
    assert all(r["dense_ratio"] is None or 0 < r["dense_ratio"] < 10 for r in rows)
    # The report command redraws everything from the results file alone.
    redrawn = tmp_path / "redrawn"
    assert bench_main(["--from-results", str(out / "results.csv"), "--out", str(redrawn)]) == 0
    assert (redrawn / "report.md").read_text().count("|") > 20 and (redrawn / "sweep_experts.png").is_file()


def test_run_grid_rows_are_sane_and_deduplicated():
    cases = [c for c in build_grid("smoke") if c.sweep in ("base", "experts")]
    rows = run_grid(cases, torch.device("cpu"), backends=["torch"], effort="smoke", with_ops=False,
                    with_baselines=False, progress_bar=False, log=lambda m: None)
    assert not check_sane(rows)
    table = headline(rows)
    assert [t["impl"] for t in table if t["op"] == "layer"] == ["torch"]
    assert all(math.isfinite(r.median_ms) for r in rows)
