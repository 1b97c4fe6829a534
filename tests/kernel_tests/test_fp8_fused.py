"""The fp8 quantisers fused into their producers (FASTMOE_FP8_QUANTISERS=fused: ops/fp8_moe_node.py,
triton_backend/fp8_fused.py) against the separate path's kernels, bit for bit: the same roundings in
the same order, so every e4m3 byte, scale, output and gradient is equal. The separate path is tested
against the specification in test_fp8.py. Outputs are poisoned (NaN) before the kernels write them."""
import dataclasses

import pytest
import torch

from fastmoe_kernels import MoELayer, backends
from fastmoe_kernels._alloc import set_poison
from fastmoe_kernels.activations import Activation, as_activation
from fastmoe_kernels.ops import fp8_moe_node
from fastmoe_kernels.ops.permute import unpermute_backward_reference

from .helpers import ON_GPU, plan_for, rel_err, routing

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not backends.availability("triton", _DEVICE)[0],
                                reason="the triton backend is unavailable here")

# Gated with gate and up side by side (f a multiple of 128, as the node requires there), interleaved
# (gpt-oss's clamped SwiGLU with its up offset, and a plain one at an f that is no multiple of 128), and
# ungated (transcendental, exact).
_CASES = [(as_activation("swiglu"), 256), (dataclasses.replace(as_activation("swiglu_oai"), interleaved=True), 160),
          (Activation("swiglu", interleaved=True), 200), (as_activation("gelu"), 200), (as_activation("relu2"), 136)]
_IDS = ["swiglu", "swiglu_oai", "swiglu_interleaved", "gelu", "relu2"]
# dropless; capacity with padding rows inside the groups; capacity packed (rows after the last group)
_PLANS = [None, (1.0, "probs", True), (0.75, "position", False)]
_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# (plan, dtype) pairs: every plan and every dtype, not every pair (interpreter time)
_PLAN_DTYPES = [(None, torch.float32), (_PLANS[1], torch.float16), (_PLANS[2], torch.float32)] + (
    [(None, torch.bfloat16), (_PLANS[2], torch.bfloat16)] if ON_GPU else [])
_PLAN_DTYPE_IDS = ["dropless-fp32", "padded-fp16", "packed-fp32"] + (
    ["dropless-bf16", "packed-bf16"] if ON_GPU else [])


def _kernels():
    from fastmoe_kernels.triton_backend import fp8, fp8_fused

    return fp8, fp8_fused


@pytest.fixture(autouse=True)
def poisoned():
    set_poison(True)
    yield
    set_poison(None)


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _assert_equal(got, want, what):
    assert got.shape == want.shape, what
    assert torch.equal(_bits(got), _bits(want)), what


def _plan(T, E, k, mode, device):
    idx, weight = routing(T, E, k, device, skew=True)
    return plan_for(idx, weight, E, mode), weight


def _written_tiles(plan):
    """The column quantiser's tiles that hold rows (the rest are never written nor read)."""
    sizes = torch.diff(plan.offsets.long()).tolist()
    return sum(-(-n // 128) for n in sizes)


@pytest.mark.parametrize("dtype", _DTYPES)
@pytest.mark.parametrize("mode", _PLANS)
def test_weighted_quantisers_read_the_combines_gradient(device, dtype, mode):
    fp8, _ = _kernels()
    T, E, k, d = 70, 4, 2, 200
    plan, weight = _plan(T, E, k, mode, device)
    g = torch.randn(T, d, device=device).to(dtype)
    y = torch.zeros(plan.num_rows, d, device=device, dtype=dtype)
    grad_y, _ = unpermute_backward_reference(g, y, plan.row, weight, plan.assignment)  # what the combine writes
    w = weight.reshape(-1)
    rows = fp8.quantize_rows(g, plan.assignment, div=k, row_weight=w)
    for got, want, what in zip(rows, fp8.quantize_rows(grad_y), ("rows e4m3", "row scales")):
        _assert_equal(got, want, what)
    n = _written_tiles(plan)
    cols = fp8.quantize_cols(g, plan.offsets, plan.num_rows, plan.assignment, div=k, row_weight=w)
    want_q, want_s = fp8.quantize_cols(grad_y, plan.offsets, plan.num_rows)
    _assert_equal(cols[0][:, : 128 * n], want_q[:, : 128 * n], "column tiles e4m3")
    _assert_equal(cols[1][:n], want_s[:n], "column scales")


def _operands(act, f, d, E, mode, dtype, device, T=90, k=2):
    fp8, _ = _kernels()
    plan, weight = _plan(T, E, k, mode, device)
    x = torch.randn(T, d, device=device).to(dtype)
    w_up = (torch.randn(E, f * (2 if act.gated else 1), d, device=device) / d ** 0.5 * 3).to(dtype)
    w_down = (torch.randn(E, d, f, device=device) / f ** 0.5).to(dtype)
    with torch.no_grad():
        w_up[:, :, : d // 2] *= 5  # weight blocks of different scales
    return fp8, plan, weight, x, w_up, w_down


@pytest.mark.parametrize("mode,dtype", _PLAN_DTYPES, ids=_PLAN_DTYPE_IDS)
@pytest.mark.parametrize("act,f", _CASES, ids=_IDS)
def test_up_projection_quantises_act_h_as_the_separate_quantiser(device, act, f, mode, dtype):
    fp8, plan, _, x, w_up, _ = _operands(act, f, 136, 4, mode, dtype, device)
    offsets = plan.offsets
    x_q, x_s = fp8.quantize_rows(x)
    w_q, _, w_s = fp8.quantize_weight_layouts(w_up, transposed=False)
    h, q, s = _kernels()[1].up_projection_quantised(x_q, x_s, w_q, w_s, offsets, plan.src, act, dtype)
    want_h = fp8.fp8_matmul(x_q, x_s, w_q, w_s, offsets, plan.num_rows, dtype, a_row_index=plan.src)
    _assert_equal(h, want_h, "h")
    want_q, want_s = fp8.quantize_rows(want_h, activation=act)
    _assert_equal(q, want_q, "act(h) e4m3")
    _assert_equal(s, want_s, "act(h) scales")


def _pin_dgrad_parts(monkeypatch, parts):
    """The dgrad's epilogue in ``parts`` column parts: 8 is the interpreter's config, 4 one a GPU offers."""
    import triton

    kernel = _kernels()[1]._fp8_dgrad_quant_kernel
    monkeypatch.setattr(kernel, "configs", [triton.Config(dict(GROUP_M=2, PARTS=parts), num_warps=1)])
    monkeypatch.setattr(kernel, "cache", {})


# Every (plan, dtype) pair in 8 parts, the dropless fp32 one in 4 too.
_DGRAD_PARAMS = [(m, d, 8) for m, d in _PLAN_DTYPES] + [(None, torch.float32, 4)]
_DGRAD_IDS = [f"{i}-8parts" for i in _PLAN_DTYPE_IDS] + ["dropless-fp32-4parts"]


@pytest.mark.parametrize("mode,dtype,parts", _DGRAD_PARAMS, ids=_DGRAD_IDS)
@pytest.mark.parametrize("act,f", _CASES, ids=_IDS)
def test_dgrad_quantises_dh_by_rows_and_columns_as_the_separate_quantisers(device, monkeypatch, act, f, mode, dtype,
                                                                           parts):
    if not ON_GPU:  # (on a GPU the autotuner's configs run: both part counts among them)
        _pin_dgrad_parts(monkeypatch, parts)
    fp8, plan, _, _, _, w_down = _operands(act, f, 136, 4, mode, dtype, device)
    R, offsets = plan.num_rows, plan.offsets
    h = (torch.randn(R, f * (2 if act.gated else 1), device=device) * 4).to(dtype)  # past swiglu_oai's clamps
    g = torch.randn(R, 136, device=device).to(dtype)
    g[torch.randperm(R)[:3]] *= 50  # rows of very different scales
    g_q, g_s = fp8.quantize_rows(g)
    _, w_qt, w_s = fp8.quantize_weight_layouts(w_down, forward=False)
    got = _kernels()[1].dgrad_quantised(g_q, g_s, w_qt, w_s, offsets, h, act)
    dh = fp8.fp8_matmul(g_q, g_s, w_qt, w_s, offsets, R, dtype, b_scale_transposed=True, grad_of=(h, act))
    rows_q, rows_s = fp8.quantize_rows(dh)
    cols_q, cols_s = fp8.quantize_cols(dh, offsets, R)
    n = _written_tiles(plan)
    _assert_equal(got[0], rows_q, "dh by rows, e4m3")
    _assert_equal(got[1], rows_s, "dh by rows, scales")
    _assert_equal(got[2][:, : 128 * n], cols_q[:, : 128 * n], "dh by columns, e4m3")
    _assert_equal(got[3][:n], cols_s[:n], "dh by columns, scales")


def test_the_dgrad_refuses_gate_and_up_halves_that_straddle_a_scaling_tile(device):
    fp8, plan, _, _, _, w_down = _operands(as_activation("swiglu"), 200, 136, 4, None, torch.float32, device)
    g_q, g_s = fp8.quantize_rows(torch.randn(plan.num_rows, 136, device=device))
    _, w_qt, w_s = fp8.quantize_weight_layouts(w_down, forward=False)
    h = torch.randn(plan.num_rows, 400, device=device)
    with pytest.raises(ValueError, match="multiple of 128"):
        _kernels()[1].dgrad_quantised(g_q, g_s, w_qt, w_s, plan.offsets, h, as_activation("swiglu"))


def _step(quantisers, backend, monkeypatch, seed=3, T=40, **kw):
    monkeypatch.setattr(fp8_moe_node, "QUANTISERS", quantisers)
    torch.manual_seed(seed)
    layer = MoELayer(d_model=136, num_experts=4, top_k=2, fp8_recipe="blockwise", backend=backend, **kw)
    x = torch.randn(T, 136, requires_grad=True)
    y = layer(x)
    y.backward(torch.randn_like(y))
    return [y, x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("kw", [dict(activation="swiglu", d_ff=256),
                                dict(activation="swiglu_oai", d_ff=256, capacity_factor=1.0, pad_to_capacity=True),
                                dict(activation="relu2", d_ff=136, capacity_factor=0.75, drop_policy="position")],
                         ids=["swiglu", "swiglu_oai-padded", "relu2-packed"])
def test_the_layers_step_is_the_separate_paths_bit_for_bit(device, monkeypatch, triton_launches, kw):
    separate = _step("separate", "triton", monkeypatch, **kw)
    triton_launches.clear()
    fused = _step("fused", "triton", monkeypatch, **kw)
    assert {"_fp8_up_quant_kernel", "_fp8_dgrad_quant_kernel"} <= set(triton_launches)  # the node ran
    for i, (a, b) in enumerate(zip(fused, separate)):
        assert a is not None and torch.isfinite(a).all(), i
        _assert_equal(a, b, f"output/gradient {i}")


def test_the_node_on_the_torch_backend_is_the_emulation(monkeypatch):
    # The node's reference composes the separate ops' references: the same numbers.
    for a, b in zip(_step("fused", "torch", monkeypatch, d_ff=256), _step("separate", "torch", monkeypatch, d_ff=256)):
        _assert_equal(a, b, "torch backend")


def test_a_fused_step_launches_no_pass_over_h_dh_or_the_weighted_gradient(monkeypatch, triton_launches):
    """The expert launches of one fp8 training step, in order (the weights' quantiser aside). Separate:
    h, w·g and dh each pass through a quantiser that reads them back (and w·g is written by a gather)."""
    kw = dict(activation="swiglu", d_ff=256)
    _step("fused", "triton", monkeypatch, **kw)
    experts = [n for n in triton_launches if n.startswith(("_quantize", "_fp8", "_gather", "_combine", "_rowdot"))
               and n != "_quantize_blocks_kernel"]  # (a new layer's weights: quantised once, tested elsewhere)
    assert experts == [
        "_quantize_rows_kernel", "_fp8_up_quant_kernel", "_fp8_matmul_kernel", "_combine_kernel",  # forward
        "_rowdot_kernel", "_quantize_rows_kernel", "_fp8_dgrad_quant_kernel", "_quantize_cols_kernel",
        "_quantize_cols_kernel", "_fp8_wgrad_kernel", "_fp8_matmul_kernel", "_quantize_cols_kernel",
        "_fp8_wgrad_kernel", "_combine_kernel"]
    triton_launches.clear()
    _step("separate", "triton", monkeypatch, **kw)
    assert triton_launches.count("_quantize_rows_kernel") == 4 and "_gather_kernel" in triton_launches


@pytest.mark.parametrize("kw", [dict(activation="swiglu", d_ff=200), dict(activation="swiglu", d_ff=256, bias=True)],
                         ids=["gated-f-not-128-aligned", "bias"])
def test_where_the_node_does_not_apply_the_separate_path_runs(monkeypatch, triton_launches, kw):
    _step("fused", "triton", monkeypatch, T=12, **kw)
    assert "_fp8_up_quant_kernel" not in triton_launches and "_fp8_matmul_kernel" in triton_launches


# ---- FASTMOE_FP8_QUANTISERS=fused-folded: the routing weight in the dgrad's row scales (a recipe change) ----
def _dequantised_columns(qt, qt_s, n_tiles):
    """The column tiles as the wgrad reads them, dequantised: [128·tiles, H]."""
    values = qt[:, : 128 * n_tiles].float().t().unflatten(0, (n_tiles, 128))  # [tiles, 128, H]
    return (values * qt_s[:n_tiles, None, :]).flatten(0, 1)


@pytest.mark.parametrize("mode", _PLANS, ids=["dropless", "padded", "packed"])
@pytest.mark.parametrize("act,f", _CASES, ids=_IDS)
def test_the_folded_dgrad_equals_its_specification(device, act, f, mode):
    """dh from the tokens' quantised gradient, each row's product times its routing weight, against the
    specification (fp8.grouped_gemm_fp8_folded_dgrad_reference, then the activation's backward), quantised
    by rows and by columns: equal as the GEMMs read them, up to the fp32 summation order (an element on an
    e4m3 rounding boundary can land one step away)."""
    from fastmoe_kernels import fp8 as spec
    from fastmoe_kernels.activations import apply_activation

    fp8, plan, weight, _, _, w_down = _operands(act, f, 136, 4, mode, torch.float32, device)
    T, k = plan.row.shape
    R, offsets = plan.num_rows, plan.offsets
    h = torch.randn(R, f * (2 if act.gated else 1), device=device) * 4
    g = torch.randn(T, 136, device=device)
    g[torch.randperm(T)[:3]] *= 50
    weights = weight.reshape(-1).contiguous()
    g_q, g_s = fp8.quantize_rows(g)
    _, w_qt, w_s = fp8.quantize_weight_layouts(w_down, forward=False)
    got = _kernels()[1].dgrad_quantised(g_q, g_s, w_qt, w_s, offsets, h, act, folded=(plan.assignment, k, weights))
    valid = plan.assignment >= 0
    row_weight = torch.where(valid, weights[torch.where(valid, plan.assignment, 0).long()], 0.0)
    grad_a = spec.grouped_gemm_fp8_folded_dgrad_reference(g, plan.src, row_weight, w_down, offsets, torch.float32)
    _, vjp = torch.func.vjp(lambda t: apply_activation(t, act), h)
    (dh,) = vjp(grad_a)
    rows_q, rows_s = fp8.quantize_rows(dh)
    cols_q, cols_s = fp8.quantize_cols(dh, offsets, R)
    n = _written_tiles(plan)
    assert rel_err(spec.dequantize_tiles(got[0], got[1]), spec.dequantize_tiles(rows_q, rows_s)) < 2e-3
    assert rel_err(_dequantised_columns(got[2], got[3], n), _dequantised_columns(cols_q, cols_s, n)) < 2e-3


def test_the_folded_step_equals_its_emulation_and_keeps_the_rest_of_the_recipe(monkeypatch, triton_launches):
    """The layer with the fold on the triton backend against the same node's torch emulation; the forward,
    the routing weights' gradient and dW_down (whose operands the fold leaves alone) are the separate
    path's bit for bit."""
    kw = dict(activation="swiglu", d_ff=256)
    fused = _kernels()[1]
    calls = []
    real = fused.dgrad_quantised
    monkeypatch.setattr(fused, "dgrad_quantised", lambda *a, **k: calls.append(k.get("folded")) or real(*a, **k))
    folded = _step("fused-folded", "triton", monkeypatch, **kw)
    assert len(calls) == 1 and calls[0] is not None  # the folded dgrad ran
    emulated = _step("fused-folded", "torch", monkeypatch, **kw)
    separate = _step("separate", "triton", monkeypatch, **kw)
    names = ["out", "dx", "router", "w_up", "w_down"]
    assert len(folded) == len(names)
    for name, a, b, c in zip(names, folded, emulated, separate):
        assert rel_err(a, b) < 5e-3, name  # test_fp8's layer tolerance
        if name in ("out", "router", "w_down"):
            _assert_equal(a, c, name)
