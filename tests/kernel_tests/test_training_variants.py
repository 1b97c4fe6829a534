"""The training step's selectable variants (the training issue's part B), each against the reference,
forward and every gradient, so that a GPU session can measure any of them against today's default:

- the composition as one autograd node (``FASTMOE_MLP_BACKWARD=epilogue``: the activation's backward in
  the epilogue of the down projection's input gradient, dh in W_up's row order);
- the fused path's "stored" backward (``FASTMOE_FUSED_BACKWARD=stored``: A_s written by the dH kernel,
  plain-operand GEMMs after it), with x gathered on load or permuted first (``FASTMOE_UP_WGRAD_X``);
- the down projection writing expert-order rows, combined by row (``FASTMOE_DOWN_OUTPUT=rows``);
- the dH epilogue over the whole tile or split by even/odd columns (``FASTMOE_DH_EPILOGUE``);
- dh written into h's buffer by the node and by the fused stored backward (``FASTMOE_DH_INTO_H=on``).
"""
import importlib

import pytest
import torch

from fastmoe_kernels import backends, ops
from fastmoe_kernels.activations import Activation, as_activation
from fastmoe_kernels.experts import GroupedExperts
from kernel_tests.conftest import low_precision_dtypes
from kernel_tests.helpers import assert_rel, plan_for, routing

grouped_mlp_module = importlib.import_module("fastmoe_kernels.ops.grouped_mlp")
fused_module = pytest.importorskip("fastmoe_kernels.triton_backend.moe_mlp")
dh_module = importlib.import_module("fastmoe_kernels.triton_backend.activation_backward")
variants_module = importlib.import_module("fastmoe_kernels._variants")
node_triton = importlib.import_module("fastmoe_kernels.triton_backend.grouped_mlp_node")

SIZES = [9, 0, 21, 1, 13]
GATED_OAI = Activation("swiglu_oai", 1.702, 0.6, interleaved=True)  # the clamps hit, rows interleaved


@pytest.fixture
def triton_only(backend):
    if backend != "triton":
        pytest.skip("the variants are the Triton backend's")
    return backend


def _grouped_mlp_grads(backend, x, w_up, w_down, b_up, b_down, offsets, act, widths, grad):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w_up, w_down, b_up, b_down)]
    y = ops.grouped_mlp(leaves[0], leaves[1], leaves[2], offsets, act, leaves[3], leaves[4], widths=widths,
                        backend=backend)
    (y.double() * grad).sum().backward()
    return [y] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("activation,widths,bias", [
    ("swiglu", None, False), ("gelu_tanh", None, True), (GATED_OAI, None, True),
    ("swiglu", [8, 16, 0, 24, 8], True), ("relu2", [8, 16, 0, 24, 8], False)],
    ids=["swiglu", "gelu_tanh-bias", "oai-interleaved-bias", "swiglu-heterogeneous-bias", "relu2-heterogeneous"])
@pytest.mark.parametrize("epilogue", ["split", "whole"])
def test_the_composition_as_one_node_equals_the_reference(triton_only, device, monkeypatch, activation, widths, bias,
                                                          epilogue):
    monkeypatch.setattr(grouped_mlp_module, "MLP_BACKWARD", "epilogue")
    monkeypatch.setattr(dh_module, "EPILOGUE", epilogue)
    calls = []
    real = backends.get_kernel
    monkeypatch.setattr(backends, "get_kernel", lambda k, n: calls.append((k, n)) or real(k, n))
    act, tensors, offsets, grad = _node_inputs(device, activation, widths, bias)
    got = _grouped_mlp_grads(backend_name := triton_only, *tensors, offsets, act, widths, grad)
    assert ("grouped_mlp_node_backward", backend_name) in calls
    assert not any(k.startswith("grouped_up") for k, _ in calls)  # one node, not grouped_up's
    _assert_node_grads(got, tensors, offsets, act, widths, grad)


def _dh_written_into_h(monkeypatch, module):
    """Per dH-kernel launch from ``module``, whether dh was h's own buffer (arguments 7 and 8)."""
    into_h = []
    real = module.activation_backward
    monkeypatch.setattr(module, "activation_backward",
                        lambda *a, **kw: into_h.append(a[7].data_ptr() == a[8].data_ptr()) or real(*a, **kw))
    return into_h


def _node_inputs(device, activation, widths, bias):
    """(activation, [x, w_up, w_down, b_up, b_down], offsets, the output's fp64 gradient) over SIZES'
    groups and three rows past the last one."""
    act = as_activation(activation)
    m, d, E = (2 if act.gated else 1), 24, len(SIZES)
    offsets = torch.tensor([0, *torch.tensor(SIZES).cumsum(0).tolist()], dtype=torch.int32, device=device)
    R = sum(SIZES) + 3  # rows past the last group: zeros out, zero gradients
    total = sum(widths) if widths else None
    if widths:
        w_up, w_down = torch.randn(m * total, d) / d ** 0.5, torch.randn(d, total) / 4
        b_up = torch.randn(m * total) if bias else None
    else:
        w_up, w_down = torch.randn(E, m * 16, d) / d ** 0.5, torch.randn(E, d, 16) / 4
        b_up = torch.randn(E, m * 16) if bias else None
    b_down = torch.randn(E, d) if bias else None
    x, grad = torch.randn(R, d), torch.randn(R, d, dtype=torch.float64)
    return act, [t.to(device) if t is not None else None for t in (x, w_up, w_down, b_up, b_down)], offsets, \
        grad.to(device)


def _assert_node_grads(got, tensors, offsets, act, widths, grad):
    want = _grouped_mlp_grads("torch", *[t.double() if t is not None else None for t in tensors], offsets, act, widths,
                              grad)
    assert torch.all(got[0][sum(SIZES):] == 0) and torch.all(got[1][sum(SIZES):] == 0)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_rel(g, w.float(), torch.float32, what=f"output {i}")


@pytest.mark.parametrize("activation,widths,bias,in_place", [
    ("swiglu", None, False, True), ("gelu_tanh", None, True, True), (GATED_OAI, None, True, False),
    ("swiglu", [8, 16, 0, 24, 8], True, True)],
    ids=["swiglu", "gelu_tanh-bias", "oai-interleaved-bias", "swiglu-heterogeneous-bias"])
def test_the_node_writes_dh_into_hs_buffer_where_their_layouts_agree(triton_only, device, monkeypatch, activation,
                                                                     widths, bias, in_place):
    """FASTMOE_DH_INTO_H=on: dh replaces h ([gate | up]); gpt-oss's interleaved dh (W_up's row order)
    goes to a new buffer, as its layout is not h's. The gradients are the reference's either way."""
    monkeypatch.setattr(grouped_mlp_module, "MLP_BACKWARD", "epilogue")
    monkeypatch.setattr(variants_module, "DH_INTO_H", True)
    into_h = _dh_written_into_h(monkeypatch, node_triton)
    act, tensors, offsets, grad = _node_inputs(device, activation, widths, bias)
    got = _grouped_mlp_grads(triton_only, *tensors, offsets, act, widths, grad)
    assert into_h == [in_place]
    _assert_node_grads(got, tensors, offsets, act, widths, grad)


def test_the_in_place_nodes_retained_graph_refuses_a_second_backward(triton_only, device, monkeypatch):
    """dh overwrote h: a second backward through the same graph fails on h's version, never reads dh as h."""
    monkeypatch.setattr(grouped_mlp_module, "MLP_BACKWARD", "epilogue")
    monkeypatch.setattr(variants_module, "DH_INTO_H", True)
    act, tensors, offsets, _ = _node_inputs(device, "swiglu", None, False)
    leaves = [t.requires_grad_() for t in tensors[:3]]
    y = ops.grouped_mlp(*leaves, offsets, act, backend=triton_only)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("activation,widths,bias,stored,in_place", [
    ("swiglu", (24,) * 5, False, True, True), ("swiglu", (8, 40, 16, 1, 24), True, True, True),
    ("swiglu", (24,) * 5, False, False, False)],
    ids=["swiglu-stored", "swiglu-heterogeneous-bias-stored", "swiglu-recompute"])
def test_the_fused_stored_backward_writes_dh_into_hs_buffer(triton_only, device, monkeypatch, activation, widths, bias,
                                                            stored, in_place):
    """FASTMOE_DH_INTO_H=on on the fused path: the stored backward's dH kernel is h's last reader, so dh
    replaces h where their layouts agree; the recomputing backward reads h again (dW_down) and keeps a
    new buffer (gpt-oss's interleaved dh: the next test). The gradients are the reference's either way."""
    monkeypatch.setattr(fused_module, "FUSED_BACKWARD", "stored" if stored else "recompute")
    monkeypatch.setattr(fused_module, "DOWN_OUTPUT", "rows")
    monkeypatch.setattr(variants_module, "DH_INTO_H", True)
    into_h = _dh_written_into_h(monkeypatch, fused_module)
    _assert_fused_step_equals_the_reference(triton_only, device, activation, widths, bias, None)
    assert into_h == [in_place]


def test_the_in_place_dh_kernel_restores_h_between_autotuning_trials():
    """Each autotuning trial of the in-place launch would read the last trial's dh as h: its autotuner
    restores h (the interpreter offers one config, so this is checked on the autotuner itself); it is
    otherwise the same kernel, configs and key (the same tuning-table entries)."""
    in_place, kernel = dh_module._activation_backward_in_place_kernel, dh_module._activation_backward_kernel
    assert in_place.restore_value == ["h_ptr"] and kernel.restore_value == []
    assert in_place.fn is kernel.fn and in_place.keys == kernel.keys
    assert [c.all_kwargs() for c in in_place.configs] == [c.all_kwargs() for c in kernel.configs]


def test_dh_sharing_hs_storage_other_than_as_h_itself_is_refused():
    h = torch.randn(6, 8)
    assert dh_module._writes_into_h(h, h, False) and not dh_module._writes_into_h(h, torch.empty_like(h), False)
    for dh, interleaved in ((h, True), (h[:, 1:], False), (h.view(8, 6), False)):
        with pytest.raises(ValueError, match="dh shares h's storage"):
            dh_module._writes_into_h(h, dh, interleaved)


def _fused_step(backend, experts, x, plan, weight, grad, fused):
    experts.zero_grad()
    xx, ww = x.clone().requires_grad_(), weight.clone().requires_grad_()
    out = experts.forward_tokens(xx, plan, ww, backend=backend, fused=fused)
    (out.float() * grad.float()).sum().backward()
    return [out, xx.grad, ww.grad] + [p.grad.clone() for p in experts.parameters()]


@pytest.mark.parametrize("activation,widths,bias,mode", [
    ("swiglu", (24,) * 5, False, None), ("gelu", (24,) * 5, True, (0.75, "probs", False)),
    ("swiglu", (8, 40, 16, 1, 24), True, (1.0, "position", True))],
    ids=["swiglu-dropless", "gelu-bias-capacity", "swiglu-heterogeneous-bias-padded"])
@pytest.mark.parametrize("x_rows", ["gather", "permuted"])
def test_the_fused_stored_backward_and_row_output_equal_the_reference(triton_only, device, monkeypatch, activation,
                                                                     widths, bias, mode, x_rows):
    monkeypatch.setattr(fused_module, "FUSED_BACKWARD", "stored")
    monkeypatch.setattr(fused_module, "DOWN_OUTPUT", "rows")
    monkeypatch.setattr(fused_module, "UP_WGRAD_X", x_rows)
    _assert_fused_step_equals_the_reference(triton_only, device, activation, widths, bias, mode)


def _assert_fused_step_equals_the_reference(backend, device, activation, widths, bias, mode):
    """The fused path's step on ``backend`` (skewed routing, 37 tokens, top-3) against the torch
    composition's, output and every gradient."""
    T, d, k = 37, 24, 3
    experts = GroupedExperts(d, widths, activation, bias, device=device)
    idx, weight = routing(T, len(widths), k, device, skew=True)
    plan = plan_for(idx, weight, len(widths), mode)
    x, grad = torch.randn(T, d, device=device), torch.randn(T, d, device=device)
    got = _fused_step(backend, experts, x, plan, weight, grad, True)
    want = _fused_step("torch", experts, x, plan, weight, grad, False)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_rel(g, w, torch.float32, scale=2.0, what=f"output {i}")


@pytest.mark.parametrize("transposed,dh_into_h", [(False, False), (True, False), (False, True)])
def test_the_stored_backward_reads_interleaved_weights_in_place(triton_only, device, monkeypatch, transposed, dh_into_h):
    """gpt-oss: dh is written interleaved like W_up's rows, so dW_up and dx are one GEMM over 2f each
    (with FASTMOE_DH_INTO_H=on too, in a new buffer: its layout is not h's)."""
    monkeypatch.setattr(fused_module, "FUSED_BACKWARD", "stored")
    monkeypatch.setattr(variants_module, "DH_INTO_H", dh_into_h)
    into_h = _dh_written_into_h(monkeypatch, fused_module)
    E, d, f, T, k = 4, 16, 24, 29, 2
    idx, weight = routing(T, E, k, device, skew=True)
    plan = ops.make_plan(idx, E)
    raw_up = torch.randn(E, d, 2 * f) if transposed else torch.randn(E, 2 * f, d)
    raw_down = torch.randn(E, f, d) if transposed else torch.randn(E, d, f)
    b_up, b_down = torch.randn(E, 2 * f), torch.randn(E, d)
    x, g = torch.randn(T, d), torch.randn(T, d)
    results = []
    for name, fused in ((triton_only, True), ("torch", False)):
        params = [(t / d ** 0.5).to(device).requires_grad_() for t in (raw_up, raw_down, b_up, b_down)]
        w_up, w_down = (p.transpose(1, 2) if transposed else p for p in params[:2])
        xx, ww = x.to(device).requires_grad_(), weight.clone().requires_grad_()
        out = ops.moe_mlp(xx, plan, ww, w_up, w_down, GATED_OAI, params[2], params[3], backend=name, fused=fused)
        (out * g.to(device)).sum().backward()
        results.append([out, xx.grad, ww.grad] + [p.grad for p in params])
    assert into_h == [False]
    for i, (a, r) in enumerate(zip(*results)):
        assert_rel(a, r, torch.float32, scale=2.0, what=f"output {i}")


@pytest.mark.parametrize("dtype", low_precision_dtypes())
def test_the_variants_in_low_precision(triton_only, device, monkeypatch, dtype):
    monkeypatch.setattr(fused_module, "FUSED_BACKWARD", "stored")
    monkeypatch.setattr(fused_module, "DOWN_OUTPUT", "rows")
    monkeypatch.setattr(grouped_mlp_module, "MLP_BACKWARD", "epilogue")
    experts = GroupedExperts(32, (32,) * 4, "swiglu", True, device=device, dtype=dtype)
    idx, weight = routing(45, 4, 2, device)
    plan = ops.make_plan(idx, 4)
    x, grad = torch.randn(45, 32, device=device).to(dtype), torch.randn(45, 32, device=device).to(dtype)
    want = _fused_step("torch", experts, x, plan, weight, grad, False)
    for fused in (True, False):  # the stored fused path; the composition as one node
        got = _fused_step(triton_only, experts, x, plan, weight, grad, fused)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_rel(g, w, dtype, scale=2.0, what=f"fused={fused} output {i}")


def test_unknown_variant_names_are_refused(monkeypatch):
    from fastmoe_kernels._variants import FLAGS, flag

    monkeypatch.setenv("FASTMOE_FUSED_BACKWARD", "fast")
    with pytest.raises(ValueError, match="FASTMOE_FUSED_BACKWARD"):
        flag("FASTMOE_FUSED_BACKWARD", *FLAGS["FASTMOE_FUSED_BACKWARD"])
