"""grouped_gemm against row-by-row products: every layout, empty groups, rows outside groups."""
import pytest
import torch

import naive
from fastmoe_kernels.ops import grouped_gemm
from tolerances import assert_close


def random_offsets(R, E, fill=True, empty_every=3):
    """Uneven group sizes with some empty groups; with fill=False the groups end before R."""
    sizes = torch.randint(0, 6, (E,))
    sizes[::empty_every] = 0
    total = int(sizes.sum())
    limit = R if fill else max(R - 3, 0)
    while total > limit:
        i = int(torch.argmax(sizes))
        sizes[i] -= 1
        total -= 1
    if fill and total < R:
        sizes[-1] += R - total
    return torch.cat([torch.zeros(1, dtype=torch.int32), torch.cumsum(sizes, 0).to(torch.int32)])


def run_both(a, b, offsets, bias=None, **kw):
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    bias1 = None if bias is None else bias.clone().requires_grad_()
    out = grouped_gemm(a1, b1, offsets, bias=bias1, **kw)
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    bias2 = None if bias is None else bias.clone().requires_grad_()
    ref = naive.grouped_gemm(a2, b2, offsets.tolist(), kw.get("trans_b", False), bias2, kw.get("widths"), kw.get("packed"))
    # Keep every input in the graph even when all groups are empty (their gradients are then 0).
    ref = ref + 0 * (a2.sum() + b2.sum() + (0 if bias2 is None else bias2.sum()))
    assert_close(out, ref)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    assert_close(a1.grad, a2.grad)
    assert_close(b1.grad, b2.grad)
    if bias is not None:
        assert_close(bias1.grad, bias2.grad)
    return out


@pytest.mark.parametrize("E", [1, 2, 7])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("fill", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_homogeneous(E, trans_b, with_bias, fill, dtype):
    R, K, N = 17, 5, 3
    offsets = random_offsets(R, E, fill)
    a = torch.randn(R, K, dtype=dtype)
    b = torch.randn(E, N, K, dtype=dtype) if trans_b else torch.randn(E, K, N, dtype=dtype)
    bias = torch.randn(E, N, dtype=dtype) if with_bias else None
    out = run_both(a, b, offsets, bias, trans_b=trans_b)
    assert out.shape == (R, N)
    assert torch.all(out[int(offsets[-1]):] == 0)


@pytest.mark.parametrize("packed", ["n", "k"])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_heterogeneous(packed, trans_b, with_bias):
    E, R = 5, 21
    widths = [3, 1, 4, 4, 2]
    total = sum(widths)
    offsets = random_offsets(R, E, fill=False, empty_every=4)
    dt = torch.float64
    if packed == "n":
        K = 6
        a = torch.randn(R, K, dtype=dt)
        b = torch.randn(total, K, dtype=dt) if trans_b else torch.randn(K, total, dtype=dt)
        bias = torch.randn(total, dtype=dt) if with_bias else None
    else:
        N = 6
        a = torch.randn(R, max(widths), dtype=dt)
        b = torch.randn(N, total, dtype=dt) if trans_b else torch.randn(total, N, dtype=dt)
        bias = torch.randn(E, N, dtype=dt) if with_bias else None
    out = run_both(a, b, offsets, bias, trans_b=trans_b, widths=widths, packed=packed)
    if packed == "n":
        bounds = offsets.tolist()
        for e in range(E):
            assert torch.all(out[bounds[e]:bounds[e + 1], widths[e]:] == 0)


def test_all_rows_one_group_and_single_rows():
    a = torch.randn(9, 4, dtype=torch.float64)
    b = torch.randn(4, 4, 3, dtype=torch.float64)
    run_both(a, b, torch.tensor([0, 0, 9, 9, 9], dtype=torch.int32))
    run_both(a, b, torch.tensor([0, 1, 2, 3, 9], dtype=torch.int32))


def test_empty_group_weight_grad_is_zero():
    a = torch.randn(6, 4)
    b = torch.randn(3, 4, 5, requires_grad=True)
    out = grouped_gemm(a, b, torch.tensor([0, 3, 3, 6], dtype=torch.int32))
    out.sum().backward()
    assert torch.all(b.grad[1] == 0) and torch.any(b.grad[0] != 0)


def test_zero_rows():
    a = torch.randn(0, 4, requires_grad=True)
    b = torch.randn(3, 4, 5, requires_grad=True)
    out = grouped_gemm(a, b, torch.zeros(4, dtype=torch.int32))
    assert out.shape == (0, 5)
    out.sum().backward()
    assert torch.all(b.grad == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_fp32(dtype):
    R, K, N, E = 40, 32, 24, 4
    offsets = random_offsets(R, E)
    a, b = torch.randn(R, K), torch.randn(E, K, N)
    out = grouped_gemm(a.to(dtype), b.to(dtype), offsets)
    ref = grouped_gemm(a.to(dtype).float(), b.to(dtype).float(), offsets)
    assert out.dtype == dtype
    assert_close(out, ref.to(dtype), dtype)


@pytest.mark.parametrize("trans_b", [False, True])
def test_gradcheck(trans_b):
    E, R, K, N = 3, 7, 3, 2
    offsets = torch.tensor([0, 2, 2, 6], dtype=torch.int32)
    a = torch.randn(R, K, dtype=torch.float64, requires_grad=True)
    shape = (E, N, K) if trans_b else (E, K, N)
    b = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(E, N, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a_, b_, c_: grouped_gemm(a_, b_, offsets, trans_b, c_), (a, b, bias))


def test_gradcheck_packed():
    widths = [2, 1, 3]
    offsets = torch.tensor([0, 2, 3, 6], dtype=torch.int32)
    a = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda a_, b_: grouped_gemm(a_, b_, offsets, True, widths=widths, packed="n")
    assert torch.autograd.gradcheck(fn, (a, b))
    a2 = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    fn2 = lambda a_, b_: grouped_gemm(a_, b_, offsets, False, widths=widths, packed="k")
    assert torch.autograd.gradcheck(fn2, (a2, b2))
