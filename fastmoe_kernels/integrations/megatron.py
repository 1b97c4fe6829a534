"""Megatron-Core integration: our grouped kernels as the experts of Megatron's ``MoELayer``.

Megatron builds the experts from the ``experts`` ``ModuleSpec`` of ``MoESubmodules``; put ours there::

    from fastmoe_kernels.integrations.megatron import FastMoEGroupedMLP, use_fastmoe_experts
    spec = get_gpt_layer_local_spec(num_experts=64, moe_grouped_gemm=True)   # or any layer spec
    use_fastmoe_experts(spec)          # swaps every experts ModuleSpec in it for FastMoEGroupedMLP
    # or by hand: MoESubmodules(experts=ModuleSpec(module=FastMoEGroupedMLP), ...)

``FastMoEGroupedMLP`` has the seam of Megatron's ``GroupedMLP`` / ``TEGroupedMLP`` / ``SequentialMLP``
(megatron-core 0.16): ``forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs) ->
(output, None)`` on the rows Megatron's token dispatcher has already grouped by local expert, then
Megatron's dispatcher combines. Its parameters are ``GroupedMLP``'s — ``weight1 [d, E·m·f]`` (each
expert's ``[d, m·f]`` with the gate columns first when gated) and ``weight2 [E·f, d]`` — and its
``sharded_state_dict`` is ``GroupedMLP``'s, so distributed checkpoints load between it and Megatron's
experts modules (``SequentialMLP`` included: the per-expert keys and layouts Megatron maps them to).

What it runs: the routing probabilities are applied in the kernel (our fused experts kernels' combine,
each row its own "token" with top-1), or, where the composition is chosen (a training step on a GPU
without a tuning entry saying otherwise), the composition's grouped GEMMs with the activation in the
up projection's epilogue and one weighting pass. No host synchronisation: the counts stay on the
device.

Megatron's configuration, honoured or refused by name:
- ``activation_func`` with ``gated_linear_unit``, ``activation_func_clamp_value`` and
  ``glu_linear_offset``: SiLU (SwiGLU, clamped or not), quick-GELU (gpt-oss's clamped SwiGLU when the
  offset is 1), GELU (GeGLU; exact or Megatron's ``fast_gelu`` tanh form), and without a gate SiLU,
  GELU, ReLU and Megatron's ``squared_relu``; anything else is refused;
- ``moe_apply_probs_on_input`` (top-1, as Megatron requires); ``params_dtype`` and
  ``use_cpu_initialization``/``perform_initialization`` with Megatron's own initialisers (and refused:
  selective recompute of ``moe_act``);
- ``gradient_accumulation_fusion``: the weight gradients are added into the parameters' fp32
  ``main_grad`` (Megatron's DistributedDataParallel), with ``grad_added_to_main_grad`` set as Megatron's
  linear layers do; the expert tensor-parallel shard (the dispatcher reduces its partial sums);
- refused: ``add_bias_linear`` (as ``GroupedMLP``), ``moe_latent_size``, Transformer Engine's ``fp8``
  and ``fp4`` recipes (ours is ``ModuleSpec(module=FastMoEGroupedMLP, params={"fp8_recipe":
  "blockwise"})``), ``delay_wgrad_compute`` (``backward_dw`` is a no-op: the weight gradients are
  computed in the backward), ``use_te_activation_func``.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Parameter

from megatron.core.activations import fast_gelu, quick_gelu, squared_relu
from megatron.core.fusions.fused_bias_geglu import quick_gelu as fused_quick_gelu
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu, _initialize_affine_weight_gpu
from megatron.core.tensor_parallel.utils import divide
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import GroupedMLP
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from .. import backends
from ..activations import Activation
from .._checks import check_optional_bool
from ..fp8 import check_recipe
from ..ops import grouped_mlp, moe_mlp
from ..ops.fp8_mlp import grouped_mlp_fp8, moe_mlp_fp8
from ..ops.moe_mlp import default_fusion
from ..ops.plan import plan_for_grouped_rows
from ..tuning import LayerShape

WHERE = "FastMoEGroupedMLP"


def activation_of(config) -> Activation:
    """Our activation for Megatron's ``activation_func``/``gated_linear_unit``/``glu_linear_offset``/
    ``activation_func_clamp_value``; a ValueError naming the field for what our kernels do not run."""
    func, gated = config.activation_func, config.gated_linear_unit
    offset, clamp = float(config.glu_linear_offset or 0.0), config.activation_func_clamp_value
    limit = math.inf if clamp is None else float(clamp)
    name = getattr(func, "__name__", repr(func))
    if not gated:
        plain = {F.silu: "silu", F.gelu: "gelu", fast_gelu: "gelu_tanh", F.relu: "relu", squared_relu: "relu2"}
        if func not in plain:
            raise ValueError(f"{WHERE}: `activation_func` {name} without a gate is not one of ours (SiLU, GELU, "
                             "fast_gelu, ReLU, squared_relu)")
        return Activation(plain[func])
    if offset not in (0.0, 1.0) or (offset == 1.0 and func not in (quick_gelu, fused_quick_gelu)):
        raise ValueError(f"{WHERE}: `glu_linear_offset`={offset} is supported as 0, or as 1 with quick_gelu "
                         "(gpt-oss's SwiGLU)")
    if func is F.silu:
        return Activation("swiglu", 1.0, limit)
    if func in (quick_gelu, fused_quick_gelu):
        return Activation("swiglu_oai" if offset == 1.0 else "swiglu", 1.702, limit)
    if func in (F.gelu, fast_gelu):
        if clamp is not None:
            raise ValueError(f"{WHERE}: `activation_func_clamp_value` applies to SwiGLU forms only, not to GeGLU")
        return Activation("geglu" if func is F.gelu else "geglu_tanh")
    raise ValueError(f"{WHERE}: `activation_func` {name} with `gated_linear_unit` is not one of ours (SiLU, "
                     "quick_gelu, GELU, fast_gelu)")


def _refuse_unsupported(config) -> None:
    refused = {
        "add_bias_linear": "expert biases are not supported (set add_bias_linear=False, as GroupedMLP needs)",
        "moe_latent_size": "MoE latent projections are not supported",
        "fp8": "Transformer Engine's fp8 recipe is not ours: use ModuleSpec(module=FastMoEGroupedMLP, "
               "params={'fp8_recipe': 'blockwise'}) with fp8 off in the config",
        "fp4": "Transformer Engine's fp4 recipe is not supported",
        "delay_wgrad_compute": "the weight gradients are computed in the backward (backward_dw is a no-op)",
        "use_te_activation_func": "Transformer Engine's activations are not ours (our kernels fuse the activation)",
    }
    for field, why in refused.items():
        if getattr(config, field, None):
            raise ValueError(f"{WHERE}: config.{field}={getattr(config, field)!r}: {why}")
    if config.recompute_granularity == "selective" and "moe_act" in (config.recompute_modules or ()):
        raise ValueError(f"{WHERE}: config.recompute_modules has 'moe_act' (recompute the activation): our up "
                         "projection saves its pre-activation for the backward; remove 'moe_act' to use these experts")
    if config.moe_apply_probs_on_input and config.moe_router_topk != 1:
        raise ValueError(f"{WHERE}: config.moe_apply_probs_on_input needs moe_router_topk=1 (as Megatron's experts), "
                         f"got {config.moe_router_topk}")


class _IntoMainGrad(torch.autograd.Function):
    """Identity on a parameter whose gradient is added into its ``main_grad`` (Megatron's
    gradient_accumulation_fusion contract: ``grad_added_to_main_grad`` tells Megatron's DDP hook not to
    add it again; the returned gradient is a placeholder that keeps the hook on the main thread)."""

    @staticmethod
    def forward(ctx, weight: Tensor) -> Tensor:
        ctx.weight = weight
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight = ctx.weight
        main_grad = getattr(weight, "main_grad", None)
        if main_grad is None:
            raise RuntimeError(f"{WHERE}: config.gradient_accumulation_fusion needs the parameters' `main_grad` "
                               "(Megatron's DistributedDataParallel allocates it)")
        main_grad.add_(grad.reshape(main_grad.shape))
        if hasattr(weight, "grad_added_to_main_grad"):
            weight.grad_added_to_main_grad = True
            if getattr(weight, "zero_out_wgrad", False):
                return torch.zeros_like(weight)
            return torch.empty_like(weight)
        return None


class FastMoEGroupedMLP(MegatronModule):
    """Megatron-Core's experts seam on fastmoe_kernels' grouped kernels (see the module docstring).

    ``fp8_recipe`` (a ModuleSpec param): None, or ``"blockwise"`` for our blockwise-e4m3 GEMMs.
    ``fused``: None follows the package's rule (the device's tuning table), True/False forces the fused
    kernels / the composition. ``backend``: a fastmoe_kernels backend name, None for auto."""

    def __init__(self, num_local_experts: int, config, pg_collection=None, *, fp8_recipe: Optional[str] = None,
                 fused: Optional[bool] = None, backend: Optional[str] = None):
        super().__init__(config=config)
        _refuse_unsupported(config)
        check_recipe(WHERE, fp8_recipe)
        check_optional_bool(WHERE, "fused", fused)
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
            pg_collection = get_default_pg_collection()
        self.activation = activation_of(config)
        self.num_local_experts = num_local_experts
        self.fp8_recipe, self.fused, self.backend = fp8_recipe, fused, backend
        self.expert_parallel = config.expert_model_parallel_size > 1
        # The groups GroupedMLP.sharded_state_dict reads.
        self.ep_group, self.tp_group, self.dp_group = pg_collection.ep, pg_collection.expt_tp, pg_collection.expt_dp
        m = 2 if self.activation.gated else 1
        d, f = config.hidden_size, config.moe_ffn_hidden_size
        tp_size, tp_rank = self.tp_group.size(), self.tp_group.rank()
        fc1_size, fc2_size = m * f * num_local_experts, f * num_local_experts
        fc1_local, fc2_local = divide(fc1_size, tp_size), divide(fc2_size, tp_size)
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight1 = Parameter(torch.empty(d, fc1_local, dtype=config.params_dtype, device=device))
        self.weight2 = Parameter(torch.empty(fc2_local, d, dtype=config.params_dtype, device=device))
        if config.perform_initialization:
            if config.use_cpu_initialization:
                _initialize_affine_weight_cpu(self.weight1, d, fc1_size, fc1_local, partition_dim=1,
                                              init_method=config.init_method, params_dtype=config.params_dtype,
                                              rank=tp_rank, world_size=tp_size)
                _initialize_affine_weight_cpu(self.weight2, fc2_size, d, fc2_local, partition_dim=0,
                                              init_method=config.output_layer_init_method,
                                              params_dtype=config.params_dtype, rank=tp_rank, world_size=tp_size)
            else:
                _initialize_affine_weight_gpu(self.weight1, config.init_method, partition_dim=1, is_expert=True)
                _initialize_affine_weight_gpu(self.weight2, config.output_layer_init_method, partition_dim=0,
                                              is_expert=True)
        # Data-parallel all-reduce only without expert parallelism (Megatron's convention for experts).
        setattr(self.weight1, "allreduce", not self.expert_parallel)
        setattr(self.weight2, "allreduce", not self.expert_parallel)
        self.register_load_state_dict_post_hook(_ignore_sequential_mlp_extra_state)

    # GroupedMLP's checkpoint mapping: local experts to global keys, per-expert [m·f, d] / [d, f] tensors
    # (SequentialMLP's layout), the gate and up halves of each tensor-parallel shard kept apart.
    sharded_state_dict = GroupedMLP.sharded_state_dict

    def expert_weights(self) -> tuple[Tensor, Tensor]:
        """``(w_up [E, m·f, d], w_down [E, d, f])``: views of weight1 and weight2 in our ops' layout."""
        E, d = self.num_local_experts, self.config.hidden_size
        w1, w2 = self.weight1, self.weight2
        if self.config.gradient_accumulation_fusion and torch.is_grad_enabled():
            w1, w2 = _IntoMainGrad.apply(w1), _IntoMainGrad.apply(w2)
        return w1.view(E, d, -1).transpose(1, 2), w2.view(E, -1, d).transpose(1, 2)

    def forward(self, permuted_local_hidden_states: Tensor, tokens_per_expert: Tensor, permuted_probs: Tensor):
        x, probs = permuted_local_hidden_states, permuted_probs
        if x.dim() != 2 or x.shape[1] != self.config.hidden_size:
            raise ValueError(f"{WHERE}: `permuted_local_hidden_states` must be [rows, {self.config.hidden_size}], "
                             f"got {list(x.shape)}")
        if probs.shape != x.shape[:1]:
            raise ValueError(f"{WHERE}: `permuted_probs` must be [{x.shape[0]}] (one per row), got {list(probs.shape)}")
        if tokens_per_expert.shape != (self.num_local_experts,):
            raise ValueError(f"{WHERE}: `tokens_per_expert` must be [{self.num_local_experts}] (one per local "
                             f"expert), got {list(tokens_per_expert.shape)}")
        if self.config.moe_apply_probs_on_input:
            x = (probs.unsqueeze(-1) * x).to(x.dtype)  # Megatron's order: weight the input, not the output
            probs = torch.ones_like(probs)
        plan = plan_for_grouped_rows(tokens_per_expert.to(x.device), x.shape[0], where=WHERE, name="tokens_per_expert")
        w_up, w_down = self.expert_weights()
        weight = probs.unsqueeze(1)
        if self._fused(x, w_up, w_down, weight):
            run = moe_mlp_fp8 if self.fp8_recipe else moe_mlp
            extra = {} if self.fp8_recipe else {"fused": True}
            return run(x, plan, weight, w_up, w_down, self.activation, backend=self.backend, **extra), None
        if self.fp8_recipe:
            y = grouped_mlp_fp8(x, w_up, w_down, plan.offsets, self.activation, backend=self.backend)
        else:
            y = grouped_mlp(x, w_up, w_down, plan.offsets, self.activation, backend=self.backend)
        # fp32 weighting, one rounding (as Megatron's activation_func_with_probs); empty rows stay zero.
        return (y * weight.to(torch.promote_types(weight.dtype, torch.float32))).to(x.dtype), None

    def _fused(self, x: Tensor, w_up: Tensor, w_down: Tensor, weight: Tensor) -> bool:
        """Whether the fused experts kernels (the probabilities applied in their combine) run."""
        if self.fp8_recipe:
            return self.fused is not False
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_up, w_down, weight))
        shape = None
        if self.fused is None:
            shape = LayerShape.of(x.shape[1], w_down.shape[2], self.num_local_experts, 1, self.activation.name,
                                  x.dtype, x.shape[0])
        fused = default_fusion(self.fused, needs_grad, x.device, shape)
        return fused is not False and backends.resolve("moe_mlp", self.backend, x.device, x.dtype) != "torch"

    def backward_dw(self) -> None:
        """Megatron's MoE layer calls it for delayed weight gradients; ours are computed in the backward."""

    def extra_repr(self) -> str:
        return (f"num_local_experts={self.num_local_experts}, activation={self.activation.name}, "
                f"fp8_recipe={self.fp8_recipe}, fused={self.fused}")


def _ignore_sequential_mlp_extra_state(module, incompatible_keys) -> None:
    """GroupedMLP.sharded_state_dict writes empty ``_extra_state`` entries for SequentialMLP's
    checkpoints; loading them back must not fail on them."""
    for key in copy.copy(incompatible_keys.unexpected_keys):
        if "_extra_state" in key:
            incompatible_keys.unexpected_keys.remove(key)


def fastmoe_experts_spec(**params) -> ModuleSpec:
    """``ModuleSpec(module=FastMoEGroupedMLP, params=params)``: the experts entry of ``MoESubmodules``."""
    return ModuleSpec(module=FastMoEGroupedMLP, params=dict(params))


def use_fastmoe_experts(spec, **params) -> int:
    """Replace the experts ``ModuleSpec`` of every ``MoESubmodules`` inside ``spec`` (a layer spec, a
    block spec or a list of them) by ours, in place; returns how many were replaced (a ValueError if
    none: the spec has no MoE layer)."""
    seen, replaced = set(), [0]

    def visit(node) -> None:
        if id(node) in seen or node is None or isinstance(node, (str, int, float, bool, type)):
            return
        seen.add(id(node))
        if isinstance(node, MoESubmodules):
            node.experts = fastmoe_experts_spec(**params)
            replaced[0] += 1
        if isinstance(node, (list, tuple)):
            children = node
        elif isinstance(node, dict):
            children = node.values()
        else:
            children = vars(node).values() if hasattr(node, "__dict__") else ()
        for child in children:
            visit(child)

    visit(spec)
    if not replaced[0]:
        raise ValueError("use_fastmoe_experts: `spec` holds no MoESubmodules (no MoE layer to give our experts)")
    return replaced[0]
