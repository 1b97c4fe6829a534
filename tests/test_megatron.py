"""Megatron-Core integration (fastmoe_kernels.integrations.megatron) against Megatron's own experts.

Megatron's real MoELayer runs on the CPU with its allgather token dispatcher and one gloo rank; its
router's ``gating`` moves the weights to the current CUDA device, so the layer here uses a TopKRouter
whose gating is the same product without the move (a router spec, as Megatron allows). Everything else —
routing, dispatcher, combine, SequentialMLP, the checkpoint mapping — is Megatron's.
"""
import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

megatron = pytest.importorskip("megatron.core", reason="megatron-core is installed by the test extra")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed" at import
    from megatron.core import parallel_state
    from megatron.core.activations import fast_gelu, quick_gelu, squared_relu
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
    from megatron.core.dist_checkpointing.mapping import apply_factories
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

from fastmoe_kernels import set_value_checks
from fastmoe_kernels.integrations.megatron import FastMoEGroupedMLP, activation_of, use_fastmoe_experts

D, F_WIDTH, E = 32, 24, 8


@pytest.fixture(scope="module", autouse=True)
def megatron_parallel_state(tmp_path_factory):
    """One gloo rank with Megatron's model-parallel groups (every size 1)."""
    store = dist.FileStore(str(tmp_path_factory.mktemp("megatron") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


class CPUGatingRouter(TopKRouter):
    """Megatron's TopKRouter with gating as its product x·Wᵀ in x's dtype, without moving the weight
    to a CUDA device (everything after the logits is Megatron's routing)."""

    def gating(self, input):
        return F.linear(input, self.weight.to(input.dtype))


def config(**overrides) -> TransformerConfig:
    fields = dict(num_layers=1, hidden_size=D, num_attention_heads=4, ffn_hidden_size=2 * F_WIDTH,
                  moe_ffn_hidden_size=F_WIDTH, num_moe_experts=E, moe_router_topk=2, gated_linear_unit=True,
                  activation_func=F.silu, add_bias_linear=False, use_cpu_initialization=True,
                  moe_token_dispatcher_type="allgather", params_dtype=torch.float32, bf16=False)
    fields.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerConfig(**fields)


def layers(cfg, **experts_params):
    """(Megatron's MoELayer with SequentialMLP, the same layer with our experts), same weights."""
    spec = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts, moe_grouped_gemm=False)
    spec.submodules.mlp.submodules.router = CPUGatingRouter
    ours_spec = copy.deepcopy(spec)
    assert use_fastmoe_experts(ours_spec, **experts_params) == 1
    ref = MoELayer(cfg, spec.submodules.mlp.submodules)
    ours = MoELayer(cfg, ours_spec.submodules.mlp.submodules)
    assert isinstance(ours.experts, FastMoEGroupedMLP)
    ours.router.load_state_dict(ref.router.state_dict())
    w1, w2 = sequential_weights(ref)
    with torch.no_grad():
        ours.experts.weight1.copy_(w1.transpose(1, 2).contiguous().view(cfg.hidden_size, -1))
        ours.experts.weight2.copy_(w2.transpose(1, 2).contiguous().view(-1, cfg.hidden_size))
    return ref, ours


def sequential_weights(layer, grad=False):
    """SequentialMLP's experts stacked: ([E, m·f, d], [E, d, f]), or their gradients."""
    pick = (lambda p: p.grad) if grad else (lambda p: p)
    experts = layer.experts.local_experts
    return (torch.stack([pick(e.linear_fc1.weight) for e in experts]),
            torch.stack([pick(e.linear_fc2.weight) for e in experts]))


def ours_as_sequential(layer, grad=False):
    """Our weight1/weight2 (or their gradients) in SequentialMLP's per-expert layout."""
    w1, w2 = (layer.experts.weight1.grad, layer.experts.weight2.grad) if grad else \
        (layer.experts.weight1, layer.experts.weight2)
    n, d = layer.experts.num_local_experts, layer.config.hidden_size
    return w1.reshape(n, d, -1).transpose(1, 2), w2.reshape(n, -1, d).transpose(1, 2)


def run_both(ref, ours, tokens=5, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(tokens, 2, D, dtype=dtype)
    g = torch.randn(tokens, 2, D, dtype=dtype)
    results = []
    for layer in (ref, ours):
        xi = x.clone().requires_grad_()
        y, bias = layer(xi)
        assert bias is None
        y.backward(g)
        results.append((y, xi.grad))
    return results


def assert_same_training(ref, ours, **kw):
    (y_ref, gx_ref), (y, gx) = run_both(ref, ours, **kw)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    torch.testing.assert_close(ours.router.weight.grad, ref.router.weight.grad, **tol)
    for got, want in zip(ours_as_sequential(ours, grad=True), sequential_weights(ref, grad=True)):
        torch.testing.assert_close(got, want, **tol)


ACTIVATIONS = {
    "swiglu": dict(gated_linear_unit=True, activation_func=F.silu),
    "clamped swiglu": dict(gated_linear_unit=True, activation_func=F.silu, activation_func_clamp_value=0.05),
    "gpt-oss swiglu": dict(gated_linear_unit=True, activation_func=quick_gelu, glu_linear_offset=1.0,
                           activation_func_clamp_value=0.05),
    "geglu": dict(gated_linear_unit=True, activation_func=F.gelu),
    "geglu tanh": dict(gated_linear_unit=True, activation_func=fast_gelu),
    "squared relu": dict(gated_linear_unit=False, activation_func=squared_relu),
    "gelu": dict(gated_linear_unit=False, activation_func=F.gelu),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_moe_layer_with_our_experts_trains_as_with_sequential_mlp(name):
    # 5·2 tokens, top-2 of 8 experts: uneven loads and (with this seed) experts without tokens.
    ref, ours = layers(config(**ACTIVATIONS[name]))
    assert_same_training(ref, ours)


def test_experts_without_tokens_and_an_empty_batch():
    ref, ours = layers(config(moe_router_topk=1, moe_router_pre_softmax=True))
    assert_same_training(ref, ours, tokens=1)  # 2 tokens, top-1 of 8: at least six experts get nothing
    x = torch.zeros(0, 1, D, requires_grad=True)
    y, _ = ours(x)
    y.sum().backward()
    assert y.shape == (0, 1, D) and x.grad.shape == x.shape


def test_probabilities_on_the_input_at_top1():
    ref, ours = layers(config(moe_router_topk=1, moe_router_pre_softmax=True, moe_apply_probs_on_input=True))
    assert_same_training(ref, ours)


@pytest.mark.parametrize("fused", [True, False])
def test_fused_kernels_apply_the_probabilities_like_megatron(fused, triton_launches):
    # The Triton fused experts (the probabilities in their combine; interpreted on the CPU) and the
    # composition (grouped GEMMs, then one weighting pass).
    ref, ours = layers(config(), backend="triton", fused=fused)
    assert_same_training(ref, ours)
    launched = set(triton_launches)
    assert {"_grouped_matmul_kernel", "_up_projection_kernel", "_grouped_wgrad_kernel"} <= launched
    # The fused path's routing-weight gradient comes from its own kernel; the composition's from torch.
    assert ("_row_values_kernel" in launched) == fused


def test_tokens_per_expert_that_do_not_sum_to_the_rows_are_an_error():
    _, ours = layers(config())
    x = torch.randn(6, D)
    set_value_checks("sync")
    try:
        with pytest.raises(ValueError, match="tokens_per_expert.*sum to the 6 rows"):
            ours.experts(x, torch.tensor([3, 2, 0, 0, 0, 0, 0, 0]), torch.ones(6))
    finally:
        set_value_checks(None)
    with pytest.raises(ValueError, match="tokens_per_expert.*\\[8\\]"):
        ours.experts(x, torch.tensor([6]), torch.ones(6))
    with pytest.raises(ValueError, match="permuted_probs"):
        ours.experts(x, torch.tensor([6, 0, 0, 0, 0, 0, 0, 0]), torch.ones(5))


def _checkpoint(layer) -> dict:
    """What Megatron's distributed checkpoint of ``layer`` holds: each key's global tensor assembled from
    its ShardedTensors' global slices, each ShardedObject by key (the save without its storage layer,
    which needs CUDA in megatron-core 0.16; torch.distributed.checkpoint reshards the same way)."""
    sharded = layer.sharded_state_dict(prefix="layer.")
    apply_factories(sharded)
    saved, filled = {}, {}
    for item in nested_values(sharded):
        if isinstance(item, ShardedTensor):
            full = saved.setdefault(item.key, torch.full(item.global_shape, float("nan"), dtype=item.data.dtype))
            full[item.global_slice()] = item.data.detach()
            filled[item.key] = filled.get(item.key, 0) + item.data.numel()
        elif isinstance(item, ShardedObject):
            saved[item.key] = item.data
    for key, count in filled.items():
        assert count == saved[key].numel() and not saved[key].isnan().any(), f"{key}: chunks do not tile it"
    return saved


def _load_checkpoint(layer, saved: dict) -> None:
    """Megatron's distributed load (load_preprocess, each ShardedTensor's global slice, the factories'
    merges) from ``_checkpoint``'s dict."""
    sharded, _, factories = load_preprocess(layer.sharded_state_dict(prefix="layer."))

    def fetch(item):
        if isinstance(item, ShardedTensor):
            return saved[item.key][item.global_slice()].clone()
        if isinstance(item, ShardedObject):
            return saved.get(item.key)
        return item

    dict_list_map_inplace(fetch, sharded)
    apply_factory_merges(sharded, factories)
    state = {key[len("layer."):]: value for key, value in sharded.items()}
    missing, unexpected = layer.load_state_dict(state, strict=False)
    assert not missing, missing
    assert all("_extra_state" in k for k in unexpected), unexpected


def test_distributed_checkpoints_load_between_sequential_mlp_and_ours():
    cfg = config()
    ref, _ = layers(cfg)
    _, ours = layers(cfg)  # fresh random experts, to be overwritten
    _load_checkpoint(ours, _checkpoint(ref))
    for got, want in zip(ours_as_sequential(ours), sequential_weights(ref)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    back, _ = layers(cfg)
    with torch.no_grad():
        for p in back.parameters():
            p.normal_()
    _load_checkpoint(back, _checkpoint(ours))
    for got, want in zip(sequential_weights(back), ours_as_sequential(ours)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gradient_accumulation_fusion_adds_into_main_grad():
    ref, ours = layers(config())
    cfg = copy.copy(ours.experts.config)
    cfg.gradient_accumulation_fusion = True
    ours.experts.config = cfg
    for p in (ours.experts.weight1, ours.experts.weight2):
        p.main_grad = torch.full(p.shape, 0.5, dtype=torch.float32)
        p.grad_added_to_main_grad = False
    run_both(ref, ours)
    run_both(ref, ours)  # a second micro-batch accumulates
    for p in (ours.experts.weight1, ours.experts.weight2):
        assert p.grad_added_to_main_grad
        p.grad = p.main_grad - 0.5
    for got, want in zip(ours_as_sequential(ours, grad=True), sequential_weights(ref, grad=True)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # ref's .grad holds both micro-batches too
    del ours.experts.weight1.main_grad
    with pytest.raises(RuntimeError, match="main_grad"):
        run_both(ref, ours)


def test_blockwise_fp8_through_a_module_spec_param():
    ref, ours = layers(config(), fp8_recipe="blockwise")
    (y_ref, _), (y, gx) = run_both(ref, ours)
    assert torch.isfinite(gx).all()
    err = (y - y_ref).norm() / y_ref.norm()
    assert 1e-4 < err < 0.1, err  # fp8's rounding, not another function


@pytest.mark.parametrize("field, value, match", [
    ("add_bias_linear", True, "add_bias_linear"),
    ("fp8", "e4m3", "config.fp8.*fp8_recipe"),
    ("delay_wgrad_compute", True, "delay_wgrad_compute"),
    ("use_te_activation_func", True, "use_te_activation_func"),
    ("moe_latent_size", 16, "moe_latent_size"),
])
def test_megatron_flags_it_does_not_run_are_refused_by_name(field, value, match):
    cfg = copy.copy(config())
    setattr(cfg, field, value)  # set after __post_init__, which checks for Transformer Engine
    with pytest.raises(ValueError, match=match):
        FastMoEGroupedMLP(E, cfg)


def test_selective_recompute_of_the_activation_is_refused_by_name():
    cfg = copy.copy(config())
    cfg.recompute_granularity, cfg.recompute_modules = "selective", ["moe_act"]
    with pytest.raises(ValueError, match="moe_act"):
        FastMoEGroupedMLP(E, cfg)


@pytest.mark.parametrize("overrides, match", [
    (dict(gated_linear_unit=True, activation_func=F.relu), "activation_func"),
    (dict(gated_linear_unit=False, activation_func=quick_gelu), "activation_func"),
    (dict(gated_linear_unit=True, activation_func=F.silu, glu_linear_offset=1.0), "glu_linear_offset"),
    (dict(gated_linear_unit=True, activation_func=F.gelu, activation_func_clamp_value=7.0), "clamp"),
])
def test_activations_it_does_not_run_are_refused_by_name(overrides, match):
    with pytest.raises(ValueError, match=match):
        activation_of(config(**overrides))


def test_use_fastmoe_experts_needs_an_moe_layer_in_the_spec():
    with pytest.raises(ValueError, match="no MoESubmodules"):
        use_fastmoe_experts(get_gpt_layer_local_spec())


def test_backward_dw_is_callable_as_megatron_calls_it():
    _, ours = layers(config())
    ours.backward_dw()  # MoELayer.backward_dw → experts.backward_dw: the weight gradients are already done
