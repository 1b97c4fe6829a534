"""Triton kernels compiled for real GPU targets (no GPU needed), and the alignment hints they rely on.

The interpreter tests (tests/kernels/) check what the kernels compute; only the compiler can say
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


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_every_layer_kernel_compiles_and_the_gemm_loop_is_pipelined(arch, tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    report = tmp_path / "kernels.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "triton_compile.py"), "--arch", str(arch), "--dtype", "bfloat16",
         "--json", str(report)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )
    summary = [line for line in result.stdout.splitlines() if "kernels compiled" in line or "FAILURE" in line
               or "not pipelined" in line or "no config" in line]
    assert result.returncode == 0, "\n".join(summary) + result.stderr[-3000:]
    import json

    kernels = json.loads(report.read_text())[f"sm_{arch}"]["kernels"]
    names = {k["kernel"] for k in kernels}
    # Every kernel family the layer launches, forward and backward, was reached and compiled.
    for family in ("_route_topk_fwd_kernel", "_route_topk_bwd_kernel", "_chunk_count_kernel", "_chunk_scan_kernel",
                   "_expert_offsets_kernel", "_place_kernel", "_gather_kernel", "_combine_kernel", "_rowdot_kernel",
                   "_stats_kernel", "_grouped_matmul_kernel", "_up_projection_kernel", "_activation_backward_kernel",
                   "_grouped_wgrad_kernel"):
        assert family in names, f"{family} was never compiled: {sorted(names)}"
    fp8_kernels = ("_fp8_matmul_kernel", "_fp8_wgrad_kernel", "_quantize_rows_kernel", "_quantize_cols_kernel",
                   "_quantize_blocks_kernel")
    if arch == 90:
        for gemm in ("_grouped_matmul_kernel", "_up_projection_kernel", "_activation_backward_kernel"):
            assert any(k["wgmma"] for k in kernels if k["kernel"] == gemm), f"{gemm}: no wgmma on sm_90"
        # fp8_recipe="blockwise": every product an fp8 wgmma, every K loop pipelined (the script checks each).
        assert set(fp8_kernels) <= names
        for gemm in ("_fp8_matmul_kernel", "_fp8_wgrad_kernel"):
            assert all(k["fp8_wgmma"] and k["async_copies"] for k in kernels if k["kernel"] == gemm), gemm
    else:  # no fp8 tensor cores: the layer runs the emulation, nothing fp8 is compiled
        assert not set(fp8_kernels) & names
    # Every autotuned launch kept configs whose real shared memory fits (the pruner's estimate holds).
    for k in kernels:
        for tuning in k["tuning"]:
            if tuning["kept"]:
                assert k["shared"] <= {80: 166912, 90: 232448}[arch], k
