"""Bad input raises an error naming the argument — never a crash, a hang or a silent result."""
import pytest
import torch

from fastmoe_kernels import BackendUnavailableError, backends, MoEConfig, MoELayer, losses, set_value_checks
from fastmoe_kernels.ops import grouped_gemm, make_plan, permute, route_topk, routing_stats, unpermute


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(top_k=9), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(num_experts=0), "num_experts"),
        (dict(d_model=0), "d_model"),
        (dict(d_ff=0), "d_ff"),
        (dict(d_ff=[4, 4]), "d_ff"),
        (dict(d_ff=[4] * 7 + [-1]), "d_ff"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(activation="tanh"), "activation"),
        (dict(score_func="relu"), "score_func"),
        (dict(router_precision="bf16"), "router_precision"),
        (dict(activation="geglu", activation_alpha=1.702), "activation_alpha"),
        (dict(activation="relu2", activation_limit=7.0), "activation_limit"),
        (dict(activation="swiglu_oai", activation_alpha=0.0), "activation_alpha"),
        (dict(activation="swiglu", activation_limit=-1.0), "activation_limit"),
        (dict(activation="swiglu", activation_limit=float("nan")), "activation_limit"),
        (dict(drop_policy="random", capacity_factor=1.0), "drop_policy"),
        (dict(pad_to_capacity=True), "pad_to_capacity"),
        (dict(num_groups=3, topk_groups=1), "num_groups"),
        (dict(num_groups=4, topk_groups=5), "topk_groups"),
        (dict(num_groups=4), "num_groups/topk_groups"),
        (dict(num_groups=4, topk_groups=1, top_k=3), "top_k"),
        (dict(d_ff=[4] * 7 + [8], num_shared_experts=1), "shared_d_ff"),
        (dict(shared_expert_gate=True), "shared_expert_gate"),
        (dict(aux_loss_coeff=-1.0), "aux_loss_coeff"),
        (dict(load_balancing_type="batch"), "load_balancing_type"),
        (dict(load_balancing_normalization="switch"), "load_balancing_normalization"),
        (dict(backend="cuda-graphs"), "backend"),
        (dict(router_jitter=1.5), "router_jitter"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    ],
)
def test_config_rejects(fields, match):
    base = dict(d_model=8, d_ff=4, num_experts=8, top_k=2)
    base.update(fields)
    with pytest.raises(ValueError, match=match):
        MoEConfig(**base)


def test_layer_input_checks():
    layer = MoELayer(d_model=8, d_ff=4, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="d_model=8"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match="`x`"):
        layer(torch.randint(0, 3, (3, 8)))
    with pytest.raises(TypeError, match="`x`"):
        layer([[0.0] * 8])
    with pytest.raises(TypeError, match="MoEConfig"):
        MoELayer({"d_model": 8})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits(bad):
    logits = torch.randn(4, 6)
    logits[2, 3] = bad
    with pytest.raises(ValueError, match="logits.*NaN/Inf"):
        route_topk(logits, 2)
    layer = MoELayer(d_model=8, d_ff=4, num_experts=4, top_k=2)
    x = torch.randn(3, 8)
    x[1, 1] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer(x)


def test_route_topk_checks():
    with pytest.raises(ValueError, match="`logits`"):
        route_topk(torch.randn(8), 2)
    with pytest.raises(TypeError, match="`logits`"):
        route_topk(torch.randint(0, 2, (4, 8)), 2)
    with pytest.raises(ValueError, match="`k`"):
        route_topk(torch.randn(4, 8), 9)
    with pytest.raises(ValueError, match="`k`"):
        route_topk(torch.randn(4, 8), 0)
    with pytest.raises(ValueError, match="`score`"):
        route_topk(torch.randn(4, 8), 2, score="tanh")
    with pytest.raises(ValueError, match="`expert_bias`"):
        route_topk(torch.randn(4, 8), 2, expert_bias=torch.zeros(7))
    with pytest.raises(ValueError, match="`expert_bias`.*meta"):
        route_topk(torch.randn(4, 8), 2, expert_bias=torch.zeros(8, device="meta"))
    with pytest.raises(ValueError, match="`num_groups`"):
        route_topk(torch.randn(4, 8), 2, num_groups=3, topk_groups=1)
    with pytest.raises(ValueError, match="`topk_groups`"):
        route_topk(torch.randn(4, 8), 2, num_groups=4)


def test_make_plan_checks():
    idx = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"`expert_idx`.*\[0, 3\)"):
        make_plan(idx, 3)
    with pytest.raises(ValueError, match=r"`expert_idx`.*or -1"):
        make_plan(torch.tensor([[0, -2]]), 4)
    with pytest.raises(TypeError, match="`expert_idx`"):
        make_plan(idx.float(), 4)
    with pytest.raises(ValueError, match="`weight`"):
        make_plan(idx, 4, capacity=1, drop_policy="probs")
    with pytest.raises(ValueError, match="`weight`"):
        make_plan(idx, 4, capacity=1, drop_policy="probs", weight=torch.rand(2, 3))
    with pytest.raises(ValueError, match="`pad=True`"):
        make_plan(idx, 4, pad=True)
    with pytest.raises(ValueError, match="`capacity`"):
        make_plan(idx, 4, capacity=-2, drop_policy="position")
    with pytest.raises(ValueError, match="`drop_policy`"):
        make_plan(idx, 4, capacity=1, drop_policy="random")


def test_out_of_range_ids_are_dropped_when_value_checks_are_off():
    """Without value checks nothing raises, and nothing out of range is read or written either:
    such assignments are dropped."""
    idx = torch.tensor([[0, 5], [-3, 1]], dtype=torch.int32)
    set_value_checks(False)
    try:
        plan = make_plan(idx, 4)
        x = torch.randn(2, 3)
        out = unpermute(permute(x, plan), plan, torch.ones(2, 2))
    finally:
        set_value_checks(None)
    assert plan.row.tolist() == [[0, -1], [-1, 1]]
    assert plan.routed_counts.tolist() == [1, 1, 0, 0] and plan.offsets.tolist() == [0, 1, 2, 2, 2]
    torch.testing.assert_close(out, x)


def test_permute_unpermute_checks():
    plan = make_plan(torch.tensor([[0, 1], [1, 2]], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="`x`"):
        permute(torch.randn(3, 4), plan)
    with pytest.raises(TypeError, match="`plan`"):
        permute(torch.randn(2, 4), "plan")
    with pytest.raises(ValueError, match="`y`"):
        unpermute(torch.randn(3, 4), plan, torch.rand(2, 2))
    with pytest.raises(ValueError, match="`weight`"):
        unpermute(torch.randn(4, 4), plan, torch.rand(2, 3))


def test_grouped_gemm_checks():
    a, b = torch.randn(6, 4), torch.randn(3, 4, 5)
    good = torch.tensor([0, 2, 4, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="`b`"):
        grouped_gemm(a, torch.randn(2, 4, 5), good)
    with pytest.raises(ValueError, match="`b`"):
        grouped_gemm(a, torch.randn(3, 3, 5), good)
    with pytest.raises(TypeError, match="`offsets`"):
        grouped_gemm(a, b, good.float())
    with pytest.raises(ValueError, match="`offsets`.*non-decreasing"):
        grouped_gemm(a, b, torch.tensor([0, 4, 2, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="`offsets`"):
        grouped_gemm(a, b, torch.tensor([0, 2, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="`bias`"):
        grouped_gemm(a, b, good, bias=torch.randn(3, 4))
    with pytest.raises(ValueError, match="`widths`"):
        grouped_gemm(a, torch.randn(4, 9), good, packed="n", widths=[3, 3])
    with pytest.raises(ValueError, match="`packed`"):
        grouped_gemm(a, b, good, packed="m")
    with pytest.raises(ValueError, match="`b`"):
        grouped_gemm(a, torch.randn(4, 8), good, packed="n", widths=[3, 3, 3])


def test_routing_stats_and_loss_checks():
    probs = torch.softmax(torch.randn(5, 4), -1)
    idx = torch.randint(0, 4, (5, 2))
    with pytest.raises(ValueError, match="`num_segments`"):
        routing_stats(probs, idx, 2)
    with pytest.raises(ValueError, match="`expert_idx`"):
        routing_stats(probs, idx + 4)
    with pytest.raises(ValueError, match="`normalization`"):
        losses.load_balancing_loss(probs, idx, normalization="switch")
    with pytest.raises(ValueError, match="`expert_idx`"):
        losses.load_balancing_loss(probs, idx[:3])


def test_backend_checks(monkeypatch):
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="backend"):
        route_topk(x, 2, backend="cupy")
    monkeypatch.setattr(backends, "_env_backend", None)  # FASTMOE_BACKEND is read again
    monkeypatch.setattr(backends, "_resolved", {})
    monkeypatch.setenv("FASTMOE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTMOE_BACKEND"):
        route_topk(x, 2)
    monkeypatch.setenv("FASTMOE_BACKEND", "torch")
    route_topk(x, 2)
    monkeypatch.setattr(backends, "_env_backend", None)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="triton.*CUDA"):
        route_topk(x, 2, backend="triton")


def test_layer_dtype_must_be_floating():
    with pytest.raises(TypeError, match="`dtype`"):
        MoELayer(d_model=8, d_ff=4, num_experts=4, top_k=2, dtype=torch.complex64)


def test_loss_errors_name_the_users_argument():
    probs, idx = torch.softmax(torch.randn(6, 4), -1), torch.randint(0, 4, (6, 2))
    with pytest.raises(ValueError, match="`num_sequences`"):
        losses.load_balancing_loss(probs, idx, num_sequences=0)
    with pytest.raises(ValueError, match="`num_sequences`"):
        losses.load_balancing_loss(probs, idx, num_sequences=4)
    with pytest.raises(ValueError, match="`coeff`"):
        losses.z_loss(torch.randn(3, 4), coeff=float("nan"))


def test_checkpoint_of_other_expert_widths_is_refused():
    a = MoELayer(d_model=8, d_ff=[8, 24, 16, 16], num_experts=4, top_k=2)
    b = MoELayer(d_model=8, d_ff=[16, 16, 8, 24], num_experts=4, top_k=2)  # same parameter shapes
    with pytest.raises(ValueError, match=r"expert widths \[8, 24, 16, 16\] differ"):
        b.load_state_dict(a.state_dict())
    older = {k: v for k, v in a.state_dict().items() if k != "experts.expert_widths"}
    MoELayer(d_model=8, d_ff=[8, 24, 16, 16], num_experts=4, top_k=2).load_state_dict(older)  # accepted


def test_capacity_beyond_int32_means_the_same_everywhere():
    idx = torch.tensor([[0], [0], [1], [0]])
    plan = make_plan(idx, 2, 2**40, "position")
    assert plan.counts.tolist() == [3, 1] and plan.capacity == 2**40
    with pytest.raises(ValueError, match="`capacity`"):
        make_plan(idx, 2, 2**40, "position", pad=True)
