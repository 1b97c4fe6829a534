"""The whole MoELayer on a kernel backend equals the torch backend (same weights), fused or not."""
import pytest
import torch

from fastmoe_kernels import MoELayer
from kernel_tests.helpers import assert_rel

CONFIGS = {
    "dropless": dict(),
    "capacity-probs": dict(capacity_factor=0.8, drop_policy="probs"),
    "capacity-pad-position": dict(capacity_factor=1.25, drop_policy="position", pad_to_capacity=True),
    "sigmoid-groups-bias-shared": dict(score_func="sigmoid", num_groups=4, topk_groups=2, expert_bias=True,
                                       num_shared_experts=1, shared_d_ff=16, routed_scaling_factor=2.0),
    "heterogeneous-gelu-bias": dict(d_ff=[8, 24, 16, 32, 8, 16, 24, 40], activation="gelu", bias=True),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("fused", [True, False])
def test_layer_matches_torch_backend(backend, device, config, fused):
    fields = dict(d_model=32, d_ff=24, num_experts=8, top_k=2, z_loss_coeff=1e-3, fused_experts=fused)
    fields.update(CONFIGS[config])
    ref = MoELayer(device=device, backend="torch", **fields)
    if ref.router.expert_bias is not None:
        ref.router.expert_bias.normal_(0, 0.1)
    layer = MoELayer(device=device, backend=backend, **fields)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(3, 11, 32, device=device)
    g = torch.randn_like(x)
    outs = []
    for m in (layer, ref):
        xx = x.clone().requires_grad_()
        (m(xx) * g).sum().backward()
        outs.append([m(x).detach(), xx.grad] + [p.grad for p in m.parameters()] + [m.aux_losses["total"]])
    names = ["out", "grad_x"] + [n for n, _ in layer.named_parameters()] + ["aux"]
    for name, a, r in zip(names, *outs):
        assert_rel(a, r, torch.float32, scale=3.0, what=name)


ACTIVATION_CASES = {
    "swiglu": dict(activation="swiglu"),
    "swiglu-clamped": dict(activation="swiglu", activation_limit=0.5),
    "swiglu_oai": dict(activation="swiglu_oai", activation_limit=0.5, bias=True),
    "geglu": dict(activation="geglu"),
    "geglu_tanh": dict(activation="geglu_tanh", bias=True),
    "silu": dict(activation="silu"),
    "gelu": dict(activation="gelu"),
    "gelu_tanh": dict(activation="gelu_tanh"),
    "relu": dict(activation="relu"),
    "relu2": dict(activation="relu2", bias=True),
}


@pytest.mark.parametrize("case", list(ACTIVATION_CASES))
def test_every_activation_matches_torch_backend(backend, device, case):
    """Forward and backward of every activation (limits small enough to clamp) on the kernel backend."""
    fields = dict(d_model=32, d_ff=24, num_experts=8, top_k=2, **ACTIVATION_CASES[case])
    ref = MoELayer(device=device, backend="torch", **fields)
    layer = MoELayer(device=device, backend=backend, **fields)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(3, 11, 32, device=device) * 4
    g = torch.randn_like(x)
    outs = []
    for m in (layer, ref):
        xx = x.clone().requires_grad_()
        y = m(xx)
        (y * g).sum().backward()
        outs.append([y.detach(), xx.grad] + [p.grad for p in m.parameters()])
    names = ["out", "grad_x"] + [n for n, _ in layer.named_parameters()]
    for name, a, r in zip(names, *outs):
        assert_rel(a, r, torch.float32, scale=3.0, what=f"{case} {name}")
