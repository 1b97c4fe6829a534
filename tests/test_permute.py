"""permute / unpermute against naive loops, forward and backward, in every plan mode."""
import pytest
import torch

import naive
from fastmoe_kernels.ops import expert_capacity, make_plan, permute, unpermute
from test_plan import random_routing
from tolerances import assert_close

MODES = [
    dict(),
    dict(capacity_factor=0.75, drop_policy="probs"),
    dict(capacity_factor=1.0, drop_policy="position"),
    dict(capacity_factor=1.5, drop_policy="probs", pad=True),
]


def build(T, E, k, d, dtype, mode, skew=True):
    idx, weight = random_routing(T, E, k, skew)
    cap = None
    if "capacity_factor" in mode:
        cap = expert_capacity(T, E, k, mode["capacity_factor"])
    plan = make_plan(idx, E, cap, mode.get("drop_policy", "probs"), weight, mode.get("pad", False))
    x = torch.randn(T, d, dtype=dtype)
    return plan, x, weight.to(dtype if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()) or "dropless")
@pytest.mark.parametrize("E,k", [(1, 1), (2, 2), (7, 2), (64, 8)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_permute_unpermute_match_naive(mode, E, k, dtype):
    T, d = 19, 5
    plan, x, weight = build(T, E, k, d, dtype, mode)
    assignment, row = plan.assignment.tolist(), plan.row.tolist()

    x1 = x.clone().requires_grad_()
    xp = permute(x1, plan)
    x2 = x.clone().requires_grad_()
    xp_ref = naive.permute(x2, assignment, k)
    assert xp.shape == (plan.num_rows, d) and xp.dtype == dtype
    assert_close(xp, xp_ref)
    g = torch.randn_like(xp)
    (xp * g).sum().backward()
    (xp_ref * g).sum().backward()
    assert_close(x1.grad, x2.grad)

    y = torch.randn(plan.num_rows, d, dtype=dtype)
    y1, w1 = y.clone().requires_grad_(), weight.clone().requires_grad_()
    out = unpermute(y1, plan, w1)
    y2, w2 = y.clone().requires_grad_(), weight.clone().requires_grad_()
    out_ref = naive.unpermute(y2, row, w2.to(dtype))
    assert out.shape == (T, d) and out.dtype == dtype
    assert_close(out, out_ref)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    assert_close(y1.grad, y2.grad)
    assert_close(w1.grad, w2.grad.to(w1.dtype), dtype)


def test_unused_rows_never_read():
    """Dropped assignments and padding rows contribute exactly zero, even if those rows hold NaN."""
    T, E, k, d = 16, 4, 2, 3
    plan, x, weight = build(T, E, k, d, torch.float32, dict(capacity_factor=0.5, drop_policy="probs", pad=True))
    y = torch.full((plan.num_rows, d), float("nan"))
    used = plan.row[plan.row >= 0].long()
    y[used] = torch.randn(used.numel(), d)
    out = unpermute(y.requires_grad_(), plan, weight.requires_grad_())
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(weight.grad).all()
    assert torch.all(weight.grad[plan.row < 0] == 0)
    unused = torch.ones(plan.num_rows, dtype=torch.bool)
    unused[used] = False
    assert torch.all(y.grad[unused] == 0)


def test_bf16_accumulates_in_fp32():
    T, E, k, d = 33, 8, 4, 64
    plan, _, weight = build(T, E, k, d, torch.float32, {})
    y = torch.randn(plan.num_rows, d)
    out16 = unpermute(y.bfloat16(), plan, weight)
    ref = unpermute(y.bfloat16().float(), plan, weight)
    assert out16.dtype == torch.bfloat16
    # One rounding of the fp32 sum, not k roundings of partial sums.
    torch.testing.assert_close(out16, ref.bfloat16(), atol=0, rtol=0)


def test_empty_batch():
    plan, x, weight = build(0, 4, 2, 3, torch.float32, {})
    x.requires_grad_()
    xp = permute(x, plan)
    out = unpermute(xp, plan, weight)
    assert xp.shape == (0, 3) and out.shape == (0, 3)
    out.sum().backward()


@pytest.mark.parametrize("mode", MODES[:3])
def test_gradcheck(mode):
    plan, x, weight = build(6, 3, 2, 4, torch.float64, mode)
    x.requires_grad_()
    w = weight.clone().requires_grad_()
    y = torch.randn(plan.num_rows, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_: permute(x_, plan), (x,))
    assert torch.autograd.gradcheck(lambda y_, w_: unpermute(y_, plan, w_), (y, w))
