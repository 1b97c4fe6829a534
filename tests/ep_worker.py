"""Worker of the expert-parallel tests (a module of its own so spawned processes can import it).

Each rank holds a shard of the same full layer, runs its own batch (token counts differ by rank),
and compares against the full layer on one process: outputs and input gradients for its batch,
router / shared-expert gradients for its batch, and expert gradients summed over every rank's batch.
"""
import copy
import json
import os
import traceback
import warnings

import torch
import torch.distributed as dist

from fastmoe_kernels import MoELayer
from fastmoe_kernels.parallel import expert_parameters, replicated_parameters
from tolerances import tol

CASES = {
    "dropless": dict(),
    "capacity-probs": dict(capacity_factor=0.75, drop_policy="probs"),
    "capacity-position-pad": dict(capacity_factor=1.0, drop_policy="position", pad_to_capacity=True),
    "heterogeneous-bias-shared": dict(d_ff=[4, 8, 12, 8, 6, 10, 4, 8], bias=True, num_shared_experts=1, shared_d_ff=6,
                                      shared_expert_gate=True, activation="geglu"),
    "idle-experts": dict(score_func="sigmoid", expert_bias=True),
    "empty-rank": dict(capacity_factor=2.0),
    "chunked-shared": dict(num_shared_experts=1, shared_d_ff=6),
}
CHUNKS = {"chunked-shared": 3}  # expert_parallel_chunks: the exchange pipelined over 3 chunks of tokens


def token_counts(case: str, world: int):
    counts = [3 + 4 * r for r in range(world)]  # uneven
    if case in ("empty-rank", "chunked-shared"):
        counts[1] = 0
    return counts


def _close(a, b, what, failures):
    if not torch.allclose(a, b, **tol(torch.float64)):
        failures.append(f"{what}: max |diff| {float((a - b).abs().max()) if a.numel() else 'shape'} "
                        f"(shapes {tuple(a.shape)} vs {tuple(b.shape)})")


def check_case(case: str, rank: int, world: int, failures: list) -> None:
    fields = dict(d_model=12, d_ff=8, num_experts=8, top_k=2)  # the default config: its aux loss included
    fields.update(CASES[case])
    torch.manual_seed(0)  # the same full layer on every rank
    full = MoELayer(dtype=torch.float64, **fields)
    if case == "idle-experts":
        with torch.no_grad():  # the last rank's experts are never chosen
            full.router.expert_bias[-8 // world:] = -10.0
    gen = torch.Generator().manual_seed(1234)
    xs = [torch.randn(t, 12, generator=gen, dtype=torch.float64) for t in token_counts(case, world)]
    gs = [torch.randn(t, 12, generator=gen, dtype=torch.float64) for t in token_counts(case, world)]
    chunks = CHUNKS.get(case, 1)
    shard = full.to_expert_parallel(dist.group.WORLD, chunks=chunks)

    x = xs[rank].clone().requires_grad_()
    shard.expert_parallel.trace = []
    y = shard(x)
    (y * gs[rank]).sum().backward()
    # The schedule: the rows' all-to-all is waited for after the shared experts' compute (overlap).
    # With chunks, every chunk's rows are sent first, and chunk c's outputs leave before chunk c+1's
    # rows are taken (they travel while the experts compute).
    tags = [""] if chunks == 1 else [f" {c}" for c in range(chunks)]
    want = [f"rows sent{t}" for t in tags] + (["shared experts"] if shard.shared_experts is not None else []) + \
        [e for t in tags for e in (f"rows received{t}", f"outputs sent{t}")] + [f"outputs returned{t}" for t in tags]
    if shard.expert_parallel.trace != want:
        failures.append(f"{case}: schedule {shard.expert_parallel.trace}, expected {want}")
    shard.expert_parallel.trace = None

    x_ref = xs[rank].clone().requires_grad_()
    y_ref = full(x_ref)
    (y_ref * gs[rank]).sum().backward()
    _close(y, y_ref, f"{case}: output", failures)
    _close(x.grad, x_ref.grad, f"{case}: grad x", failures)
    for (name, p), q in zip(shard.named_parameters(), shard.parameters()):
        if name.startswith("experts."):
            continue
        _close(q.grad, dict(full.named_parameters())[name].grad, f"{case}: grad {name}", failures)
    # Expert gradients: every rank's tokens reach this rank's experts.
    full.zero_grad()
    for xr, gr in zip(xs, gs):
        (full(xr) * gr).sum().backward()
    grads = copy.deepcopy(full.experts)
    with torch.no_grad():
        for p, q in zip(grads.parameters(), full.experts.parameters()):
            p.copy_(q.grad)
    expected = grads.subset(shard.expert_parallel.local)
    for (name, p), q in zip(shard.experts.named_parameters(), expected.parameters()):
        _close(p.grad, q, f"{case}: grad experts.{name}", failures)
    if case == "idle-experts" and rank == world - 1:
        routed = sum(int(full.routing_stats.tokens_per_expert[e]) for e in shard.expert_parallel.local)
        if routed:
            failures.append("idle-experts: the last rank's experts received tokens")
    # Back to a full layer on every rank.
    back = shard.gather_full()
    for (name, p), q in zip(back.state_dict().items(), full.state_dict().values()):
        _close(p, q, f"{case}: gather_full {name}", failures)
    if {id(p) for p in expert_parameters(shard)} != {id(p) for p in shard.experts.parameters()}:
        failures.append(f"{case}: expert parameters not tagged")
    if any(n.startswith("experts.") for n, p in shard.named_parameters() if p in set(replicated_parameters(shard))):
        failures.append(f"{case}: expert parameter counted as replicated")


def check_aux_loss(rank: int, world: int, failures: list) -> None:
    """The load-balancing loss keeps its configured scope: micro-batch (the default) counts this rank's
    tokens, as the unsharded layer on this batch; "global" over the group set by set_aux_loss_group
    counts every rank's tokens, probabilities kept local."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(99)
    xs = [torch.randn(5 + r, 12, generator=gen, dtype=torch.float64) for r in range(world)]
    full = MoELayer(d_model=12, d_ff=8, num_experts=8, top_k=2, aux_loss_coeff=0.1, dtype=torch.float64)
    shard = full.to_expert_parallel(dist.group.WORLD)
    shard(xs[rank])
    full(xs[rank])
    _close(shard.aux_losses["load_balancing"], full.aux_losses["load_balancing"], "micro-batch aux loss", failures)

    torch.manual_seed(0)
    full = MoELayer(d_model=12, d_ff=8, num_experts=8, top_k=2, aux_loss_coeff=0.1, load_balancing_type="global",
                    dtype=torch.float64)
    full.set_aux_loss_group(dist.group.WORLD)
    shard = full.to_expert_parallel(dist.group.WORLD)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shard(xs[rank].clone().requires_grad_()).sum().backward()  # PyTorch warns in the backward
    traced = [str(w.message) for w in caught if "autograd" in str(w.message)]
    if traced:
        failures.append(f"the counts' all-reduce is traced by autograd: {traced}")
    full.set_aux_loss_group(None)  # the reference counts by hand, on one process
    counts = torch.zeros(8, dtype=torch.float64)
    for xr in xs:
        full(xr)
        counts += full.routing_stats.tokens_per_expert.double()
    with torch.no_grad():
        probs = torch.softmax(xs[rank] @ full.router.weight.t(), -1).mean(0)
    expected = 8 * ((counts / counts.sum()) * probs).sum()
    _close(shard.aux_losses["load_balancing"].detach(), expected, "global aux loss over the group", failures)


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    failures = []
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        for case in CASES:
            check_case(case, rank, world, failures)
        check_aux_loss(rank, world, failures)
        dist.barrier()
    except Exception:
        failures.append(traceback.format_exc())
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(failures, fh)
        if dist.is_initialized():
            dist.destroy_process_group()


def mismatch_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    """Rank 1 builds a padded-capacity layer, rank 0 a dropless one: both must raise a named error
    (before any exchange that the mismatch would deadlock or crash)."""
    outcome = "no error"
    try:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
        extra = dict(capacity_factor=1.0, pad_to_capacity=True) if rank == 1 else {}
        layer = MoELayer(d_model=8, d_ff=8, num_experts=4, top_k=2, expert_parallel_group=dist.group.WORLD,
                         expert_parallel_timeout=60, **extra)
        layer(torch.randn(5, 8))
    except Exception as exc:  # noqa: BLE001 - the test reads what happened
        outcome = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump([outcome], f)
    os._exit(0)


def frozen_peer_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    """Rank 1 never enters the exchange: rank 0 must raise within its timeout, not wait 30 minutes."""
    outcome = "no error"
    import time

    try:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
        layer = MoELayer(d_model=8, d_ff=8, num_experts=4, top_k=2, expert_parallel_group=dist.group.WORLD,
                         expert_parallel_timeout=3)
        if rank == 0:
            started = time.time()
            try:
                layer(torch.randn(5, 8))
            finally:
                outcome_time = time.time() - started
            outcome = f"no error after {outcome_time:.1f} s"
        else:
            time.sleep(20)
    except Exception as exc:  # noqa: BLE001
        outcome = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump([outcome], f)
    os._exit(0)
