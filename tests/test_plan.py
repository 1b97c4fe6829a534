"""make_plan against the Python-loop plan: every field, every mode."""
import math
from fractions import Fraction

import pytest
import torch

import naive
from fastmoe_kernels.ops import expert_capacity, make_plan


def random_routing(T, E, k, skew=False):
    if skew:  # uneven loads: a few hot experts, many cold (often empty) ones
        p = torch.rand(E) ** 6 + 1e-3
    else:
        p = torch.ones(E)
    idx = torch.stack([torch.multinomial(p, k, replacement=False) for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    weight = torch.rand(T, k)
    return idx.to(torch.int32), weight


def check_against_naive(idx, weight, E, cap, policy, pad):
    plan = make_plan(idx, E, cap, policy, weight, pad)
    counts, routed, offsets, row, assignment = naive.plan(idx, E, cap, policy, weight, pad)
    assert plan.counts.tolist() == counts
    assert plan.routed_counts.tolist() == routed
    assert plan.offsets.tolist() == offsets
    assert plan.row.tolist() == row
    assert plan.assignment.tolist() == assignment
    for t in (plan.counts, plan.routed_counts, plan.offsets, plan.row, plan.assignment):
        assert t.dtype == torch.int32
    return plan


CASES = [(E, k) for E in (1, 2, 7, 64) for k in (1, 2, 8, E) if k <= E]


@pytest.mark.parametrize("E,k", sorted(set(CASES)))
@pytest.mark.parametrize("T", [0, 1, 13, 40])
@pytest.mark.parametrize("skew", [False, True])
def test_dropless(E, k, T, skew):
    idx, weight = random_routing(T, E, k, skew)
    plan = check_against_naive(idx, weight, E, None, "probs", False)
    assert plan.num_rows == T * k and int(plan.num_dropped) == 0


@pytest.mark.parametrize("E,k", [(2, 1), (7, 2), (64, 8), (8, 8)])
@pytest.mark.parametrize("factor", [0.25, 1.0, 1.25, 4.0])
@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("skew", [False, True])
def test_capacity(E, k, factor, policy, pad, skew):
    T = 23
    idx, weight = random_routing(T, E, k, skew)
    cap = expert_capacity(T, E, k, factor)
    plan = check_against_naive(idx, weight, E, cap, policy, pad)
    assert plan.capacity == cap
    assert torch.all(plan.counts <= cap)
    assert int(plan.num_dropped) == int((plan.row < 0).sum())


def test_huge_capacity_equals_dropless():
    idx, weight = random_routing(31, 7, 3, skew=True)
    dropless = make_plan(idx, 7)
    big = make_plan(idx, 7, capacity=31 * 3, drop_policy="probs", weight=weight)
    for name in ("counts", "offsets", "row", "assignment"):
        assert torch.equal(getattr(dropless, name), getattr(big, name)), name


def test_all_tokens_on_one_expert():
    T, E = 10, 5
    idx = torch.full((T, 1), 3, dtype=torch.int32)
    weight = torch.linspace(0.1, 1.0, T).unsqueeze(1)
    plan = check_against_naive(idx, weight, E, 4, "probs", False)
    assert plan.counts.tolist() == [0, 0, 0, 4, 0]
    kept_tokens = sorted(plan.src[plan.src >= 0].tolist())
    assert kept_tokens == [6, 7, 8, 9]  # the four largest weights
    plan_pos = make_plan(idx, E, 4, "position")
    assert sorted(plan_pos.src[plan_pos.src >= 0].tolist()) == [0, 1, 2, 3]


def test_probs_policy_ties_keep_lower_position():
    idx = torch.zeros(6, 1, dtype=torch.int32)
    weight = torch.ones(6, 1)
    plan = make_plan(idx, 1, 2, "probs", weight)
    assert plan.row[:, 0].tolist() == [0, 1, -1, -1, -1, -1]


def test_zero_capacity_drops_everything():
    idx, weight = random_routing(5, 4, 2)
    plan = check_against_naive(idx, weight, 4, 0, "probs", True)
    assert plan.num_rows == 0 and torch.all(plan.row == -1)


def test_src_property_and_dropped_fraction():
    idx, weight = random_routing(12, 4, 2, skew=True)
    plan = make_plan(idx, 4, capacity=3, drop_policy="position")
    src = plan.src
    valid = plan.assignment >= 0
    assert torch.equal(src[valid], plan.assignment[valid] // 2)
    assert torch.all(src[~valid] == -1)
    assert math.isclose(float(plan.dropped_fraction), float((plan.row < 0).sum()) / 24, rel_tol=1e-6)


@pytest.mark.parametrize("T", [1, 7, 100, 4096, 12345])
@pytest.mark.parametrize("E", [1, 3, 8, 64, 160])
@pytest.mark.parametrize("k", [1, 2, 6])
@pytest.mark.parametrize("factor", [0.1, 1.0, 1.1, 1.25, 1.3, 2.0, 3.7])
def test_capacity_formula_is_exact(T, E, k, factor):
    expected = math.ceil(Fraction(str(factor)) * T * k / E)
    assert expert_capacity(T, E, k, factor) == expected


def test_int64_ids_accepted():
    idx, weight = random_routing(9, 6, 2)
    a = make_plan(idx, 6)
    b = make_plan(idx.long(), 6)
    assert torch.equal(a.row, b.row)


@pytest.mark.parametrize("capacity,pad", [(None, False), (2, False), (2, True)])
@pytest.mark.parametrize("policy", ["probs", "position"])
def test_minus_one_means_no_expert(capacity, pad, policy):
    """Ids of -1 (expert parallelism's tokens of other ranks) are dropped and not counted."""
    idx, weight = random_routing(17, 5, 2, skew=True)
    idx[::2, 0] = -1
    plan = check_against_naive(idx, weight, 5, capacity, policy, pad)
    assert torch.all(plan.row[::2, 0] == -1)
    assert int(plan.routed_counts.sum()) == int((idx >= 0).sum())


def test_src_is_computed_once_per_assignment_version():
    """The plan's source-token index is cached (three small launches per forward otherwise) and follows
    every change of the assignment: an in-place edit, a new tensor, another top_k."""
    from fastmoe_kernels.ops import make_plan

    idx = torch.tensor([[0, 1], [1, 2], [2, 0]])
    plan = make_plan(idx, 3)
    first = plan.src
    assert plan.src is first
    assert first.tolist() == [(a // 2 if a >= 0 else -1) for a in plan.assignment.tolist()]
    plan.assignment[0] = -1  # in place: the version moves
    assert plan.src is not first and plan.src[0].item() == -1
    plan.assignment = plan.assignment.clone().fill_(5)
    assert plan.src.tolist() == [2] * plan.num_rows
    plan.top_k = 5
    assert plan.src.tolist() == [1] * plan.num_rows
