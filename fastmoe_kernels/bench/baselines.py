"""Baselines, run on the same weights and routing as our experts.

Each is a callable ``(x [T, d], expert_idx [T, k], weight [T, k]) → [T, d]`` built from a
``GroupedExperts`` (homogeneous, gated or not), or a reason it cannot run here.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple, Union

import torch
import torch.nn.functional as F

from ..activations import apply_activation
from ..experts import GroupedExperts

Baseline = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class NaiveLoopExperts:
    """The naive module: a Python loop over experts, each gathering its tokens (fp32 index_add)."""

    def __init__(self, experts: GroupedExperts):
        self.experts = experts

    def __call__(self, x, expert_idx, weight):
        ex = self.experts
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(ex.num_experts):
            token, slot = torch.where(expert_idx == e)
            if token.numel() == 0:
                continue
            h = F.linear(x[token], ex.w_up[e])
            y = F.linear(apply_activation(h, ex.activation), ex.w_down[e])
            out.index_add_(0, token, (y * weight[token, slot, None]).float())
        return out.to(x.dtype)


def grouped_mm_available(x: torch.Tensor) -> Tuple[bool, str]:
    if not hasattr(torch, "_grouped_mm"):
        return False, f"torch {torch.__version__} has no torch._grouped_mm"
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 0):
        return False, "torch._grouped_mm needs sm_80 or newer"
    return True, ""


class TorchGroupedMMExperts:
    """Sort assignments by expert, then ``torch._grouped_mm`` for the up and down projections."""

    def __init__(self, experts: GroupedExperts):
        self.experts = experts

    def __call__(self, x, expert_idx, weight):
        ex = self.experts
        T, k = expert_idx.shape
        flat = expert_idx.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        counts = torch.bincount(flat, minlength=ex.num_experts)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        xs = x[order // k]
        h = torch._grouped_mm(xs, ex.w_up.transpose(-2, -1), offs=offs)
        y = torch._grouped_mm(apply_activation(h, ex.activation), ex.w_down.transpose(-2, -1), offs=offs)
        y = y.float() * weight.reshape(-1)[order, None].float()
        out = torch.zeros(T * k, x.shape[1], dtype=torch.float32, device=x.device)
        out[order] = y
        return out.view(T, k, -1).sum(1).to(x.dtype)


def hf_implementations() -> Union[Dict[str, object], str]:
    """Name → nothing, for every experts implementation transformers registers (plus "eager"),
    or the reason transformers is unusable."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except Exception as exc:  # absent or broken install
        return f"transformers unavailable ({type(exc).__name__}: {exc})"
    return {"eager": None, **{name: None for name in ALL_EXPERTS_FUNCTIONS.keys()}}


class HFExperts:
    """Hugging Face transformers' Mixtral experts module, with our weights, under one
    ``experts_implementation``. Its weight layout is ours: gate_up_proj [E, 2f, d], down_proj [E, d, f]."""

    def __init__(self, experts: GroupedExperts, implementation: str):
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        spec = experts.activation
        plain = spec.alpha == 1.0 and spec.limit == float("inf")  # Mixtral's act_fn(gate)·up, no clamp
        act = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_pytorch_tanh"}.get(spec.name) if plain else None
        if act is None or not experts.homogeneous or experts.b_up is not None:
            raise ValueError("Hugging Face Mixtral experts are gated, homogeneous and bias-free")
        cfg = MixtralConfig(hidden_size=experts.d_model, intermediate_size=experts.widths[0],
                            num_local_experts=experts.num_experts, hidden_act=act)
        cfg._experts_implementation = implementation
        with torch.device("meta"):  # our weights replace its own: never allocate a second copy (21 GiB for DeepSeek-V3)
            module = MixtralExperts(cfg)
        module.gate_up_proj = experts.w_up
        module.down_proj = experts.w_down
        self.module = module

    def __call__(self, x, expert_idx, weight):
        return self.module(x, expert_idx.long(), weight.to(x.dtype))


def per_assignment_weight_bytes(experts: GroupedExperts, num_assignments: int) -> int:
    """Bytes Hugging Face's ``batched_mm`` materialises: each assignment's copy of its expert's weights."""
    per_expert = experts.w_up[0].numel() + experts.w_down[0].numel()
    return num_assignments * per_expert * experts.w_up.element_size()


def memory_budget_bytes(device: torch.device) -> int:
    return 8 * 2**30 if device.type == "cuda" else 512 * 2**20


def probe(out: Dict[str, Union[Baseline, str]], x, expert_idx, weight) -> Dict[str, Union[Baseline, str]]:
    """Run each callable once: one that cannot run here (missing kernels, unsupported dtype/device)
    becomes a skip reason instead of an error mid-sweep."""
    for name, fn in list(out.items()):
        if callable(fn):
            try:
                with torch.no_grad():
                    fn(x, expert_idx, weight)
            except Exception as exc:
                out[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return out


def build_baselines(experts: GroupedExperts, x, expert_idx, weight) -> Dict[str, Union[Baseline, str]]:
    """Every baseline: a callable, or the reason it is skipped (printed by the runner)."""
    out: Dict[str, Union[Baseline, str]] = {"naive-loop": NaiveLoopExperts(experts)}
    ok, why = grouped_mm_available(x)
    out["torch._grouped_mm"] = TorchGroupedMMExperts(experts) if ok else why
    impls = hf_implementations()
    if isinstance(impls, str):
        out["hf"] = impls
    else:
        copy_bytes = per_assignment_weight_bytes(experts, expert_idx.numel())
        for name in impls:
            if name == "batched_mm" and copy_bytes > memory_budget_bytes(x.device):
                out[f"hf-{name}"] = (f"would materialise {copy_bytes / 2**30:.1f} GiB of per-assignment expert weights "
                                     f"(budget {memory_budget_bytes(x.device) / 2**30:.1f} GiB)")
                continue
            try:
                fn = HFExperts(experts, name)
            except Exception as exc:
                out[f"hf-{name}"] = f"{type(exc).__name__}: {exc}"
                continue
            out[f"hf-{name}"] = fn
    from .peers import build_peers

    out.update(build_peers(experts, fp8=False))
    return probe(out, x, expert_idx, weight)
