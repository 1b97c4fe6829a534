import pytest
import torch

from fastmoe_kernels.ops import grouped_gemm
from kernels.conftest import low_precision_dtypes
from kernels.helpers import assert_rel


def offsets_for(sizes, device):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32, device=device)


GROUPS = {
    "uneven": [5, 0, 17, 1, 0, 40, 3],
    "single-rows": [1, 1, 1, 1],
    "one-group": [0, 0, 61, 0],
    "all-empty": [0, 0, 0],
}


def run(backend, a, b, offsets, bias=None, **kw):
    res = {}
    g = torch.randn(a.shape[0], 1, device=a.device)
    for name in (backend, "torch"):
        aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
        cc = None if bias is None else bias.clone().requires_grad_()
        out = grouped_gemm(aa, bb, offsets, bias=cc, backend=name, **kw)
        (out.float() * g).sum().backward()
        res[name] = [out, aa.grad, bb.grad] + ([cc.grad] if cc is not None else [])
    return res[backend], res["torch"]


@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, *low_precision_dtypes()])
def test_homogeneous(backend, device, groups, trans_b, with_bias, dtype):
    sizes = GROUPS[groups]
    E, K, N = len(sizes), 40, 24
    R = sum(sizes) + 5  # five rows past the last group: must come out as zeros
    offsets = offsets_for(sizes, device)
    a = torch.randn(R, K, device=device).to(dtype)
    b = (torch.randn(E, N, K) if trans_b else torch.randn(E, K, N)).to(device, dtype) / K ** 0.5
    bias = torch.randn(E, N, device=device).to(dtype) if with_bias else None
    got, ref = run(backend, a, b, offsets, bias, trans_b=trans_b)
    assert torch.all(got[0][sum(sizes):] == 0)
    for name, x, y in zip(("out", "grad_a", "grad_b", "grad_bias"), got, ref):
        assert_rel(x, y, dtype, what=name)


@pytest.mark.parametrize("packed", ["n", "k"])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed(backend, device, packed, trans_b, with_bias):
    widths = [8, 33, 1, 20]
    sizes = [7, 0, 30, 12]
    E, total = len(widths), sum(widths)
    offsets = offsets_for(sizes, device)
    R = sum(sizes) + 3
    if packed == "n":
        K = 24
        a = torch.randn(R, K, device=device)
        b = torch.randn(total, K, device=device) if trans_b else torch.randn(K, total, device=device)
        bias = torch.randn(total, device=device) if with_bias else None
    else:
        N = 24
        a = torch.randn(R, max(widths), device=device)
        b = torch.randn(N, total, device=device) if trans_b else torch.randn(total, N, device=device)
        bias = torch.randn(E, N, device=device) if with_bias else None
    got, ref = run(backend, a, b, offsets, bias, trans_b=trans_b, widths=widths, packed=packed)
    for name, x, y in zip(("out", "grad_a", "grad_b", "grad_bias"), got, ref):
        assert_rel(x, y, torch.float32, what=name)


def test_many_small_experts(backend, device):
    """Fine-grained MoE: more experts than rows per expert; exercises the persistent tile loop."""
    E, K, N = 70, 32, 32
    sizes = torch.randint(0, 4, (E,)).tolist()
    offsets = offsets_for(sizes, device)
    a = torch.randn(sum(sizes), K, device=device)
    b = torch.randn(E, K, N, device=device)
    got, ref = run(backend, a, b, offsets)
    for name, x, y in zip(("out", "grad_a", "grad_b"), got, ref):
        assert_rel(x, y, torch.float32, what=name)
