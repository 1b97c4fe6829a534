"""FASTMOE_AUTOTUNE: every fitting config benchmarked ("all"), or one per key in turn ("one", GPU test runs)."""
import pytest
import triton

from fastmoe_kernels.triton_backend import _gemm

CONFIGS = [triton.Config({"BM": m, "BN": 64, "BK": 32}, num_warps=4) for m in (16, 32, 64)]


def test_all_keeps_every_fitting_config(monkeypatch):
    monkeypatch.delenv("FASTMOE_AUTOTUNE", raising=False)
    assert _gemm.take_configs(CONFIGS) == CONFIGS
    monkeypatch.setenv("FASTMOE_AUTOTUNE", "all")
    assert _gemm.rotating_pruner(CONFIGS, {}) == CONFIGS


def test_one_takes_each_config_in_turn(monkeypatch):
    monkeypatch.setenv("FASTMOE_AUTOTUNE", "one")
    taken = [_gemm.rotating_pruner(CONFIGS, {}) for _ in range(2 * len(CONFIGS))]
    assert all(len(t) == 1 for t in taken)
    assert {id(t[0]) for t in taken} == {id(c) for c in CONFIGS}  # every tile shape gets its turn
    assert _gemm.take_configs(CONFIGS[:1]) == CONFIGS[:1]


def test_an_unknown_mode_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("FASTMOE_AUTOTUNE", "fastest")
    with pytest.raises(ValueError, match="FASTMOE_AUTOTUNE must be one of"):
        _gemm.take_configs(CONFIGS)
