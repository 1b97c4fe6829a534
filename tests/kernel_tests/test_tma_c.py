"""The forward's grouped matmul and up projection writing their output tiles by TMA stores
(``FASTMOE_C_STORES=tma``, ``triton_backend/_tma.py``): which outputs take them, and the product against the reference with
poisoned outputs — uneven groups whose last tiles are partial (pointer stores: a box would write the
next expert's rows), an empty expert, rows outside every group (zeros), a width that is not a multiple
of the tile (the descriptor clips the box) — the up projection's act(h) and both halves of h (each
half its own descriptor: a gate box past f must not write the up half), and the layer's forward and
training step (the composition's down projection and input gradient write contiguous rows; the fused
path's scattered down projection keeps pointer stores; both paths' up projections take them)."""
import copy

import pytest
import torch

from fastmoe_kernels import MoELayer
from fastmoe_kernels.ops.grouped_gemm import grouped_gemm_reference
from kernel_tests.conftest import low_precision_dtypes
from kernel_tests.helpers import assert_rel

triton = pytest.importorskip("triton")
from fastmoe_kernels.activations import Activation, apply_activation, as_activation  # noqa: E402
from fastmoe_kernels.triton_backend import _layout, _tma, grouped_gemm, up_projection  # noqa: E402
from fastmoe_kernels.triton_backend.moe_mlp import _matrices  # noqa: E402

SIZES = [37, 0, 90, 5, 16]  # with 16-row tiles (the interpreter's): full and partial tiles, an empty expert


def _spy_launches(monkeypatch, module, kernel, record) -> None:
    """Call ``record(kwargs)`` for each launch of ``kernel`` through ``module.launch``."""
    real = module.launch

    def launch(k, grid, *args, **kwargs):
        if k is kernel:
            record(kwargs)
        return real(k, grid, *args, **kwargs)

    monkeypatch.setattr(module, "launch", launch)


@pytest.fixture
def tma_stores(monkeypatch, device):
    """The flag on, and each grouped-matmul launch's C_TMA."""
    if device.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("no TMA before sm_90")
    monkeypatch.setattr(_tma, "C_STORES", "tma")
    taken = []
    _spy_launches(monkeypatch, grouped_gemm, grouped_gemm._grouped_matmul_kernel,
                  lambda kwargs: taken.append(kwargs["C_TMA"]))
    return taken


class UpLaunches(list):
    """C_TMA per up-projection launch, and H_TMA per launch in ``h``."""

    def __init__(self):
        super().__init__()
        self.h = []

    def clear(self):
        super().clear()
        self.h.clear()


@pytest.fixture
def up_tma_stores(tma_stores, monkeypatch):
    """Each up-projection launch's C_TMA (act(h) by TMA; the flag on through ``tma_stores``), and its
    H_TMA in ``up_tma_stores.h`` (h's halves too: FASTMOE_C_STORES=tma+h)."""
    taken = UpLaunches()

    def record(kwargs):
        taken.append(kwargs["C_TMA"])
        taken.h.append(kwargs["H_TMA"])

    _spy_launches(monkeypatch, up_projection, up_projection._up_projection_kernel, record)
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
def test_the_compositions_forward_with_tma_stores(tma_stores, up_tma_stores, device, dtype):
    layer = _layer(False, device)
    x = torch.randn(53, 40, device=device)
    with torch.no_grad():
        reference = copy.deepcopy(layer).double()(x.double(), backend="torch")
        out = layer.to(dtype)(x.to(dtype))
    assert True in tma_stores  # the down projection's contiguous rows
    assert up_tma_stores == [True]  # act(h) (no h in inference)
    assert_rel(out, reference.to(dtype), dtype, scale=2 if dtype != torch.float32 else 1, what="forward, TMA C")


@pytest.mark.parametrize("fused", [False, True], ids=["composition", "fused"])
@pytest.mark.parametrize("mode", ["tma", "tma+h"])
def test_the_training_step_with_tma_stores(tma_stores, up_tma_stores, monkeypatch, device, fused, mode):
    monkeypatch.setattr(_tma, "C_STORES", mode)
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
    # act(h), and with tma+h h's halves, either path (their rows are the groups' own)
    assert up_tma_stores == [True] and up_tma_stores.h == [mode == "tma+h"]
    assert_rel(xt.grad, xr.grad.float(), torch.float32, what="dx")
    for (name, p), q in zip(layer.named_parameters(), reference.parameters()):
        assert_rel(p.grad, q.grad.float(), torch.float32, what=name)


def _up_reference(x, w, offsets, act, f):
    """h = [x @ W_gateᵀ | x @ W_upᵀ] per expert's rows and act(h), in fp64 (rows outside every group: 0)."""
    m = 2 if act.gated else 1
    h = torch.zeros(x.shape[0], m * f, dtype=torch.float64, device=x.device)
    for e in range(len(offsets) - 1):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        h[lo:hi] = x[lo:hi].double() @ w[e].double().t()
    return apply_activation(h, Activation(act.name, act.alpha, act.limit)), h


@pytest.mark.parametrize("dtype", [torch.float32, *low_precision_dtypes()], ids=str)
@pytest.mark.parametrize("f", [40, 64])
@pytest.mark.parametrize("activation,keep_h", [("swiglu", True), ("swiglu", False), ("gelu", True)])
@pytest.mark.parametrize("mode", ["tma", "tma+h"])
def test_the_up_projection_with_tma_stores_equals_the_reference(up_tma_stores, monkeypatch, device, dtype, f,
                                                                activation, keep_h, mode):
    monkeypatch.setattr(_tma, "C_STORES", mode)
    act = as_activation(activation)
    m = 2 if act.gated else 1
    d = 48
    R = sum(SIZES)
    offsets = torch.tensor([0, *torch.tensor(SIZES).cumsum(0).tolist()], dtype=torch.int32, device=device)
    x = torch.randn(R, d, device=device).to(dtype)
    w = (torch.randn(len(SIZES), m * f, d, device=device) / d ** 0.5).to(dtype)
    out = torch.full((R, f), float("nan"), device=device, dtype=dtype)
    h = torch.full((R, m * f), float("nan"), device=device, dtype=dtype) if keep_h else None
    up_projection.up_projection(x, None, 1, w, _matrices(w, None, "gate", f),
                                _matrices(w, None, "up", f) if act.gated else None, offsets, out,
                                activation=act, h=h)
    assert up_tma_stores == [True] and up_tma_stores.h == [keep_h and mode == "tma+h"]
    want_a, want_h = _up_reference(x, w, offsets, act, f)
    assert_rel(out, want_a.to(dtype), dtype, what=f"act(h), TMA stores, f={f}")
    if keep_h:  # both halves whole: a gate box clipped at f, never written into the up half
        assert_rel(h, want_h.to(dtype), dtype, what=f"h, TMA stores, f={f}")


def test_an_unaligned_half_of_h_keeps_pointer_stores(up_tma_stores, monkeypatch, device):
    """FASTMOE_C_STORES=tma+h, fp32, act(h) in rows 96 bytes apart: with f = 20 the up half of h starts
    80 bytes into each row (a multiple of 16), with f = 18 at 72 bytes, so that launch writes h by
    pointer stores (act(h) still by TMA); both equal the reference."""
    monkeypatch.setattr(_tma, "C_STORES", "tma+h")
    act = as_activation("swiglu")
    for f, h_by_tma in ((20, True), (18, False)):
        up_tma_stores.clear()
        offsets = torch.tensor([0, 17, 17, 40], dtype=torch.int32, device=device)
        x = torch.randn(40, 32, device=device)
        w = torch.randn(3, 2 * f, 32, device=device) / 32 ** 0.5
        out_rows = torch.full((40, 24), float("nan"), device=device)
        out = out_rows[:, :f]
        h = torch.full((40, 2 * f), float("nan"), device=device)
        up_projection.up_projection(x, None, 1, w, _matrices(w, None, "gate", f), _matrices(w, None, "up", f),
                                    offsets, out, activation=act, h=h)
        assert up_tma_stores == [True] and up_tma_stores.h == [h_by_tma], f
        assert torch.isnan(out_rows[:, f:]).all()  # the descriptor clipped every box at f
        want_a, want_h = _up_reference(x, w, offsets, act, f)
        assert_rel(out, want_a.float(), torch.float32, what=f"act(h), f={f}")
        assert_rel(h, want_h.float(), torch.float32, what=f"h, f={f}")


@pytest.mark.parametrize("mode", ["tma", "tma+h"])
def test_boxes_are_clipped_at_the_outputs_width(up_tma_stores, monkeypatch, device, mode):
    """act(h) and a non-gated h, each a view of f = 20 columns of a wider NaN buffer (rows 112 bytes
    apart): with 16-column tiles the last box spans columns 16-31, so a box not clipped at f would write
    the buffer's columns 20-27, which stay NaN."""
    monkeypatch.setattr(_tma, "C_STORES", mode)
    act, f = as_activation("gelu"), 20
    offsets = torch.tensor([0, 19, 19, 48], dtype=torch.int32, device=device)
    x = torch.randn(48, 32, device=device)
    w = torch.randn(3, f, 32, device=device) / 32 ** 0.5
    out_rows = torch.full((48, 28), float("nan"), device=device)
    h_rows = torch.full((48, 28), float("nan"), device=device)
    up_projection.up_projection(x, None, 1, w, _matrices(w, None, "gate", f), None, offsets, out_rows[:, :f],
                                activation=act, h=h_rows[:, :f])
    assert up_tma_stores == [True] and up_tma_stores.h == [mode == "tma+h"]
    assert torch.isnan(out_rows[:, f:]).all() and torch.isnan(h_rows[:, f:]).all()
    want_a, want_h = _up_reference(x, w, offsets, act, f)
    assert_rel(out_rows[:, :f], want_a.float(), torch.float32, what="act(h), clipped boxes")
    assert_rel(h_rows[:, :f], want_h.float(), torch.float32, what="h, clipped boxes")


def test_the_pruner_counts_the_up_projections_staging_tile():
    """One BM×BN tile beside the pipeline's buffers, whatever the stores (the compiler reuses it for
    act(h) and h's halves: the sm_90 record); none with pointer stores."""
    out = torch.empty(4, 4, dtype=torch.bfloat16)
    t = dict(BM=128, BN=128)
    staged = up_projection._staged_output_bytes
    for gated, keep_h in ((True, True), (True, False), (False, True)):
        for h_tma in (False, True):
            assert staged(t, dict(C_TMA=True, H_TMA=h_tma, GATED=gated, STORE_H=keep_h, out_ptr=out)) == 128 * 128 * 2
    assert staged(t, dict(C_TMA=False, H_TMA=False, GATED=True, STORE_H=True, out_ptr=out)) == 0
    # and the kernel's autotuner prunes with it: its estimate grows by the staging tile
    estimate = up_projection._up_projection_kernel.early_config_prune.estimate
    config = triton.Config(dict(BM=128, BN=128, BK=64, GROUP_M=1), num_warps=8, num_stages=3)
    args = dict(x_ptr=out, out_ptr=out, GATED=True, STORE_H=True, C_TMA=False, H_TMA=False)
    assert estimate(config, dict(args, C_TMA=True)) - estimate(config, args) == 128 * 128 * 2
