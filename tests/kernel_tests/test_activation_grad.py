"""The activation's backward as one elementwise Triton pass (``FASTMOE_ACTIVATION_BACKWARD=kernel``, and
``kernel-in-place``: dh written into h's buffer), against the fp64 reference: the kernel alone for every
activation, odd sizes and the clamps, its output poisoned first; the composition's gradients with each
setting against the torch setting's; the in-place variant's retained graph refused, not misread."""
import importlib

import pytest
import torch

from fastmoe_kernels import ops
from fastmoe_kernels.activations import ACTIVATIONS, Activation, apply_activation, as_activation
from kernel_tests.conftest import low_precision_dtypes
from kernel_tests.helpers import assert_rel

activation_grad_module = pytest.importorskip("fastmoe_kernels.triton_backend.activation_grad")
up_triton = importlib.import_module("fastmoe_kernels.triton_backend.grouped_up")
up_ops = importlib.import_module("fastmoe_kernels.ops.grouped_up")
SIZES = [9, 0, 21, 1, 13]
CLAMPED = Activation("swiglu_oai", 1.702, 0.6)  # gpt-oss's, with a limit the test's values pass


@pytest.fixture
def triton_only(backend):
    if backend != "triton":
        pytest.skip("the kernel is the Triton backend's")
    return backend


def _reference_dh(grad_a, h, act):
    h64 = h.double().requires_grad_()
    apply_activation(h64, act).backward(grad_a.double())
    return h64.grad


@pytest.mark.parametrize("activation", [*ACTIVATIONS, CLAMPED], ids=[*ACTIVATIONS, "swiglu_oai-clamped"])
@pytest.mark.parametrize("dtype", [torch.float32, *low_precision_dtypes()])
@pytest.mark.parametrize("rows,f", [(37, 5), (1, 33), (300, 16), (0, 8)])
def test_the_kernel_equals_the_fp64_gradient(triton_only, device, activation, dtype, rows, f):
    act = as_activation(activation)
    torch.manual_seed(rows * 131 + f)
    h = (torch.randn(rows, (2 if act.gated else 1) * f, device=device) * 2).to(dtype)
    grad_a = torch.randn(rows, f, device=device).to(dtype)
    dh = torch.full_like(h, float("nan"))  # every element must be written
    out = activation_grad_module.activation_grad(grad_a, h, act, dh)
    assert out is dh
    want = _reference_dh(grad_a, h, act)
    assert not dh.isnan().any()
    assert_rel(dh, want.to(dtype), dtype, scale=2 if dtype != torch.float32 else 1, what="dh")


def test_the_kernel_may_write_into_h(triton_only, device):
    act = as_activation("swiglu")
    h = torch.randn(50, 2 * 24, device=device)
    grad_a = torch.randn(50, 24, device=device)
    want = activation_grad_module.activation_grad(grad_a, h, act, torch.empty_like(h))
    activation_grad_module.activation_grad(grad_a, h, act, h)
    assert torch.equal(h, want)


def test_bad_operands_are_refused_by_name(triton_only, device):
    act = as_activation("swiglu")
    h, g = torch.randn(4, 16, device=device), torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="grad_a .* h .* dh"):
        activation_grad_module.activation_grad(g, h[:, :12], act, torch.empty(4, 12, device=device))
    with pytest.raises(ValueError, match="dh must have contiguous rows"):
        activation_grad_module.activation_grad(g, h, act, torch.empty(16, 4, device=device).t())
    with pytest.raises(ValueError, match="interleaved"):
        activation_grad_module.activation_grad(g, h, Activation("swiglu", interleaved=True), torch.empty_like(h))


def _composition_grads(x, w_up, w_down, b_up, offsets, act, widths, grad):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w_up, w_down, b_up)]
    y = ops.grouped_mlp(leaves[0], leaves[1], leaves[2], offsets, act, leaves[3], widths=widths, backend="triton")
    (y.double() * grad).sum().backward()
    return [y] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("setting", ["kernel", "kernel-in-place"])
@pytest.mark.parametrize("activation,widths,bias", [
    ("swiglu", None, False), ("gelu", None, True), (Activation("swiglu_oai", 1.702, 0.6, interleaved=True), None, True),
    ("geglu", [8, 16, 0, 24, 8], True)], ids=["swiglu", "gelu-bias", "oai-interleaved-bias", "geglu-heterogeneous"])
def test_the_compositions_gradients_equal_the_torch_settings(triton_only, device, monkeypatch, setting, activation,
                                                             widths, bias):
    act = as_activation(activation)
    m, d, E = (2 if act.gated else 1), 24, len(SIZES)
    offsets = torch.tensor([0, *torch.tensor(SIZES).cumsum(0).tolist()], dtype=torch.int32, device=device)
    R = sum(SIZES) + 3  # rows past the last group
    f_total = 16 * E if widths is None else sum(widths)
    x = torch.randn(R, d, device=device)
    if widths is None:
        w_up, w_down = torch.randn(E, m * 16, d, device=device) / d ** 0.5, torch.randn(E, d, 16, device=device) / 4
        b_up = torch.randn(E, m * 16, device=device) if bias else None
    else:
        w_up, w_down = torch.randn(m * f_total, d, device=device) / d ** 0.5, torch.randn(d, f_total, device=device) / 4
        b_up = torch.randn(m * f_total, device=device) if bias else None
    grad = torch.randn(R, d, device=device, dtype=torch.float64)
    want = _composition_grads(x.double(), w_up.double(), w_down.double(), None if b_up is None else b_up.double(),
                              offsets, act, widths, grad)
    launches = []
    real = activation_grad_module.activation_grad
    monkeypatch.setattr(up_triton, "activation_grad", lambda *a: launches.append(a[1].data_ptr()) or real(*a))
    monkeypatch.setattr(up_triton, "ACTIVATION_BACKWARD", setting)
    monkeypatch.setattr(up_ops, "ACTIVATION_KERNEL_IN_PLACE", setting == "kernel-in-place")
    got = _composition_grads(x, w_up, w_down, b_up, offsets, act, widths, grad)
    assert len(launches) == 1  # the kernel ran, not torch's ops
    for name, g, w in zip(("y", "grad_x", "grad_w_up", "grad_w_down", "grad_b_up"), got, want):
        assert_rel(g, w.float(), torch.float32, what=f"{setting} {name}")


def test_in_place_a_retained_graphs_second_backward_is_refused(triton_only, device, monkeypatch):
    """dh overwrote h: a second backward through the same graph must fail on h's version, never read dh
    as h (a silent wrong gradient)."""
    monkeypatch.setattr(up_triton, "ACTIVATION_BACKWARD", "kernel-in-place")
    monkeypatch.setattr(up_ops, "ACTIVATION_KERNEL_IN_PLACE", True)
    E, d, f = len(SIZES), 16, 8
    offsets = torch.tensor([0, *torch.tensor(SIZES).cumsum(0).tolist()], dtype=torch.int32, device=device)
    x = torch.randn(sum(SIZES), d, device=device, requires_grad=True)
    w_up = torch.randn(E, 2 * f, d, device=device, requires_grad=True)
    w_down = torch.randn(E, d, f, device=device, requires_grad=True)
    y = ops.grouped_mlp(x, w_up, w_down, offsets, "swiglu", backend="triton")
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    # Without in place, the retained graph's second backward is the first's again.
    monkeypatch.setattr(up_triton, "ACTIVATION_BACKWARD", "kernel")
    monkeypatch.setattr(up_ops, "ACTIVATION_KERNEL_IN_PLACE", False)
    x.grad = None
    y = ops.grouped_mlp(x, w_up, w_down, offsets, "swiglu", backend="triton")
    y.sum().backward(retain_graph=True)
    first = x.grad.clone()
    y.sum().backward()
    assert_rel(x.grad, 2 * first, torch.float32, what="second backward")
