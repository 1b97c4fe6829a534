"""The layer on every backend against a float64 reference, forward and backward, in fp32 and bf16, in
every dispatch mode; CUDA-graph capture; sizes past the GPU's grid limits.

The layer tests run on the CPU too (the backends the CPU has: torch, cpp, Triton interpreted in
fp32), so that a red GPU test means a kernel bug, not a flaky test: the reference is built from the
low-precision parameters and input (rounded once), so it routes exactly like the layer under test —
an unrounded reference flips near-tie routing decisions in bf16 in ~40% of seeds. Errors are held to
twice the torch backend's own error in the same dtype on the same device (flash-attention's rule),
with the suite's relative-error bound (tests/tolerances.py) as a floor. Run the GPU ones with `pytest -m gpu tests/`.
"""
import pytest
import torch

from fastmoe_kernels import MoELayer, backends, flush_value_checks, ops
from tolerances import REL_ERR

MODES = {
    "dropless": dict(),
    "capacity": dict(capacity_factor=1.0, drop_policy="probs"),
    "capacity-pad": dict(capacity_factor=1.25, drop_policy="position", pad_to_capacity=True),
    "heterogeneous-shared": dict(d_ff=[64] * 4 + [192] * 4, num_shared_experts=1, shared_d_ff=128),
    "sigmoid-groups-bias": dict(score_func="sigmoid", num_groups=4, topk_groups=2, expert_bias=True, bias=True),
}
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def kernel_backend(device: str) -> str:
    return "cuda" if device == "cuda" else "cpp"


def relative_error(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def rounded_state(layer: MoELayer, dtype: torch.dtype) -> dict:
    """The layer's state with every float tensor rounded to ``dtype`` (the loss-free bias stays fp32,
    as the layer keeps it)."""
    return {k: v.to(dtype) if v.is_floating_point() and "expert_bias" not in k else v
            for k, v in layer.state_dict().items()}


def run(layer, x, g):
    x = x.clone().requires_grad_()
    y = layer(x)
    (y.double() * g.to(y.device)).sum().backward()
    return [y, x.grad] + [p.grad for p in layer.parameters()]


def errors_against_fp64(device, backend, mode, dtype):
    fields = dict(d_model=128, d_ff=128, num_experts=8, top_k=2, aux_loss_coeff=1e-2)
    fields.update(MODES[mode])
    source = MoELayer(dtype=torch.float64, **fields)
    state = rounded_state(source, dtype)
    ref = MoELayer(dtype=torch.float64, **fields)
    ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
    x = torch.randn(257, 128).to(dtype)
    g = torch.randn(257, 128, dtype=torch.float64)
    want = run(ref, x.double(), g)
    layer = MoELayer(device=device, dtype=dtype, backend=backend, **fields)
    layer.load_state_dict(state)
    got = run(layer, x.to(device), g)
    flush_value_checks()
    return [relative_error(a, b) for a, b in zip(got, want)]


def skip_unless_available(backend, device, dtype):
    ok, why = backends.availability(backend, torch.device(device))
    if not ok:
        pytest.skip(f"backend {backend!r} not available on {device}: {why}")
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter computes bf16 dots wrongly; bf16 Triton is checked on a GPU")


def skip_slow_interpreter(backend, device, mode):
    # The interpreter takes ~1 min per mode at these sizes; tests/kernel_tests/ covers every mode at small ones.
    if backend == "triton" and device == "cpu" and mode != "dropless":
        pytest.skip("Triton interpreted: one mode here, every mode in tests/kernel_tests/")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton", "csrc"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_matches_the_fp64_reference(device, backend, mode, dtype):
    backend = kernel_backend(device) if backend == "csrc" else backend
    skip_unless_available(backend, device, dtype)
    skip_slow_interpreter(backend, device, mode)
    errors = errors_against_fp64(device, backend, mode, dtype)
    baseline = errors if backend == "torch" else errors_against_fp64(device, "torch", mode, dtype)
    names = ["y", "grad_x"] + [f"grad[{i}]" for i in range(len(errors) - 2)]
    for name, err, base in zip(names, errors, baseline):
        assert err <= max(2 * base, REL_ERR[dtype]), f"{name}: relative error {err:.2e} (torch in this dtype: {base:.2e})"


# ---- GPU only ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["dropless", "capacity-pad", "sigmoid-groups-bias"])
def test_layer_captures_into_a_cuda_graph(mode):
    """After warm-up (extension load, autotuning, weight layouts), the forward has no host sync and
    replays from a CUDA graph; so does a training step through make_graphed_callables."""
    fields = dict(d_model=128, d_ff=256, num_experts=8, top_k=2)
    fields.update(MODES[mode])
    layer = MoELayer(device="cuda", dtype=torch.bfloat16, **fields)
    x = torch.randn(512, 128, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            layer(x)
    torch.cuda.current_stream().wait_stream(side)
    flush_value_checks()
    graph = torch.cuda.CUDAGraph()
    static_x = x.clone()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_y = layer(static_x)
    fresh = torch.randn_like(x)
    static_x.copy_(fresh)
    graph.replay()
    with torch.no_grad():
        torch.testing.assert_close(static_y, layer(fresh))
    # A training step: forward and backward captured together.
    step = torch.cuda.make_graphed_callables(layer, (x.clone().requires_grad_(),))
    inp = fresh.clone().requires_grad_()
    step(inp).float().square().sum().backward()
    assert torch.isfinite(inp.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_routing_stats_past_the_grids_second_axis(backend):
    ok, why = backends.availability(backend, torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    S, E = 70_000, 8  # more segments (sequences) than a grid's y axis holds
    probs = torch.softmax(torch.randn(S * 2, E, device="cuda"), -1)
    idx = torch.randint(0, E, (S * 2, 2), device="cuda", dtype=torch.int32)
    tokens, prob_mean = ops.routing_stats(probs, idx, S, backend=backend)
    ref_tokens, ref_mean = ops.routing_stats(probs, idx, S, backend="torch")
    torch.testing.assert_close(tokens, ref_tokens)
    torch.testing.assert_close(prob_mean, ref_mean)


@pytest.mark.gpu
def test_triton_launches_on_the_tensors_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    layer = MoELayer(d_model=64, d_ff=64, num_experts=4, top_k=2, backend="triton", device="cuda:1")
    with torch.cuda.device(0):
        y = layer(torch.randn(33, 64, device="cuda:1"))
    assert y.device == torch.device("cuda:1") and torch.isfinite(y).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_bad_values_are_reported_asynchronously_without_a_fault(backend):
    """On a GPU the value checks are asynchronous (the default): the kernels run on the bad values
    first and must stay in bounds; the error comes from a later check or the flush, and the CUDA
    context stays usable."""
    ok, why = backends.availability(backend, torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    a, b = torch.randn(64, 32, device="cuda"), torch.randn(2, 32, 16, device="cuda")
    bad = torch.tensor([0, 5, 100_000], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.grouped_gemm(a, b, bad, backend=backend)
        flush_value_checks()
    layer = MoELayer(d_model=32, d_ff=32, num_experts=4, top_k=2, expert_bias=True, score_func="sigmoid",
                     backend=backend, device="cuda").train()
    x = torch.randn(16, 32, device="cuda")
    x[3] = float("nan")
    with pytest.raises(ValueError, match="`logits`"):
        layer(x)
        flush_value_checks()
    y = layer(torch.randn(16, 32, device="cuda"))  # the context is intact
    flush_value_checks()
    assert torch.isfinite(y).all()
