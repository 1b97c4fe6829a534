"""TopKRouter: token → (experts, weights). Computed in fp32 (fp64 for fp64 input); with
``router_precision="input"`` the logits ``x·Wᵀ`` are computed in the input's dtype first."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig
from .losses import expert_bias_delta
from ._variants import flag
from .ops import route_topk, router_logits

# The fp32 router GEMM: torch's F.linear ("torch": CUDA cores on a GPU) or ops.router_logits's tensor-core
# kernels at fp32's accuracy ("tensor-cores"); kept selectable for the GPU session's A/B.
ROUTER_GEMM = flag("FASTMOE_ROUTER_GEMM", "torch", ("torch", "tensor-cores"))


@dataclass
class RouterOutput:
    logits: Tensor        # [T, E] fp32 router logits
    expert_idx: Tensor    # [T, k] int32
    weight: Tensor        # [T, k] fp32 combine weights (differentiable)
    probs: Optional[Tensor]  # [T, E] fp32 probabilities for the load-balancing loss, when asked


class TopKRouter(nn.Module):
    """Linear gate ``logits = x · Wᵀ`` (``weight [E, d]``, the nn.Linear layout) and top-k routing.

    With ``config.expert_bias``, holds the loss-free balancing bias as a buffer ``expert_bias [E]``
    (saved in checkpoints, never trained by the optimizer) and counts the tokens routed to each
    expert in training (``tokens_since_update``), for :meth:`update_expert_bias`.
    """

    def __init__(self, config: MoEConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        E = config.num_experts
        self.weight = nn.Parameter(torch.empty(E, config.d_model, device=device, dtype=dtype))
        if config.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(E, device=device, dtype=torch.float32))
            # Integer counts: exact, and left alone by module.to(dtype) (a bf16 count stops at 256).
            self.register_buffer("tokens_since_update", torch.zeros(E, device=device, dtype=torch.int64), persistent=False)
        else:
            self.expert_bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.config.init_std is None:
            bound = 1 / math.sqrt(self.config.d_model)
            nn.init.uniform_(self.weight, -bound, bound)
        else:
            nn.init.normal_(self.weight, std=self.config.init_std)

    def forward(self, x: Tensor, *, return_probs: bool = False, backend: Optional[str] = None) -> RouterOutput:
        cfg = self.config
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        jitter = self.training and cfg.router_jitter > 0
        if (ROUTER_GEMM == "tensor-cores" and cfg.router_precision == "fp32" and compute == torch.float32
                and self.weight.dtype != torch.float64):
            # The same fp32 product on tensor cores, x read in its own dtype (no fp32 copy of it
            # unless jitter makes one): ops/router_logits.py.
            inp = x * torch.empty_like(x, dtype=compute).uniform_(1 - cfg.router_jitter, 1 + cfg.router_jitter) \
                if jitter else x
            logits = router_logits(inp, self.weight, backend=backend)
        else:
            # "input": the logits rounded to x's dtype, as a bf16 transformers router computes them.
            inp = x if cfg.router_precision == "input" else x.to(compute)
            if jitter:
                # Switch Transformer's multiplicative jitter on the router input.
                inp = inp * torch.empty_like(inp).uniform_(1 - cfg.router_jitter, 1 + cfg.router_jitter)
            logits = F.linear(inp, self.weight.to(inp.dtype)).to(compute)
        if self.training and cfg.router_noise_std > 0:
            logits = logits + torch.randn_like(logits) * cfg.router_noise_std
        out = route_topk(
            logits, cfg.top_k, cfg.score_func, cfg.normalize_topk, self.expert_bias,
            num_groups=cfg.num_groups, topk_groups=cfg.topk_groups, scaling_factor=cfg.routed_scaling_factor,
            return_probs=return_probs, backend=backend,
        )
        expert_idx, weight = out[0], out[1]
        if self.expert_bias is not None and self.training:
            with torch.no_grad():
                # scatter_add, not bincount: bincount reads the ids' maximum back to the host (a sync).
                # Only ids in range count: a router kernel given NaN logits (which the value check
                # reports, possibly a call later) may emit any id.
                ids = expert_idx.reshape(-1).long()
                valid = (ids >= 0) & (ids < cfg.num_experts)
                self.tokens_since_update.scatter_add_(0, ids.clamp(0, cfg.num_experts - 1), valid.long())
        return RouterOutput(logits, expert_idx, weight, out[2] if return_probs else None)

    @torch.no_grad()
    def update_expert_bias(self, group: Optional["dist.ProcessGroup"] = None) -> Optional[Tensor]:
        """Apply DeepSeek-V3's rule ``bias += rate · sign(mean_load − load_e)`` to the tokens counted
        since the last call (all-reduced over ``group`` if given), then reset the count. Call it once
        per optimizer step. Returns the applied delta, or None without expert bias."""
        if self.expert_bias is None:
            return None
        counts = self.tokens_since_update.clone()
        if group is not None:
            dist.all_reduce(counts, group=group)
        counts = counts.to(torch.float32)
        delta = expert_bias_delta(counts, self.config.expert_bias_update_rate)
        if counts.sum() == 0:
            delta.zero_()
        self.expert_bias.add_(delta)
        self.tokens_since_update.zero_()
        return delta
