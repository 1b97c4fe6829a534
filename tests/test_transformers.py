"""Hugging Face transformers integration: the "fastmoe" experts implementation against "eager" on
several architectures (outputs, gradients, training steps), block conversion both ways, the layout
conventions of the experts interface, and clear errors for unsupported variants."""
import copy
import types

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra: pip install .[transformers]")

from fastmoe_kernels import MoELayer  # noqa: E402
from fastmoe_kernels.integrations import transformers as fm_hf  # noqa: E402
from transformers.integrations.moe import use_experts_implementation  # noqa: E402
from tolerances import tol

fm_hf.register()

COMMON = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _mixtral():
    return transformers.MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)


def _qwen2_moe():
    return transformers.Qwen2MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=32,
                                       shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                                       norm_topk_prob=False)


def _qwen3_moe():
    return transformers.Qwen3MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=32, num_experts=8,
                                       num_experts_per_tok=3, norm_topk_prob=True, head_dim=16)


def _olmoe():
    return transformers.OlmoeConfig(**COMMON, intermediate_size=32, num_experts=8, num_experts_per_tok=2)


def _deepseek_v3():
    return transformers.DeepseekV3Config(
        **{**COMMON, "num_key_value_heads": 4}, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5,
        norm_topk_prob=True)


ARCHS = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe,
         "deepseek_v3": _deepseek_v3}


def build(arch):
    cfg = ARCHS[arch]()
    model = transformers.AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Spread the router weights so that routing is decisive (HF's init is nearly uniform).
            if name.endswith("gate.weight") or "gate_up_proj" in name or "down_proj" in name:
                p.normal_(0, 0.2)
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.05)
    return model


def moe_blocks(model):
    return [m for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate")]


def run(model, ids, impl):
    model.set_experts_implementation(impl)
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fastmoe_equals_eager_outputs_and_gradients(arch):
    model = build(arch)
    ids = torch.randint(0, 97, (2, 13))
    logits_e, grads_e = run(model, ids, "eager")
    logits_f, grads_f = run(model, ids, "fastmoe")
    assert model.config._experts_implementation == "fastmoe"
    torch.testing.assert_close(logits_f, logits_e, **tol(torch.float32))
    assert grads_f.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_f[name], grads_e[name], **tol(torch.float32), msg=name)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_training_steps_give_the_same_losses(arch):
    base = build(arch)
    losses = {}
    for impl in ("eager", "fastmoe"):
        torch.manual_seed(1)
        model = copy.deepcopy(base)
        model.set_experts_implementation(impl)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        trace = []
        for _ in range(4):
            ids = torch.randint(0, 97, (2, 11))
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            trace.append(loss.item())
        losses[impl] = trace
    assert losses["fastmoe"] == pytest.approx(losses["eager"], rel=1e-4)
    assert losses["eager"][-1] != losses["eager"][0]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_from_transformers_block_matches_and_round_trips(arch):
    model = build(arch)
    block = moe_blocks(model)[0]
    layer = MoELayer.from_transformers(block, aux_loss_coeff=0.0)
    x = torch.randn(2, 7, 64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = layer(x1)
    theirs = block(x2)
    torch.testing.assert_close(ours, theirs, **tol(torch.float32))
    g = torch.randn_like(ours)
    (ours * g).sum().backward()
    (theirs * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, **tol(torch.float32))
    # And back: a fresh block receiving our weights computes the same function.
    fresh = copy.deepcopy(block)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    layer.to_transformers(fresh)
    torch.testing.assert_close(fresh(x), block(x), atol=0, rtol=0)


def test_from_transformers_maps_routing_semantics():
    ds = MoELayer.from_transformers(moe_blocks(build("deepseek_v3"))[0])
    cfg = ds.config
    assert (cfg.score_func, cfg.num_groups, cfg.topk_groups, cfg.expert_bias) == ("sigmoid", 4, 2, True)
    assert cfg.routed_scaling_factor == 2.5 and cfg.num_shared_experts == 1 and cfg.normalize_topk
    q2 = MoELayer.from_transformers(moe_blocks(build("qwen2_moe"))[0]).config
    assert q2.shared_expert_gate and q2.shared_d_ff == 48 and not q2.normalize_topk
    capped = MoELayer.from_transformers(moe_blocks(build("mixtral"))[0], capacity_factor=1.25)
    assert capped.config.capacity_factor == 1.25


# ---- the interface's layout conventions, on stand-alone experts modules -----------------------------
E, D, F = 6, 16, 8


def _expert_config():
    return types.SimpleNamespace(_experts_implementation="eager")


def reference_experts(x, idx, w, up, down, b_up, b_down, gated, interleaved, act):
    """Plain per-token loop over the canonical [E, 2f, d] / [E, d, f] weights."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if e >= up.shape[0]:
                continue
            h = up[e] @ x[t] + (b_up[e] if b_up is not None else 0)
            if gated:
                g, u = (h[0::2], h[1::2]) if interleaved else h.chunk(2)
                a = act(g) * u
            else:
                a = act(h)
            out[t] += w[t, j] * (down[e] @ a + (b_down[e] if b_down is not None else 0))
    return out


def make_experts(transposed, concatenated, bias, gated, act):
    @use_experts_implementation(is_transposed=transposed, is_concatenated=concatenated, has_bias=bias, has_gate=gated)
    class Experts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = E
            self.act_fn = act
            m = 2 if gated else 1
            up_shape = (E, D, m * F) if transposed else (E, m * F, D)
            down_shape = (E, F, D) if transposed else (E, D, F)
            name = "gate_up_proj" if gated else "up_proj"
            setattr(self, name, nn.Parameter(torch.randn(up_shape) * 0.3))
            self.down_proj = nn.Parameter(torch.randn(down_shape) * 0.3)
            if bias:
                setattr(self, name + "_bias", nn.Parameter(torch.randn(E, m * F) * 0.1))
                self.down_proj_bias = nn.Parameter(torch.randn(E, D) * 0.1)

        def forward(self, hidden_states, top_k_index, top_k_weights):
            up = self.gate_up_proj if gated else self.up_proj
            down = self.down_proj
            if transposed:
                up, down = up.transpose(1, 2), down.transpose(1, 2)
            b_up = getattr(self, ("gate_up_proj" if gated else "up_proj") + "_bias", None)
            return reference_experts(hidden_states, top_k_index, top_k_weights, up, down, b_up,
                                     getattr(self, "down_proj_bias", None), gated, not concatenated, self.act_fn)

    return Experts(_expert_config())


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("concatenated", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_layouts(transposed, concatenated, bias):
    experts = make_experts(transposed, concatenated, bias, True, nn.SiLU())
    compare_layout(experts)


@pytest.mark.parametrize("act", [nn.GELU(), nn.ReLU()], ids=["gelu", "relu"])
@pytest.mark.parametrize("transposed", [False, True])
def test_non_gated_layouts(act, transposed):
    compare_layout(make_experts(transposed, True, True, False, act))


def compare_layout(experts, sentinels=False):
    x = torch.randn(11, D)
    idx = torch.stack([torch.randperm(E)[:2] for _ in range(11)])
    w = torch.rand(11, 2)
    if sentinels:
        experts._is_expert_parallel = True
        idx[::3, 1] = E  # another rank's expert
        w[::3, 1] = 0.7  # dropping must not rely on a zero weight
    ref = experts(x, idx, w)
    experts.config._experts_implementation = "fastmoe"
    x2 = x.clone().requires_grad_()
    out = experts(x2, idx, w)
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    grads = torch.autograd.grad(out.sum(), [x2, *experts.parameters()])
    experts.config._experts_implementation = "eager"
    x3 = x.clone().requires_grad_()
    ref_grads = torch.autograd.grad(experts(x3, idx, w).sum(), [x3, *experts.parameters()])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **tol(torch.float32))


def test_expert_parallel_sentinels_are_dropped():
    compare_layout(make_experts(False, True, False, True, nn.SiLU()), sentinels=True)


def test_unsupported_variants_raise_clearly():
    gpt_oss = transformers.GptOssConfig(**COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                        head_dim=16)
    model = transformers.AutoModelForCausalLM.from_config(gpt_oss)
    model.set_experts_implementation("fastmoe")
    with pytest.raises(NotImplementedError, match="_apply_gate"):
        model(torch.randint(0, 97, (1, 5)))
    tanh_gelu = make_experts(False, True, False, True, nn.GELU(approximate="tanh"))
    tanh_gelu.config._experts_implementation = "fastmoe"
    with pytest.raises(NotImplementedError, match="activation GELU"):
        tanh_gelu(torch.randn(3, D), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2))
    with pytest.raises(TypeError, match="sparse-MoE block"):
        MoELayer.from_transformers(nn.Linear(4, 4))
