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
The rows' all-to-all is issued asynchronously and waited for only when the experts need the rows:
the layer computes its shared experts in between, so they overlap the exchange.
The backward runs the same exchanges in the transposed direction. Dropping by capacity is decided
by each source rank on its own tokens (C from its own T_r), as a single-device layer would.
"""
from __future__ import annotations

import datetime
import hashlib
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops import DispatchPlan, permute, unpermute

DEFAULT_TIMEOUT_S = 600.0  # long enough for a first step's kernel compiles on a slower rank


class ExpertParallelError(RuntimeError):
    """The ranks of an expert-parallel group disagree, or one of them stopped answering."""


def bounds_its_waits(group) -> bool:
    """Whether a timed ``work.wait`` is the right wait for ``group``'s backend: gloo's blocks the host
    at most that long; NCCL's would spin the host until the collective ends (ProcessGroupNCCL waits on
    the host whenever a timeout is given), while its plain wait only orders the current stream after
    the collective, which NCCL's own timeout and watchdog bound."""
    try:
        return dist.get_backend(group) != "nccl"
    except (RuntimeError, ValueError):  # not a process group torch knows: keep the bounded wait
        return True


def wait_or_raise(work, what: str, timeout_s: float, group=None) -> None:
    """Wait for an asynchronous collective: at most ``timeout_s`` seconds where the backend bounds host
    waits (gloo), else raise a named error; on NCCL the stream-ordering wait (see bounds_its_waits)."""
    if group is not None and not bounds_its_waits(group):
        work.wait()
        return
    try:
        finished = work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        raise ExpertParallelError(f"expert parallelism: {what} did not complete within {timeout_s:g} s (a rank "
                                  f"stopped answering, or the ranks run different code): {exc}") from exc
    if finished is False:
        raise ExpertParallelError(f"expert parallelism: {what} did not complete within {timeout_s:g} s")


def collective(fn: Callable, *args, what: str, timeout_s: float, **kwargs) -> None:
    """Run ``fn(*args, async_op=True, **kwargs)`` (a torch.distributed collective) and wait for it
    (bounded where the backend allows: wait_or_raise)."""
    wait_or_raise(fn(*args, async_op=True, **kwargs), what, timeout_s, kwargs.get("group"))


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; its backward is the exchange the other way."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: List[int], in_splits: List[int], group, timeout_s: float) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.timeout_s = out_splits, in_splits, group, timeout_s
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        collective(dist.all_to_all_single, out, x.contiguous(), out_splits, in_splits, group=group,
                   what="the rows' all-to-all", timeout_s=timeout_s)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        back = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        collective(dist.all_to_all_single, back, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group,
                   what="the gradients' all-to-all", timeout_s=ctx.timeout_s)
        return back, None, None, None, None


def all_to_all(x: Tensor, out_splits: List[int], in_splits: List[int], group,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group, timeout_s)


class Pending:
    """An issued asynchronous exchange: its work handle, what it is called (for errors and the
    schedule trace) and its bounded wait."""

    def __init__(self, work, what: str, timeout_s: float, group=None):
        self.work, self.what, self.timeout_s, self.group = work, what, timeout_s, group

    def wait(self) -> None:
        if self.work is not None:
            wait_or_raise(self.work, self.what, self.timeout_s, self.group)
            self.work = None


class _AllToAllStart(torch.autograd.Function):
    """Issue ``all_to_all_single`` asynchronously: the output is not to be read before ``_Wait``
    (which takes it and the Pending). The backward's exchange the other way is synchronous."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: List[int], in_splits: List[int], group, timeout_s: float,
                pending: list) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.timeout_s = out_splits, in_splits, group, timeout_s
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group, async_op=True)
        pending.append(Pending(work, "the rows' all-to-all", timeout_s, group))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllToAll.backward(ctx, grad)[:5] + (None,)


class _Wait(torch.autograd.Function):
    """Wait for a Pending exchange, then hand its output on (identity for autograd)."""

    @staticmethod
    def forward(ctx, t: Tensor, pending: Pending) -> Tensor:
        pending.wait()
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


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
    """The token exchange of one expert-parallel layer (see the module docstring).

    ``fingerprint``: what every rank of the group must agree on (the layer's config and dtype); the
    ranks compare it before their first exchange, so that mismatched layers raise instead of
    deadlocking or crashing in a collective. Every exchange waits at most ``timeout_s`` seconds.
    """

    def __init__(self, num_experts: int, group, fingerprint: str = "", timeout_s: float = DEFAULT_TIMEOUT_S):
        if not timeout_s > 0:
            raise ValueError(f"expert parallelism: `timeout_s` must be > 0, got {timeout_s}")
        self.group = group
        self.rank, self.world = group_info(group)
        self.local = local_expert_range(num_experts, group)
        self.num_experts = num_experts
        self.per_rank = len(self.local)
        self.fingerprint = fingerprint
        self.timeout_s = float(timeout_s)
        self.agreed = False
        self.trace: Optional[list] = None

    def check_agreement(self, device: torch.device) -> None:
        """Raise ExpertParallelError naming what differs when the ranks' layers disagree (once)."""
        if self.agreed:
            return
        # A fixed-size digest first (a bounded collective); the fingerprints themselves only when they differ.
        digest = int.from_bytes(hashlib.sha256(self.fingerprint.encode()).digest()[:7], "little")
        mine = torch.tensor([digest], dtype=torch.int64, device=device)
        digests = [torch.empty_like(mine) for _ in range(self.world)]
        collective(dist.all_gather, digests, mine, group=self.group, what="the layers' config check",
                   timeout_s=self.timeout_s)
        if len({int(d) for d in digests}) > 1:
            prints: List[Optional[str]] = [None] * self.world
            dist.all_gather_object(prints, self.fingerprint, group=self.group)
            fields = dict(item.split("=", 1) for item in self.fingerprint.split(";") if item)
            differing = sorted({key for p in prints for key, value in (i.split("=", 1) for i in p.split(";") if i)
                                if fields.get(key) != value})
            raise ExpertParallelError(f"expert parallelism: the ranks' layers differ in {differing} (rank {self.rank} "
                                      f"has {', '.join(f'{k}={fields.get(k)}' for k in differing)}); every rank of "
                                      "the group must build the same layer")
        self.agreed = True

    def run_experts(self, x: Tensor, plan: DispatchPlan, weight: Tensor, experts, backend: Optional[str]) -> Tensor:
        """Tokens ``x [T, d]`` in, combined expert outputs ``[T, d]`` out, through the local ``experts``
        (``dispatch``, ``receive``, the experts, ``combine``; the layer puts its shared experts
        between ``dispatch`` and ``receive`` to overlap them with the rows' exchange)."""
        sent = self.dispatch(x, plan, backend)
        rows, offsets = self.receive(sent)
        return self.combine(sent, experts(rows, offsets, backend=backend), plan, weight, backend)

    def dispatch(self, x: Tensor, plan: DispatchPlan, backend: Optional[str]) -> "Dispatch":
        """Exchange the counts (the one host synchronisation of the layer: uneven splits must be known
        on the host) and issue the rows' all-to-all asynchronously; ``receive`` waits for it."""
        return self.dispatch_chunks([x], [plan], backend)[0]

    def dispatch_chunks(self, xs: List[Tensor], plans: List[DispatchPlan], backend: Optional[str]) -> List["Dispatch"]:
        """``dispatch`` of several chunks of tokens (dropless plans when more than one): one counts
        exchange and one host synchronisation for all, then every chunk's rows issued asynchronously,
        so that a later chunk's rows travel while an earlier chunk's experts compute."""
        if len(xs) != len(plans) or not plans:
            raise ValueError(f"dispatch_chunks: `xs` and `plans` must be as many (>= 1), got {len(xs)} and {len(plans)}")
        if len(plans) > 1 and any(p.padded for p in plans):
            raise ValueError("dispatch_chunks: `plans` of several chunks must be unpadded (the padded [E, C] layout "
                             "exchanges one chunk)")
        self.check_agreement(xs[0].device)
        x_rows = [permute(x, plan, backend=backend) for x, plan in zip(xs, plans)]
        if plans[0].padded:
            splits = [self._padded_splits(plans[0], xs[0].device)]
        else:
            splits = self._count_exchange(plans)
        sent = []
        for c, (rows, (recv_matrix, in_splits, out_splits)) in enumerate(zip(x_rows, splits)):
            rows_out = rows if plans[c].padded else rows[: sum(in_splits)]  # the capacity tail stays home
            pending: list = []
            received = _AllToAllStart.apply(rows_out, out_splits, in_splits, self.group, self.timeout_s, pending)
            label = "" if len(xs) == 1 else f" {c}"  # the chunk, in the schedule trace
            self._trace("rows sent" + label)
            sent.append(Dispatch(received, pending[0], recv_matrix, in_splits, out_splits, rows.shape[0], label))
        return sent

    def _padded_splits(self, plan: DispatchPlan, device) -> Tuple[Tensor, List[int], List[int]]:
        """Fixed [E, C] layout: a rank sends E/W · C rows (padding included) to every rank. C comes from
        each rank's own token count, so the ranks tell each other theirs first (equal when every rank
        has the same number of tokens, the usual fixed-shape training step)."""
        W, E_l = self.world, self.per_rank
        mine = torch.tensor([plan.capacity], dtype=torch.int64, device=device)
        capacities = [torch.empty_like(mine) for _ in range(W)]
        collective(dist.all_gather, capacities, mine, what="the capacities' all-gather", group=self.group,
                   timeout_s=self.timeout_s)
        caps = torch.cat(capacities).cpu().tolist()
        recv_matrix = torch.tensor(caps, dtype=torch.int64, device=device).unsqueeze(1).expand(W, E_l).contiguous()
        return recv_matrix, [E_l * plan.capacity] * W, [E_l * c for c in caps]

    def _count_exchange(self, plans: List[DispatchPlan]) -> List[Tuple[Tensor, List[int], List[int]]]:
        """Rows per (source rank, local expert) of every chunk: one all-to-all of all chunks' counts,
        one host read of the splits."""
        W, E_l, C = self.world, self.per_rank, len(plans)
        send = torch.stack([p.counts.to(torch.int64) for p in plans]).view(C, W, E_l)
        send_by_rank = send.transpose(0, 1).contiguous()  # [W, C, E_l]: what goes to each rank, contiguous
        recv = torch.empty_like(send_by_rank)
        collective(dist.all_to_all_single, recv, send_by_rank, what="the counts' all-to-all", group=self.group,
                   timeout_s=self.timeout_s)
        host = torch.stack([send.sum(2), recv.sum(2).transpose(0, 1)]).cpu()  # [2, C, W]
        return [(recv[:, c], host[0, c].tolist(), host[1, c].tolist()) for c in range(C)]

    def receive(self, sent: "Dispatch") -> Tuple[Tensor, Tensor]:
        """Wait for the rows; return them regrouped by local expert, and the local experts' offsets."""
        received = _Wait.apply(sent.received, sent.pending)
        self._trace("rows received" + sent.label)
        W, E_l = self.world, self.per_rank
        # Received rows are grouped by source rank, then local expert; regroup them by local expert.
        device = received.device
        expert_of_row = torch.repeat_interleave(torch.arange(E_l, device=device).repeat(W), sent.recv_matrix.reshape(-1))
        sent.order = torch.sort(expert_of_row, stable=True).indices
        per_expert = sent.recv_matrix.sum(0)
        offsets = torch.cat([per_expert.new_zeros(1), torch.cumsum(per_expert, 0)]).to(torch.int32)
        return received[sent.order], offsets

    def combine(self, sent: "Dispatch", local_out: Tensor, plan: DispatchPlan, weight: Tensor,
                backend: Optional[str]) -> Tensor:
        """Send the local experts' outputs back and combine them with the routing weights."""
        return self.combine_finish(self.combine_start(sent, local_out), plan, weight, backend)

    def combine_start(self, sent: "Dispatch", local_out: Tensor) -> "Dispatch":
        """Issue the outputs' return asynchronously (``combine_finish`` waits for it)."""
        back = torch.empty_like(local_out).index_copy(0, sent.order, local_out)
        pending: list = []
        sent.returned = _AllToAllStart.apply(back, sent.in_splits, sent.out_splits, self.group, self.timeout_s, pending)
        sent.return_pending = pending[0]
        self._trace("outputs sent" + sent.label)
        return sent

    def combine_finish(self, sent: "Dispatch", plan: DispatchPlan, weight: Tensor, backend: Optional[str]) -> Tensor:
        returned = _Wait.apply(sent.returned, sent.return_pending)
        self._trace("outputs returned" + sent.label)
        if returned.shape[0] < sent.num_rows:
            # The capacity tail holds no assignment and is never read by the combine.
            returned = torch.cat([returned, returned.new_zeros(sent.num_rows - returned.shape[0], returned.shape[1])])
        return unpermute(returned, plan, weight, backend=backend)

    @staticmethod
    def drain(sent: List["Dispatch"]) -> None:
        """Wait for every exchange still in flight (after an error between dispatch and combine: a buffer
        freed under a running collective, or ranks left one collective apart, would be worse)."""
        for s in sent:
            for pending in (s.pending, s.return_pending):
                if pending is not None:
                    try:
                        pending.wait()
                    except Exception:  # noqa: BLE001 - the original error is the one to report
                        pass

    def _trace(self, event: str) -> None:
        """The schedule, for tests: set ``exchange.trace = []`` to record the order of events."""
        if self.trace is not None:
            self.trace.append(event)


class Dispatch:
    """What ``dispatch`` hands to ``receive`` and ``combine``: the rows in flight and their splits.
    The interface a DeepEP-style backend would fill (its dispatch returns per-expert counts with an
    alignment, as our grouped GEMMs take them)."""

    def __init__(self, received: Tensor, pending: Pending, recv_matrix: Tensor, in_splits: List[int],
                 out_splits: List[int], num_rows: int, label: str = ""):
        self.received, self.pending, self.recv_matrix = received, pending, recv_matrix
        self.in_splits, self.out_splits, self.num_rows, self.label = in_splits, out_splits, num_rows, label
        self.order: Optional[Tensor] = None
        self.returned: Optional[Tensor] = None
        self.return_pending: Optional[Pending] = None
