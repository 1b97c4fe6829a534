"""Backend selection: explicit argument, environment variable, auto, and the report."""
import torch

from fastmoe_kernels import MoELayer, backend_report, backends, describe_backends


def test_torch_backend_always_available_and_described():
    report = backend_report(torch.device("cpu"))
    assert report["torch"] == "available"
    kernels = describe_backends(torch.device("cpu"), "torch")
    for name in ("route_topk", "make_plan", "permute", "combine", "grouped_gemm", "routing_stats"):
        assert kernels[name] == "torch"


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("FASTMOE_BACKEND", "torch")
    assert backends.resolve("permute", None, torch.device("cpu")) == "torch"
    assert backends.resolve("permute", "auto", torch.device("cpu")) == "torch"


def test_layer_backend_attribute_is_used(monkeypatch):
    calls = []
    original = backends.resolve

    def spy(kernel, requested, device):
        calls.append(requested)
        return original(kernel, requested, device)

    monkeypatch.setattr(backends, "resolve", spy)
    layer = MoELayer(d_model=8, d_ff=4, num_experts=4, top_k=2, backend="torch")
    layer(torch.randn(3, 8))
    assert calls and set(calls) == {"torch"}
    calls.clear()
    layer(torch.randn(3, 8), backend="auto")
    assert set(calls) == {"auto"}
