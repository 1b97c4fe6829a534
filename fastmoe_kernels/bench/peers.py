"""Baselines from other packages, optional: each runs when its package is installed (on the GPU
machine they travel as wheels: ``benchmarks/gpu_session.py``), else it is skipped with the reason.

- ``liger-fused_moe``: Liger-Kernel's released fused MoE (``liger_kernel.ops.fused_moe``, 0.8.5):
  routing metadata, a gather + grouped GEMM + SwiGLU up projection, the down projection and a weighted
  token sum, in Triton; SwiGLU without clamp or scale only, and bf16 (its kernels' dtype).
- ``torchao-fp8_rowwise``: torchao's fp8 grouped GEMM (``_to_fp8_rowwise_then_scaled_grouped_mm``,
  0.18): each operand quantised to e4m3 with one scale per row (A) / per column (B), then
  ``torch._scaled_grouped_mm``; a *rowwise* recipe, not our blockwise one (1×128 / 128×128 scales):
  compared as such. Its groups must hold multiples of 16 rows, so the baseline pads each expert's rows
  to 16 (as a user of it must), in a static bound of ``T·k + 16·E`` rows (no host sync).

Both take our weights as they are (``w_up [E, 2f, d]`` with rows [gate | up], ``w_down [E, d, f]``).
"""
from __future__ import annotations

from typing import Callable, Dict, Union

import torch

from ..activations import apply_activation
from ..experts import GroupedExperts

Baseline = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
TORCHAO_GROUP_ROWS = 16


def _plain_swiglu(experts: GroupedExperts) -> bool:
    act = experts.activation
    return act.name == "swiglu" and act.alpha == 1.0 and act.limit == float("inf") and not act.interleaved


class LigerFusedMoE:
    """Liger-Kernel's fused MoE on our experts' weights."""

    def __init__(self, experts: GroupedExperts):
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

        if not (experts.homogeneous and _plain_swiglu(experts) and experts.b_up is None):
            raise ValueError("Liger's fused MoE is SwiGLU (no clamp or scale), homogeneous and bias-free")
        self.fn = LigerFusedMoEFunction.apply
        self.experts = experts

    def __call__(self, x, expert_idx, weight):
        ex = self.experts
        return self.fn(x, ex.w_up, ex.w_down, expert_idx.to(torch.int32), weight.to(x.dtype))


def padded_grouping(expert_idx: torch.Tensor, num_experts: int, multiple: int):
    """Rows grouped by expert with each group padded to ``multiple`` rows, in the static bound
    ``T·k + multiple·E``: ``(row of each assignment [T·k], group ends [E] int32, source token of each
    row [bound], -1 for padding)``. Rows of one expert keep token order."""
    T, k = expert_idx.shape
    flat = expert_idx.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + multiple - 1) // multiple * multiple
    padded_start = torch.cumsum(padded, 0) - padded
    start = torch.cumsum(counts, 0) - counts
    order = torch.sort(flat, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(flat.numel(), device=flat.device)
    row = padded_start[flat] + (rank - start[flat])
    bound = T * k + multiple * num_experts
    src = torch.full((bound,), -1, dtype=torch.long, device=flat.device)
    src[row] = torch.arange(flat.numel(), device=flat.device) // k
    return row, torch.cumsum(padded, 0).to(torch.int32), src


class TorchaoFp8Rowwise:
    """torchao's fp8 rowwise grouped GEMMs for the two projections, the activation between them, and
    the weighted combine (fp32 sums)."""

    def __init__(self, experts: GroupedExperts):
        from torchao.prototype.moe_training import _to_fp8_rowwise_then_scaled_grouped_mm

        if not experts.homogeneous or experts.b_up is not None:
            raise ValueError("torchao's fp8 grouped GEMM takes homogeneous, bias-free experts")
        self.fn = _to_fp8_rowwise_then_scaled_grouped_mm
        self.experts = experts

    def __call__(self, x, expert_idx, weight):
        ex = self.experts
        T, k = expert_idx.shape
        row, ends, src = padded_grouping(expert_idx, ex.num_experts, TORCHAO_GROUP_ROWS)
        x_rows = torch.where((src >= 0)[:, None], x[src.clamp(min=0)], 0.0)
        # B_t [E, K, N] in per-expert column-major layout: the transposes of our [E, N, K] weights.
        h = self.fn(x_rows, ex.w_up.transpose(-2, -1), ends, out_dtype=x.dtype, pad_token_groups_for_grouped_mm=False)
        y = self.fn(apply_activation(h, ex.activation).contiguous(), ex.w_down.transpose(-2, -1), ends,
                    out_dtype=x.dtype, pad_token_groups_for_grouped_mm=False)
        y = y[row].float() * weight.reshape(-1, 1).float()
        return y.view(T, k, -1).sum(1).to(x.dtype)


PEERS = {"liger-fused_moe": LigerFusedMoE, "torchao-fp8_rowwise": TorchaoFp8Rowwise}


def build_peers(experts: GroupedExperts, *, fp8: bool) -> Dict[str, Union[Baseline, str]]:
    """The peers that apply (the fp8 one to fp8 cases, Liger's to bf16 ones): callables, or why not."""
    out: Dict[str, Union[Baseline, str]] = {}
    for name, cls in PEERS.items():
        if (name == "torchao-fp8_rowwise") != fp8:
            continue
        try:
            out[name] = cls(experts)
        except ImportError as exc:
            out[name] = f"not installed ({exc})"
        except ValueError as exc:
            out[name] = str(exc)
    return out
