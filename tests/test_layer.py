"""MoELayer against the token-by-token naive layer: outputs and gradients of x and every
parameter, over expert counts, top-k, dispatch modes, activations, shared and heterogeneous experts."""
import dataclasses
import math

import pytest
import torch

import naive
from fastmoe_kernels import MoEConfig, MoELayer
from tolerances import assert_close

CASES = sorted({(E, k) for E in (1, 2, 7, 64) for k in (1, 2, 8, E) if k <= E})
MODES = {
    "dropless": dict(),
    "cap-probs": dict(capacity_factor=0.8, drop_policy="probs"),
    "cap-position": dict(capacity_factor=1.0, drop_policy="position"),
    "cap-pad": dict(capacity_factor=1.25, drop_policy="probs", pad_to_capacity=True),
}


def make(dtype=torch.float64, **kw):
    fields = dict(d_model=6, d_ff=4, num_experts=4, top_k=2)
    fields.update(kw)
    return MoELayer(dtype=dtype, **fields)


def compare_with_naive(layer, x, dtype=torch.float64):
    """Forward and backward (x and all parameters) of the layer vs the naive layer."""
    x1 = x.clone().requires_grad_()
    y, _ = layer(x1, return_aux_loss=True)
    x2 = x.clone().requires_grad_()
    ref = naive.moe_layer(layer, x2)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, ref, dtype)
    g = torch.randn_like(y)
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad((y * g).sum(), [x1, *params], allow_unused=True)
    ref_grads = torch.autograd.grad((ref * g).sum(), [x2, *params], allow_unused=True)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, got, want in zip(names, grads, ref_grads):
        got = torch.zeros_like(params[names.index(name) - 1]) if got is None else got
        want = torch.zeros_like(got) if want is None else want
        assert_close(got, want, dtype, msg=lambda m: f"gradient of {name}: {m}")
    return y


@pytest.mark.parametrize("E,k", CASES)
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_naive_over_experts_topk_modes(E, k, mode):
    layer = make(num_experts=E, top_k=k, **MODES[mode])
    compare_with_naive(layer, torch.randn(2, 5, 6, dtype=torch.float64))


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "geglu_tanh", "swiglu_oai", "silu", "gelu", "gelu_tanh", "relu",
                                        "relu2"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["dropless", "cap-probs"])
def test_activations_and_biases(activation, bias, dtype, mode):
    layer = make(dtype, num_experts=7, top_k=2, activation=activation, bias=bias, **MODES[mode])
    compare_with_naive(layer, torch.randn(13, 6, dtype=dtype), dtype)


VARIANTS = {
    "heterogeneous": dict(num_experts=5, top_k=2, d_ff=[2, 5, 3, 3, 1]),
    "heterogeneous-cap-gelu": dict(num_experts=5, top_k=3, d_ff=[4, 1, 2, 6, 3], activation="gelu", capacity_factor=0.9, bias=True),
    "shared": dict(num_shared_experts=1, shared_d_ff=5),
    "shared-2-gated": dict(num_shared_experts=2, shared_d_ff=3, shared_expert_gate=True, bias=True),
    "shared-heterogeneous": dict(num_experts=3, d_ff=[2, 3, 4], num_shared_experts=1, shared_d_ff=8),
    "sigmoid-groups-bias": dict(num_experts=8, top_k=3, score_func="sigmoid", num_groups=4, topk_groups=2, expert_bias=True, routed_scaling_factor=2.5),
    "softmax-unnormalized": dict(num_experts=7, top_k=3, normalize_topk=False),
    "sigmoid-unnormalized-cap": dict(num_experts=7, top_k=2, score_func="sigmoid", normalize_topk=False, capacity_factor=1.0, drop_policy="position"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants(variant):
    layer = make(**VARIANTS[variant])
    if layer.router.expert_bias is not None:
        layer.router.expert_bias.normal_(0, 0.2)
    compare_with_naive(layer, torch.randn(3, 4, 6, dtype=torch.float64))


def test_huge_capacity_equals_dropless():
    x = torch.randn(20, 6, dtype=torch.float64)
    dropless = make(num_experts=7, top_k=3)
    capped = make(num_experts=7, top_k=3, capacity_factor=100.0)
    capped.load_state_dict(dropless.state_dict())
    torch.testing.assert_close(capped(x, return_aux_loss=True)[0], dropless(x, return_aux_loss=True)[0], atol=0, rtol=0)
    assert capped.routing_stats.dropped_fraction == 0.0


def test_dropped_assignments_contribute_zero():
    """With capacity 1 per expert and every token on expert 0, only one token gets expert output."""
    layer = make(num_experts=4, top_k=1, capacity_factor=0.25, drop_policy="position")  # C = ceil(.25·8·1/4) = 1
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 1.0
    x = torch.randn(8, 6, dtype=torch.float64)
    x[:, 0] = 5.0  # every token routes to expert 0
    y, _ = layer(x, return_aux_loss=True)
    assert torch.all(y[1:] == 0)
    assert torch.any(y[0] != 0)
    stats = layer.routing_stats
    assert stats.tokens_per_expert.tolist() == [8, 0, 0, 0] and stats.kept_per_expert.tolist() == [1, 0, 0, 0]
    assert math.isclose(stats.dropped_fraction, 7 / 8, rel_tol=1e-6)
    assert stats.max_over_mean == 4.0


def test_experts_without_tokens_get_zero_gradient():
    layer = make(num_experts=64, top_k=1)
    x = torch.randn(3, 6, dtype=torch.float64)
    y, _ = layer(x, return_aux_loss=True)
    y.sum().backward()
    used = set(layer.routing_stats.tokens_per_expert.nonzero().flatten().tolist())
    for e in range(64):
        zero = bool(torch.all(layer.experts.w_up.grad[e] == 0) and torch.all(layer.experts.w_down.grad[e] == 0))
        assert zero == (e not in used)


@pytest.mark.parametrize("mode", list(MODES))
def test_empty_batch(mode):
    layer = make(num_shared_experts=1, **MODES[mode])
    x = torch.randn(0, 6, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert x.grad.shape == (0, 6)
    assert float(layer.aux_losses["total"]) == 0.0


def test_one_dimensional_and_many_leading_dims():
    layer = make()
    x = torch.randn(6, dtype=torch.float64)
    assert layer(x).shape == (6,)
    x4 = torch.randn(2, 3, 2, 6, dtype=torch.float64)
    y4 = layer(x4)
    torch.testing.assert_close(y4.reshape(-1, 6), layer(x4.reshape(-1, 6)))


def test_aux_loss_reaches_gradients_without_trainer_changes():
    layer = make(num_experts=6, top_k=2, aux_loss_coeff=0.3, z_loss_coeff=0.05)
    x = torch.randn(10, 6, dtype=torch.float64)
    g = torch.randn(10, 6, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    auto = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    y, aux = layer(x, return_aux_loss=True)
    ((y * g).sum() + aux).backward()
    for a, b in zip(auto, [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(a, b)
    # And the aux loss does change the router gradient.
    layer.zero_grad()
    (layer(x, return_aux_loss=True)[0] * g).sum().backward()
    assert not torch.allclose(layer.router.weight.grad, auto[0])


@pytest.mark.parametrize("normalization", ["megatron", "mixtral"])
@pytest.mark.parametrize("lb_type", ["micro_batch", "sequence", "global"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_aux_loss_values(normalization, lb_type, score):
    layer = make(num_experts=5, top_k=2, score_func=score, aux_loss_coeff=0.1, z_loss_coeff=0.01,
                 load_balancing_normalization=normalization, load_balancing_type=lb_type)
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    _, total = layer(x, return_aux_loss=True)
    logits = x.reshape(-1, 6) @ layer.router.weight.t()
    idx, _, probs = naive.route(logits, 2, score=score)
    sequences = 3 if lb_type == "sequence" else 1
    lb = naive.load_balancing_loss(probs, idx, 5, 2, normalization, sequences)
    z = naive.z_loss(logits)
    assert_close(layer.aux_losses["load_balancing"], lb.detach())
    assert_close(layer.aux_losses["z_loss"], z.detach())
    assert_close(total, 0.1 * lb + 0.01 * z)


def test_no_aux_loss_when_coefficients_are_zero():
    layer = make(aux_loss_coeff=0.0)
    x = torch.randn(5, 6, dtype=torch.float64)
    y, aux = layer(x, return_aux_loss=True)
    assert float(aux) == 0.0 and "load_balancing" not in layer.aux_losses


def test_expert_bias_update_rule():
    layer = make(num_experts=4, top_k=1, expert_bias=True, expert_bias_update_rate=0.01, aux_loss_coeff=0.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 1.0
    x = torch.randn(10, 6, dtype=torch.float64)
    x[:, 0] = 3.0  # expert 2 overloaded
    layer.train()
    layer(x)
    layer(x)
    assert layer.router.tokens_since_update.tolist() == [0, 0, 20, 0]
    delta = layer.update_expert_bias()
    assert delta.tolist() == pytest.approx([0.01, 0.01, -0.01, 0.01])
    assert layer.router.expert_bias.tolist() == pytest.approx([0.01, 0.01, -0.01, 0.01])
    assert layer.router.tokens_since_update.sum() == 0
    # The bias is a buffer: saved in the state dict, not a parameter.
    assert "router.expert_bias" in layer.state_dict()
    assert all("expert_bias" not in n for n, _ in layer.named_parameters())
    # Eval forwards do not count.
    layer.eval()
    layer(x)
    assert layer.router.tokens_since_update.sum() == 0


def test_bias_shifts_selection_in_layer():
    layer = make(num_experts=4, top_k=1, expert_bias=True)
    x = torch.randn(16, 6, dtype=torch.float64)
    layer(x)
    before = layer.routing_stats.tokens_per_expert.clone()
    with torch.no_grad():
        layer.router.expert_bias[3] = 100.0
    layer(x)
    assert layer.routing_stats.tokens_per_expert.tolist() == [0, 0, 0, 16]
    assert before.sum() == 16


def test_jitter_and_noise_only_in_training():
    layer = make(num_experts=8, top_k=2, router_jitter=0.5, router_noise_std=1.0)
    x = torch.randn(40, 6, dtype=torch.float64)
    layer.eval()
    a, b = layer(x), layer(x)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    layer.train()
    c = layer(x)
    assert not torch.allclose(a, c)


def test_gradcheck_small_layer():
    layer = make(num_experts=3, top_k=2, d_ff=3, num_shared_experts=1, shared_d_ff=2, bias=True)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_: layer(x_, return_aux_loss=True)[0], (x,))


def test_bf16_forward_backward_close_to_fp32():
    low = make(torch.bfloat16, d_model=32, d_ff=16, num_experts=8, top_k=2)
    ref = make(torch.float32, d_model=32, d_ff=16, num_experts=8, top_k=2)
    # The reference holds the bf16 weights exactly (upcast), so both route identically and only the
    # bf16 arithmetic differs.
    ref.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in low.state_dict().items()})
    x = torch.randn(64, 32).bfloat16()
    y_ref, _ = ref(x.float(), return_aux_loss=True)
    y, _ = low(x, return_aux_loss=True)
    assert torch.equal(low.routing_stats.tokens_per_expert, ref.routing_stats.tokens_per_expert)
    assert y.dtype == torch.bfloat16
    err = (y.float() - y_ref).norm() / y_ref.norm()
    assert err < 2e-2, err
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in low.parameters())


def test_fp32_master_weights_with_bf16_input():
    layer = make(torch.float32, d_model=16, d_ff=8, num_experts=4, top_k=2)
    y = layer(torch.randn(10, 16).bfloat16())
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.experts.w_up.grad.dtype == torch.float32


def test_config_and_kwargs_are_equivalent():
    cfg = MoEConfig(d_model=8, d_ff=4, num_experts=4, top_k=2, capacity_factor=1.25)
    a = MoELayer(cfg)
    b = MoELayer(d_model=8, d_ff=4, num_experts=4, top_k=2, capacity_factor=1.25)
    assert a.config == b.config
    c = MoELayer(cfg, top_k=3)
    assert c.config.top_k == 3 and c.config.capacity_factor == 1.25
    assert a.num_parameters() == sum(p.numel() for p in a.parameters())
    # router 4·8 + 2 of 4 experts of (2·4·8 + 8·4) parameters
    assert a.num_parameters(active=True) == 32 + 2 * 96


def test_routing_stats_before_forward_is_none():
    assert make().routing_stats is None


def test_router_precision_input_rounds_the_logits_to_the_input_dtype():
    layer = MoELayer(d_model=16, d_ff=8, num_experts=8, top_k=2, router_precision="input").to(torch.bfloat16)
    x = torch.randn(40, 16).to(torch.bfloat16)
    out = layer.router(x)
    assert out.logits.dtype == torch.float32
    assert torch.equal(out.logits, torch.nn.functional.linear(x, layer.router.weight).float())
    default = MoELayer(dataclasses.replace(layer.config, router_precision="fp32"))
    default.load_state_dict(layer.state_dict())
    x32 = x.float()
    assert torch.equal(layer.float().router(x32).logits, default.router(x32).logits)  # fp32 input: the same
