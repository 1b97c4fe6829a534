"""MoEConfig: the one validated description of an MoE layer.

Every knob of the layer lives here (MegaBlocks' ``Arguments`` is the model). ``MoELayer`` accepts
either a config or the same fields as keyword arguments.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from .activations import ACTIVATIONS, GATED_ACTIVATIONS, PARAMETRIC, Activation, as_activation
from .fp8 import FP8_RECIPES

SCORE_FUNCS = ("softmax", "sigmoid")
ROUTER_PRECISIONS = ("fp32", "input")
DROP_POLICIES = ("probs", "position")
LOAD_BALANCING_TYPES = ("micro_batch", "sequence", "global", "none")
LOAD_BALANCING_NORMALIZATIONS = ("megatron", "mixtral")
BACKEND_NAMES = ("auto", "torch", "triton", "cuda", "cpp")
MAX_CAPACITY_FACTOR = 1e6


def _fail(field: str, expected: str, got) -> None:
    raise ValueError(f"MoEConfig.{field}: expected {expected}, got {got!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite real number (NaN and ±inf are not: a NaN coefficient silently switches a loss off)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(field: str, value, *, low: float, high: float = math.inf, low_open: bool = False,
                  high_open: bool = False) -> None:
    ok = _is_number(value) and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if high == math.inf:
            _fail(field, f"a finite number {'>' if low_open else '>='} {low:g}", value)
        lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open else "]")
        _fail(field, f"a finite number in {lo}, {hi}", value)


def _check_bool(field: str, value, optional: bool = False) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        _fail(field, "True or False" + (" or None" if optional else ""), value)


@dataclass(frozen=True)
class MoEConfig:
    """Configuration of one MoE layer.

    Shapes: ``d_model`` is the token width; ``d_ff`` the hidden width of each routed expert — an int
    (all experts alike) or a sequence of ``num_experts`` ints (heterogeneous experts).
    ``activation``: gated ``swiglu``, ``swiglu_oai`` (gpt-oss), ``geglu``, ``geglu_tanh``, or plain
    ``silu``, ``gelu``, ``gelu_tanh``, ``relu``, ``relu2`` (see :mod:`fastmoe_kernels.activations`);
    ``activation_alpha`` / ``activation_limit`` set the SwiGLU variants' α and clamp.

    Router: ``score_func`` "softmax" (over all experts, then top-k) or "sigmoid" (DeepSeek-V3);
    ``normalize_topk`` renormalises the k selected weights to sum to 1; ``num_groups``/``topk_groups``
    enable group-limited routing (experts split into ``num_groups`` equal groups, a token may only use
    experts of its ``topk_groups`` best groups, a group scored by the sum of its two best experts);
    ``routed_scaling_factor`` multiplies the final weights; ``expert_bias`` adds DeepSeek-V3's
    loss-free balancing bias (selection only; updated by ``MoELayer.update_expert_bias`` at rate
    ``expert_bias_update_rate``); ``router_jitter`` multiplies the router input by U(1-eps, 1+eps)
    and ``router_noise_std`` adds N(0, std²) noise to the logits, both in training only.
    ``router_precision``: "fp32" (default) computes the logits ``x·Wᵀ`` in fp32; "input" computes
    them in the input's dtype, as most transformers routers do in bf16, so that routing matches such
    a model exactly (near-ties otherwise break differently). Scores and top-k are fp32 either way.

    Dispatch: ``capacity_factor=None`` is dropless. Otherwise each expert keeps at most
    ``C = ceil(capacity_factor · T · k / E)`` assignments, dropping by lowest weight ("probs") or
    latest position ("position"); ``pad_to_capacity`` lays the rows out as a fixed ``[E, C]`` block.

    Shared experts: ``num_shared_experts`` dense MLPs of width ``shared_d_ff`` applied to every token
    (computed as one MLP of width ``num_shared_experts · shared_d_ff``, which is the same function),
    optionally scaled by a per-token sigmoid gate (``shared_expert_gate``, as in Qwen2-MoE).

    Execution: ``backend`` ("auto", "torch", "triton", "cuda", "cpp"; see :mod:`fastmoe_kernels.backends`);
    ``fused_experts`` None runs gather → expert MLPs → combine as one fused op where the backend has
    one (but a training step on a GPU takes the separate ops: faster there, measured on an H100),
    False forces the separate permute / grouped MLP / unpermute ops, True the fused op. ``fp8_recipe`` "blockwise"
    runs the routed experts' GEMMs (forward, dgrad, wgrad) in float8_e4m3fn with DeepSeek-V3's
    scaling (1×128 tiles for activations and gradients, 128×128 blocks for weights, fp32
    accumulation; :mod:`fastmoe_kernels.fp8`); the router, gather, activation, combine, losses and
    shared experts stay in the input's precision, and the weights and outputs in theirs. The fp8
    kernels need the triton backend on a GPU of compute capability ≥ 8.9; elsewhere the same numbers
    come from an fp32 emulation (with a warning on a GPU). Homogeneous experts only.

    Losses: ``aux_loss_coeff`` scales the Switch/GShard load-balancing loss of type
    ``load_balancing_type`` ("micro_batch", "sequence", "global" or "none") with
    ``load_balancing_normalization`` "megatron" (balanced routing gives 1) or "mixtral" (gives k);
    ``z_loss_coeff`` scales the router z-loss. With ``aux_loss_in_backward`` the losses reach the
    gradients through the layer's output (no change to the trainer's loss); otherwise ask the layer
    to return them.
    """

    d_model: int
    d_ff: Union[int, Sequence[int]]
    num_experts: int
    top_k: int
    activation: str = "swiglu"
    activation_alpha: Optional[float] = None  # swiglu / swiglu_oai: gate·σ(α·gate); None: the default
    activation_limit: Optional[float] = None  # swiglu / swiglu_oai: the clamp (inf: none); None: the default
    bias: bool = False
    # router
    score_func: str = "softmax"
    normalize_topk: bool = True
    num_groups: Optional[int] = None
    topk_groups: Optional[int] = None
    routed_scaling_factor: float = 1.0
    expert_bias: bool = False
    expert_bias_update_rate: float = 1e-3
    router_jitter: float = 0.0
    router_noise_std: float = 0.0
    router_precision: str = "fp32"
    # dispatch
    capacity_factor: Optional[float] = None
    drop_policy: str = "probs"
    pad_to_capacity: bool = False
    # shared experts
    num_shared_experts: int = 0
    shared_d_ff: Optional[int] = None
    shared_expert_gate: bool = False
    # losses
    aux_loss_coeff: float = 1e-2
    load_balancing_type: str = "micro_batch"
    load_balancing_normalization: str = "megatron"
    z_loss_coeff: float = 0.0
    aux_loss_in_backward: bool = True
    # execution
    backend: str = "auto"
    fused_experts: Optional[bool] = None
    fp8_recipe: Optional[str] = None
    init_std: Optional[float] = None

    def __post_init__(self) -> None:
        if not _is_int(self.d_model) or self.d_model < 1:
            _fail("d_model", "a positive int", self.d_model)
        if not _is_int(self.num_experts) or self.num_experts < 1:
            _fail("num_experts", "a positive int", self.num_experts)
        if not _is_int(self.top_k) or not 1 <= self.top_k <= self.num_experts:
            _fail("top_k", f"an int in [1, num_experts={self.num_experts}]", self.top_k)
        self._validate_d_ff()
        if self.activation not in ACTIVATIONS:
            _fail("activation", f"one of {ACTIVATIONS}", self.activation)
        for name in ("activation_alpha", "activation_limit"):
            value = getattr(self, name)
            if value is None:
                continue
            if self.activation not in PARAMETRIC:
                _fail(name, f"None for activation={self.activation!r} (only {PARAMETRIC} take it)", value)
            if name == "activation_limit" and value == math.inf:
                continue  # no clamp
            _check_number(name, value, low=0, low_open=True)
        if self.score_func not in SCORE_FUNCS:
            _fail("score_func", f"one of {SCORE_FUNCS}", self.score_func)
        if self.router_precision not in ROUTER_PRECISIONS:
            _fail("router_precision", f"one of {ROUTER_PRECISIONS}", self.router_precision)
        self._validate_groups()
        for name in ("bias", "normalize_topk", "expert_bias", "pad_to_capacity", "shared_expert_gate",
                     "aux_loss_in_backward"):
            _check_bool(name, getattr(self, name))
        _check_bool("fused_experts", self.fused_experts, optional=True)
        _check_number("routed_scaling_factor", self.routed_scaling_factor, low=0, low_open=True)
        _check_number("expert_bias_update_rate", self.expert_bias_update_rate, low=0)
        _check_number("router_jitter", self.router_jitter, low=0, high=1, high_open=True)
        _check_number("router_noise_std", self.router_noise_std, low=0)
        if self.capacity_factor is not None and not (_is_number(self.capacity_factor)
                                                     and 0 < self.capacity_factor <= MAX_CAPACITY_FACTOR):
            # A capacity past T·k drops nothing, whatever its size; a factor this large is a typo
            # (and would make a padded layout astronomically large).
            _fail("capacity_factor", f"None (dropless) or a finite number in (0, {MAX_CAPACITY_FACTOR:g}]",
                  self.capacity_factor)
        if self.drop_policy not in DROP_POLICIES:
            _fail("drop_policy", f"one of {DROP_POLICIES}", self.drop_policy)
        if self.pad_to_capacity and self.capacity_factor is None:
            _fail("pad_to_capacity", "False when capacity_factor is None (dropless)", True)
        self._validate_shared()
        _check_number("aux_loss_coeff", self.aux_loss_coeff, low=0)
        _check_number("z_loss_coeff", self.z_loss_coeff, low=0)
        if self.load_balancing_type not in LOAD_BALANCING_TYPES:
            _fail("load_balancing_type", f"one of {LOAD_BALANCING_TYPES}", self.load_balancing_type)
        if self.load_balancing_normalization not in LOAD_BALANCING_NORMALIZATIONS:
            _fail(
                "load_balancing_normalization",
                f"one of {LOAD_BALANCING_NORMALIZATIONS}",
                self.load_balancing_normalization,
            )
        if self.backend not in BACKEND_NAMES:
            _fail("backend", f"one of {BACKEND_NAMES}", self.backend)
        if self.fp8_recipe is not None:
            if self.fp8_recipe not in FP8_RECIPES:
                _fail("fp8_recipe", f"None or one of {FP8_RECIPES}", self.fp8_recipe)
            if self.heterogeneous:
                _fail("fp8_recipe", "None with experts of different widths (the fp8 path's 128×128 weight blocks "
                      "need one width)", self.fp8_recipe)
        if self.init_std is not None and not (_is_number(self.init_std) and self.init_std > 0):
            _fail("init_std", "None or a finite number > 0", self.init_std)

    def _validate_d_ff(self) -> None:
        if _is_int(self.d_ff):
            if self.d_ff < 1:
                _fail("d_ff", "a positive int or a sequence of positive ints", self.d_ff)
            return
        try:
            widths = tuple(self.d_ff)
        except TypeError:
            _fail("d_ff", "a positive int or a sequence of num_experts positive ints", self.d_ff)
        if len(widths) != self.num_experts:
            _fail("d_ff", f"{self.num_experts} widths (one per expert)", f"{len(widths)} widths")
        if not all(_is_int(w) and w >= 1 for w in widths):
            _fail("d_ff", "positive ints", widths)
        # Frozen dataclass: store the canonical, hashable form.
        object.__setattr__(self, "d_ff", widths[0] if len(set(widths)) == 1 else widths)

    def _validate_groups(self) -> None:
        if self.num_groups is None and self.topk_groups is None:
            return
        if self.num_groups is None or self.topk_groups is None:
            _fail("num_groups/topk_groups", "both set or both None", (self.num_groups, self.topk_groups))
        if not _is_int(self.num_groups) or self.num_groups < 1 or self.num_experts % self.num_groups:
            _fail("num_groups", f"a positive divisor of num_experts={self.num_experts}", self.num_groups)
        if not _is_int(self.topk_groups) or not 1 <= self.topk_groups <= self.num_groups:
            _fail("topk_groups", f"an int in [1, num_groups={self.num_groups}]", self.topk_groups)
        group_size = self.num_experts // self.num_groups
        if self.top_k > self.topk_groups * group_size:
            _fail(
                "top_k",
                f"at most topk_groups * experts_per_group = {self.topk_groups * group_size}",
                self.top_k,
            )

    def _validate_shared(self) -> None:
        if not _is_int(self.num_shared_experts) or self.num_shared_experts < 0:
            _fail("num_shared_experts", "an int >= 0", self.num_shared_experts)
        if self.num_shared_experts == 0:
            if self.shared_expert_gate:
                _fail("shared_expert_gate", "False when num_shared_experts == 0", True)
            return
        if self.shared_d_ff is None:
            if not _is_int(self.d_ff):
                _fail("shared_d_ff", "an int when d_ff is a list of widths", None)
            object.__setattr__(self, "shared_d_ff", self.d_ff)
        elif not _is_int(self.shared_d_ff) or self.shared_d_ff < 1:
            _fail("shared_d_ff", "None or a positive int", self.shared_d_ff)

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def heterogeneous(self) -> bool:
        return not _is_int(self.d_ff)

    @property
    def expert_widths(self) -> tuple[int, ...]:
        """The hidden width of each routed expert."""
        if self.heterogeneous:
            return tuple(self.d_ff)
        return (self.d_ff,) * self.num_experts

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def activation_spec(self) -> Activation:
        """The activation with its parameters (the defaults where they are None)."""
        return as_activation(self.activation, self.activation_alpha, self.activation_limit)

    @property
    def dropless(self) -> bool:
        return self.capacity_factor is None

    @property
    def sparsity(self) -> float:
        """s = num_experts / top_k, the quantity the design studies rank by."""
        return self.num_experts / self.top_k

    def replace(self, **changes) -> "MoEConfig":
        return dataclasses.replace(self, **changes)
