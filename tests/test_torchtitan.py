"""torchtitan integration (fastmoe_kernels.integrations.torchtitan) against torchtitan's own MoE.

The model is torchtitan's Qwen3 MoE debug model ("debugmodel_moe": dim 256, 64 experts of width 768,
top-8, its router, norms and initialisers) cut to one layer: torchtitan's CPU attention (FlexAttention)
has no backward on the CPU, so the embeddings and attention are frozen and everything from the MoE on
trains. torchtitan's own experts cast x and the weights to bf16, so the model comparisons are at bf16's
tolerance; the grouped-experts seam is also checked in fp32 against the fp64 SwiGLU it computes.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchtitan", reason="torchtitan is installed by the README's test command")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torchtitan.models.qwen3 as qwen3
    from torchtitan.components.quantization.float8 import _get_float8_grouped_experts_cls
    from torchtitan.models.common.moe import GroupedExperts, RoutedExperts
    from torchtitan.models.gpt_oss.moe import GptOssGroupedExperts

from tolerances import tol  # noqa: E402
from fastmoe_kernels.integrations.torchtitan import FastMoEConverter, FastMoEGroupedExperts, FastMoERoutedExperts

TOKENS, SEQ = 2, 24


def debug_config(**converter):
    """torchtitan's Qwen3 MoE debug model config, one layer; converted when ``converter`` is given."""
    config = qwen3.model_registry("debugmodel_moe", attn_backend="flex").model
    config.layers = config.layers[:1]
    if converter:
        config = FastMoEConverter.Config(**converter).build().convert(config)
    return config


def build(config, seed=0):
    torch.manual_seed(seed)
    model = config.build()
    model.init_weights(buffer_device=torch.device("cpu"))
    for name, p in model.named_parameters():
        if "tok_embeddings" in name or "attention" in name:
            p.requires_grad_(False)  # FlexAttention has no CPU backward (module docstring)
    return model


def pair(**converter):
    """(torchtitan's model, the converted model), same weights."""
    ref = build(debug_config())
    ours = build(debug_config(**({"routed_experts": True} | converter)))
    assert not ours.load_state_dict(ref.state_dict()).missing_keys
    return ref, ours


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 2048, (TOKENS, SEQ), generator=g)
    return tokens, torch.arange(SEQ).repeat(TOKENS, 1)


def loss_of(model, seed=0):
    tokens, positions = batch(seed)
    logits = model(tokens, attention_masks=model.get_attention_masks(positions), positions=positions)
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens.roll(-1, 1).flatten())


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_the_converter_swaps_torchtitans_experts_and_keeps_their_parameters():
    ref, ours = pair()
    kinds = {type(m) for m in ours.modules()}
    assert {FastMoERoutedExperts, FastMoEGroupedExperts} <= kinds and GroupedExperts not in {type(m) for m in ours.modules()}
    assert list(ref.state_dict()) == list(ours.state_dict())  # names, order
    for (n, a), (_, b) in zip(ref.state_dict().items(), ours.state_dict().items()):
        assert a.shape == b.shape and a.dtype == b.dtype, n
    experts = ours.layers["0"].moe.routed_experts.inner_experts
    assert {n for n, _ in experts.named_parameters()} == {"w1_EFD", "w2_EDF", "w3_EFD"}


@pytest.mark.parametrize("routed_experts", [True, False])
def test_a_converted_debug_model_trains_as_torchtitans(routed_experts):
    # routed_experts=True: our plan, gather-fused experts and combine; False: torchtitan's dispatch and
    # combine around our grouped experts (the seam every dispatcher, expert-parallel ones too, uses).
    ref, ours = pair(routed_experts=routed_experts)
    routed = ours.layers["0"].moe.routed_experts
    if routed_experts:
        assert routed.dispatches_locally()  # the debug model's "standard" dispatcher without a mesh
    else:
        assert type(routed) is RoutedExperts
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3) for m in (ref, ours)]
    for step in range(3):
        losses = []
        for model, opt in zip((ref, ours), optimizers):
            opt.zero_grad()
            loss = loss_of(model, seed=step)
            loss.backward()
            losses.append(loss)
        assert abs(losses[1].item() - losses[0].item()) < 2e-3 * losses[0].item(), (step, losses)
        if step == 0:
            for (name, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters()):
                if a.requires_grad:
                    assert rel(b.grad, a.grad) < 2e-2, (name, rel(b.grad, a.grad))  # bf16 in torchtitan's
        for opt in optimizers:
            opt.step()


def test_the_grouped_experts_seam_is_swiglu_in_fp32():
    config = debug_config(routed_experts=False).layers[0].moe.routed_experts.inner_experts
    torch.manual_seed(3)
    experts = FastMoEGroupedExperts(config)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(std=0.05)
    E, D = experts.num_experts, config.dim
    counts = torch.zeros(E, dtype=torch.int64)
    counts[[0, 5, 63]] = torch.tensor([3, 0, 7])
    counts[10] = 1  # experts without rows, uneven loads
    rows = int(counts.sum()) + 2  # two padding rows past the counts (a padding dispatcher's)
    x = torch.randn(rows, D, requires_grad=True)
    out = experts(x, counts)
    g = torch.randn_like(out)
    out.backward(g)
    x64 = x.detach().double().requires_grad_()
    w = [p.detach().double().requires_grad_() for p in (experts.w1_EFD, experts.w2_EDF, experts.w3_EFD)]
    pieces, start = [], 0
    for e, n in enumerate(counts.tolist()):
        xe = x64[start:start + n]
        pieces.append((F.silu(xe @ w[0][e].T) * (xe @ w[2][e].T)) @ w[1][e].T)
        start += n
    want = torch.cat(pieces + [x64.new_zeros(2, D)])
    want.backward(g.double())
    torch.testing.assert_close(out.double(), want, **tol(torch.float32))
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol(torch.float32))
    for p, ref in zip((experts.w1_EFD, experts.w2_EDF, experts.w3_EFD), w):
        torch.testing.assert_close(p.grad.double(), ref.grad, **tol(torch.float32))
    # torchtitan's own module on the same rows (its bf16 casts: bf16's tolerance).
    theirs = GroupedExperts(config)
    theirs.load_state_dict(experts.state_dict())
    assert rel(theirs(x.detach()[:-2], counts), out.detach()[:-2]) < 1e-2


def test_checkpoints_load_both_ways(tmp_path):
    import torch.distributed.checkpoint as dcp
    ref, ours = pair()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is not initialized": one process
        dcp.save(ours.state_dict(), checkpoint_id=str(tmp_path / "ours"))
        back = build(debug_config(), seed=9)
        state = back.state_dict()
        dcp.load(state, checkpoint_id=str(tmp_path / "ours"))
    back.load_state_dict(state)
    for (n, a), (_, b) in zip(back.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), n
    ours2 = build(debug_config(routed_experts=True), seed=9)
    ours2.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert abs(loss_of(ours2).item() - loss_of(ref).item()) < 2e-3 * loss_of(ref).item()


@pytest.mark.parametrize("routed_experts", [True, False])
def test_the_combine_is_deterministic_and_the_moe_traces_without_graph_breaks(routed_experts):
    _, ours = pair(routed_experts=routed_experts)
    moe = ours.layers["0"].moe
    x = torch.randn(TOKENS, SEQ, 256)
    with torch.no_grad():
        assert torch.equal(moe(x), moe(x))
        torch._dynamo.reset()
        compiled = torch.compile(moe, backend="eager", fullgraph=True)  # fullgraph: a graph break fails
        torch.testing.assert_close(compiled(x), moe(x), rtol=1e-6, atol=1e-7)


def test_blockwise_fp8():
    ref, ours = pair(fp8_recipe="blockwise")
    a, b = loss_of(ref), loss_of(ours)
    b.backward()
    assert torch.isfinite(b) and abs(b.item() - a.item()) < 2e-2 * a.item()
    grad = ours.layers["0"].moe.routed_experts.inner_experts.w1_EFD.grad
    assert grad is not None and torch.isfinite(grad).all()


def test_torchtitans_float8_on_our_experts_is_refused_whichever_comes_first():
    ours_first = _get_float8_grouped_experts_cls(FastMoEGroupedExperts)
    config = debug_config(routed_experts=False).layers[0].moe.routed_experts.inner_experts
    with pytest.raises(ValueError, match="float8/MXFP8.*fp8_recipe='blockwise'"):
        ours_first(ours_first.Config(**{f: getattr(config, f) for f in ("dim", "hidden_dim", "num_experts")}))
    config = debug_config()
    routed = config.layers[0].moe.routed_experts
    float8 = _get_float8_grouped_experts_cls(GroupedExperts)
    inner = routed.inner_experts
    routed.inner_experts = float8.Config(dim=inner.dim, hidden_dim=inner.hidden_dim, num_experts=inner.num_experts)
    with pytest.raises(ValueError, match="Float8GroupedExperts.*float8/MXFP8"):
        FastMoEConverter.Config().build().convert(config)


def test_other_experts_and_configs_without_experts_are_refused_by_name():
    config = debug_config()
    inner = config.layers[0].moe.routed_experts.inner_experts
    config.layers[0].moe.routed_experts.inner_experts = GptOssGroupedExperts.Config(
        dim=inner.dim, hidden_dim=inner.hidden_dim, num_experts=inner.num_experts)
    with pytest.raises(ValueError, match="GptOssGroupedExperts is not torchtitan's SwiGLU GroupedExperts"):
        FastMoEConverter.Config().build().convert(config)
    dense = qwen3.model_registry("debugmodel", attn_backend="flex").model
    with pytest.raises(ValueError, match="no torchtitan GroupedExperts"):
        FastMoEConverter.Config().build().convert(dense)
    with pytest.raises(TypeError, match="fused"):
        FastMoEConverter.Config(fused="yes").build()
    with pytest.raises(ValueError, match="fp8_recipe"):
        FastMoEConverter.Config(fp8_recipe="rowwise").build()


def test_a_converted_config_converts_again_to_itself():
    config = debug_config(routed_experts=True)
    again = FastMoEConverter.Config().build().convert(copy.deepcopy(config))
    assert type(again.layers[0].moe.routed_experts) is FastMoERoutedExperts.Config
    assert type(again.layers[0].moe.routed_experts.inner_experts) is FastMoEGroupedExperts.Config


def test_the_training_step_of_the_moe_compiles_with_autograd_and_equals_eager():
    # aot_eager traces the forward and the backward (our ops' autograd formulas) in one graph.
    _, ours = pair()
    moe = ours.layers["0"].moe
    x = torch.randn(TOKENS, SEQ, 256, requires_grad=True)
    moe(x).sum().backward()
    want = [x.grad.clone()] + [p.grad.clone() for p in moe.parameters() if p.requires_grad]
    x.grad = None
    moe.zero_grad()
    torch._dynamo.reset()
    torch.compile(moe, backend="aot_eager", fullgraph=True)(x).sum().backward()
    got = [x.grad] + [p.grad for p in moe.parameters() if p.requires_grad]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
