"""Backend resolution: one place decides which implementation runs each kernel, per device, dtype
and call facts; fallbacks are recorded; explicit requests, the environment and "auto"."""
import pytest
import torch

from fastmoe_kernels import MoELayer, backend_report, backends, describe_backends

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
GEMM_KERNELS = ("grouped_gemm", "grouped_gemm_wgrad", "moe_mlp", "moe_mlp_backward", "grouped_up", "grouped_up_backward",
                "grouped_mlp_node", "grouped_mlp_node_backward", "router_logits", "router_logits_backward",
                "grouped_gemm_fp8",
                "grouped_gemm_fp8_backward", "grouped_gemm_fp8_gathered", "grouped_gemm_fp8_gathered_backward",
                "grouped_gemm_fp8_activated", "grouped_gemm_fp8_activated_backward", "moe_mlp_fp8_node",
                "moe_mlp_fp8_node_backward")
INDEX_KERNELS = ("route_topk", "route_topk_backward", "make_plan", "permute", "combine", "unpermute_backward",
                 "routing_stats")


@pytest.fixture
def fresh(monkeypatch):
    """Resolution state of its own (the test's choices do not leak into other tests)."""
    monkeypatch.setattr(backends, "_resolved", {})
    monkeypatch.setattr(backends, "_fallbacks", {})
    monkeypatch.setattr(backends, "_env_backend", None)
    monkeypatch.setattr(backends, "_default_backend", None)
    monkeypatch.delenv("FASTMOE_BACKEND", raising=False)


@pytest.fixture
def simulated_gpu(fresh, monkeypatch):
    """A machine whose CUDA device has every backend: the registrations are the real ones."""
    pytest.importorskip("triton")
    for backend in ("triton", "cpp"):
        if not backends._load(backend):
            pytest.skip(f"{backend} not loadable here: {backends._load_errors[backend]}")
    real = backends.availability

    def availability(backend, device):
        if torch.device(device).type == "cuda":
            return (True, "") if backend in backends.BACKENDS else (False, "unknown")
        return real(backend, device)

    monkeypatch.setattr(backends, "availability", availability)


def test_auto_on_a_gpu_takes_triton_for_gemms_and_the_csrc_kernels_for_the_rest(simulated_gpu):
    chosen = describe_backends(CUDA)
    for kernel in GEMM_KERNELS:
        assert chosen[kernel] == backends.Choice("triton"), kernel
    for kernel in INDEX_KERNELS:
        assert chosen[kernel] == backends.Choice("cuda"), kernel
    assert set(chosen) == set(GEMM_KERNELS) | set(INDEX_KERNELS)


def test_resolution_follows_coverage_and_records_why(simulated_gpu):
    resolve = backends.resolve
    assert resolve("route_topk", "auto", CUDA, torch.float32, num_experts=256, top_k=8) == "cuda"
    # The CUDA router fits a token in one warp (k <= 32): beyond it, Triton's router; beyond E = 1024, torch.
    assert resolve("route_topk", "auto", CUDA, torch.float32, num_experts=512, top_k=64) == "triton"
    assert resolve("route_topk", "auto", CUDA, torch.float32, num_experts=2048, top_k=8) == "torch"
    assert resolve("permute", "auto", CUDA, torch.float64) == "torch"
    reasons = {key[0]: [] for key in backends.recorded_fallbacks()}
    for (kernel, *_), choice in backends.recorded_fallbacks().items():
        reasons[kernel].append(choice.fallback)
    assert any("k <= 32" in r for r in reasons["route_topk"]) and any("E <= 1024" in r for r in reasons["route_topk"])
    assert any("float64" in r for r in reasons["permute"])


def test_a_named_backend_runs_its_kernels_and_says_where_it_cannot(simulated_gpu):
    chosen = describe_backends(CUDA, "cuda")
    assert chosen["permute"] == backends.Choice("cuda")
    # The cuda backend's GEMMs are torch's grouped matmul, bf16 only: an fp32 request falls back to
    # auto's choice, with the reason; its fp8 products do not exist.
    assert chosen["grouped_gemm"].backend == "triton"
    assert "cuda has no float32 grouped_gemm" in chosen["grouped_gemm"].fallback
    assert "cuda has no grouped_gemm_fp8" in describe_backends(CUDA, "cuda")["grouped_gemm_fp8"].fallback
    assert describe_backends(CUDA, "triton")["make_plan"] == backends.Choice("triton")


def test_get_kernel_never_substitutes(simulated_gpu):
    with pytest.raises(KeyError, match="no 'cuda' implementation"):
        backends.get_kernel("moe_mlp", "cuda")
    assert backends.get_kernel("permute", "torch") is backends.implementations("permute")["torch"].fn


def test_cpu_auto_follows_the_cpu_measurements(fresh):
    if not backends.availability("cpp", CPU)[0]:
        pytest.skip("the csrc kernels are not built here")
    for kernel in INDEX_KERNELS:
        assert backends.resolve(kernel, "auto", CPU, torch.float32, num_experts=8, top_k=2) == "cpp", kernel
    # The C++ router while k is small against E; the reference's sort beyond.
    assert backends.resolve("route_topk", "auto", CPU, torch.float32, num_experts=32, top_k=16) == "torch"
    assert backends.resolve("route_topk", "auto", CPU, torch.float32, num_experts=256, top_k=16) == "cpp"
    facts = dict(packed="", k_dim=64, n_dim=32, element_size=4)
    assert backends.resolve("grouped_gemm", "auto", CPU, torch.float32, **facts) == "cpp"
    assert backends.resolve("grouped_gemm", "auto", CPU, torch.float32, **{**facts, "packed": "n"}) == "torch"
    assert backends.resolve("moe_mlp", "auto", CPU, torch.float32) == "torch"


def test_cpp_gemm_coverage(fresh):
    if not backends.availability("cpp", CPU)[0]:
        pytest.skip("the csrc kernels are not built here")
    facts = dict(k_dim=64, n_dim=32, element_size=4)
    assert backends.resolve("grouped_gemm", "cpp", CPU, torch.float32, packed="", **facts) == "cpp"
    assert backends.resolve("grouped_gemm", "cpp", CPU, torch.float32, packed="n", **facts) == "torch"
    assert backends.resolve("grouped_gemm", "cpp", CPU, torch.float32, packed="", k_dim=5, n_dim=32,
                            element_size=4) == "torch"
    assert backends.resolve("grouped_gemm", "cpp", CPU, torch.float16, packed="", **facts) == "torch"
    reasons = [c.fallback for (kernel, *_), c in backends.recorded_fallbacks().items() if kernel == "grouped_gemm"]
    assert any("16-byte" in r for r in reasons) and any("packed" in r for r in reasons)


def test_old_cuda_name_on_cpu_tensors_runs_the_cpp_kernels(fresh, monkeypatch):
    if not backends.availability("cpp", CPU)[0]:
        pytest.skip("the csrc kernels are not built here")
    monkeypatch.setattr(backends, "_warned_alias", False)
    with pytest.warns(FutureWarning, match="backend='cpp'"):
        assert backends.resolve("permute", "cuda", CPU, torch.float32) == "cpp"


def test_unavailable_named_backend_says_why(fresh, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(backends.BackendUnavailableError, match="CUDA tensors"):
        backends.resolve("permute", "triton", CPU, torch.float32)
    report = backend_report(CPU)
    assert report["torch"] == "available" and "CUDA tensors" in report["cuda"]


def test_environment_and_process_default(fresh, monkeypatch):
    monkeypatch.setenv("FASTMOE_BACKEND", "torch")
    assert backends.resolve("permute", None, CPU, torch.float32) == "torch"
    assert backends.resolve("permute", "auto", CPU, torch.float32) == "torch"
    backends.set_default_backend("torch")
    assert backends.resolve("combine", None, CPU, torch.float32) == "torch"
    with pytest.raises(ValueError, match="set_default_backend"):
        backends.set_default_backend("cupy")


def test_auto_preference_can_be_changed(fresh, monkeypatch):
    monkeypatch.setitem(backends.AUTO_PREFERENCE, "cpu", dict(backends.AUTO_PREFERENCE["cpu"]))
    backends.set_auto_preference("cpu", "permute", ["torch"])
    assert backends.resolve("permute", "auto", CPU, torch.float32) == "torch"


def test_torch_backend_describes_every_kernel_as_torch(fresh):
    for kernel, choice in describe_backends(CPU, "torch").items():
        assert choice == backends.Choice("torch"), kernel
    assert "grouped_gemm" in backends.format_describe(CPU)


def test_layer_backend_attribute_is_used(fresh, monkeypatch):
    calls = []
    original = backends.resolve

    def spy(kernel, requested, device, dtype=None, **facts):
        calls.append(requested)
        return original(kernel, requested, device, dtype, **facts)

    monkeypatch.setattr(backends, "resolve", spy)
    layer = MoELayer(d_model=8, d_ff=4, num_experts=4, top_k=2, backend="torch")
    layer(torch.randn(3, 8))
    assert calls and set(calls) == {"torch"}
    calls.clear()
    layer(torch.randn(3, 8), backend="auto")
    assert set(calls) == {"auto"}


def test_an_op_called_by_name_in_a_fresh_process_loads_its_backend():
    """An exported graph or a direct torch.ops call names a backend no resolution has loaded yet."""
    import subprocess
    import sys

    if not backends.availability("cpp", CPU)[0]:
        pytest.skip("the csrc kernels are not built here")
    code = ("import torch, fastmoe_kernels\n"
            "x = torch.randn(3, 4); src = torch.tensor([2, 0, -1], dtype=torch.int32)\n"
            "row = torch.tensor([[1], [0], [-1]], dtype=torch.int32)\n"
            "print(torch.ops.fastmoe.permute(x, src, row, 'cpp', 'cpp')[0].tolist() == x[2].tolist())\n")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0 and probe.stdout.strip().endswith("True"), probe.stderr[-2000:]


def test_the_cuda_gemms_are_torchs_grouped_matmul_where_it_applies(simulated_gpu, monkeypatch):
    from fastmoe_kernels import tuning

    bf16 = torch.bfloat16
    facts = dict(packed="", k_dim=64, n_dim=96, element_size=2, num_experts=8, rows=4096, dtype_name="bfloat16",
                 all_rows_grouped=True)
    assert backends.resolve("grouped_gemm", "cuda", CUDA, bf16, **facts) == "cuda"
    assert backends.resolve("grouped_gemm_wgrad", "cuda", CUDA, bf16, **facts) == "cuda"
    # Rows outside every group must be zeros, which torch's kernel leaves unwritten: not for such calls.
    assert backends.resolve("grouped_gemm", "cuda", CUDA, bf16, **dict(facts, all_rows_grouped=False)) == "triton"
    assert backends.resolve("grouped_gemm", "cuda", CUDA, bf16, **dict(facts, packed="n")) == "triton"
    assert backends.resolve("grouped_gemm", "cuda", CUDA, bf16, **dict(facts, n_dim=93)) == "triton"
    # auto: Triton's, unless the device's tuning table measured torch's faster at this shape.
    assert backends.resolve("grouped_gemm", "auto", CUDA, bf16, **facts) == "triton"
    table = tuning.Table(device="x", triton="y", gemms=[dict(key=dict(K=64, N=96, E=8, rows_bucket=4096,
                                                                      dtype="bfloat16"), backend="cuda")])
    monkeypatch.setattr(tuning, "current_table", lambda device=None: table)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backends.refresh()
    assert backends.resolve("grouped_gemm", "auto", CUDA, bf16, **facts) == "cuda"
    assert backends.resolve("grouped_gemm", "auto", CUDA, bf16, **dict(facts, all_rows_grouped=False)) == "triton"
    backends.refresh()
