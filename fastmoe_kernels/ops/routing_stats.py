"""routing_stats: the per-expert statistics of the load-balancing loss, in one pass.

``routing_stats(probs [T, E], expert_idx [T, k], num_segments=S)`` splits the T tokens into S equal
consecutive segments (S = 1: the micro-batch; S = batch size: one segment per sequence) and returns

- ``tokens_per_expert [S, E]`` — assignments routed to each expert (fp32 counts, no gradient; ids of
  -1, "no expert", are not counted);
- ``prob_mean [S, E]`` — mean router probability of each expert over the segment's tokens
  (differentiable in ``probs``; zeros for an empty batch).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .._checks import FLOAT_DTYPES, INDEX_DTYPES, check_ids_in_range, check_int, check_tensor


def routing_stats_reference(probs: Tensor, expert_idx: Tensor, num_segments: int) -> tuple[Tensor, Tensor]:
    T, E = probs.shape
    S = num_segments
    if T == 0:
        return probs.new_zeros(S, E, dtype=torch.float32), probs.new_zeros(S, E)
    segment = torch.arange(T, device=probs.device) // (T // S)
    ids = expert_idx.long()
    # Out-of-range ids (possible only with value checks off) go to a discarded bin.
    key = torch.where((ids >= 0) & (ids < E), segment.unsqueeze(1) * E + ids, S * E).reshape(-1)
    tokens = torch.bincount(key, minlength=S * E + 1)[: S * E].view(S, E).to(torch.float32)
    return tokens, probs.view(S, T // S, E).mean(dim=1)


backends.register("routing_stats", "torch")(routing_stats_reference)


@torch.library.custom_op("fastmoe::routing_stats", mutates_args=())
def _routing_stats_op(probs: Tensor, expert_idx: Tensor, num_segments: int, backend: str) -> tuple[Tensor, Tensor]:
    check_ids_in_range("routing_stats", "expert_idx", expert_idx, probs.shape[1], allow_unassigned=True)
    return backends.get_kernel("routing_stats", backend)(probs, expert_idx, num_segments)


@_routing_stats_op.register_fake
def _(probs, expert_idx, num_segments, backend):
    E = probs.shape[1]
    return probs.new_empty((num_segments, E), dtype=torch.float32), probs.new_empty((num_segments, E))


def _setup(ctx, inputs, output):
    probs, _idx, num_segments, _backend = inputs
    ctx.shape = probs.shape
    ctx.num_segments = num_segments


def _backward(ctx, _grad_tokens, grad_prob_mean):
    T, E = ctx.shape
    S = ctx.num_segments
    if T == 0:
        return grad_prob_mean.new_zeros(T, E), None, None, None
    grad = (grad_prob_mean / (T // S)).unsqueeze(1).expand(S, T // S, E).reshape(T, E)
    return grad, None, None, None


_routing_stats_op.register_autograd(_backward, setup_context=_setup)


def routing_stats(
    probs: Tensor, expert_idx: Tensor, num_segments: int = 1, *, backend: Optional[str] = None
) -> tuple[Tensor, Tensor]:
    """``(tokens_per_expert [S, E] fp32, prob_mean [S, E])`` — see the module docstring."""
    where = "routing_stats"
    check_tensor(where, "probs", probs, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, None))
    check_tensor(where, "expert_idx", expert_idx, ndim=2, dtypes=INDEX_DTYPES, shape=(probs.shape[0], None), device=probs.device)
    check_int(where, "num_segments", num_segments, low=1)
    T = probs.shape[0]
    if isinstance(T, int) and T % num_segments:
        raise ValueError(f"{where}: `num_segments`={num_segments} must divide the number of tokens T={T}")
    backend_name = backends.resolve("routing_stats", backend, probs.device, probs.dtype)
    return _routing_stats_op(probs.contiguous(), expert_idx.contiguous(), num_segments, backend_name)
