"""Value checks off the hot path for what the package made itself: a plan from make_plan and the ids
from route_topk are trusted while unchanged (version counters), so a training step runs only the
router's finite-logits check (user data); an in-place edit, a plan built by hand, or another tensor at
the same address brings the checks back."""
import importlib

import pytest
import torch

from fastmoe_kernels import MoELayer, _checks, ops, set_value_checks
from fastmoe_kernels.ops import DispatchPlan


@pytest.fixture
def checks_run(monkeypatch):
    """The value checks that ran (computed their statistics), by the message's op name."""
    ran = []
    real = _checks.check_values

    def counting(device, stats, message):
        ran.append(message)
        return real(device, stats, message)

    monkeypatch.setattr(_checks, "check_values", counting)
    gg = importlib.import_module("fastmoe_kernels.ops.grouped_gemm")  # the module (ops re-exports the function)
    monkeypatch.setattr(gg, "check_values", counting)
    set_value_checks("sync")
    yield ran
    set_value_checks(None)


def _names(ran):
    return sorted({m([1, 0, 0, 0]).split(":")[0] for m in ran})


@pytest.mark.parametrize("fields", [dict(), dict(capacity_factor=1.25), dict(fused_experts=False),
                                    dict(d_ff=[8, 16, 24, 8], fused_experts=False)])
def test_a_training_step_checks_only_the_router_logits(checks_run, fields):
    kw = dict(d_model=16, d_ff=16, num_experts=4, top_k=2)
    kw.update(fields)
    layer = MoELayer(**kw).train()
    x = torch.randn(2, 9, 16, requires_grad=True)
    layer(x).square().sum().backward()
    assert _names(checks_run) == ["route_topk"], _names(checks_run)


def test_an_edited_plan_is_checked_again(checks_run):
    idx = torch.randint(0, 4, (12, 2))
    plan = ops.make_plan(idx, 4)
    x = torch.randn(plan.num_rows, 8)
    w = torch.randn(4, 8, 8)
    checks_run.clear()  # make_plan checked the ids it was given (not the router's)
    ops.grouped_gemm(x, w, plan.offsets)
    assert not checks_run
    plan.offsets.add_(0)  # same values, but an in-place edit: no longer known to be the plan's
    ops.grouped_gemm(x, w, plan.offsets)
    assert _names(checks_run) == ["grouped_gemm"]
    plan.offsets[1] = 99  # and a bad edit is caught as before
    with pytest.raises(ValueError, match="offsets"):
        ops.grouped_gemm(x, w, plan.offsets)


def test_a_plan_built_by_hand_and_ids_from_elsewhere_are_checked(checks_run):
    idx = torch.randint(0, 4, (12, 2), dtype=torch.int32)
    ops.make_plan(idx, 4)
    assert _names(checks_run) == ["make_plan"]  # ids the router did not make
    plan = ops.make_plan(ops.route_topk(torch.randn(12, 4), 2)[0], 4)
    checks_run.clear()
    hand = DispatchPlan(plan.counts.clone(), plan.routed_counts.clone(), plan.offsets.clone(), plan.row.clone(),
                        plan.assignment.clone(), plan.top_k, plan.capacity, plan.padded)
    ops.grouped_gemm(torch.randn(hand.num_rows, 8), torch.randn(4, 8, 8), hand.offsets)
    assert _names(checks_run) == ["grouped_gemm"]


def test_trust_ends_with_the_tensor():
    t = torch.arange(5, dtype=torch.int32)
    _checks.trust(t)
    assert _checks.is_trusted(t) and _checks.is_trusted(t[:])  # a view shares the version counter
    assert not _checks.is_trusted(t[1:])  # another window of the memory is another tensor
    key = _checks._trust_key(t)
    del t
    assert key in _checks._trusted
    stranger = torch.empty(0)
    assert not _checks.is_trusted(stranger)
