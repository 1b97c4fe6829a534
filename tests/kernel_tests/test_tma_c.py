"""The forward's grouped matmul writing its output tiles by TMA stores (``FASTMOE_C_STORES=tma``,
``triton_backend/_tma.py``): which outputs take them, and the product against the reference with
poisoned outputs — uneven groups whose last tiles are partial (pointer stores: a box would write the
next expert's rows), an empty expert, rows outside every group (zeros), a width that is not a multiple
of the tile (the descriptor clips the box) — and the layer's forward and training step (the
composition's down projection and input gradient write contiguous rows; the fused path's scattered
down projection keeps pointer stores)."""
import copy

import pytest
import torch

from fastmoe_kernels import MoELayer
from fastmoe_kernels.ops.grouped_gemm import grouped_gemm_reference
from kernel_tests.conftest import low_precision_dtypes
from kernel_tests.helpers import assert_rel

pytest.importorskip("triton")
from fastmoe_kernels.triton_backend import _layout, _tma, grouped_gemm  # noqa: E402

SIZES = [37, 0, 90, 5, 16]  # with 16-row tiles (the interpreter's): full and partial tiles, an empty expert


@pytest.fixture
def tma_stores(monkeypatch, device):
    """The flag on, and each grouped-matmul launch's C_TMA."""
    if device.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("no TMA before sm_90")
    monkeypatch.setattr(_tma, "C_STORES", "tma")
    taken = []
    real = grouped_gemm.launch

    def launch(kernel, grid, *args, **kwargs):
        if kernel is grouped_gemm._grouped_matmul_kernel:
            taken.append(kwargs["C_TMA"])
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(grouped_gemm, "launch", launch)
    return taken


def test_which_outputs_take_tma_stores(tma_stores, device):
    out = torch.empty(64, 40, device=device)
    assert _tma.tma_store_ok(out)
    assert _tma.tma_store_ok(torch.empty(64, 48, device=device)[:, :40])  # rows 192 bytes apart: fine
    assert not _tma.tma_store_ok(torch.empty(64, 3, device=device))  # 12-byte rows: under TMA's 16
    assert not _tma.tma_store_ok(torch.empty(64, 7, device=device)[:, :6])  # row stride 28 bytes
    assert not _tma.tma_store_ok(torch.empty(40, 64, device=device).t())  # column stride 40
    assert not _tma.tma_store_ok(torch.empty(0, 40, device=device))


def test_tma_stores_off_by_default(device):
    assert _tma.C_STORES == "pointer" or pytest.skip("FASTMOE_C_STORES set in this environment")
    assert not _tma.tma_store_ok(torch.empty(64, 40, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, *low_precision_dtypes()], ids=str)
@pytest.mark.parametrize("n", [40, 64])
def test_the_grouped_gemm_with_tma_stores_equals_the_reference(tma_stores, device, dtype, n):
    k = 48
    rows = sum(SIZES) + 7  # rows past the last group: zeros
    offsets = torch.tensor([0, *torch.tensor(SIZES).cumsum(0).tolist()], dtype=torch.int32, device=device)
    a = torch.randn(rows, k, device=device).to(dtype)
    w = (torch.randn(len(SIZES), n, k, device=device) / k ** 0.5).to(dtype)
    want = grouped_gemm_reference(a.double(), w.double(), offsets, True, None, [], "")
    got = grouped_gemm.grouped_gemm_triton(a, w, offsets, True, None, [], "")  # its output comes poisoned
    assert tma_stores == [True]
    assert torch.all(got[sum(SIZES):] == 0)
    assert_rel(got, want.to(dtype), dtype, what=f"grouped gemm, TMA stores, n={n}")


def test_rows_through_an_index_keep_pointer_stores(tma_stores, device):
    offsets = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
    a, w = torch.randn(12, 32, device=device), torch.randn(2, 32, 32, device=device)
    out = torch.full((12, 32), float("nan"), device=device)
    index = torch.randperm(12, device=device).to(torch.int32)
    grouped_gemm.grouped_matmul(a, _layout.stacked(w), True, offsets, out, b=w, n_out=32, c_row_index=index)
    assert tma_stores == [False]
    want = grouped_gemm_reference(a.double(), w.double(), offsets, True, None, [], "")
    assert_rel(out[index.long()], want.float(), torch.float32, what="scattered rows")


def _layer(fused, device, bias=False):
    torch.manual_seed(5)
    return MoELayer(d_model=40, d_ff=24, num_experts=8, top_k=2, fused_experts=fused, bias=bias,
                    backend="triton").to(device)


@pytest.mark.parametrize("dtype", [torch.float32, *low_precision_dtypes()], ids=str)
def test_the_compositions_forward_with_tma_stores(tma_stores, device, dtype):
    layer = _layer(False, device)
    x = torch.randn(53, 40, device=device)
    with torch.no_grad():
        reference = copy.deepcopy(layer).double()(x.double(), backend="torch")
        out = layer.to(dtype)(x.to(dtype))
    assert True in tma_stores  # the down projection's contiguous rows
    assert_rel(out, reference.to(dtype), dtype, scale=2 if dtype != torch.float32 else 1, what="forward, TMA C")


@pytest.mark.parametrize("fused", [False, True], ids=["composition", "fused"])
def test_the_training_step_with_tma_stores(tma_stores, device, fused):
    layer = _layer(fused, device, bias=True)
    x = torch.randn(67, 40, device=device)
    reference = copy.deepcopy(layer).double()
    xr = x.double().requires_grad_()
    reference(xr, backend="torch").square().sum().backward()
    xt = x.clone().requires_grad_()
    layer(xt).square().sum().backward()
    # the composition's down projection and dx write contiguous rows by TMA; the fused path's
    # scattered down projection and dx slots keep pointer stores
    assert (True in tma_stores) == (not fused)
    assert_rel(xt.grad, xr.grad.float(), torch.float32, what="dx")
    for (name, p), q in zip(layer.named_parameters(), reference.parameters()):
        assert_rel(p.grad, q.grad.float(), torch.float32, what=name)
