"""Expert parallelism on 2 and 4 CPU processes (gloo): outputs and gradients equal a single-process
layer holding all experts, in dropless and capacity modes, with uneven token counts per rank, a rank
without tokens, and ranks whose experts receive no token."""
import json
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ep_worker
from fastmoe_kernels import MoELayer
from fastmoe_kernels.parallel import ExpertParallelExchange


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_single_process(tmp_path, world):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    ctx = mp.start_processes(ep_worker.worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.time() + 600
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("expert-parallel workers did not finish in 600 s (a collective mismatch?)")
    failures = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)}
    problems = [f"rank {r}: {f}" for r, fs in failures.items() for f in fs]
    assert not problems, "\n".join(problems)


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of this process alone (the default group while the test runs)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_layer_rejects_indivisible_expert_count(one_rank_group):
    layer = MoELayer(d_model=8, d_ff=4, num_experts=4, top_k=2)
    shard = layer.to_expert_parallel(one_rank_group)  # one rank: all experts, same function
    x = torch.randn(5, 8)
    torch.testing.assert_close(shard(x), layer(x))
    with pytest.raises(ValueError, match="already expert-parallel"):
        shard.to_expert_parallel(one_rank_group)
    with pytest.raises(ValueError, match="not expert-parallel"):
        layer.gather_full()


def test_pipelined_chunks_need_dropless_routing_and_a_positive_count():
    with pytest.raises(ValueError, match="expert_parallel_chunks.*dropless"):
        MoELayer(d_model=8, d_ff=4, num_experts=4, top_k=2, capacity_factor=1.0, expert_parallel_chunks=2)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="expert_parallel_chunks"):
            MoELayer(d_model=8, d_ff=4, num_experts=4, top_k=2, expert_parallel_chunks=bad)


def run_workers(target, tmp_path, world=2, limit=120):
    ctx = mp.start_processes(target, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=False,
                             start_method="spawn")
    started = time.time()
    while not ctx.join(timeout=2):
        if time.time() - started > limit:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"workers did not finish in {limit} s")
    return {r: json.loads((tmp_path / f"rank{r}.json").read_text())[0] for r in range(world)}, time.time() - started


def test_ranks_with_different_layers_raise_instead_of_deadlocking(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    outcomes, _ = run_workers(ep_worker.mismatch_worker, tmp_path)
    for rank, outcome in outcomes.items():
        assert outcome.startswith("ExpertParallelError") and "capacity_factor" in outcome and "pad_to_capacity" in outcome, \
            f"rank {rank}: {outcome}"


def test_a_frozen_peer_is_reported_within_the_timeout(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    outcomes, elapsed = run_workers(ep_worker.frozen_peer_worker, tmp_path)
    assert outcomes[0].startswith("ExpertParallelError") and "did not complete within 3 s" in outcomes[0], outcomes[0]
    assert elapsed < 60


def test_padded_plans_go_in_one_chunk_and_gloo_waits_are_bounded(one_rank_group):
    from fastmoe_kernels.ops import make_plan
    from fastmoe_kernels.parallel.expert_parallel import bounds_its_waits

    exchange = ExpertParallelExchange(4, one_rank_group)
    x = torch.randn(5, 8)
    plan = make_plan(torch.randint(0, 4, (5, 2)), 4, capacity=3, drop_policy="position", pad=True)
    with pytest.raises(ValueError, match="plans.*unpadded"):
        exchange.dispatch_chunks([x, x], [plan, plan], None)
    with pytest.raises(ValueError, match="as many"):
        exchange.dispatch_chunks([x], [plan, plan], None)
    assert bounds_its_waits(one_rank_group)  # gloo: a timed wait (NCCL's would spin the host)
