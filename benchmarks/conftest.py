"""The benchmark suite: every target of every case of a grid as one pytest-benchmark test.

    pytest benchmarks/                                   # the "gpu" grid on a GPU (≤ 15 min on an H100), "quick" on a CPU (≤ 10 min)
    pytest benchmarks/ --grid full                       # the long GPU grid: no time budget
    pytest benchmarks/ --grid smoke --benchmark-disable  # CI: run every case once, check the numbers
    pytest benchmarks/ --bench-out benchmarks/results/h100 --benchmark-json benchmarks/results/h100/pytest-benchmark.json

Tests are generated as (case, op, implementation, mode) and run case by case (a case's targets are
built once); an implementation that cannot run here is skipped with its reason. The run has a time
budget that each target's share of shrinks as the run goes (``--bench-budget-minutes``); the CPU
threads are one per free core (``--bench-threads``). ``--bench-out`` writes the tidy results
(CSV/JSON, with each point's flags), the plots and the Markdown report of the session. Value checks
are off (they synchronise the device).
"""
from __future__ import annotations

import pathlib
from dataclasses import replace
from typing import Dict, List

import pytest
import torch

from fastmoe_kernels._checks import set_value_checks
from fastmoe_kernels.bench.grids import GRIDS, build_grid, default_grid, measured_key
from fastmoe_kernels.bench.report import OUR_IMPLS as _OUR_IMPLS
from fastmoe_kernels.bench.peers import PEERS
from fastmoe_kernels.bench.sweeps import GRAPHED_IMPL, IMPL_VARIANTS, impl_backend
from fastmoe_kernels.bench.runner import (EFFORT, OPS_PER_BACKEND, Budget, PartialWriter, ThreadGuard, release_memory,
                                          rooflines, set_roofline_ratios)

OPS_WITH_BACKENDS = ["route", "plan", "permute", "grouped_up", "grouped_down", "unpermute"]
OUR_IMPLS = list(_OUR_IMPLS)
BASELINES = ["naive-loop", "torch._grouped_mm", "hf-eager", "hf-batched_mm", "hf-grouped_mm", "hf-deepgemm", "hf-sonicmoe",
             *PEERS]
# The whole session's budget per grid (seconds): ops are broken down on every case here, so it is
# larger than fastmoe-bench's.
SESSION_BUDGET_S = {"smoke": None, "quick": 540.0, "gpu": 840.0, "full": None}
assert OPS_PER_BACKEND == 2 * len(OPS_WITH_BACKENDS) - 1  # plan has no backward


def pytest_addoption(parser):
    group = parser.getgroup("fastmoe")
    group.addoption("--grid", choices=GRIDS, default=None,
                    help="smoke / quick (the CPU default) / gpu (the GPU default) / full (the long GPU grid)")
    group.addoption("--bench-device", default=None, help="cuda or cpu (default: cuda when available)")
    group.addoption("--bench-out", default=None, help="folder for results.csv/json, plots and report.md")
    group.addoption("--bench-threads", default="auto", help="CPU threads: auto (one per free core) or a number")
    group.addoption("--bench-budget-minutes", type=float, default=None,
                    help="the session's time budget (default: 9 min on quick, 14 on gpu, none on smoke/full)")


def bench_device(config) -> torch.device:
    return torch.device(config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu"))


def grid_name(config) -> str:
    return config.getoption("--grid") or default_grid(bench_device(config).type)


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
    baselines = ["naive-loop", "torch._grouped_mm"] + _hf_names() + list(PEERS)
    for case in cases:
        if measured_key(case) in seen:  # a base point repeated by several sweeps is benchmarked once
            continue
        seen.add(measured_key(case))
        combos = []
        name = metafunc.function.__name__
        if name == "test_layer":
            combos = [("layer", i) for i in OUR_IMPLS] + [("experts", i) for i in OUR_IMPLS + baselines]
            combos += [("layer", GRAPHED_IMPL)] if case.graphed_modes() else []
        elif name == "test_op" and not case.inference_only:
            combos = [(op, i) for op in OPS_WITH_BACKENDS for i in OUR_IMPLS if i not in IMPL_VARIANTS]
        elif name == "test_roofline":
            combos = [("copy", "dense")] if case.inference_only else \
                [(op, "dense") for op in ("dense_gemm", "dense_up", "dense_down")]
        for op, impl in combos:
            modes = case.graphed_modes() if impl == GRAPHED_IMPL else \
                ("fwd",) if case.inference_only or op in ("plan", "copy") else ("fwd", "fwd+bwd")
            for mode in modes:
                params.append((case, op, impl, mode))
                ids.append(f"{case.sweep}-{case.name}-{op}-{impl}-{mode}")
    metafunc.parametrize("target_key", params, ids=ids)


class BenchSession:
    """Targets of the current case (built once per case), the budget, and the rows measured so far."""

    def __init__(self, device: torch.device, grid: str, threads: str, budget_s, items: int, out=None):
        from fastmoe_kernels.bench.env import environment
        from fastmoe_kernels.bench.targets import kernel_backends

        self.device = device
        self.grid = grid
        self.backends, self.backend_skips = kernel_backends(device)
        self.guard = ThreadGuard(device, threads, print)
        self.env = environment(device)
        self.budget = Budget(budget_s, items, EFFORT[grid]["max_seconds"])
        self.case = None
        self.build_error = None
        self.targets = {}
        self.roofs: Dict[tuple, Dict[tuple, str]] = {}
        self.skips = {}
        self.rows = []
        self.partial = PartialWriter(pathlib.Path(out) if out else None)

    def target(self, case, op, impl, mode):
        from fastmoe_kernels.bench.targets import build_targets

        if case != self.case:
            self.targets = {}  # free the previous case's tensors first
            self.case, self.build_error = case, None
            release_memory(self.device)
            try:
                built = build_targets(case, self.device, self.backends, skips=self.skips)
            except Exception as exc:  # out of memory, most likely: every target of the case says so
                self.build_error = f"building the case failed: {type(exc).__name__}: {str(exc)[:200]}"
                release_memory(self.device)
                return None
            self.targets = {(t.op, t.impl, t.mode): t for t in built}
            self.roofs[measured_key(case)] = rooflines(built)
        return self.targets.get((op, impl, mode))

    def record(self, row, target):
        self.rows.append((measured_key(self.case), row))
        self.partial(row)
        self.budget.done()

    def why_missing(self, impl: str) -> str:
        if self.build_error:
            return self.build_error
        backend = impl_backend(impl)[0]
        if backend in self.backend_skips:
            return self.backend_skips[backend]
        if impl in OUR_IMPLS:  # an op of ours this case does not break down
            return self.skips.get(f"ops of {self.case.name}", "not applicable to this case")
        return self.skips.get(impl, self.skips.get("baselines", "not applicable to this case"))

    def report_rows(self, cases) -> List:
        """The measured rows with their roofline ratios, under every sweep their configuration is in."""
        for key, roof_of in self.roofs.items():
            set_roofline_ratios([r for k, r in self.rows if k == key], roof_of)
        occurrences: Dict = {}
        for case in cases:
            occurrences.setdefault(measured_key(case), []).append(case)
        return [replace(r, sweep=case.sweep, label=case.label, case=case.name)
                for key, r in self.rows for case in occurrences.get(key, [])]


@pytest.fixture(scope="session")
def bench_session(request):
    set_value_checks(False)
    config = request.config
    grid = grid_name(config)
    minutes = config.getoption("--bench-budget-minutes")
    budget = SESSION_BUDGET_S[grid] if minutes is None else minutes * 60
    items = sum(1 for item in request.session.items if "target_key" in getattr(item, "fixturenames", ()))
    out = config.getoption("--bench-out")
    session = BenchSession(bench_device(config), grid, config.getoption("--bench-threads"), budget, items, out)
    yield session
    set_value_checks(None)
    if out and session.rows:
        from fastmoe_kernels.bench.checks import flag_rows
        from fastmoe_kernels.bench.report import as_dicts, markdown, plot_all
        from fastmoe_kernels.bench.runner import write_rows

        folder = pathlib.Path(out)
        table = as_dicts(session.report_rows(build_grid(grid)))
        flag_rows(table)
        write_rows(table, folder)
        plots = plot_all(table, folder)
        skipped = {**{f"backend {k}": v for k, v in session.backend_skips.items()}, **session.skips}
        (folder / "report.md").write_text(markdown(table, plots, skipped, folder))
        session.partial.finish()


def pytest_collection_modifyitems(config, items):
    # Case by case, so that a case's targets are built once for the layer, op and roofline tests.
    order = {measured_key(c): i for i, c in reversed(list(enumerate(build_grid(grid_name(config)))))}

    def case_index(item):
        key = getattr(item, "callspec", None)
        if key is None or "target_key" not in key.params:
            return -1
        return order.get(measured_key(key.params["target_key"][0]), len(order))

    items.sort(key=case_index)  # stable: within a case, pytest's own order
    for item in items:
        # With --benchmark-disable the targets run once outside the fixture, which is the point.
        item.add_marker(pytest.mark.filterwarnings("ignore:Benchmark fixture was not used"))
