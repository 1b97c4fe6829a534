import pytest
import torch

from fastmoe_kernels.ops import expert_capacity, make_plan
from kernel_tests.helpers import routing

FIELDS = ("counts", "routed_counts", "offsets", "row", "assignment")
MODES = [(None, "probs", False), (1.0, "position", False), (0.6, "probs", False), (1.25, "probs", True), (0.5, "position", True)]


def assert_same_plan(idx, weight, E, mode, backend):
    factor, policy, pad = mode
    T, k = idx.shape
    cap = None if factor is None else expert_capacity(T, E, k, factor)
    a = make_plan(idx, E, cap, policy, weight, pad, backend=backend)
    b = make_plan(idx, E, cap, policy, weight, pad, backend="torch")
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    return b


@pytest.mark.parametrize("E,k", [(1, 1), (7, 2), (64, 8), (256, 4)])
@pytest.mark.parametrize("T", [0, 1, 45, 700])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m[0]}-{m[1]}-pad{m[2]}")
def test_plan_equals_reference(backend, device, E, k, T, mode):
    idx, weight = routing(T, E, k, device, skew=True)
    assert_same_plan(idx, weight, E, mode, backend)


def test_ties_and_all_on_one_expert(backend, device):
    idx = torch.full((300, 1), 2, dtype=torch.int32, device=device)
    weight = torch.ones(300, 1, device=device)
    for cap, policy in [(None, "probs"), (7, "probs"), (7, "position")]:
        a = make_plan(idx, 5, cap, policy, weight, backend=backend)
        b = make_plan(idx, 5, cap, policy, weight, backend="torch")
        for f in FIELDS:
            assert torch.equal(getattr(a, f), getattr(b, f)), f


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m[0]}-{m[1]}-pad{m[2]}")
def test_unassigned_ids(backend, device, mode):
    idx, weight = routing(50, 6, 2, device)
    idx[::3, 1] = -1
    reference = assert_same_plan(idx, weight, 6, mode, backend)
    assert torch.all(reference.row[::3, 1] == -1)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m[0]}-{m[1]}-pad{m[2]}")
def test_chunks_of_many_tiles(backend, device, mode, monkeypatch):
    """Few chunks of many tiles each (a large batch's shape): ranks carry across a chunk's tiles and
    the in-kernel scan across chunks."""
    if backend != "triton":
        pytest.skip("Triton's chunked counting plan")
    from fastmoe_kernels.triton_backend import plan as triton_plan

    monkeypatch.setattr(triton_plan, "MAX_CHUNKS", 3)
    idx, weight = routing(333, 9, 3, device, skew=True)
    idx[::7, 0] = -1
    assert_same_plan(idx, weight, 9, mode, backend)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m[0]}-{m[1]}-pad{m[2]}")
def test_int64_ids_and_rows_no_assignment_fills(backend, device, mode):
    """The kernels read the ids in their own dtype (no host cast or masking pass) and mark every row no
    assignment fills with -1 themselves (no fill pass): int64 ids with unassigned ones, a capacity
    that leaves padded rows empty, against the reference."""
    idx, weight = routing(61, 9, 3, device, skew=True)
    idx = idx.long()
    idx[::4, 2] = -1
    reference = assert_same_plan(idx, weight, 9, mode, backend)
    factor, _, pad = mode
    if pad or factor is None:  # the unassigned ids leave rows no assignment fills
        assert (reference.assignment == -1).any()
