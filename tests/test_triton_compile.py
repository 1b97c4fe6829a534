"""Triton kernels compiled for real GPU targets (no GPU needed), and the alignment hints they rely on.

The interpreter tests (tests/kernel_tests/) check what the kernels compute; only the compiler can say
whether they build for sm_80/sm_90 and whether the grouped GEMM's K loop is software-pipelined.
"""
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_alignment_is_the_largest_power_of_two_that_divides_all():
    pytest.importorskip("triton")
    from fastmoe_kernels.triton_backend._layout import alignment, packed_cols, packed_rows, stacked
    import torch

    assert alignment([]) == 16 and alignment([0, 0]) == 16
    assert alignment([0, 48, 96]) == 16 and alignment([0, 4096, 8192]) == 16
    assert alignment([8, 24]) == 8 and alignment([12, 20]) == 4 and alignment([6, 10]) == 2
    assert alignment([3, 1, 6]) == 1 and alignment([16, 17]) == 1
    # Layouts report hints that hold for every expert (a false hint would misalign vector loads).
    hetero = packed_rows(torch.empty(3 + 1 + 6, 64), [3, 1, 6])  # offsets 0, 192, 256 elements
    assert hetero.align == (16, 1, 16)
    assert packed_cols(torch.empty(64, 10), [3, 1, 6]).align == (1, 16, 1)  # offsets 0, 3, 4
    homo = stacked(torch.empty(4, 32, 64))
    assert homo.align == (16, 16, 16)
    assert homo.b_align(transpose=True) == (16, 16, 16)
    odd = stacked(torch.empty(3, 24, 40))
    assert odd.align == (alignment([0, 960, 1920]), 8, 8)


COMPILE_ARCHES = (90, 80)


@pytest.fixture(scope="module")
def compile_runs(tmp_path_factory):
    """Both targets' compile runs, started together: each is one process compiling serially (Triton's
    passes and ptxas), so on CI's two cores the pair takes the time of the longer one (sm_90's 16 min
    alone, sm_80's about as long; run one after the other they took half of CI's hour)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = {}
    for arch in COMPILE_ARCHES:
        work = tmp_path_factory.mktemp(f"sm{arch}")
        report = work / "kernels.json"
        # Output to files, not pipes: a pipe nobody reads yet (the other target's) would fill and stall it.
        with open(work / "stdout", "w") as out, open(work / "stderr", "w") as err:
            proc = subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "triton_compile.py"), "--arch", str(arch), "--dtype", "bfloat16",
                 "--json", str(report)],
                cwd=REPO, env=dict(env, TRITON_CACHE_DIR=str(work / "triton-cache")), stdout=out, stderr=err,
            )
        runs[arch] = (proc, work)
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
@pytest.mark.parametrize("arch", COMPILE_ARCHES)
def test_every_layer_kernel_compiles_and_the_gemm_loop_is_pipelined(arch, compile_runs):
    proc, work = compile_runs[arch]
    try:
        proc.wait(timeout=2400)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"sm_{arch}: the compile run took over 40 minutes")
    stdout, stderr, report = (work / "stdout").read_text(), (work / "stderr").read_text(), work / "kernels.json"
    summary = [line for line in stdout.splitlines() if "kernels compiled" in line or "FAILURE" in line
               or "not pipelined" in line or "no config" in line]
    assert proc.returncode == 0, "\n".join(summary) + stderr[-3000:]
    import json

    kernels = json.loads(report.read_text())[f"sm_{arch}"]["kernels"]
    names = {k["kernel"] for k in kernels}
    # Every kernel family the layer launches, forward and backward, was reached and compiled.
    for family in ("_route_topk_fwd_kernel", "_route_topk_bwd_kernel", "_chunk_count_kernel", "_chunk_scan_kernel",
                   "_expert_offsets_kernel", "_place_kernel", "_gather_kernel", "_combine_kernel", "_rowdot_kernel",
                   "_stats_kernel", "_grouped_matmul_kernel", "_up_projection_kernel", "_activation_backward_kernel",
                   "_grouped_wgrad_kernel", "_activation_grad_kernel"):
        assert family in names, f"{family} was never compiled: {sorted(names)}"
    fp8_kernels = ("_fp8_matmul_kernel", "_fp8_wgrad_kernel", "_quantize_rows_kernel", "_quantize_cols_kernel",
                   "_quantize_blocks_kernel")
    if arch == 90:
        for gemm in ("_grouped_matmul_kernel", "_up_projection_kernel", "_activation_backward_kernel"):
            assert any(k["wgmma"] for k in kernels if k["kernel"] == gemm), f"{gemm}: no wgmma on sm_90"
        # fp8_recipe="blockwise": every product an fp8 wgmma, every K loop pipelined (the script checks each).
        assert set(fp8_kernels) <= names
        # (a 16-row decode tile is under wgmma's 64 rows: an fp8 mma.sync, pipelined all the same)
        for gemm in ("_fp8_matmul_kernel", "_fp8_wgrad_kernel"):
            tiles = [k for k in kernels if k["kernel"] == gemm]
            assert tiles and all(k["async_copies"] for k in tiles), gemm
            assert all(k["fp8_wgmma"] for k in tiles if k["constexprs"].get("BM") != 16), gemm
            assert any(k["fp8_wgmma"] for k in tiles), gemm
    else:  # no fp8 tensor cores: the layer runs the emulation, nothing fp8 is compiled
        assert not set(fp8_kernels) & names
    # Every autotuned launch kept configs whose real shared memory fits (the pruner's estimate holds).
    for k in kernels:
        for tuning in k["tuning"]:
            if tuning["kept"]:
                assert k["shared"] <= {80: 166912, 90: 232448}[arch], k
