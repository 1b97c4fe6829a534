"""Tuning tables (fastmoe_kernels.tuning): a table's kernel entry is launched as is, a key it lacks
autotunes, a table of another Triton version is ignored with one log line, and the layer and GEMM
entries steer ``fused=None`` and ``backend="auto"``. Fake device tables on the CPU (the "cpu"
device name, Triton's interpreter)."""
import logging

import pytest
import torch

from fastmoe_kernels import backends, ops, tuning
from fastmoe_kernels.ops.moe_mlp import default_fusion
from fastmoe_kernels.tuning import LayerShape, Table

triton = pytest.importorskip("triton")

from fastmoe_kernels.triton_backend import _common  # noqa: E402

E, K, N = 3, 32, 24
SIZES = [5, 0, 19]


def _inputs():
    offsets = torch.tensor([0, *torch.tensor(SIZES).cumsum(0).tolist()], dtype=torch.int32)
    a = torch.randn(sum(SIZES), K)
    b = torch.randn(E, K, N) / K ** 0.5
    return a, b, offsets


def _forward_key(a, offsets):
    return dict(N_OUT=N, K_MAX=K, M_BUCKET=_common.rows_per_expert_bucket(a.shape[0], E), E=E, DUAL_AB=False, C_TMA=False,
                dtype=str(a.dtype))


# Not the interpreter's own tile (16×16×16, GROUP_M 2): seeing it launched means the table was read.
TABLE_CONFIG = dict(BM=32, BN=16, BK=16, GROUP_M=1, num_warps=1, num_stages=1)


@pytest.fixture
def table_file(tmp_path, monkeypatch):
    """Write a table, point FASTMOE_TUNING at it, and forget every table read before and after."""
    path = tmp_path / "table.json"

    def write(table: Table):
        table.save(path)
        monkeypatch.setenv("FASTMOE_TUNING", str(path))
        tuning.forget()
        backends.refresh()
        _common.tuned_launches.clear()
        return path

    yield write
    tuning.forget()
    backends.refresh()


def _reference(a, b, offsets):
    return ops.grouped_gemm(a, b, offsets, backend="torch")


def test_a_table_entry_is_launched_without_autotuning(table_file):
    a, b, offsets = _inputs()
    table_file(Table(device="cpu", triton=triton.__version__,
                     kernels={"_grouped_matmul_kernel": [dict(key=_forward_key(a, offsets), config=TABLE_CONFIG)]}))
    out = ops.grouped_gemm(a, b, offsets, backend="triton")
    assert _common.tuned_launches["_grouped_matmul_kernel"] == TABLE_CONFIG
    torch.testing.assert_close(out, _reference(a, b, offsets), rtol=1e-5, atol=1e-5)


def test_a_key_the_table_lacks_autotunes(table_file):
    a, b, offsets = _inputs()
    other = dict(_forward_key(a, offsets), N_OUT=N + 8)
    table_file(Table(device="cpu", triton=triton.__version__,
                     kernels={"_grouped_matmul_kernel": [dict(key=other, config=TABLE_CONFIG)]}))
    out = ops.grouped_gemm(a, b, offsets, backend="triton")
    assert "_grouped_matmul_kernel" not in _common.tuned_launches
    torch.testing.assert_close(out, _reference(a, b, offsets), rtol=1e-5, atol=1e-5)


def test_a_table_of_another_triton_is_ignored_with_one_log_line(table_file, caplog):
    a, b, offsets = _inputs()
    table_file(Table(device="cpu", triton="0.0.1",
                     kernels={"_grouped_matmul_kernel": [dict(key=_forward_key(a, offsets), config=TABLE_CONFIG)]}))
    with caplog.at_level(logging.INFO, logger="fastmoe_kernels"):
        for _ in range(2):
            out = ops.grouped_gemm(a, b, offsets, backend="triton")
    stale = [r for r in caplog.records if "ignored" in r.getMessage()]
    assert len(stale) == 1 and "0.0.1" in stale[0].getMessage()
    assert "_grouped_matmul_kernel" not in _common.tuned_launches
    torch.testing.assert_close(out, _reference(a, b, offsets), rtol=1e-5, atol=1e-5)


def test_a_table_for_another_device_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "TUNED_DIR", tmp_path)
    monkeypatch.setenv("FASTMOE_TUNING", "auto")
    tuning.forget()
    Table(device="NVIDIA H100 80GB HBM3", triton=triton.__version__).save(tmp_path / "nvidia-h200.json")
    assert tuning.table_for("NVIDIA H200") is None  # the file has the H200's name but another device's table
    Table(device="NVIDIA H200", triton=triton.__version__).save(tmp_path / "nvidia-h200.json")
    tuning.forget()
    assert tuning.table_for("NVIDIA H200").device == "NVIDIA H200"
    assert tuning.table_for("NVIDIA H100 80GB HBM3") is None
    tuning.forget()


def test_tables_can_be_turned_off(table_file, monkeypatch):
    a, b, offsets = _inputs()
    table_file(Table(device="cpu", triton=triton.__version__,
                     kernels={"_grouped_matmul_kernel": [dict(key=_forward_key(a, offsets), config=TABLE_CONFIG)]}))
    monkeypatch.setenv("FASTMOE_TUNING", "off")
    tuning.forget()
    ops.grouped_gemm(a, b, offsets, backend="triton")
    assert "_grouped_matmul_kernel" not in _common.tuned_launches


SHAPE = LayerShape.of(64, 32, 8, 2, "swiglu", torch.float32, 100)


def test_fused_none_follows_the_layer_entry(table_file):
    cpu = torch.device("cpu")
    assert default_fusion(None, True, cpu, SHAPE) is None  # no table: the rule (CPU: the backend's fused kernels)
    table_file(Table(device="cpu", triton=triton.__version__, layers=[
        dict(shape=vars(SHAPE), mode="fwd+bwd", fused=True, times_ms={"fused": 1.0, "composition": 2.0}),
        dict(shape=vars(SHAPE), mode="fwd", fused=False, times_ms={"fused": 2.0, "composition": 1.0})]))
    assert default_fusion(None, True, cpu, SHAPE) is True
    assert default_fusion(None, False, cpu, SHAPE) is False
    assert default_fusion(False, True, cpu, SHAPE) is False  # what the user asked for stands
    other = LayerShape.of(64, 32, 8, 2, "swiglu", torch.float32, 5000)  # another tokens bucket: not measured
    assert default_fusion(None, True, cpu, other) is None


def test_rows_share_a_bucket_up_to_the_next_power_of_two():
    assert [tuning.rows_bucket(n) for n in (0, 1, 2, 3, 1024, 1025)] == [1, 1, 2, 4, 1024, 2048]
    assert LayerShape.of(1, 1, 1, 1, "relu", torch.bfloat16, 1000).tokens_bucket == 1024


def test_the_gemm_order_puts_the_measured_winner_first(table_file, monkeypatch):
    order = tuning.gemm_order(("triton", "torch"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tuning, "current_table", lambda device=None: tuning.table_for("cpu"))
    table_file(Table(device="cpu", triton=triton.__version__, gemms=[
        dict(key=dict(K=64, N=96, E=8, rows_bucket=4096, dtype="bfloat16"), backend="cuda",
             times_ms={"triton": 2.0, "cuda": 1.5})]))
    facts = dict(k_dim=64, n_dim=96, num_experts=8, rows=4096, dtype_name="bfloat16")
    assert order(**facts) == ("cuda", "triton", "torch")
    assert order(**dict(facts, rows=8192)) == ("triton", "torch")
    assert order(**dict(facts, dtype_name="float16")) == ("triton", "torch")


def test_a_table_round_trips_through_its_file(tmp_path):
    table = Table(device="NVIDIA H200", triton="3.6.0", meta=dict(source="benchmarks/results/x"),
                  kernels={"_up_projection_kernel": [dict(key=dict(N_OUT=768, dtype="torch.bfloat16"),
                                                          config=TABLE_CONFIG, ms=1.5)]})
    path = table.save(tmp_path / f"{tuning.device_slug(table.device)}.json")
    assert path.name == "nvidia-h200.json"
    again = Table.from_json(__import__("json").loads(path.read_text()))
    assert again.as_json() == table.as_json()
    assert again.kernel_config("_up_projection_kernel", dict(N_OUT=768, dtype="torch.bfloat16")) == TABLE_CONFIG
    with pytest.raises(ValueError, match="schema"):
        Table.from_json(dict(table.as_json(), schema=99))


# ---- writing a table from a run -------------------------------------------------------------------
def _layer_row(impl, mode, ms, **shape):
    row = dict(op="layer", impl=impl, mode=mode, median_ms=ms, d_model=2048, d_ff=768, num_experts=128, top_k=8,
               activation="swiglu", dtype="bfloat16", tokens=16384, capacity_factor=None, num_shared_experts=0,
               fp8_recipe=None)
    row.update(shape)
    return row


def test_the_table_takes_each_shapes_faster_path_and_its_gemm_backend():
    from fastmoe_kernels.bench.tune import layer_entries, gemm_entries

    rows = [_layer_row("triton-fused", "fwd", 3.7), _layer_row("triton-unfused", "fwd", 4.3),
            _layer_row("cuda-unfused", "fwd", 7.0),
            _layer_row("triton-fused", "fwd+bwd", 17.4), _layer_row("triton-unfused", "fwd+bwd", 12.6),
            _layer_row("cuda-unfused", "fwd+bwd", 12.0),
            _layer_row("triton", "fwd+bwd", 12.5),  # the default path: not one side of the comparison
            _layer_row("triton-fused", "fwd+bwd", 1.0, capacity_factor=1.25),  # capacity: not learnt from
            _layer_row("triton-fused", "fwd+bwd", 2.0, d_model=4096)]  # only one side measured
    layers = layer_entries(rows)
    assert [(e["mode"], e["fused"], e["composition"]) for e in layers] == [
        ("fwd", True, "triton-unfused"), ("fwd+bwd", False, "cuda-unfused")]
    assert layers[1]["times_ms"] == {"triton-fused": 17.4, "triton-unfused": 12.6, "cuda-unfused": 12.0}
    gemms = gemm_entries(layers)
    # The training step's GEMMs (forward and input gradient of both projections) go to torch's grouped matmul.
    shapes = {(g["key"]["K"], g["key"]["N"]): g["backend"] for g in gemms}
    assert shapes == {(2048, 1536): "cuda", (768, 2048): "cuda", (2048, 768): "cuda", (1536, 2048): "cuda"}
    assert all(g["key"]["rows_bucket"] == 131072 and g["key"]["E"] == 128 for g in gemms)


def test_a_written_table_is_read_back_by_fused_none(tmp_path, monkeypatch):
    from fastmoe_kernels.bench.tune import write_table

    rows = [_layer_row("triton-fused", "fwd", 3.7, dtype="float32", tokens=100, d_model=64, d_ff=32, num_experts=8,
                       top_k=2),
            _layer_row("triton-unfused", "fwd", 4.3, dtype="float32", tokens=100, d_model=64, d_ff=32, num_experts=8,
                       top_k=2)]
    path = write_table(rows, tmp_path / "cpu.json", "cpu", source="a test")
    monkeypatch.setenv("FASTMOE_TUNING", str(path))
    tuning.forget()
    try:
        table = tuning.table_for("cpu")
        assert table.meta["source"] == "a test" and table.triton == triton.__version__
        assert default_fusion(None, False, torch.device("cpu"), SHAPE) is True
        # Written again from a run that measured nothing new: the entries stay.
        write_table([], path, "cpu")
        tuning.forget()
        assert tuning.table_for("cpu").layers == table.layers
    finally:
        tuning.forget()


def test_a_symbolic_size_takes_the_largest_measured_bucket_of_the_shape():
    """Under torch.compile with dynamic shapes the token count is symbolic: the look-up must not
    specialise the graph on it, and takes the same layer's largest measurement instead."""
    small, large = (dict(SHAPE.__dict__, tokens_bucket=b) for b in (128, 4096))
    table = Table(device="cpu", triton="t", layers=[dict(shape=small, mode="fwd", fused=True),
                                                     dict(shape=large, mode="fwd", fused=False)])
    wildcard = LayerShape(**dict(SHAPE.__dict__, tokens_bucket=0))
    assert table.layer_entry(wildcard, "fwd")["fused"] is False
    assert table.layer_entry(LayerShape(**small), "fwd")["fused"] is True
    assert table.layer_entry(LayerShape(**dict(small, d_model=7, tokens_bucket=0)), "fwd") is None


def test_a_pinned_config_beats_the_table(table_file, monkeypatch):
    a, b, offsets = _inputs()
    table_file(Table(device="cpu", triton=triton.__version__,
                     kernels={"_grouped_matmul_kernel": [dict(key=_forward_key(a, offsets), config=TABLE_CONFIG)]}))
    pinned = dict(TABLE_CONFIG, BM=16, GROUP_M=2)
    monkeypatch.setitem(_common.pinned_configs, "_grouped_matmul_kernel", pinned)
    out = ops.grouped_gemm(a, b, offsets, backend="triton")
    assert _common.tuned_launches["_grouped_matmul_kernel"] == pinned
    torch.testing.assert_close(out, _reference(a, b, offsets), rtol=1e-5, atol=1e-5)
