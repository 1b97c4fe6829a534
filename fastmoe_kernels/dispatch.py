"""Dispatchers: from routing decisions to the plan of the expert-grouped rows.

``DroplessDispatcher`` keeps every assignment. ``CapacityDispatcher`` keeps at most
``C = ceil(capacity_factor · T · k / E)`` per expert (see ``ops.plan`` for the drop policies).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .ops import DispatchPlan, make_plan
from .ops.plan import capacity_from_ratio, capacity_ratio


class Dispatcher:
    """What both dispatchers are: a plan from routing decisions (the ops move the rows with it)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def plan(self, expert_idx: Tensor, weight: Tensor, *, backend: Optional[str] = None) -> DispatchPlan:
        raise NotImplementedError


class DroplessDispatcher(Dispatcher):
    def plan(self, expert_idx: Tensor, weight: Tensor, *, backend: Optional[str] = None) -> DispatchPlan:
        return make_plan(expert_idx, self.num_experts, backend=backend)


class CapacityDispatcher(Dispatcher):
    def __init__(self, num_experts: int, top_k: int, capacity_factor: float, drop_policy: str = "probs", pad: bool = False):
        super().__init__(num_experts)
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        # Exact fraction, computed once here so that a compiled forward only does integer math.
        self._ratio = capacity_ratio(capacity_factor)
        self.drop_policy = drop_policy
        self.pad = pad

    def capacity(self, num_tokens: int) -> int:
        return capacity_from_ratio(num_tokens, self.num_experts, self.top_k, self._ratio)

    def plan(self, expert_idx: Tensor, weight: Tensor, *, backend: Optional[str] = None) -> DispatchPlan:
        capacity = self.capacity(expert_idx.shape[0])
        return make_plan(
            expert_idx, self.num_experts, capacity, self.drop_policy, weight.detach(), self.pad, backend=backend
        )
