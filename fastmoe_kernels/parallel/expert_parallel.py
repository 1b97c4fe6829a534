"""Expert parallelism over a ``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs).

Layout: with W ranks and E experts, rank r owns experts ``[r·E/W, (r+1)·E/W)`` (contiguous blocks);
the router and the shared experts are replicated on every rank.

Forward of one layer on rank r (its own T_r tokens):
1. route and plan over all E experts — the rows bound for each rank are then contiguous;
2. exchange per-expert row counts (all-to-all), then the rows themselves (``all_to_all_single``,
   uneven splits; with capacity and padding a rank sends exactly ``E/W · C`` rows to every rank,
   after the ranks exchange their capacities — equal when their token counts are);
3. reorder the received rows (grouped by source rank) by local expert, run the local experts,
   undo the reorder, exchange back, and combine with the routing weights.
The backward runs the same exchanges in the transposed direction. Dropping by capacity is decided
by each source rank on its own tokens (C from its own T_r), as a single-device layer would.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops import DispatchPlan, grouped_mlp, permute, unpermute


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; its backward is the exchange the other way."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: List[int], in_splits: List[int], group) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        back = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: Tensor, out_splits: List[int], in_splits: List[int], group) -> Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


def group_info(group) -> Tuple[int, int]:
    """(rank, world size) of this process in ``group``."""
    return dist.get_rank(group), dist.get_world_size(group)


def local_expert_range(num_experts: int, group) -> range:
    rank, world = group_info(group)
    if num_experts % world:
        raise ValueError(f"expert parallelism: num_experts={num_experts} must be divisible by the group size {world}")
    per_rank = num_experts // world
    return range(rank * per_rank, (rank + 1) * per_rank)


class ExpertParallelExchange:
    """The token exchange of one expert-parallel layer (see the module docstring)."""

    def __init__(self, num_experts: int, group):
        self.group = group
        self.rank, self.world = group_info(group)
        self.local = local_expert_range(num_experts, group)
        self.num_experts = num_experts
        self.per_rank = len(self.local)

    def run_experts(self, x: Tensor, plan: DispatchPlan, weight: Tensor, experts, backend: Optional[str]) -> Tensor:
        """Tokens ``x [T, d]`` in, combined expert outputs ``[T, d]`` out, through the local ``experts``."""
        W, E_l = self.world, self.per_rank
        x_rows = permute(x, plan, backend=backend)
        if plan.padded:
            # Fixed [E, C] layout: a rank sends E/W · C rows (padding included) to every rank. C comes
            # from each rank's own token count, so the ranks tell each other theirs first (equal when
            # every rank has the same number of tokens, the usual fixed-shape training step).
            mine = torch.tensor([plan.capacity], dtype=torch.int64, device=x.device)
            capacities = [torch.empty_like(mine) for _ in range(W)]
            dist.all_gather(capacities, mine, group=self.group)
            caps = torch.cat(capacities).cpu().tolist()
            recv_matrix = torch.tensor(caps, dtype=torch.int64, device=x.device).unsqueeze(1).expand(W, E_l).contiguous()
            in_splits = [E_l * plan.capacity] * W
            out_splits = [E_l * c for c in caps]
            sent = x_rows
        else:
            send_counts = plan.counts.to(torch.int64)
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)  # rows from each source, per expert
            recv_matrix = recv_counts.view(W, E_l)
            # Uneven splits must be known on the host: one synchronisation per layer.
            host = torch.stack([send_counts.view(W, E_l).sum(1), recv_matrix.sum(1)]).cpu()
            in_splits, out_splits = host[0].tolist(), host[1].tolist()
            sent = x_rows[: sum(in_splits)]  # rows past the kept ones (the capacity tail) stay home
        received = all_to_all(sent, out_splits, in_splits, self.group)
        # Received rows are grouped by source rank, then local expert; regroup them by local expert.
        expert_of_row = torch.repeat_interleave(torch.arange(E_l, device=x.device).repeat(W), recv_matrix.reshape(-1))
        order = torch.sort(expert_of_row, stable=True).indices
        per_expert = recv_matrix.sum(0)
        offsets = torch.cat([per_expert.new_zeros(1), torch.cumsum(per_expert, 0)]).to(torch.int32)
        local_out = grouped_mlp(received[order], experts.w_up, experts.w_down, offsets, experts.activation,
                                experts.b_up, experts.b_down, widths=None if experts.homogeneous else experts.widths,
                                backend=backend)
        back = torch.empty_like(local_out).index_copy(0, order, local_out)
        returned = all_to_all(back, in_splits, out_splits, self.group)
        if returned.shape[0] < x_rows.shape[0]:
            # The capacity tail holds no assignment and is never read by the combine.
            returned = torch.cat([returned, returned.new_zeros(x_rows.shape[0] - returned.shape[0], returned.shape[1])])
        return unpermute(returned, plan, weight, backend=backend)
