"""The benchmark suite: every target of every case of a grid as one pytest-benchmark test.

    pytest benchmarks/                                   # full grid on a GPU, quick grid on a CPU
    pytest benchmarks/ --grid smoke --benchmark-disable  # CI: run every case once, check the numbers
    pytest benchmarks/ --bench-out benchmarks/results/h100 --benchmark-json benchmarks/results/h100/pytest-benchmark.json

Tests are generated as (case, op, implementation, mode); an implementation that cannot run here is
skipped with its reason. ``--bench-out`` writes the tidy results (CSV/JSON), the plots and the
Markdown report of the session. Value checks are off (they synchronise the device).
"""
from __future__ import annotations

import pathlib

import pytest
import torch

from fastmoe_kernels._checks import set_value_checks
from fastmoe_kernels.bench.grids import GRIDS, build_grid
from fastmoe_kernels.bench.report import OUR_IMPLS as _OUR_IMPLS

OPS_WITH_BACKENDS = ["route", "plan", "permute", "grouped_up", "grouped_down", "unpermute"]
OUR_IMPLS = list(_OUR_IMPLS)
BASELINES = ["naive-loop", "torch._grouped_mm", "hf-eager", "hf-batched_mm", "hf-grouped_mm", "hf-deepgemm", "hf-sonicmoe"]


def pytest_addoption(parser):
    group = parser.getgroup("fastmoe")
    group.addoption("--grid", choices=GRIDS, default=None, help="smoke / quick / full (default: full on a GPU, else quick)")
    group.addoption("--bench-device", default=None, help="cuda or cpu (default: cuda when available)")
    group.addoption("--bench-out", default=None, help="folder for results.csv/json, plots and report.md")


def bench_device(config) -> torch.device:
    return torch.device(config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu"))


def grid_name(config) -> str:
    return config.getoption("--grid") or ("full" if bench_device(config).type == "cuda" else "quick")


def _hf_names():
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        return [f"hf-{n}" for n in ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]]
    except Exception:
        return [b for b in BASELINES if b.startswith("hf-")]


def pytest_generate_tests(metafunc):
    if "target_key" not in metafunc.fixturenames:
        return
    cases = build_grid(grid_name(metafunc.config))
    seen, params, ids = set(), [], []
    baselines = ["naive-loop", "torch._grouped_mm"] + _hf_names()
    for case in cases:
        if case.name in seen:  # a base point repeated by several sweeps is benchmarked once
            continue
        seen.add(case.name)
        combos = []
        if metafunc.function.__name__ == "test_layer":
            combos = [("layer", i) for i in OUR_IMPLS] + [("experts", i) for i in OUR_IMPLS + baselines]
        elif metafunc.function.__name__ == "test_op":
            combos = [(op, i) for op in OPS_WITH_BACKENDS for i in OUR_IMPLS if i != "triton-unfused"]
        elif metafunc.function.__name__ == "test_roofline":
            combos = [(op, "dense") for op in ("dense_gemm", "dense_up", "dense_down")]
        for op, impl in combos:
            for mode in ("fwd", "fwd+bwd"):
                if op == "plan" and mode == "fwd+bwd":
                    continue
                params.append((case, op, impl, mode))
                ids.append(f"{case.sweep}-{case.name}-{op}-{impl}-{mode}")
    metafunc.parametrize("target_key", params, ids=ids)


class BenchSession:
    """Targets of the current case (built once per case), and the rows measured so far."""

    def __init__(self, device: torch.device, grid: str):
        from fastmoe_kernels.bench.targets import kernel_backends

        self.device = device
        self.grid = grid
        self.backends, self.backend_skips = kernel_backends(device)
        self.case = None
        self.targets = {}
        self.skips = {}
        self.rows = []

    def target(self, case, op, impl, mode):
        from fastmoe_kernels.bench.targets import build_targets

        if case != self.case:
            self.targets = {}  # free the previous case's tensors first
            self.case = case
            built = build_targets(case, self.device, self.backends, skips=self.skips)
            self.targets = {(t.op, t.impl, t.mode): t for t in built}
        return self.targets.get((op, impl, mode))

    def why_missing(self, impl: str) -> str:
        backend = "triton" if impl == "triton-unfused" else impl
        if backend in self.backend_skips:
            return self.backend_skips[backend]
        return self.skips.get(impl, self.skips.get("baselines", "not applicable to this case"))


@pytest.fixture(scope="session")
def bench_session(request):
    set_value_checks(False)
    session = BenchSession(bench_device(request.config), grid_name(request.config))
    yield session
    set_value_checks(None)
    out = request.config.getoption("--bench-out")
    if out and session.rows:
        from fastmoe_kernels.bench.report import markdown, plot_all
        from fastmoe_kernels.bench.runner import write_rows

        folder = pathlib.Path(out)
        write_rows(session.rows, folder)
        plots = plot_all(session.rows, folder)
        skipped = {**{f"backend {k}": v for k, v in session.backend_skips.items()}, **session.skips}
        (folder / "report.md").write_text(markdown(session.rows, plots, skipped, folder))


def pytest_collection_modifyitems(config, items):
    # With --benchmark-disable the targets run once outside the fixture, which is the point.
    for item in items:
        item.add_marker(pytest.mark.filterwarnings("ignore:Benchmark fixture was not used"))
