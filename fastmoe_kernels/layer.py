"""MoELayer: a drop-in replacement for a dense MLP block."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import hf_layout
from ._checks import FLOAT_DTYPES, check_tensor
from .config import MoEConfig
from .dispatch import CapacityDispatcher, Dispatcher, DroplessDispatcher
from .experts import GroupedExperts, SharedExperts
from .losses import attach_aux_loss, load_balancing_loss_from_stats, z_loss
from .ops import routing_stats as routing_stats_op
from .parallel.expert_parallel import DEFAULT_TIMEOUT_S, ExpertParallelExchange, collective
from .router import RouterOutput, TopKRouter


@dataclass
class RoutingStats:
    """Routing of the last forward pass (values read from the device on access)."""

    tokens_per_expert: Tensor  # [E] assignments routed to each expert (before capacity)
    kept_per_expert: Tensor    # [E] assignments kept (equal to the above when dropless)
    dropped_fraction: float    # dropped assignments / (T·k)
    max_load: float            # max_e tokens_per_expert
    mean_load: float           # mean_e tokens_per_expert
    max_over_mean: float       # max_load / mean_load (1 = perfectly balanced)


class MoELayer(nn.Module):
    """Mixture-of-Experts MLP: ``y = Σ_j w_j · expert_{e_j}(x) (+ shared experts(x))``.

    Build it from a :class:`MoEConfig` or from the same fields as keyword arguments::

        layer = MoELayer(d_model=512, d_ff=256, num_experts=64, top_k=8)
        layer = MoELayer(config, capacity_factor=1.25)   # fields given as kwargs override the config

    ``forward(x)`` takes ``x [..., d_model]`` and returns y with x's shape and dtype. The router
    runs in fp32. The auxiliary losses (load balancing, z-loss) of the pass are in
    :attr:`aux_losses` (detached, for logging) and, with ``config.aux_loss_in_backward`` (the
    default), already reach the gradients through ``y`` — the trainer's loss needs no change. Call
    ``forward(x, return_aux_loss=True)`` to get ``(y, aux_loss)`` instead and add it yourself.

    For the per-sequence load-balancing loss, the second-to-last dim of x is the sequence:
    ``x [B, S, d]`` has B sequences; a 2-D x is one sequence.

    ``expert_parallel_group``: shard the experts over a ``torch.distributed`` group (see
    :mod:`fastmoe_kernels.parallel`): this rank holds experts ``[r·E/W, (r+1)·E/W)``, the router and
    the shared experts are replicated, tokens travel by all-to-all, and the load-balancing loss keeps
    its configured scope (``"global"`` over ``set_aux_loss_group``'s group, else this rank's tokens, as
    without expert parallelism). Before the first exchange the ranks check that they built the same
    layer (a mismatch raises ``ExpertParallelError`` naming the fields); every exchange waits at most
    ``expert_parallel_timeout`` seconds (then ``ExpertParallelError``). ``expert_parallel_chunks`` C > 1
    (dropless only) pipelines the exchange: the tokens go in C chunks, a chunk's rows travelling while
    the experts compute the previous one.
    """

    def __init__(self, config: Optional[MoEConfig] = None, /, *, device=None, dtype=None,
                 expert_parallel_group=None, expert_parallel_timeout: float = DEFAULT_TIMEOUT_S,
                 expert_parallel_chunks: int = 1, **fields):
        super().__init__()
        if config is None:
            config = MoEConfig(**fields)
        elif not isinstance(config, MoEConfig):
            raise TypeError(f"MoELayer: `config` must be a MoEConfig, got {type(config).__name__}")
        elif fields:
            config = config.replace(**fields)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"MoELayer: `dtype` must be one of float16/bfloat16/float32/float64, got {dtype}")
        self.config = config
        self.backend: Optional[str] = config.backend
        factory = dict(device=device, dtype=dtype)
        self.router = TopKRouter(config, **factory)
        self.expert_parallel = None
        widths = config.expert_widths
        if not isinstance(expert_parallel_chunks, int) or isinstance(expert_parallel_chunks, bool) \
                or expert_parallel_chunks < 1:
            raise ValueError(f"MoELayer: `expert_parallel_chunks` must be an int >= 1, got {expert_parallel_chunks!r}")
        if expert_parallel_chunks > 1 and not config.dropless:
            raise ValueError("MoELayer: `expert_parallel_chunks` > 1 needs dropless routing (capacity is decided on "
                             "the whole batch; chunks would change which assignments drop)")
        self.expert_parallel_chunks = expert_parallel_chunks
        if expert_parallel_group is not None:
            fingerprint = _fingerprint(config, dtype) + f";expert_parallel_chunks={expert_parallel_chunks}"
            self.expert_parallel = ExpertParallelExchange(
                config.num_experts, expert_parallel_group, fingerprint, expert_parallel_timeout)
            widths = tuple(widths[e] for e in self.expert_parallel.local)
        self.experts = GroupedExperts(config.d_model, widths, config.activation_spec, config.bias, config.init_std,
                                      fp8_recipe=config.fp8_recipe, **factory)
        if self.expert_parallel is not None:
            for p in self.experts.parameters():
                p.fastmoe_expert_parallel = True
        self.shared_experts = None
        if config.num_shared_experts:
            self.shared_experts = SharedExperts(
                config.d_model, config.shared_d_ff, config.num_shared_experts, config.activation_spec, config.bias,
                config.shared_expert_gate, config.init_std, **factory,
            )
        self.dispatcher: Dispatcher
        if config.dropless:
            self.dispatcher = DroplessDispatcher(config.num_experts)
        else:
            self.dispatcher = CapacityDispatcher(
                config.num_experts, config.top_k, config.capacity_factor, config.drop_policy, config.pad_to_capacity
            )
        self.aux_losses: Dict[str, Tensor] = {}
        self._last_route: Optional[dict] = None
        self.aux_loss_group: Optional["dist.ProcessGroup"] = None

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor, *, return_aux_loss: bool = False, backend: Optional[str] = None):
        cfg = self.config
        check_tensor("MoELayer.forward", "x", x, dtypes=FLOAT_DTYPES)
        if x.dim() < 1 or x.shape[-1] != cfg.d_model:
            raise ValueError(f"MoELayer.forward: `x` must be [..., d_model={cfg.d_model}], got shape {list(x.shape)}")
        backend = backend if backend is not None else self.backend
        lead_shape = x.shape[:-1]
        x2 = x.reshape(-1, cfg.d_model)
        need_lb = cfg.aux_loss_coeff > 0 and cfg.load_balancing_type != "none"
        route = self.router(x2, return_probs=need_lb, backend=backend)
        if self.expert_parallel is not None:
            y, routed, kept, dropped = self._expert_parallel_experts(x2, route, backend)
        else:
            plan = self.dispatcher.plan(route.expert_idx, route.weight, backend=backend)
            routed, kept, dropped = plan.routed_counts, plan.counts, plan.dropped_fraction
            # permute → experts → weighted combine, as one fused op where the backend has it.
            y = self.experts.forward_tokens(x2, plan, route.weight, backend=backend, fused=cfg.fused_experts)
            if self.shared_experts is not None:
                y = y + self.shared_experts(x2)
        y = y.view(*lead_shape, cfg.d_model)

        aux_loss = self._aux_losses(route, lead_shape, backend)
        self._last_route = {"routed": routed, "kept": kept, "dropped": dropped}
        if return_aux_loss:
            return y, aux_loss
        if cfg.aux_loss_in_backward and aux_loss.requires_grad:
            y = attach_aux_loss(y, aux_loss)
        return y

    def _expert_parallel_experts(self, x: Tensor, route: RouterOutput, backend):
        """Routed experts through the exchange, the shared experts computed while the rows travel;
        returns (output, routed counts, kept counts, dropped fraction). With ``expert_parallel_chunks``
        C > 1 the tokens go in C chunks (one plan each, no plan of the whole batch): every chunk's rows
        are sent at once, and chunk c+1's rows and chunk c's outputs travel while the experts compute."""
        exchange, C = self.expert_parallel, self.expert_parallel_chunks
        if C == 1:
            plan = self.dispatcher.plan(route.expert_idx, route.weight, backend=backend)
            chunks, plans, weights = [x], [plan], [route.weight]
            routed, kept, dropped = plan.routed_counts, plan.counts, plan.dropped_fraction
        else:
            bounds = [x.shape[0] * i // C for i in range(C + 1)]
            chunks = [x[a:b] for a, b in zip(bounds, bounds[1:])]
            weights = [route.weight[a:b] for a, b in zip(bounds, bounds[1:])]
            plans = [self.dispatcher.plan(route.expert_idx[a:b], route.weight[a:b], backend=backend)
                     for a, b in zip(bounds, bounds[1:])]
            kept = routed = torch.stack([p.counts for p in plans]).sum(0).to(plans[0].counts.dtype)
            dropped = route.weight.new_zeros((), dtype=torch.float32)  # dropless (checked at construction)
        sent = exchange.dispatch_chunks(chunks, plans, backend)
        shared = None
        try:
            if self.shared_experts is not None:
                shared = self.shared_experts(x)
                exchange._trace("shared experts")
            for s in sent:
                rows, offsets = exchange.receive(s)
                exchange.combine_start(s, self.experts(rows, offsets, backend=backend))
        except BaseException:
            exchange.drain(sent)
            raise
        outs = [exchange.combine_finish(s, p, w, backend) for s, p, w in zip(sent, plans, weights)]
        y = outs[0] if C == 1 else torch.cat(outs)
        return (y if shared is None else y + shared), routed, kept, dropped

    def _aux_losses(self, route: RouterOutput, lead_shape, backend) -> Tensor:
        cfg = self.config
        total = route.logits.new_zeros(())
        losses: Dict[str, Tensor] = {}
        if route.probs is not None:
            segments = 1
            if cfg.load_balancing_type == "sequence" and len(lead_shape) >= 2:
                segments = route.logits.shape[0] // lead_shape[-1] if lead_shape[-1] else 1
            tokens, prob_mean = routing_stats_op(route.probs, route.expert_idx, segments, backend=backend)
            # The configured scope, with or without expert parallelism (turning it on must not change
            # the loss): "global" sums the counts over aux_loss_group (set_aux_loss_group), the other
            # types count this rank's tokens. The counts carry no gradient: their all-reduce is detached.
            group = self.aux_loss_group if cfg.load_balancing_type == "global" else None
            if group is not None:
                tokens = tokens.detach().clone()
                if self.expert_parallel is not None and group is self.expert_parallel.group:
                    collective(dist.all_reduce, tokens, group=group, what="the load-balancing counts' all-reduce",
                               timeout_s=self.expert_parallel.timeout_s)
                else:
                    dist.all_reduce(tokens, group=group)
            lb = load_balancing_loss_from_stats(
                tokens, prob_mean, cfg.top_k, normalization=cfg.load_balancing_normalization
            )
            losses["load_balancing"] = lb.detach()
            total = total + cfg.aux_loss_coeff * lb
        if cfg.z_loss_coeff > 0:
            z = z_loss(route.logits)
            losses["z_loss"] = z.detach()
            total = total + cfg.z_loss_coeff * z
        losses["total"] = total.detach()
        self.aux_losses = losses
        return total

    # ---- statistics and balancing --------------------------------------------------------------
    @property
    def routing_stats(self) -> Optional[RoutingStats]:
        """Routing of the last forward pass: tokens per expert, dropped fraction, max/mean load."""
        if self._last_route is None:
            return None
        routed = self._last_route["routed"].detach()
        loads = routed.float()
        mean = float(loads.mean()) if loads.numel() else 0.0
        peak = float(loads.max()) if loads.numel() else 0.0
        return RoutingStats(
            tokens_per_expert=routed.cpu(),
            kept_per_expert=self._last_route["kept"].detach().cpu(),
            dropped_fraction=float(self._last_route["dropped"]),
            max_load=peak,
            mean_load=mean,
            max_over_mean=peak / mean if mean > 0 else 0.0,
        )

    def update_expert_bias(self, group: Optional["dist.ProcessGroup"] = None) -> Optional[Tensor]:
        """Loss-free balancing step (needs ``expert_bias=True``); call once per optimizer step."""
        return self.router.update_expert_bias(group)

    def set_aux_loss_group(self, group: Optional["dist.ProcessGroup"]) -> None:
        """Process group over which the "global" load-balancing loss sums its token counts."""
        self.aux_loss_group = group

    # ---- accounting ---------------------------------------------------------------------------
    def num_parameters(self, active: bool = False) -> int:
        """Parameters of the layer; with ``active``, those one token uses: router, shared experts and
        k routed experts (of the mean expert size, for heterogeneous experts)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        expert_params = sum(p.numel() for p in self.experts.parameters())
        return int(total - expert_params + self.config.top_k * expert_params / self.config.num_experts)

    # ---- expert parallelism ---------------------------------------------------------------------
    def to_expert_parallel(self, group, timeout: float = DEFAULT_TIMEOUT_S, chunks: int = 1) -> "MoELayer":
        """This rank's shard of this (full) layer: its block of experts, the router and shared experts
        (``timeout``: seconds any exchange may wait; ``chunks``: ``expert_parallel_chunks``)."""
        if self.expert_parallel is not None:
            raise ValueError("to_expert_parallel: the layer is already expert-parallel")
        shard = MoELayer(self.config, device=self.router.weight.device, dtype=self.router.weight.dtype,
                         expert_parallel_group=group, expert_parallel_timeout=timeout, expert_parallel_chunks=chunks)
        shard.backend = self.backend
        shard.aux_loss_group = self.aux_loss_group
        _load_all_but_experts(shard, self)
        shard.experts.load_experts([self.experts.expert_weights(e) for e in shard.expert_parallel.local])
        return shard

    def gather_full(self) -> "MoELayer":
        """A full (single-device) layer with every rank's experts, built on every rank of the group."""
        if self.expert_parallel is None:
            raise ValueError("gather_full: the layer is not expert-parallel")
        local = [tuple(None if t is None else t.detach().cpu() for t in self.experts.expert_weights(e))
                 for e in range(self.experts.num_experts)]
        gathered: list = [None] * self.expert_parallel.world
        dist.all_gather_object(gathered, local, group=self.expert_parallel.group)
        full = MoELayer(self.config, device=self.router.weight.device, dtype=self.router.weight.dtype)
        full.backend = self.backend
        _load_all_but_experts(full, self)
        device = self.router.weight.device
        full.experts.load_experts([tuple(None if t is None else t.to(device) for t in w) for part in gathered for w in part])
        return full

    # ---- conversion ---------------------------------------------------------------------------
    @classmethod
    def from_transformers(cls, block: nn.Module, **overrides) -> "MoELayer":
        """An MoELayer with the weights and routing of a Hugging Face transformers sparse-MoE block
        (Mixtral, Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V3, …); ``overrides`` set other config fields."""
        router_weight = hf_layout.block_router_weight(block)
        layer = cls(MoEConfig(**hf_layout.config_fields(block, **overrides)), device=router_weight.device,
                    dtype=hf_layout.expert_weights(block.experts)[0].dtype)
        hf_layout.load_block(layer, block)
        return layer

    def to_transformers(self, block: nn.Module) -> nn.Module:
        """Copy this layer's weights into a transformers sparse-MoE ``block`` of the same shape."""
        return hf_layout.store_block(self, block)

    def extra_repr(self) -> str:
        cfg = self.config
        mode = "dropless" if cfg.dropless else f"capacity_factor={cfg.capacity_factor}, drop_policy={cfg.drop_policy}"
        return f"top_k={cfg.top_k}, score={cfg.score_func}, {mode}, backend={self.backend}"


def _fingerprint(config: MoEConfig, dtype) -> str:
    """What the ranks of an expert-parallel group must agree on: every config field but the backend
    (ranks may run different kernels), and the parameters' dtype."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "backend"}
    fields["dtype"] = str(dtype or torch.get_default_dtype())
    return ";".join(f"{k}={v}" for k, v in sorted(fields.items()))


def _load_all_but_experts(dst: MoELayer, src: MoELayer) -> None:
    """Copy the router, shared experts and buffers of ``src`` into ``dst`` (experts differ in layout)."""
    result = dst.load_state_dict({k: v for k, v in src.state_dict().items() if not k.startswith("experts.")}, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("experts.")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"layer conversion: missing {missing}, unexpected {result.unexpected_keys}")


def update_expert_biases(model: nn.Module, group: Optional["dist.ProcessGroup"] = None) -> None:
    """Call :meth:`MoELayer.update_expert_bias` on every MoELayer of ``model`` (once per optimizer step)."""
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.update_expert_bias(group)
