"""Expert modules: the routed experts (one grouped MLP) and the shared experts (one dense MLP)."""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import ActivationLike, apply_activation, as_activation
from .fp8 import check_recipe
from .ops import DispatchPlan, grouped_mlp, moe_mlp
from .ops.fp8_mlp import grouped_mlp_fp8, moe_mlp_fp8


def _init_uniform(t: Tensor, fan_in: int, std: Optional[float]) -> None:
    """nn.Linear's default (U(±1/√fan_in)) unless an explicit normal std is configured."""
    if std is None:
        bound = 1 / math.sqrt(max(fan_in, 1))
        nn.init.uniform_(t, -bound, bound)
    else:
        nn.init.normal_(t, std=std)


class GroupedExperts(nn.Module):
    """E expert MLPs applied to expert-grouped rows with ``grouped_mlp``.

    Homogeneous (one width f): ``w_up [E, m·f, d]`` (rows ``[gate | up]`` when gated, m = 2) and
    ``w_down [E, d, f]`` — the Hugging Face transformers layout. Heterogeneous (``widths`` f_e):
    ``w_up [m·Σf, d]`` (every expert's gate rows, then every expert's up rows) and
    ``w_down [d, Σf]``. Optional biases ``b_up``, ``b_down [E, d]``. ``fp8_recipe`` "blockwise"
    runs the GEMMs in fp8 (:mod:`fastmoe_kernels.ops.fp8_mlp`; homogeneous experts only).
    """

    def __init__(
        self, d_model: int, widths: Sequence[int], activation: ActivationLike = "swiglu", bias: bool = False,
        init_std: Optional[float] = None, *, fp8_recipe: Optional[str] = None, device=None, dtype=None,
    ):
        super().__init__()
        self.d_model = d_model
        self.widths = tuple(int(w) for w in widths)
        self.num_experts = len(self.widths)
        self.activation = as_activation(activation)
        if self.activation.interleaved:
            raise ValueError("GroupedExperts: its weights hold [gate | up] concatenated; interleaved is a layout of "
                             "weights read in place (the transformers experts), not of this module")
        self.init_std = init_std
        self.homogeneous = len(set(self.widths)) == 1
        check_recipe("GroupedExperts", fp8_recipe)
        if fp8_recipe is not None and not self.homogeneous:
            raise ValueError("GroupedExperts: `fp8_recipe` needs experts of one width (the 128×128 weight blocks of "
                             f"packed experts of widths {list(self.widths)} would straddle experts)")
        self.fp8_recipe = fp8_recipe
        m = 2 if self.activation.gated else 1
        E, d = self.num_experts, d_model
        factory = dict(device=device, dtype=dtype)
        if self.homogeneous:
            f = self.widths[0]
            self.w_up = nn.Parameter(torch.empty(E, m * f, d, **factory))
            self.w_down = nn.Parameter(torch.empty(E, d, f, **factory))
            up_bias_shape = (E, m * f)
        else:
            total = sum(self.widths)
            self.w_up = nn.Parameter(torch.empty(m * total, d, **factory))
            self.w_down = nn.Parameter(torch.empty(d, total, **factory))
            up_bias_shape = (m * total,)
        self.b_up = nn.Parameter(torch.empty(up_bias_shape, **factory)) if bias else None
        self.b_down = nn.Parameter(torch.empty(E, d, **factory)) if bias else None
        # Saved with the weights: packed weights of other widths can have the same shape (e.g. [8, 24]
        # and [24, 8]), and loading them would put each expert's weights in another's place.
        self.register_buffer("expert_widths", torch.tensor(self.widths, dtype=torch.int64, device=device))
        self.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "expert_widths"
        if key in state_dict:
            saved = tuple(int(w) for w in state_dict[key].tolist())
            if saved != self.widths:
                raise ValueError(f"GroupedExperts: the checkpoint's expert widths {list(saved)} differ from this "
                                 f"module's {list(self.widths)}; loading would give experts each other's weights")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)  # a checkpoint from before the widths were saved

    @property
    def gated(self) -> bool:
        return self.activation.gated

    def reset_parameters(self) -> None:
        with torch.no_grad():
            _init_uniform(self.w_up, self.d_model, self.init_std)
            if self.b_up is not None:
                _init_uniform(self.b_up, self.d_model, self.init_std)
            for e in range(self.num_experts):
                w_down_e = self.expert_weights(e)[1]
                _init_uniform(w_down_e, self.widths[e], self.init_std)
                if self.b_down is not None:
                    _init_uniform(self.b_down[e], self.widths[e], self.init_std)

    def expert_weights(self, e: int) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """Views of expert e's ``(w_up [m·f_e, d] rows [gate | up], w_down [d, f_e], b_up, b_down)``."""
        if self.homogeneous:
            w_up, w_down = self.w_up[e], self.w_down[e]
            b_up = None if self.b_up is None else self.b_up[e]
        else:
            starts = [0, *itertools.accumulate(self.widths)]
            total, lo, hi = starts[-1], starts[e], starts[e + 1]
            rows = [slice(lo, hi)] + ([slice(total + lo, total + hi)] if self.gated else [])
            w_up = torch.cat([self.w_up[r] for r in rows]) if self.gated else self.w_up[lo:hi]
            w_down = self.w_down[:, lo:hi]
            b_up = None
            if self.b_up is not None:
                b_up = torch.cat([self.b_up[r] for r in rows]) if self.gated else self.b_up[lo:hi]
        b_down = None if self.b_down is None else self.b_down[e]
        return w_up, w_down, b_up, b_down

    def forward(self, x: Tensor, offsets: Tensor, *, backend: Optional[str] = None) -> Tensor:
        """``x [R, d]`` grouped by ``offsets [E+1]`` → ``[R, d]``. The ops cast the weights to x's
        dtype (fp32 master weights with bf16 activations work like autocast)."""
        if self.fp8_recipe is not None:
            return grouped_mlp_fp8(x, self.w_up, self.w_down, offsets, self.activation, self.b_up, self.b_down,
                                   backend=backend)
        return grouped_mlp(
            x, self.w_up, self.w_down, offsets, self.activation, self.b_up, self.b_down,
            widths=None if self.homogeneous else self.widths, backend=backend,
        )

    def forward_tokens(
        self, x: Tensor, plan: DispatchPlan, weight: Tensor, *, backend: Optional[str] = None,
        fused: Optional[bool] = None,
    ) -> Tensor:
        """Tokens in, tokens out: ``x [T, d]`` dispatched by ``plan`` and combined with
        ``weight [T, k]`` (``ops.moe_mlp``; fused kernels when the backend has them; with
        ``fp8_recipe``, ``ops.fp8_mlp.moe_mlp_fp8`` whatever ``fused``)."""
        if self.fp8_recipe is not None:
            return moe_mlp_fp8(x, plan, weight, self.w_up, self.w_down, self.activation, self.b_up, self.b_down,
                               backend=backend)
        return moe_mlp(
            x, plan, weight, self.w_up, self.w_down, self.activation, self.b_up, self.b_down,
            widths=None if self.homogeneous else self.widths, backend=backend, fused=fused,
        )

    # ---- moving experts between layouts (expert parallelism, checkpoints) -----------------------
    def subset(self, experts: Sequence[int]) -> "GroupedExperts":
        """A new GroupedExperts holding copies of the given experts, in that order."""
        experts = list(experts)
        widths = [self.widths[e] for e in experts]
        fp8_recipe = self.fp8_recipe if len(set(widths)) == 1 else None  # none for an empty subset
        out = GroupedExperts(self.d_model, widths, self.activation, self.b_up is not None, self.init_std,
                             fp8_recipe=fp8_recipe, device=self.w_up.device, dtype=self.w_up.dtype)
        out.load_experts([self.expert_weights(e) for e in experts])
        return out

    @torch.no_grad()
    def load_experts(self, weights: Sequence[tuple]) -> None:
        """Copy per-expert ``(w_up, w_down, b_up, b_down)`` (as from :meth:`expert_weights`) into this module."""
        if len(weights) != self.num_experts:
            raise ValueError(f"load_experts: {self.num_experts} experts expected, got {len(weights)}")
        for e, (w_up, w_down, b_up, b_down) in enumerate(weights):
            if self.homogeneous:
                self.w_up[e].copy_(w_up)
                self.w_down[e].copy_(w_down)
                if self.b_up is not None:
                    self.b_up[e].copy_(b_up)
            else:
                starts = [0, *itertools.accumulate(self.widths)]
                total, lo, hi = starts[-1], starts[e], starts[e + 1]
                f = hi - lo
                self.w_up[lo:hi].copy_(w_up[:f])
                self.w_down[:, lo:hi].copy_(w_down)
                if self.gated:
                    self.w_up[total + lo:total + hi].copy_(w_up[f:])
                if self.b_up is not None:
                    self.b_up[lo:hi].copy_(b_up[:f])
                    if self.gated:
                        self.b_up[total + lo:total + hi].copy_(b_up[f:])
            if self.b_down is not None:
                self.b_down[e].copy_(b_down)

    def extra_repr(self) -> str:
        widths = self.widths[0] if self.homogeneous else list(self.widths)
        fp8 = f", fp8_recipe={self.fp8_recipe}" if self.fp8_recipe else ""
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={widths}, activation={self.activation.name}{fp8}"


class SharedExperts(nn.Module):
    """``n`` shared experts of width f applied to every token, as one MLP of width n·f.

    Summing n independent MLPs equals one MLP with their hidden units side by side, so this is the
    same function with one matrix product per projection. ``w_up [m·n·f, d]`` (gate rows then up
    rows), ``w_down [d, n·f]``; with ``gate``, the output is scaled per token by
    ``sigmoid(x · w_gateᵀ)`` (``w_gate [1, d]``, Qwen2-MoE's shared-expert gate).
    """

    def __init__(
        self, d_model: int, d_ff: int, num_experts: int = 1, activation: ActivationLike = "swiglu", bias: bool = False,
        gate: bool = False, init_std: Optional[float] = None, *, device=None, dtype=None,
    ):
        super().__init__()
        self.d_model, self.d_ff, self.num_experts = d_model, d_ff, num_experts
        self.activation = as_activation(activation)
        self.init_std = init_std
        hidden = num_experts * d_ff
        m = 2 if self.activation.gated else 1
        factory = dict(device=device, dtype=dtype)
        self.w_up = nn.Parameter(torch.empty(m * hidden, d_model, **factory))
        self.w_down = nn.Parameter(torch.empty(d_model, hidden, **factory))
        self.b_up = nn.Parameter(torch.empty(m * hidden, **factory)) if bias else None
        self.b_down = nn.Parameter(torch.empty(d_model, **factory)) if bias else None
        self.w_gate = nn.Parameter(torch.empty(1, d_model, **factory)) if gate else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for t, fan_in in ((self.w_up, self.d_model), (self.b_up, self.d_model), (self.w_gate, self.d_model),
                              (self.w_down, self.d_ff), (self.b_down, self.d_ff)):
                if t is not None:
                    _init_uniform(t, fan_in, self.init_std)

    def forward(self, x: Tensor) -> Tensor:
        cast = (lambda t: None if t is None else t.to(x.dtype))
        # w_up holds all gate rows then all up rows, so the gated activation's chunk(2) splits them.
        h = F.linear(x, cast(self.w_up), cast(self.b_up))
        y = F.linear(apply_activation(h, self.activation), cast(self.w_down), cast(self.b_down))
        if self.w_gate is not None:
            y = y * torch.sigmoid(F.linear(x, cast(self.w_gate)))
        return y

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, gate={self.w_gate is not None}"
