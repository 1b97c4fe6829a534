"""GPU checks (marker `gpu`): the layer on CUDA in every available backend against the CPU float64
reference, in fp32 and bf16, forward and backward. Run them all with `pytest -m gpu tests/`."""
import pytest
import torch

from fastmoe_kernels import MoELayer, backend_report

pytestmark = pytest.mark.gpu

MODES = {
    "dropless": dict(),
    "capacity": dict(capacity_factor=1.0, drop_policy="probs"),
    "capacity-pad": dict(capacity_factor=1.25, drop_policy="position", pad_to_capacity=True),
    "heterogeneous-shared": dict(d_ff=[64] * 4 + [192] * 4, num_shared_experts=1, shared_d_ff=128),
}


def cuda_backends():
    if not torch.cuda.is_available():
        return ["torch"]
    report = backend_report(torch.device("cuda"))
    return [b for b, status in report.items() if status == "available"]


def relative_error(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_on_gpu_matches_cpu_fp64(backend, mode, dtype):
    if backend not in cuda_backends():
        pytest.skip(f"backend {backend!r} not available on CUDA: {backend_report(torch.device('cuda'))[backend]}")
    fields = dict(d_model=128, d_ff=128, num_experts=8, top_k=2, aux_loss_coeff=0.0)
    fields.update(MODES[mode])
    ref = MoELayer(dtype=torch.float64, **fields)
    layer = MoELayer(device="cuda", dtype=dtype, backend=backend, **fields)
    layer.load_state_dict({k: v.to(dtype) if v.is_floating_point() and "expert_bias" not in k else v for k, v in ref.state_dict().items()})
    x = torch.randn(257, 128, dtype=torch.float64)
    g = torch.randn_like(x)
    x_ref = x.clone().requires_grad_()
    y_ref = ref(x_ref)
    (y_ref * g).sum().backward()
    x_gpu = x.to("cuda", dtype).requires_grad_()
    y = layer(x_gpu)
    (y.double() * g.cuda()).sum().backward()
    # Routing decisions can flip on near-ties in low precision; compare with bounded relative error.
    limit = 1e-5 if dtype == torch.float32 else 3e-2
    assert relative_error(y.cpu(), y_ref) < limit
    assert relative_error(x_gpu.grad.cpu(), x_ref.grad) < limit * 2
    for (name, p), p_ref in zip(layer.named_parameters(), ref.parameters()):
        assert relative_error(p.grad.cpu(), p_ref.grad) < limit * 4, name
