"""MoEConfig(fp8_recipe="blockwise") on the torch backend (the emulation): the layer equals the recipe
composed by hand, trains every parameter, differs from full precision by an fp8 amount, and bad
input or an unsupported configuration gets a clear error. Which backend runs where is tested here
too (the Triton kernels themselves: tests/kernel_tests/test_fp8.py)."""
import pytest
import torch

from fastmoe_kernels import MoEConfig, MoELayer, backends, fp8
from fastmoe_kernels.activations import apply_activation
from fastmoe_kernels.experts import GroupedExperts
from fastmoe_kernels.ops import grouped_gemm_fp8, make_plan, permute, unpermute
from fastmoe_kernels.ops.fp8_mlp import gathered_gemm_fp8, moe_mlp_fp8
from fastmoe_kernels.triton_backend.fp8 import fp8_capable
from tolerances import rel_err

BASE = dict(d_model=136, d_ff=96, num_experts=6, top_k=2)


def test_config_takes_blockwise_and_nothing_else():
    assert MoEConfig(**BASE).fp8_recipe is None
    assert MoEConfig(**BASE, fp8_recipe="blockwise").fp8_recipe == "blockwise"
    for bad in ("tensorwise", "BLOCKWISE", True, 1):
        with pytest.raises(ValueError, match="fp8_recipe"):
            MoEConfig(**BASE, fp8_recipe=bad)


def test_heterogeneous_experts_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="fp8_recipe.*widths"):
        MoEConfig(d_model=64, d_ff=[32, 64, 32, 64], num_experts=4, top_k=2, fp8_recipe="blockwise")
    with pytest.raises(ValueError, match="fp8_recipe.*one width"):
        GroupedExperts(64, [32, 64], fp8_recipe="blockwise")


def _by_hand(layer, x):
    """The recipe composed from the specification: permute, fp8 up, activation, fp8 down, combine."""
    route = layer.router(x)
    plan = layer.dispatcher.plan(route.expert_idx, route.weight)
    ex = layer.experts
    offsets = plan.offsets
    rows = torch.searchsorted(offsets[1:].long(), torch.arange(plan.num_rows), right=True)

    def bias(b):
        return 0 if b is None else torch.cat([b, b.new_zeros(1, b.shape[1])])[rows]

    h = fp8.grouped_gemm_fp8_reference(permute(x, plan, backend="torch"), ex.w_up, offsets) + bias(ex.b_up)
    y = fp8.grouped_gemm_fp8_reference(apply_activation(h, ex.activation), ex.w_down, offsets) + bias(ex.b_down)
    return unpermute(y, plan, route.weight, backend="torch")


@pytest.mark.parametrize("extra", [dict(), dict(bias=True, activation="gelu"),
                                   dict(capacity_factor=1.0, pad_to_capacity=True),
                                   dict(num_shared_experts=1, score_func="sigmoid")])
def test_layer_equals_the_recipe_composed_by_hand(extra):
    layer = MoELayer(**BASE, **extra, fp8_recipe="blockwise", aux_loss_coeff=0.0, backend="torch")
    x = torch.randn(41, BASE["d_model"])
    y = layer(x)
    want = _by_hand(layer, x)
    if layer.shared_experts is not None:
        want = want + layer.shared_experts(x)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)


def test_every_parameter_trains_and_fp8_is_not_full_precision():
    torch.manual_seed(1)
    fp8_layer = MoELayer(**BASE, bias=True, fp8_recipe="blockwise", backend="torch")
    full = MoELayer(**BASE, bias=True, backend="torch")
    full.load_state_dict(fp8_layer.state_dict())  # the same weights either way
    x = torch.randn(64, BASE["d_model"])
    outs = []
    for layer in (fp8_layer, full):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.square().mean().backward()
        outs.append([y, xi.grad] + [p.grad for p in layer.parameters()])
    for name, (a, b) in zip(["out", "x"] + [n for n, _ in fp8_layer.named_parameters()], zip(*outs)):
        assert a is not None and torch.isfinite(a).all(), name
        # e4m3 keeps 3 mantissa bits: a few percent off, never exact, never far.
        assert (1e-4 < rel_err(a, b) < 0.15) or name.startswith(("router", "shared")), (name, rel_err(a, b))


def test_bf16_in_bf16_out_with_fp32_master_weights():
    layer = MoELayer(**BASE, fp8_recipe="blockwise", backend="torch")
    x = torch.randn(20, BASE["d_model"], dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == x.grad.dtype == torch.bfloat16
    assert layer.experts.w_up.grad.dtype == torch.float32


def test_grouped_gemm_fp8_names_the_bad_argument():
    x, w = torch.randn(10, 64), torch.randn(3, 32, 64)
    offsets = torch.tensor([0, 4, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="`w`"):
        grouped_gemm_fp8(x, torch.randn(3, 32, 63), offsets)
    with pytest.raises(ValueError, match="`offsets`"):
        grouped_gemm_fp8(x, w, offsets[:3])
    with pytest.raises(TypeError, match="`x`"):
        grouped_gemm_fp8(x.long(), w, offsets)
    with pytest.raises(ValueError, match="`offsets` must be non-decreasing"):
        grouped_gemm_fp8(x, w, torch.tensor([0, 6, 4, 10], dtype=torch.int32))


def test_fp8_kernels_only_where_fp8_tensor_cores_are():
    assert fp8_capable(cc=90) is None and fp8_capable(cc=89) is None and fp8_capable(cc=0) is None
    assert "8.9" in fp8_capable(cc=80) and "8.0" in fp8_capable(cc=80)
    # An A100 asking for triton gets the emulation, and the fallback is recorded with its reason.
    if backends.availability("triton", torch.device("cpu"))[0]:
        assert backends.resolve("grouped_gemm_fp8", "triton", torch.device("cpu"), torch.float32, cc=80) == "torch"
        assert backends.resolve("grouped_gemm_fp8", "triton", torch.device("cpu"), torch.float32, cc=90) == "triton"
        reasons = [str(c) for key, c in backends.recorded_fallbacks().items() if key[0] == "grouped_gemm_fp8"]
        assert any("compute capability 8.9" in r for r in reasons)


def test_state_dict_moves_between_fp8_and_full_precision():
    a = MoELayer(**BASE, fp8_recipe="blockwise")
    b = MoELayer(**BASE)
    b.load_state_dict(a.state_dict())
    assert "fp8_recipe=blockwise" in repr(a) and "fp8" not in repr(b)


def _saved_bytes(run, params):
    """(bytes of the tensors autograd keeps for the backward while ``run()`` runs, each storage once and
    the parameters not counted; run's result)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(storages.values()), out


def test_the_activation_is_not_kept_for_the_backward():
    # The fused down projection keeps the pre-activation h only: act(h) and the gate's SiLU, which
    # the composition's autograd keeps, are never stored (2·R·f elements per layer).
    ex = GroupedExperts(136, [96] * 6, "swiglu", fp8_recipe="blockwise")
    x = torch.randn(41, 136, requires_grad=True)
    plan = make_plan(torch.stack([torch.randperm(6)[:2] for _ in range(41)]).int(), 6)
    weight = torch.rand(41, 2)
    fused, y = _saved_bytes(lambda: moe_mlp_fp8(x, plan, weight, ex.w_up, ex.w_down, ex.activation, backend="torch"),
                            ex.parameters())

    def composed():
        h = gathered_gemm_fp8(x, plan, ex.w_up, backend="torch")
        y_rows = grouped_gemm_fp8(apply_activation(h, ex.activation), ex.w_down, plan.offsets, backend="torch")
        return unpermute(y_rows, plan, weight, backend="torch")

    by_hand, want = _saved_bytes(composed, ex.parameters())
    assert fused == by_hand - 2 * plan.num_rows * 96 * x.element_size()
    torch.testing.assert_close(y, want, rtol=0, atol=0)  # the torch backend is the specification itself
