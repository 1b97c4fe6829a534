"""torch.compile(layer): one graph (fullgraph, no graph break) on every backend the CPU has, forward
and backward, in every dispatch mode; equal to eager; and reused across batch sizes."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from fastmoe_kernels import MoELayer, backends

MODES = {
    "dropless": dict(),
    "capacity-probs": dict(capacity_factor=1.0, drop_policy="probs"),
    "capacity-position": dict(capacity_factor=0.9, drop_policy="position"),
    "capacity-pad-shared-zloss": dict(capacity_factor=1.0, pad_to_capacity=True, num_shared_experts=1, z_loss_coeff=1e-3),
    "heterogeneous-bias": dict(d_ff=[4, 8, 12, 8], bias=True),
    "unfused": dict(fused_experts=False),
    "sigmoid-groups-expert-bias": dict(score_func="sigmoid", num_groups=2, topk_groups=1, expert_bias=True),
    "fp8": dict(fp8_recipe="blockwise"),
    "fp8-capacity-bias-gelu": dict(fp8_recipe="blockwise", capacity_factor=1.0, pad_to_capacity=True, bias=True,
                                   activation="gelu"),
}
BACKENDS = ["torch", "cpp", "triton"]


def available(backend: str) -> None:
    ok, why = backends.availability(backend, torch.device("cpu"))
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable on the CPU here: {why}")


def eager_and_compiled(layer, compiled, x):
    results = []
    for fn in (compiled, layer):
        xx = x.clone().requires_grad_()
        layer.zero_grad()
        y = fn(xx)
        aux = [v.clone() for _, v in sorted(layer.aux_losses.items())]
        y.square().sum().backward()
        results.append([y.detach(), xx.grad] + [p.grad.clone() for p in layer.parameters()] + aux)
    return results


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_one_graph_forward_and_backward_on_every_backend(backend, mode, monkeypatch):
    available(backend)
    torch._dynamo.reset()
    monkeypatch.setattr(backends, "_resolved", {})  # resolution happens while dynamo traces
    fields = dict(d_model=16, d_ff=8, num_experts=4, top_k=2, backend=backend)
    fields.update(MODES[mode])
    layer = MoELayer(**fields)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)  # fullgraph: a graph break raises
    got, want = eager_and_compiled(layer, compiled, torch.randn(2, 7, 16))
    assert counter.frame_count == 1
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_compiled_layer_is_reused_across_batch_sizes(backend):
    """Dynamic shapes: one compile serves every token count (no recompile per size)."""
    available(backend)
    torch._dynamo.reset()
    layer = MoELayer(d_model=16, d_ff=8, num_experts=4, top_k=2, capacity_factor=1.25, backend=backend)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
    compiles = []
    for tokens in (5, 9, 17, 33, 64):
        got, want = eager_and_compiled(layer, compiled, torch.randn(tokens, 16))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        compiles.append(counter.frame_count)
    # The first call compiles (dynamo may restart its analysis once inside that compile); no size after
    # it compiles again.
    assert compiles == [compiles[0]] * len(compiles) and compiles[0] <= 2


@pytest.mark.parametrize("mode", ["dropless", "capacity-pad-shared-zloss", "heterogeneous-bias", "fp8"])
def test_inductor_matches_eager(mode):
    """The default compiler (Inductor) too, with the aux losses."""
    torch._dynamo.reset()
    fields = dict(d_model=16, d_ff=8, num_experts=4, top_k=2)
    fields.update(MODES[mode])
    layer = MoELayer(**fields)
    compiled = torch.compile(layer, fullgraph=True)
    for shape in [(2, 8, 16), (3, 5, 16)]:  # the second shape exercises a re-trace / dynamic shapes
        got, want = eager_and_compiled(layer, compiled, torch.randn(*shape))
        assert len(got) == len(want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("quantisers", ["fused", "fused-folded"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_fused_fp8_node_is_one_op_in_one_graph(backend, quantisers, monkeypatch):
    """FASTMOE_FP8_QUANTISERS=fused (ops/fp8_moe_node.py) under torch.compile: one graph holding the node's
    op, forward and backward equal to eager."""
    from fastmoe_kernels.ops import fp8_moe_node

    available(backend)
    monkeypatch.setattr(fp8_moe_node, "QUANTISERS", quantisers)
    torch._dynamo.reset()
    monkeypatch.setattr(backends, "_resolved", {})
    layer = MoELayer(d_model=16, d_ff=128, num_experts=4, top_k=2, backend=backend, fp8_recipe="blockwise")
    graphs = []

    def record(gm, example_inputs):  # Dynamo's graph, run as it is (autograd through the custom ops)
        graphs.append([str(node.target) for node in gm.graph.nodes])
        return gm

    compiled = torch.compile(layer, backend=record, fullgraph=True)
    got, want = eager_and_compiled(layer, compiled, torch.randn(2, 7, 16))
    assert len(graphs) == 1 and any("moe_mlp_fp8_node" in target for target in graphs[0])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("path", ["node", "fused-stored"])
def test_dh_into_h_compiles_to_one_graph_equal_to_eager(backend, path, monkeypatch):
    """FASTMOE_DH_INTO_H=on: the backward ops that declare h mutated (ops/grouped_mlp_node.py, ops/moe_mlp.py)
    under torch.compile (aot_eager: the backward traced and functionalised), equal to eager."""
    import importlib

    from fastmoe_kernels import _variants

    grouped_mlp = importlib.import_module("fastmoe_kernels.ops.grouped_mlp")
    available(backend)
    monkeypatch.setattr(_variants, "DH_INTO_H", True)
    if path == "node":
        monkeypatch.setattr(grouped_mlp, "MLP_BACKWARD", "epilogue")
    else:
        moe_mlp_triton = pytest.importorskip("fastmoe_kernels.triton_backend.moe_mlp")
        monkeypatch.setattr(moe_mlp_triton, "FUSED_BACKWARD", "stored")
    torch._dynamo.reset()
    monkeypatch.setattr(backends, "_resolved", {})
    layer = MoELayer(d_model=16, d_ff=8, num_experts=4, top_k=2, backend=backend, fused_experts=path != "node")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    got, want = eager_and_compiled(layer, compiled, torch.randn(2, 7, 16))
    assert counter.frame_count == 1
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
