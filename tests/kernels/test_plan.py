import pytest
import torch

from fastmoe_kernels.ops import expert_capacity, make_plan
from kernels.helpers import routing

FIELDS = ("counts", "routed_counts", "offsets", "row", "assignment")
MODES = [(None, "probs", False), (1.0, "position", False), (0.6, "probs", False), (1.25, "probs", True), (0.5, "position", True)]


@pytest.mark.parametrize("E,k", [(1, 1), (7, 2), (64, 8), (256, 4)])
@pytest.mark.parametrize("T", [0, 1, 45, 700])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m[0]}-{m[1]}-pad{m[2]}")
def test_plan_equals_reference(backend, device, E, k, T, mode):
    factor, policy, pad = mode
    idx, weight = routing(T, E, k, device, skew=True)
    cap = None if factor is None else expert_capacity(T, E, k, factor)
    a = make_plan(idx, E, cap, policy, weight, pad, backend=backend)
    b = make_plan(idx, E, cap, policy, weight, pad, backend="torch")
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f


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
    factor, policy, pad = mode
    T, E, k = 50, 6, 2
    idx, weight = routing(T, E, k, device)
    idx[::3, 1] = -1
    cap = None if factor is None else expert_capacity(T, E, k, factor)
    a = make_plan(idx, E, cap, policy, weight, pad, backend=backend)
    b = make_plan(idx, E, cap, policy, weight, pad, backend="torch")
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert torch.all(b.row[::3, 1] == -1)
