"""grouped_up (the composition's up projection with the activation in its epilogue) on the kernel
backends against the reference, forward and backward: every activation, heterogeneous widths, bias,
interleaved gate/up rows, empty experts and rows outside every group; and grouped_mlp's use of it."""
import importlib

import pytest
import torch

from fastmoe_kernels import backends, ops
from fastmoe_kernels.activations import ACTIVATIONS, Activation, as_activation
from fastmoe_kernels.ops.grouped_up import grouped_up
from kernel_tests.conftest import low_precision_dtypes
from kernel_tests.helpers import assert_rel

grouped_mlp_module = importlib.import_module("fastmoe_kernels.ops.grouped_mlp")  # the module, not the function
SIZES = [9, 0, 21, 1, 13]


def _weights(act: Activation, widths, d, dtype, device, bias):
    m = 2 if act.gated else 1
    E = len(SIZES)
    if widths is None:
        f = 16
        w_up = torch.randn(E, m * f, d, device=device) / d ** 0.5
        b_up = torch.randn(E, m * f, device=device) if bias else None
    else:
        w_up = torch.randn(m * sum(widths), d, device=device) / d ** 0.5
        b_up = torch.randn(m * sum(widths), device=device) if bias else None
    return w_up.to(dtype), None if b_up is None else b_up.to(dtype)


def _run(backend, x, w_up, b_up, offsets, act, widths, grad, all_rows_grouped=False):
    x, w_up = x.clone().requires_grad_(), w_up.clone().requires_grad_()
    b_up = None if b_up is None else b_up.clone().requires_grad_()
    a = grouped_up(x, w_up, offsets, act, b_up, widths=widths, backend=backend, all_rows_grouped=all_rows_grouped)
    (a.float() * grad).sum().backward()
    return [a, x.grad, w_up.grad] + ([b_up.grad] if b_up is not None else [])


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("widths", [None, [8, 16, 0, 24, 8]], ids=["homogeneous", "heterogeneous"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, *low_precision_dtypes()])
def test_grouped_up_equals_the_reference(backend, device, activation, widths, bias, dtype):
    if backend != "triton":
        pytest.skip("grouped_up has a Triton kernel only (the others run the reference)")
    act = as_activation(activation)
    d = 32
    offsets = torch.tensor([0, *torch.tensor(SIZES).cumsum(0).tolist()], dtype=torch.int32, device=device)
    R = sum(SIZES) + 3  # rows past the last group: zeros
    x = torch.randn(R, d, device=device).to(dtype)
    w_up, b_up = _weights(act, widths, d, dtype, device, bias)
    f = 16 if widths is None else max(widths)
    grad = torch.randn(R, f, device=device)
    got = _run(backend, x, w_up, b_up, offsets, act, widths, grad)
    want = _run("torch", x.double(), w_up.double(), None if b_up is None else b_up.double(), offsets, act, widths,
                grad.double())
    assert backends.resolve("grouped_up", backend, device, dtype) == backend
    assert torch.all(got[0][sum(SIZES):] == 0)
    for name, g, w in zip(("a", "grad_x", "grad_w_up", "grad_b_up"), got, want):
        assert g.dtype == dtype
        assert_rel(g, w.to(g.dtype), dtype, scale=4 if dtype != torch.float32 else 1, what=name)


@pytest.mark.parametrize("activation", ["swiglu", "swiglu_oai"])
def test_interleaved_gate_and_up_rows_are_read_in_place(backend, device, activation):
    if backend != "triton":
        pytest.skip("grouped_up has a Triton kernel only")
    act = Activation(activation, *( (1.702, 7.0) if activation == "swiglu_oai" else (1.0, float("inf"))), True)
    d, f = 32, 16
    offsets = torch.tensor([0, *torch.tensor(SIZES).cumsum(0).tolist()], dtype=torch.int32, device=device)
    R = sum(SIZES)
    x = torch.randn(R, d, device=device)
    w_up = torch.randn(len(SIZES), 2 * f, d, device=device) / d ** 0.5
    grad = torch.randn(R, f, device=device)
    got = _run(backend, x, w_up, None, offsets, act, None, grad, all_rows_grouped=True)
    want = _run("torch", x.double(), w_up.double(), None, offsets, act, None, grad.double())
    for name, g, w in zip(("a", "grad_x", "grad_w_up"), got, want):
        assert_rel(g, w.float(), torch.float32, what=name)


def test_grouped_mlp_runs_the_epilogue_kernel_where_its_gemms_run_on_triton(backend, device, monkeypatch):
    if backend != "triton":
        pytest.skip("the epilogue is Triton's")
    calls = []
    real = backends.get_kernel

    def counting(kernel, name):
        calls.append((kernel, name))
        return real(kernel, name)

    monkeypatch.setattr(backends, "get_kernel", counting)
    E, d, f = len(SIZES), 32, 16
    offsets = torch.tensor([0, *torch.tensor(SIZES).cumsum(0).tolist()], dtype=torch.int32, device=device)
    x = torch.randn(sum(SIZES), d, device=device, requires_grad=True)
    w_up = (torch.randn(E, 2 * f, d, device=device) / d ** 0.5).requires_grad_()
    w_down = (torch.randn(E, d, f, device=device) / f ** 0.5).requires_grad_()
    y = ops.grouped_mlp(x, w_up, w_down, offsets, "swiglu", backend="triton")
    y.sum().backward()
    assert ("grouped_up", "triton") in calls and ("grouped_up_backward", "triton") in calls
    assert sum(k == "grouped_gemm" for k, _ in calls) == 2  # the down projection and its input gradient
    # The separate activation stays selectable (FASTMOE_UP_ACTIVATION=separate) for the GPU's A/B.
    calls.clear()
    monkeypatch.setattr(grouped_mlp_module, "UP_ACTIVATION", "separate")
    ref = ops.grouped_mlp(x, w_up, w_down, offsets, "swiglu", backend="triton")
    assert not any(k.startswith("grouped_up") for k, _ in calls)
    assert_rel(y, ref, torch.float32, what="epilogue vs separate")
