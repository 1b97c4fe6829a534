"""torchtitan integration: a model converter that runs torchtitan's routed experts on our kernels.

    from fastmoe_kernels.integrations.torchtitan import FastMoEConverter
    spec = torchtitan.models.qwen3.model_registry("30B-A3B", converters=[FastMoEConverter.Config()])
    # or on a model config: model_config = FastMoEConverter.Config().build().convert(model_config)

Written against torchtitan 0.3.0's MoE (``torchtitan/models/common/moe.py``), two seams:

- ``GroupedExperts.forward(x_RD, num_tokens_per_expert_E)`` (rows already grouped by expert, under
  every token dispatcher, expert parallelism included) → :class:`FastMoEGroupedExperts`: our grouped
  GEMMs with SwiGLU in the up projection's epilogue (``ops.grouped_mlp``) instead of three
  ``torch._grouped_mm`` and torch's SiLU and product;
- ``RoutedExperts.forward(x, scores, expert ids, counts)`` with torchtitan's local dispatch
  (``LocalTokenDispatcher``, or the "standard" ``AllToAllTokenDispatcher`` without an expert-parallel
  mesh) → :class:`FastMoERoutedExperts`: our plan, gather-fused up projection and
  weighted combine (``ops.moe_mlp``), no argsort, gather or scatter_add of torchtitan's. With an
  expert-parallel dispatcher it keeps torchtitan's dispatch and combine around our grouped experts.

The parameters stay torchtitan's: ``w1_EFD``, ``w2_EDF``, ``w3_EFD`` with their names, shapes and
initialisers, so FSDP2 shards them on the expert dimension and checkpoints load either way. The gate
(w1) and up (w3) weights are concatenated to our ``[E, 2F, D]`` each forward (one copy of the up
weights; the backward splits the gradient); torchtitan's path casts the weights to bf16 each forward,
a copy of the same size. Computation is in x's dtype (torchtitan's own path always casts x and the
weights to bf16): with FSDP2's bf16 parameters that is bf16; under ``torch.autocast`` with fp32
activations (a single-device or DDP run) our custom ops are not autocast-aware and run in fp32 —
correct, slower and larger than torchtitan's bf16. The combine sums each token's k outputs in fp32
in a fixed order (deterministic). No host synchronisation; the MoE layer traces under ``torch.compile``
without graph breaks (fullgraph; its training step under aot_eager equals eager). Not checked: torchtitan's ``spmd_types`` type checking
(its ``GroupedExperts`` retypes the offsets; ours builds its own).

fp8: ``FastMoEConverter.Config(fp8_recipe="blockwise")`` runs our blockwise-e4m3 GEMMs. torchtitan's
own ``Float8GroupedExpertsConverter`` / ``MXFP8GroupedExpertsConverter`` on the same experts is
refused by name, whichever converter comes first. Refused too: experts other than torchtitan's SwiGLU
``GroupedExperts`` (gpt-oss's ``GptOssGroupedExperts`` has biases and its own activation).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from torchtitan.models.common.moe import GroupedExperts, RoutedExperts
from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher, LocalTokenDispatcher
from torchtitan.protocols.model import ModelConfigConverter

from ..activations import as_activation
from .._checks import check_optional_bool
from ..fp8 import check_recipe
from ..ops import grouped_mlp, make_plan, moe_mlp
from ..ops.fp8_mlp import grouped_mlp_fp8, moe_mlp_fp8
from ..ops.plan import plan_for_grouped_rows

_QUANTIZATION_MODULE = "torchtitan.components.quantization"
SWIGLU = as_activation("swiglu")  # torchtitan's GroupedExperts: silu(x·w1ᵀ) · (x·w3ᵀ), then ·w2ᵀ


def _refuse_torchtitan_quantization(cls: type) -> None:
    """torchtitan's float8/MXFP8 converters subclass the experts class they find (ours included)."""
    if cls.__module__.startswith(_QUANTIZATION_MODULE):
        raise ValueError(f"{cls.__name__}: torchtitan's float8/MXFP8 grouped-experts converter is configured on "
                         "experts FastMoEConverter converted; use one of them: for our fp8, "
                         "FastMoEConverter.Config(fp8_recipe='blockwise') without torchtitan's")


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class FastMoEGroupedExperts(GroupedExperts):
    """torchtitan's ``GroupedExperts`` (same parameters) computed by ``ops.grouped_mlp``."""

    @dataclass(kw_only=True, slots=True)
    class Config(GroupedExperts.Config):
        backend: str | None = None
        fp8_recipe: str | None = None

    def __init__(self, config: Config):
        _refuse_torchtitan_quantization(type(self))
        super().__init__(config)
        self.backend, self.fp8_recipe = config.backend, config.fp8_recipe

    def expert_weights(self) -> tuple[Tensor, Tensor]:
        """``(w_up [E, 2F, D] = [w1 | w3], w_down [E, D, F])`` from the local shards."""
        return torch.cat([_local(self.w1_EFD), _local(self.w3_EFD)], dim=1), _local(self.w2_EDF)

    def forward(self, x_RD: Tensor, num_tokens_per_expert_E: Tensor) -> Tensor:
        w_up, w_down = self.expert_weights()
        # Rows past the counts (an expert-parallel dispatcher's padding) belong to no expert: zeros.
        plan = plan_for_grouped_rows(num_tokens_per_expert_E, x_RD.shape[0], all_rows=False,
                                     where="FastMoEGroupedExperts", name="num_tokens_per_expert_E")
        if self.fp8_recipe:
            return grouped_mlp_fp8(x_RD, w_up, w_down, plan.offsets, SWIGLU, backend=self.backend)
        return grouped_mlp(x_RD, w_up, w_down, plan.offsets, SWIGLU, backend=self.backend)


class FastMoERoutedExperts(RoutedExperts):
    """torchtitan's ``RoutedExperts`` with ``LocalTokenDispatcher``: plan, experts and combine in our
    ops (``moe_mlp``: the gather fused into the up projection, the scores applied in the combine).
    Under another dispatcher (expert parallelism) torchtitan's dispatch and combine run as before."""

    @dataclass(kw_only=True, slots=True)
    class Config(RoutedExperts.Config):
        fused: bool | None = None

    def __init__(self, config: Config):
        super().__init__(config)
        self.fused = config.fused

    def dispatches_locally(self) -> bool:
        """torchtitan's local dispatch: LocalTokenDispatcher, or its "standard" AllToAllTokenDispatcher
        without an expert-parallel mesh (which then falls back to the local dispatch)."""
        dispatcher = self.token_dispatcher
        return type(dispatcher) is LocalTokenDispatcher or (
            type(dispatcher) is AllToAllTokenDispatcher and dispatcher.ep_mesh is None)

    def forward(self, x_BLD: Tensor, topk_scores_BLK: Tensor, topk_expert_ids_BLK: Tensor,
                num_local_tokens_per_expert_E: Tensor) -> Tensor:
        experts = self.inner_experts
        if not self.dispatches_locally() or not isinstance(experts, FastMoEGroupedExperts):
            return super().forward(x_BLD, topk_scores_BLK, topk_expert_ids_BLK, num_local_tokens_per_expert_E)
        B, L, D = x_BLD.shape
        K = topk_scores_BLK.shape[-1]
        x_TD = x_BLD.reshape(B * L, D)
        plan = make_plan(topk_expert_ids_BLK.reshape(B * L, K), experts.num_experts, backend=experts.backend)
        scores_TK = topk_scores_BLK.reshape(B * L, K)
        w_up, w_down = experts.expert_weights()
        if experts.fp8_recipe:
            out_TD = moe_mlp_fp8(x_TD, plan, scores_TK, w_up, w_down, SWIGLU, backend=experts.backend)
        else:
            out_TD = moe_mlp(x_TD, plan, scores_TK, w_up, w_down, SWIGLU, backend=experts.backend, fused=self.fused)
        return out_TD.view(B, -1, D)


def _copy_fields(config, **extra) -> dict:
    return {**{f.name: getattr(config, f.name) for f in fields(config)}, **extra}


class FastMoEConverter(ModelConfigConverter):
    """Converts every torchtitan ``RoutedExperts``/``GroupedExperts`` of a model config to ours.

    ``backend``: a fastmoe_kernels backend name (None: auto). ``fp8_recipe``: None or "blockwise".
    ``fused``: the routed experts' path (None: the package's rule; True/False: our fused kernels / the
    composition). ``routed_experts``: also replace ``RoutedExperts`` (the gather-fused path where the
    dispatcher is local); False keeps torchtitan's dispatch and combine everywhere."""

    @dataclass(kw_only=True, slots=True)
    class Config(ModelConfigConverter.Config):
        backend: str | None = None
        fp8_recipe: str | None = None
        fused: bool | None = None
        routed_experts: bool = True

    def __init__(self, config: Config):
        check_recipe("FastMoEConverter", config.fp8_recipe)
        check_optional_bool("FastMoEConverter", "fused", config.fused)
        self.config = config

    def _experts(self, config) -> FastMoEGroupedExperts.Config:
        if isinstance(config, FastMoEGroupedExperts.Config):
            return config  # converted already
        if type(config) is not GroupedExperts.Config:
            owner = getattr(type(config), "_owner", None)
            name = getattr(owner, "__name__", type(config).__qualname__)
            if owner is not None and owner.__module__.startswith(_QUANTIZATION_MODULE):
                _refuse_torchtitan_quantization(owner)
            raise ValueError(f"FastMoEConverter: {name} is not torchtitan's SwiGLU GroupedExperts (its weights or "
                             "activation differ); only GroupedExperts is converted")
        return FastMoEGroupedExperts.Config(**_copy_fields(config, backend=self.config.backend,
                                                           fp8_recipe=self.config.fp8_recipe))

    def convert(self, model_config):
        converted = 0
        for _fqn, config, parent, attr in list(model_config.traverse(RoutedExperts.Config)):
            inner = self._experts(config.inner_experts)
            if self.config.routed_experts and type(config) is RoutedExperts.Config:
                new = FastMoERoutedExperts.Config(**_copy_fields(config, inner_experts=inner, fused=self.config.fused))
            else:
                config.inner_experts, new = inner, config
            model_config = _replace(model_config, parent, attr, new)
            converted += 1
        for _fqn, config, parent, attr in list(model_config.traverse(GroupedExperts.Config)):
            if not isinstance(config, FastMoEGroupedExperts.Config):  # grouped experts outside RoutedExperts
                model_config = _replace(model_config, parent, attr, self._experts(config))
                converted += 1
        if not converted:
            raise ValueError("FastMoEConverter: the model config holds no torchtitan GroupedExperts to convert")
        return model_config


def _replace(root, parent, attr, new):
    """Put ``new`` where traverse found a config; returns the (possibly new) root."""
    if parent is None:
        return new
    if isinstance(parent, list):
        parent[attr] = new
    else:
        setattr(parent, attr, new)
    return root
