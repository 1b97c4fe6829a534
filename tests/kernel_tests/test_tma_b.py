"""The forward's weights through TMA descriptors (``FASTMOE_B_LOADS=tma``, ``triton_backend/_tma.py``):
which layouts take them, and the layer's forward and training step with them (both forward GEMM
kernels: the fused path's up projection and scattered down projection, the composition's) against the
fp64 reference — odd widths, uneven loads, experts without tokens whose weights are NaN (a box past an
expert's rows must read zeros, not the next expert), fp32 and fp16."""
import copy

import pytest
import torch

from fastmoe_kernels import MoELayer
from kernel_tests.conftest import low_precision_dtypes
from kernel_tests.helpers import assert_rel

pytest.importorskip("triton")
from fastmoe_kernels.triton_backend import _layout, _tma, grouped_gemm, up_projection  # noqa: E402


@pytest.fixture
def tma_on(monkeypatch):
    """The flag on, and a record of which launches took the descriptor path."""
    monkeypatch.setattr(_tma, "B_LOADS", "tma")
    taken = []

    def recording(module):
        real = module.tma_args

        def tma_args(stack):
            args = real(stack)
            taken.append((module.__name__.rsplit(".", 1)[-1], args["B_TMA"]))
            return args
        monkeypatch.setattr(module, "tma_args", tma_args)

    recording(grouped_gemm)
    recording(up_projection)
    return taken


def test_which_layouts_take_descriptors(tma_on, device):
    if device.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("no TMA before sm_90")
    w = torch.empty(4, 48, 40, device=device)
    assert _tma.tma_stack(w, _layout.stacked(w), True) == _layout.Stack(4, 48, 40, 48 * 40, 40, 0)
    assert _tma.tma_stack(w, _layout.stacked(w, 24, 24), True).row_start == 24  # the up half of [gate | up]
    assert _tma.tma_stack(w, _layout.stacked(w), False) is None  # only B read transposed (the forward's)
    assert _tma.tma_stack(w, _layout.stacked(w, 1, 24, row_step=2), True) is None  # gpt-oss's interleaved rows
    odd = torch.empty(4, 48, 7, device=device)  # 28-byte rows: not a multiple of 16
    assert _tma.tma_stack(odd, _layout.stacked(odd), True) is None
    packed = torch.empty(30, 40, device=device)
    assert _tma.tma_stack(packed, _layout.packed_rows(packed, [10, 20]), True) is None
    strided = torch.empty(4, 48, 80, device=device)[:, :, :40]  # unit column stride, rows 80 apart: fine
    assert _tma.tma_stack(strided, _layout.stacked(strided), True).stride_r == 80
    transposed = torch.empty(4, 40, 48, device=device).transpose(1, 2)  # column stride 48: pointer loads
    assert _tma.tma_stack(transposed, _layout.stacked(transposed), True) is None


def _layer(fused, dtype, device, bias=False):
    torch.manual_seed(3)
    layer = MoELayer(d_model=40, d_ff=24, num_experts=8, top_k=2, fused_experts=fused, bias=bias,
                     backend="triton").to(device)
    with torch.no_grad():
        layer.router.weight[6:] = -1.0  # with positive inputs experts 6 and 7 never get a token
    return layer, dtype


def _nan_unhit(layer, x):
    hit = set(layer.router(x).expert_idx.flatten().tolist())
    for e in set(range(layer.config.num_experts)) - hit:
        layer.experts.w_up[e] = float("nan")
        layer.experts.w_down[e] = float("nan")
    return hit


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "composition"])
@pytest.mark.parametrize("dtype", [torch.float32, *low_precision_dtypes()], ids=str)
def test_forward_with_descriptors(tma_on, device, fused, dtype):
    layer, _ = _layer(fused, dtype, device)
    x = torch.randn(37, 40, device=device).abs()  # uneven loads over experts 0-5, none for 6 and 7
    with torch.no_grad():
        reference = copy.deepcopy(layer).double()(x.double())
        layer = layer.to(dtype)
        hit = _nan_unhit(layer, x.to(dtype))
        assert hit <= set(range(6))
        out = layer(x.to(dtype))
    assert set(tma_on) == {("grouped_gemm", True), ("up_projection", True)}
    assert not out.isnan().any()
    assert_rel(out, reference.to(dtype), dtype, scale=2 if dtype != torch.float32 else 1, what="forward, TMA B")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "composition"])
def test_training_step_with_descriptors(tma_on, device, fused):
    layer, dtype = _layer(fused, torch.float32, device, bias=True)
    x = torch.randn(67, 40, device=device)
    reference = copy.deepcopy(layer).double()
    xr = x.double().requires_grad_()
    reference(xr, backend="torch").square().sum().backward()
    xt = x.clone().requires_grad_()
    layer(xt).square().sum().backward()
    assert ("up_projection", True) in tma_on and ("grouped_gemm", True) in tma_on
    assert_rel(xt.grad, xr.grad.float(), dtype, what="dx")
    for (name, p), q in zip(layer.named_parameters(), reference.parameters()):
        assert_rel(p.grad, q.grad.float(), dtype, what=name)
