"""make_plan: where each (token, expert) assignment goes in the expert-grouped row layout.

Layout (the reference below is the specification):

- rows are grouped by expert, expert 0 first; inside an expert, kept assignments are in token
  order (assignment ``a = t·k + j`` ascending), whatever the drop policy.
- dropless: every assignment is kept; ``R = T·k`` rows.
- capacity ``C``: an expert keeps at most C of its assignments. ``drop_policy="probs"`` keeps the C
  with the largest weight (ties: lower assignment index first, like Megatron-Core's "probs");
  ``"position"`` keeps the first C in token order. Without padding the kept rows are packed and
  ``R = min(T·k, E·C)`` — a static bound, so shapes never depend on the data; rows past
  ``offsets[E]`` belong to no expert, hold no assignment and are written as zeros by the ops. With
  ``pad=True`` expert e owns rows ``[e·C, (e+1)·C)`` (``R = E·C``) and its unused rows are padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .._shapes import num_plan_rows
from .._checks import (FLOAT_DTYPES, INDEX_DTYPES, check_choice, check_ids_in_range, check_int, check_tensor,
                      check_values, trust)

DROP_POLICIES = ("probs", "position")


def capacity_ratio(capacity_factor: float) -> tuple[int, int]:
    """``capacity_factor`` as an exact fraction ``(numerator, denominator)`` of the decimal it prints
    as (1.1 is 11/10, not the nearest binary float), so the capacity ceiling never lands one slot
    high through rounding."""
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) or not capacity_factor > 0:
        raise ValueError(f"expert_capacity: `capacity_factor` must be a number > 0, got {capacity_factor!r}")
    frac = Fraction(repr(float(capacity_factor)))
    return frac.numerator, frac.denominator


def capacity_from_ratio(num_tokens, num_experts: int, top_k: int, ratio: tuple[int, int]):
    """``ceil(ratio · T · k / E)`` in integers (``num_tokens`` may be a SymInt under torch.compile)."""
    numerator, denominator = ratio
    return -(-(numerator * num_tokens * top_k) // (denominator * num_experts))


def expert_capacity(num_tokens, num_experts: int, top_k: int, capacity_factor: float):
    """``C = ceil(capacity_factor · T · k / E)`` (GShard / Megatron-Core), computed exactly."""
    return capacity_from_ratio(num_tokens, num_experts, top_k, capacity_ratio(capacity_factor))


@dataclass
class DispatchPlan:
    """Where every assignment goes. ``R`` rows, ``E`` experts, ``T`` tokens, ``k`` per token.

    Fields:
        counts:         [E] int32 — rows kept per expert.
        routed_counts:  [E] int32 — assignments routed to each expert, before capacity dropping.
        offsets:        [E+1] int32 — expert e owns rows ``offsets[e]:offsets[e+1]``.
        row:            [T, k] int32 — destination row of each assignment, -1 when dropped.
        assignment:     [R] int32 — the assignment ``t·k + j`` a row holds, -1 for padding/unused.
        top_k, capacity (None when dropless), padded.
    """

    counts: Tensor
    routed_counts: Tensor
    offsets: Tensor
    row: Tensor
    assignment: Tensor
    top_k: int
    capacity: Optional[int]
    padded: bool

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    @property
    def num_rows(self) -> int:
        return self.assignment.shape[0]

    @property
    def num_assignments(self) -> int:
        return self.row.numel()

    @property
    def src(self) -> Tensor:
        """[R] int32 — the source token of each row, -1 for padding/unused rows.

        Computed once per assignment tensor and version (three small launches every forward otherwise):
        an in-place edit of ``assignment`` or a new one recomputes it; never cached while compiling."""
        a = self.assignment
        if torch.compiler.is_compiling() or type(a) is not torch.Tensor:
            return torch.where(a >= 0, torch.div(a, self.top_k, rounding_mode="floor"), -1)
        cached = self.__dict__.get("_src_cache")
        if cached is not None and cached[0] is a and cached[1] == a._version and cached[2] == self.top_k:
            return cached[3]
        src = torch.where(a >= 0, torch.div(a, self.top_k, rounding_mode="floor"), -1)
        self.__dict__["_src_cache"] = (a, a._version, self.top_k, src)
        return src

    @property
    def num_dropped(self) -> Tensor:
        return self.routed_counts.sum() - self.counts.sum()

    @property
    def dropped_fraction(self) -> Tensor:
        """Fraction of the T·k assignments dropped by capacity (a 0-d float tensor, no sync)."""
        return self.num_dropped.float() / max(self.num_assignments, 1)


def make_plan_reference(
    expert_idx: Tensor, num_experts: int, capacity: int, drop_policy: str, weight: Optional[Tensor], pad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Reference: ``(counts, routed_counts, offsets, row, assignment)`` as described above.

    Ids outside ``[0, E)`` (reachable only with value checks off) are treated as dropped: nothing is
    read or written for them, and they are not counted.
    """
    T, k = expert_idx.shape
    A = T * k
    E = num_experts
    device = expert_idx.device
    flat = expert_idx.reshape(-1).long()
    valid = (flat >= 0) & (flat < E)
    expert = torch.where(valid, flat, E)  # out-of-range ids go to a sentinel expert that sorts last
    arange_a = torch.arange(A, device=device)
    routed = torch.bincount(expert, minlength=E + 1)
    if capacity < 0:
        keep = valid
        counts = routed[:E]
    else:
        # Rank of each assignment inside its expert by the drop policy's priority.
        if drop_policy == "probs":
            by_weight = torch.sort(weight.reshape(-1), descending=True, stable=True).indices
            order = by_weight[torch.sort(expert[by_weight], stable=True).indices]
        else:
            order = torch.sort(expert, stable=True).indices
        routed_start = torch.cumsum(routed, 0) - routed
        rank = torch.empty(A, dtype=torch.long, device=device)
        rank[order] = arange_a - routed_start[expert[order]]
        keep = valid & (rank < capacity)
        counts = routed[:E].clamp(max=capacity)
    # Kept assignments, grouped by expert, in token order; dropped ones sort last.
    token_order = torch.sort(torch.where(keep, expert, E), stable=True).indices
    position = torch.empty(A, dtype=torch.long, device=device)
    position[token_order] = arange_a
    R = num_plan_rows(T, k, E, capacity, pad)
    if pad:
        kept_start = torch.cumsum(counts, 0) - counts
        safe_expert = expert.clamp(max=E - 1)
        row = torch.where(keep, safe_expert * capacity + position - kept_start[safe_expert], -1)
        offsets = torch.arange(E + 1, device=device) * capacity
    else:
        row = torch.where(keep, position, -1)
        offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    # Scatter assignment ids into their rows; dropped ones land in a discarded extra slot.
    assignment = torch.full((R + 1,), -1, dtype=torch.long, device=device)
    assignment[torch.where(keep, row, R)] = arange_a
    i32 = torch.int32
    return counts.to(i32), routed[:E].to(i32), offsets.to(i32), row.view(T, k).to(i32), assignment[:R].to(i32)


backends.register("make_plan", "torch")(make_plan_reference)


@torch.library.custom_op("fastmoe::make_plan", mutates_args=())
def _make_plan_op(
    expert_idx: Tensor, num_experts: int, capacity: int, drop_policy: str, weight: Optional[Tensor], pad: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_ids_in_range("make_plan", "expert_idx", expert_idx, num_experts, allow_unassigned=True)
    fn = backends.get_kernel("make_plan", backend)
    outputs = fn(expert_idx, num_experts, capacity, drop_policy, weight, pad)
    trust(*outputs)  # a plan valid by construction: the ops skip its value checks while it is unchanged
    return outputs


@_make_plan_op.register_fake
def _(expert_idx, num_experts, capacity, drop_policy, weight, pad, backend):
    T, k = expert_idx.shape
    R = num_plan_rows(T, k, num_experts, capacity, pad)
    new = expert_idx.new_empty
    i32 = torch.int32
    return (
        new((num_experts,), dtype=i32),
        new((num_experts,), dtype=i32),
        new((num_experts + 1,), dtype=i32),
        new((T, k), dtype=i32),
        new((R,), dtype=i32),
    )


def make_plan(
    expert_idx: Tensor,
    num_experts: int,
    capacity: Optional[int] = None,
    drop_policy: str = "probs",
    weight: Optional[Tensor] = None,
    pad: bool = False,
    *,
    backend: Optional[str] = None,
) -> DispatchPlan:
    """Build the :class:`DispatchPlan` for ``expert_idx [T, k]`` (int32/int64 ids in ``[0, E)``, or -1
    for "no expert": dropped, not counted).

    ``capacity`` None is dropless; an int C >= 0 keeps at most C assignments per expert (see
    :func:`expert_capacity` for the usual ``C = ceil(cf · T · k / E)``). ``drop_policy="probs"``
    needs ``weight [T, k]``. ``pad=True`` (capacity only) gives the fixed ``[E, C]`` layout.
    Not differentiable (integer outputs).
    """
    where = "make_plan"
    check_tensor(where, "expert_idx", expert_idx, ndim=2, dtypes=INDEX_DTYPES, shape=(None, None))
    check_int(where, "num_experts", num_experts, low=1)
    T, k = expert_idx.shape
    if isinstance(k, int) and isinstance(num_experts, int) and k > num_experts:
        raise ValueError(f"{where}: top-k ({k}) must not exceed `num_experts` ({num_experts})")
    check_choice(where, "drop_policy", drop_policy, DROP_POLICIES)
    if capacity is None:
        if pad:
            raise ValueError(f"{where}: `pad=True` needs a `capacity` (padding is to capacity)")
        capacity = -1
    else:
        check_int(where, "capacity", capacity, low=0)
        if drop_policy == "probs":
            if weight is None:
                raise ValueError(f"{where}: drop_policy='probs' needs `weight` [T, k]")
            check_tensor(where, "weight", weight, ndim=2, dtypes=FLOAT_DTYPES, shape=(T, k), device=expert_idx.device)
    if isinstance(T, int) and T * k >= 2**31:
        raise ValueError(f"{where}: T·k = {T * k} assignments exceeds the int32 row index range")
    kernel_capacity = capacity
    if capacity >= 0 and not pad:
        # No expert can hold more than the T·k assignments: a larger capacity drops nothing more, and
        # this keeps every backend's integers in range (a capacity past int32 means the same everywhere).
        kernel_capacity = torch.sym_min(capacity, T * k)
    if pad and isinstance(capacity, int) and num_experts * capacity >= 2**31:
        raise ValueError(f"{where}: `capacity`={capacity} with pad=True gives E·C = {num_experts * capacity} rows, "
                         "past the int32 row index range")
    backend_name = backends.resolve("make_plan", backend, expert_idx.device, None, num_experts=int(num_experts))
    counts, routed, offsets, row, assignment = _make_plan_op(
        expert_idx, num_experts, kernel_capacity, drop_policy,
        weight if capacity >= 0 and drop_policy == "probs" else None, bool(pad), backend_name,
    )
    return DispatchPlan(
        counts=counts, routed_counts=routed, offsets=offsets, row=row, assignment=assignment,
        top_k=k, capacity=None if capacity < 0 else capacity, padded=bool(pad),
    )


def plan_for_grouped_rows(counts: Tensor, num_rows: int, *, all_rows: bool = True,
                          where: str = "plan_for_grouped_rows", name: str = "counts") -> DispatchPlan:
    """The :class:`DispatchPlan` of ``num_rows`` rows that a trainer's token dispatcher has already grouped
    by expert (Megatron-Core's experts seam, torchtitan's ``GroupedExperts``): ``counts [E]`` rows per
    expert, in order. Each row is its own assignment (top-1, row r holds assignment r), so ``moe_mlp`` with
    ``weight [num_rows, 1]`` applies one weight per row and writes row r's output to row r.

    No host synchronisation: ``counts`` must sum to ``num_rows`` (``all_rows``; at most ``num_rows``
    otherwise, for a dispatcher that pads) — a value check, asynchronous like the others, reports where
    they do not; the offsets are clamped to the rows, so rows past them hold no assignment and come
    out as zeros. ``where`` and ``name`` (the caller's name for ``counts``) make the errors the caller's."""
    check_tensor(where, name, counts, ndim=1, dtypes=INDEX_DTYPES)
    if isinstance(num_rows, int):  # a SymInt while compiling: its bounds are the trace's
        check_int(where, "num_rows", num_rows, low=0)
        if num_rows >= 2**31:
            raise ValueError(f"{where}: {num_rows} rows exceed the int32 row index range")
    E = counts.shape[0]
    if E < 1:
        raise ValueError(f"{where}: `{name}` must hold one count per expert (E >= 1), got shape [0]")
    totals = torch.cumsum(counts.clamp(min=0).to(torch.int64), 0)

    def stats() -> Tensor:
        total = counts.to(torch.int64).sum()
        wrong_total = (total != num_rows) if all_rows else (total > num_rows)
        lowest = counts.min().to(torch.int64)
        return torch.stack([((lowest < 0) | wrong_total).to(torch.int64), total, lowest])

    def message(values) -> str:
        if values[2] < 0:
            return f"{where}: `{name}` must hold counts >= 0, found {values[2]}"
        bound = "" if all_rows else "at most "
        return f"{where}: `{name}` must sum to {bound}the {num_rows} rows given, sums to {values[1]}"

    if not torch.compiler.is_compiling():  # a trace cannot hold the check's host read; the offsets stay clamped
        check_values(counts.device, stats, message)
    offsets = torch.cat([totals.new_zeros(1), totals.clamp(max=num_rows)]).to(torch.int32)
    kept = offsets[1:] - offsets[:-1]
    rows = torch.arange(num_rows, dtype=torch.int32, device=counts.device)
    assignment = torch.where(rows < offsets[-1], rows, -1)
    plan = DispatchPlan(counts=kept, routed_counts=kept, offsets=offsets, row=assignment.view(num_rows, 1),
                        assignment=assignment, top_k=1, capacity=None, padded=False)
    trust(plan.counts, plan.offsets, plan.row, plan.assignment)  # valid by construction, as make_plan's
    return plan
