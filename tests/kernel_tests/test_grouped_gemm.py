import os

import pytest
import torch

from fastmoe_kernels.ops import grouped_gemm
from kernel_tests.conftest import low_precision_dtypes
from kernel_tests.helpers import assert_rel


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


def test_weight_cast_to_the_data_dtype_keeps_its_layout(backend, device):
    """A strided fp32 weight with fp16 data: the kernel must read the cast copy with the copy's strides."""
    E, K, N = 3, 24, 16
    sizes = [5, 9, 4]
    offsets = offsets_for(sizes, device)
    a = torch.randn(sum(sizes), K, device=device).half()
    b = torch.randn(E, K, 2 * N, device=device)[:, :, ::2]  # non-contiguous fp32: .to(fp16) makes a dense copy
    got, ref = run(backend, a, b, offsets)
    for name, x, y in zip(("out", "grad_a", "grad_b"), got, ref):
        assert_rel(x, y, torch.float16, what=name)


def test_new_tf32_api(backend, device):
    """torch's new fp32-precision API must not break the kernels (reading the legacy flag raises)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        sizes = [6, 3]
        a = torch.randn(sum(sizes), 16, device=device)
        b = torch.randn(2, 16, 8, device=device)
        got, ref = run(backend, a, b, offsets_for(sizes, device))
        assert_rel(got[0], ref[0], torch.bfloat16, what="out (TF32 allowed)")
    finally:
        matmul.fp32_precision = before


INT64_PROBE = """
import os, sys, torch
from fastmoe_kernels.ops import grouped_gemm
backend, device = sys.argv[1], sys.argv[2]
# One weight matrix with a row stride of 1.5 * 2**30 elements (an int32 stride) and three rows: its
# last row starts past 2**31, an in-matrix offset that wraps in int32 arithmetic (a read far out of
# bounds). Only the touched pages of the 6 GiB buffer are ever committed.
storage = torch.empty(3 * 2**30 + 64, dtype=torch.float16, device=device)
b = storage.as_strided((1, 3, 16), (0, 3 * 2**29, 1))
b.copy_(torch.randn(1, 3, 16))
a = torch.randn(7, 3, dtype=torch.float16, device=device)
offsets = torch.tensor([0, 7], dtype=torch.int32, device=device)
got = grouped_gemm(a, b, offsets, backend=backend).float()
ref = a.float() @ b[0].float()
print("MAXERR", float((got - ref).abs().max()))
"""


def test_offsets_past_int32_inside_one_expert_matrix(backend, device):
    import subprocess
    import sys

    env = dict(os.environ, FASTMOE_POISON="1")
    probe = subprocess.run([sys.executable, "-c", INT64_PROBE, backend, device.type], capture_output=True, text=True,
                           env=env, timeout=600)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert float(probe.stdout.split("MAXERR")[1]) < 1e-2, probe.stdout


@pytest.mark.parametrize("packed", ["n", "k"])
def test_zero_width_experts(backend, device, packed):
    """An expert of width 0 (a pruned expert, say): no columns, yet its rows and bias gradient are due."""
    widths, sizes = [0, 4, 8], [3, 5, 4]
    offsets = offsets_for(sizes, device)
    R = sum(sizes)
    if packed == "n":
        a, b = torch.randn(R, 16, device=device), torch.randn(16, sum(widths), device=device)
        bias = torch.randn(sum(widths), device=device)
    else:
        a, b = torch.randn(R, max(widths), device=device), torch.randn(sum(widths), 16, device=device)
        bias = torch.randn(len(widths), 16, device=device)
    got, ref = run(backend, a, b, offsets, bias, widths=widths, packed=packed)
    for name, x, y in zip(("out", "grad_a", "grad_b", "grad_bias"), got, ref):
        assert_rel(x, y, torch.float32, what=name)
