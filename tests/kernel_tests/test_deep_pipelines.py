"""Deeper pipelines for the Hopper tiles (``FASTMOE_DEEP_PIPELINES``, ``_gemm.DEEP_PIPELINE_TILES``): offered
to the grouped GEMMs' autotuners only with the flag, in both tile orders, and pruned where they do not
fit sm_90's shared memory beside a TMA store's staging tile."""
import pytest
import torch

triton = pytest.importorskip("triton")
_gemm = pytest.importorskip("fastmoe_kernels.triton_backend._gemm")
from fastmoe_kernels.triton_backend import _common, grouped_gemm, up_projection  # noqa: E402

SM90_SHARED = 232448
BF16 = torch.empty(0, dtype=torch.bfloat16)


@pytest.fixture
def gpu_configs(monkeypatch):
    monkeypatch.setattr(_gemm, "interpreted", lambda: False)
    monkeypatch.setattr(_common, "shared_memory_override", SM90_SHARED)
    return lambda: _gemm.matmul_configs(decode=True)


def _deep(configs):
    return sorted((c.kwargs["BM"], c.kwargs["BN"], c.kwargs["GROUP_M"]) for c in configs
                  if c.num_stages == 4 and c.kwargs["BM"] == 128 and c.num_warps == 8)


def test_deep_pipelines_are_offered_only_with_the_flag(gpu_configs, monkeypatch):
    monkeypatch.setattr(_gemm, "DEEP_PIPELINES", "off")  # whatever this environment sets
    assert _deep(gpu_configs()) == []
    monkeypatch.setattr(_gemm, "DEEP_PIPELINES", "on")
    assert _deep(gpu_configs()) == [(128, 128, 1), (128, 128, _gemm.GROUPED_ORDER), (128, 256, 1),
                                    (128, 256, _gemm.GROUPED_ORDER)]


def test_the_pruner_keeps_the_deep_tiles_that_fit_beside_a_staging_tile(gpu_configs, monkeypatch):
    monkeypatch.setattr(_gemm, "DEEP_PIPELINES", "on")
    configs = gpu_configs()
    matmul = _gemm.pruner(grouped_gemm._footprint, "a_ptr", staged_bytes=grouped_gemm._staged_output_bytes)
    # 128×256×64 at 4 stages: 196,608 bytes of buffers; + a 64 KiB staging tile is past sm_90's 232,448
    pointer = _deep(matmul(configs, {}, a_ptr=BF16, c_ptr=BF16, DUAL_AB=False, C_TMA=False, M_BUCKET=1024))
    tma = _deep(matmul(configs, {}, a_ptr=BF16, c_ptr=BF16, DUAL_AB=False, C_TMA=True, M_BUCKET=1024))
    assert (128, 256, 1) in pointer and (128, 128, 1) in pointer
    assert (128, 256, 1) not in tma and (128, 128, 1) in tma
    # the gated up projection: 128×128 at 4 stages is 196,608 bytes (A and two B tiles per step)
    up = _gemm.pruner(up_projection._footprint, "x_ptr", staged_bytes=up_projection._staged_output_bytes)
    kept = _deep(up(configs, {}, x_ptr=BF16, out_ptr=BF16, GATED=True, STORE_H=True, C_TMA=False, H_TMA=False,
                    M_BUCKET=1024))
    assert (128, 128, 1) in kept and (128, 256, 1) not in kept
