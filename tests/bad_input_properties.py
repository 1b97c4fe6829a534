"""Property-based checks (hypothesis) of every backend on valid and invalid input. Run through
tests/test_bad_input.py, in a process of its own: a crash is a failure there, not a lost run.

- valid input: every backend equals the torch reference (routing, plan, gather/combine, grouped GEMM,
  the fused expert MLP), for odd sizes, empty batches, capacity 0, ids beyond int32, non-finite bias;
- invalid input: every backend raises the same error class, before any kernel runs, naming the argument.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmoe_kernels import MoEConfig, backends, set_value_checks
from fastmoe_kernels.experts import GroupedExperts
from fastmoe_kernels.ops import grouped_gemm, make_plan, moe_mlp, permute, route_topk, routing_stats, unpermute

BACKENDS = [b for b in ("torch", "cpp", "triton") if backends.availability(b, torch.device("cpu"))[0]]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def routings(draw):
    E = draw(st.integers(1, 9))
    k = draw(st.integers(1, E))
    T = draw(st.integers(0, 12))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    weight = torch.rand(T, k, generator=g)
    mode = draw(st.sampled_from(["dropless", "probs", "position", "pad"]))
    capacity = None if mode == "dropless" else draw(st.integers(0, max(T * k, 1)))
    return dict(idx=idx.to(draw(st.sampled_from([torch.int32, torch.int64]))), weight=weight, E=E,
                capacity=capacity, policy="position" if mode == "position" else "probs", pad=mode == "pad", seed=seed)


def plan_of(r, backend):
    return make_plan(r["idx"], r["E"], r["capacity"], r["policy"], r["weight"], r["pad"], backend=backend)


@given(routings())
@SETTINGS
def test_plans_and_row_movement_agree_on_every_backend(r):
    want = plan_of(r, "torch")
    T, d = r["idx"].shape[0], 5
    x = torch.randn(T, d, generator=torch.Generator().manual_seed(r["seed"]))
    y_ref = unpermute(permute(x, want, backend="torch") * 2, want, r["weight"], backend="torch")
    for backend in BACKENDS:
        got = plan_of(r, backend)
        for field in ("counts", "routed_counts", "offsets", "row", "assignment"):
            assert torch.equal(getattr(got, field), getattr(want, field)), (backend, field)
        y = unpermute(permute(x, got, backend=backend) * 2, got, r["weight"], backend=backend)
        torch.testing.assert_close(y, y_ref)


@given(routings(), st.sampled_from(["swiglu", "gelu"]), st.booleans(), st.lists(st.integers(0, 12), min_size=9, max_size=9))
@SETTINGS
def test_the_expert_mlp_agrees_on_every_backend(r, activation, bias, widths):
    E = r["E"]
    widths = tuple(widths[:E]) if any(widths[:E]) else (4,) * E
    torch.manual_seed(r["seed"])
    experts = GroupedExperts(8, widths if len(set(widths)) > 1 else (max(widths[0], 1),) * E, activation, bias)
    plan = plan_of(r, "torch")
    x = torch.randn(r["idx"].shape[0], 8)
    outputs = {}
    for backend in BACKENDS:
        experts.zero_grad()
        xx, ww = x.clone().requires_grad_(), r["weight"].clone().requires_grad_()
        out = experts.forward_tokens(xx, plan, ww, backend=backend)
        out.sum().backward()
        outputs[backend] = [out, xx.grad, ww.grad] + [p.grad.clone() for p in experts.parameters()]
    for backend, values in outputs.items():
        for a, b in zip(values, outputs["torch"]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=backend)


@given(st.integers(1, 8), st.data())
@SETTINGS
def test_routing_agrees_on_every_backend_even_with_non_finite_keys(E, data):
    k = data.draw(st.integers(1, E))
    T = data.draw(st.integers(0, 7))
    special = st.sampled_from([0.0, 1.0, -1.0, math.inf, -math.inf, math.nan])
    logits = torch.tensor(data.draw(st.lists(st.lists(st.floats(-5, 5) | special, min_size=E, max_size=E),
                                             min_size=T, max_size=T)), dtype=torch.float32).view(T, E)
    bias = torch.tensor(data.draw(st.lists(special, min_size=E, max_size=E)), dtype=torch.float32)
    groups = data.draw(st.sampled_from([g for g in range(1, E + 1) if E % g == 0]))
    topk_groups = data.draw(st.integers(1, groups))
    if k > topk_groups * (E // groups):
        groups = topk_groups = 1
    kw = dict(score="sigmoid", expert_bias=bias, num_groups=groups, topk_groups=topk_groups)
    set_value_checks(False)  # non-finite logits are the value checks' to report; here the kernels' order
    try:
        want = route_topk(logits, k, backend="torch", **kw)[0]
        for backend in BACKENDS:
            got = route_topk(logits, k, backend=backend, **kw)[0]
            assert torch.equal(got, want), (backend, got, want)
            assert all(len(set(row.tolist())) == k for row in got), "an expert chosen twice"
    finally:
        set_value_checks(None)


@given(st.integers(0, 6), st.integers(2, 5), st.sampled_from([2**32 + 1, -(2**33), 2**40]))
@SETTINGS
def test_ids_beyond_int32_are_dropped_everywhere(T, E, big):
    idx = torch.randint(0, E, (T, 1), dtype=torch.int64)
    if T:
        idx[0, 0] = big
    probs = torch.softmax(torch.randn(T, E), -1)
    set_value_checks(False)
    try:
        want = make_plan(idx, E, backend="torch")
        stats = routing_stats(probs, idx, backend="torch")[0]
        for backend in BACKENDS:
            assert torch.equal(make_plan(idx, E, backend=backend).row, want.row), backend
            assert torch.equal(routing_stats(probs, idx, backend=backend)[0], stats), backend
    finally:
        set_value_checks(None)


# ---- invalid input: the same error everywhere, naming the argument -----------------------------------
def bad_calls(T=6, E=4, k=2, d=8, f=8):
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int()
    plan = make_plan(idx, E)
    x, w = torch.randn(T, d), torch.rand(T, k)
    ex = GroupedExperts(d, (f,) * E, "swiglu")
    up, down = ex.w_up.detach(), ex.w_down.detach()
    offsets = torch.tensor([0, 2, 4, 5, 6], dtype=torch.int32)
    return {
        "x of other tokens": (lambda b: moe_mlp(torch.randn(3, d), plan, w, up, down, backend=b), "`x`"),
        "int x": (lambda b: moe_mlp(x.long(), plan, w, up, down, backend=b), "`x`"),
        "weight shape": (lambda b: moe_mlp(x, plan, w[:, :1], up, down, backend=b), "`weight`"),
        "w_down of another d": (lambda b: moe_mlp(x, plan, w, up, torch.randn(E, 12, f), backend=b), "`w_down`"),
        "w_up of other experts": (lambda b: moe_mlp(x, plan, w, up[:3], down, backend=b), "`w_up`"),
        "bad bias": (lambda b: moe_mlp(x, plan, w, up, down, b_up=torch.randn(E, 3), backend=b), "`b_up`"),
        "bad widths": (lambda b: moe_mlp(x, plan, w, torch.randn(20, d), torch.randn(d, 10), widths=[5, 5], backend=b),
                       "`widths`"),
        "bad activation": (lambda b: moe_mlp(x, plan, w, up, down, "tanh", backend=b), "`activation`"),
        "permute x rows": (lambda b: permute(torch.randn(5, d), plan, backend=b), "`x`"),
        "unpermute weight": (lambda b: unpermute(torch.randn(plan.num_rows, d), plan, w.t(), backend=b), "`weight`"),
        "gemm offsets dtype": (lambda b: grouped_gemm(x, torch.randn(E, d, f), offsets.float(), backend=b), "`offsets`"),
        "gemm b shape": (lambda b: grouped_gemm(x, torch.randn(E, d + 1, f), offsets, backend=b), "`b`"),
        "k > E": (lambda b: route_topk(torch.randn(T, E), E + 1, backend=b), "`k`"),
        "capacity < 0": (lambda b: make_plan(idx, E, -3, "position", backend=b), "`capacity`"),
        "segments": (lambda b: routing_stats(torch.rand(T, E), idx, 4, backend=b), "`num_segments`"),
    }


@pytest.mark.parametrize("case", list(bad_calls()))
def test_invalid_input_raises_the_same_named_error_on_every_backend(case):
    errors = {}
    for backend in BACKENDS:
        call, name = bad_calls()[case]
        with pytest.raises((ValueError, TypeError)) as info:
            call(backend)
        assert name in str(info.value), f"{backend}: {info.value}"
        errors[backend] = type(info.value)
    assert len(set(errors.values())) == 1, errors


FIELDS = {"capacity_factor": [math.inf, math.nan, 1e300, -1.0, 0.0], "aux_loss_coeff": [math.nan, -1.0, math.inf],
          "z_loss_coeff": [math.nan, math.inf], "expert_bias_update_rate": [math.nan, -0.1],
          "routed_scaling_factor": [0.0, math.nan, math.inf], "router_jitter": [1.0, math.nan],
          "router_noise_std": [math.nan, -1.0], "bias": ["yes", 1], "init_std": [0.0, math.nan]}


@given(st.sampled_from([(f, v) for f, vs in FIELDS.items() for v in vs]))
@SETTINGS
def test_config_refuses_non_finite_and_absurd_values_by_name(field_value):
    field, value = field_value
    with pytest.raises(ValueError, match=f"MoEConfig.{field}"):
        MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, **{field: value})


@given(routings())
@SETTINGS
def test_a_dropped_assignment_adds_zero_whatever_its_weight(r):
    plan = plan_of(r, "torch")
    T = r["idx"].shape[0]
    weight = torch.where(plan.row < 0, float("nan"), r["weight"])  # NaN on every dropped assignment
    y = torch.randn(plan.num_rows, 3)
    want = unpermute(y, plan, weight, backend="torch")
    assert torch.isfinite(want).all()
    for backend in BACKENDS:
        torch.testing.assert_close(unpermute(y, plan, weight, backend=backend), want)
        experts = GroupedExperts(3, (4,) * r["E"], "swiglu")
        out = experts.forward_tokens(torch.randn(T, 3), plan, weight, backend=backend)
        assert torch.isfinite(out).all(), backend
