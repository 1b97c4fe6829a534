"""The fp8 weight cache (triton_backend/fp8_weight_cache.py): a weight is quantised once per version,
both layouts in one pass when a backward follows; it never serves a stale weight after an optimizer
step, copy_, load_state_dict, an in-place edit of a view or ``param.data = …``; it frees what it holds."""
import gc

import pytest
import torch

from fastmoe_kernels import backends
from fastmoe_kernels.ops import grouped_gemm_fp8

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not backends.availability("triton", _DEVICE)[0],
                                reason="the triton backend is unavailable here")
SIZES = [7, 0, 13]


@pytest.fixture
def cache(monkeypatch):
    from fastmoe_kernels.triton_backend import fp8_weight_cache

    monkeypatch.setattr(fp8_weight_cache, "ENABLED", True)
    fp8_weight_cache.clear()
    yield fp8_weight_cache
    fp8_weight_cache.clear()


def _inputs(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(sum(SIZES), 48, device=_DEVICE, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(len(SIZES), 40, 48, device=_DEVICE))
    offsets = torch.tensor([0, *torch.tensor(SIZES).cumsum(0).tolist()], dtype=torch.int32, device=_DEVICE)
    return x, w, offsets


def _uncached(monkeypatch, cache, x, w, offsets, grad=None):
    """The product (and gradients) with the cache off: the reference the cached path must equal."""
    monkeypatch.setattr(cache, "ENABLED", False)
    try:
        xx, ww = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        y = grouped_gemm_fp8(xx, ww, offsets, backend="triton")
        if grad is None:
            return y.detach(), None, None
        y.backward(grad)
        return y.detach(), xx.grad, ww.grad
    finally:
        monkeypatch.setattr(cache, "ENABLED", True)


def test_a_training_step_quantises_the_weight_once_and_the_next_micro_batch_not_at_all(cache, monkeypatch):
    x, w, offsets = _inputs()
    grad = torch.randn(x.shape[0], 40, device=_DEVICE)
    want = _uncached(monkeypatch, cache, x, w, offsets, grad)
    before = cache.quantisations
    for _ in range(2):  # two micro-batches, weights unchanged
        x.grad = w.grad = None
        y = grouped_gemm_fp8(x, w, offsets, backend="triton")
        y.backward(grad)
        assert torch.equal(y, want[0]) and torch.equal(x.grad, want[1]) and torch.equal(w.grad, want[2])
    assert cache.quantisations - before == 1  # one pass wrote both layouts, in the first forward
    assert cache.cached_bytes() == 2 * w.numel() + 4 * len(SIZES) * 1 * 1  # e4m3 ×2 layouts, one 128² block each
    from fastmoe_kernels import fp8

    assert fp8.weight_cache_bytes() == cache.cached_bytes()
    fp8.refresh_weight_cache(w)
    assert fp8.weight_cache_bytes() == 0


@pytest.mark.parametrize("update", ["optimizer", "copy_", "load_state_dict", "view_edit", "data"])
def test_an_updated_weight_is_quantised_again(cache, monkeypatch, update):
    x, w, offsets = _inputs(1)
    grouped_gemm_fp8(x, w, offsets, backend="triton").sum().backward()
    with torch.no_grad():
        if update == "optimizer":
            torch.optim.SGD([w], lr=0.5).step()
        elif update == "copy_":
            w.copy_(torch.randn_like(w))
        elif update == "load_state_dict":
            module = torch.nn.Module()
            module.w = w
            module.load_state_dict({"w": torch.randn_like(w)})
        elif update == "view_edit":
            w[2].mul_(-3.0)  # a view: its version is the weight's
        else:
            w.data = torch.randn_like(w)  # new memory, same Parameter
    before = cache.quantisations
    got = grouped_gemm_fp8(x, w, offsets, backend="triton")
    assert cache.quantisations == before + 1
    assert torch.equal(got, _uncached(monkeypatch, cache, x, w, offsets)[0])


def test_inference_keeps_one_layout_and_a_backward_adds_the_other(cache, monkeypatch):
    x, w, offsets = _inputs(2)
    with torch.no_grad():
        grouped_gemm_fp8(x, w, offsets, backend="triton")
    entry = next(iter(cache._entries.values()))
    assert entry.q is not None and entry.qt is None
    before = cache.quantisations
    with torch.no_grad():
        grouped_gemm_fp8(x, w, offsets, backend="triton")
    assert cache.quantisations == before  # served
    grad = torch.randn(x.shape[0], 40, device=_DEVICE)
    y = grouped_gemm_fp8(x, w, offsets, backend="triton")
    y.backward(grad)
    assert cache.quantisations == before + 1  # the dgrad's layout (the forward's rewritten beside it)
    want = _uncached(monkeypatch, cache, x, w, offsets, grad)
    assert torch.equal(x.grad, want[1]) and torch.equal(w.grad, want[2])


def test_refresh_clear_and_a_freed_weight_drop_their_entries(cache):
    x, w, offsets = _inputs(3)
    with torch.no_grad():
        grouped_gemm_fp8(x, w, offsets, backend="triton")
        assert cache.cached_bytes() > 0
        cache.refresh(w)
        assert cache.cached_bytes() == 0
        before = cache.quantisations
        grouped_gemm_fp8(x, w, offsets, backend="triton")
        assert cache.quantisations == before + 1
        cache.clear()
        assert not cache._entries
        grouped_gemm_fp8(x, w, offsets, backend="triton")
    del w
    gc.collect()
    assert not cache._entries and cache.cached_bytes() == 0


def test_off_quantises_on_every_call(cache, monkeypatch):
    monkeypatch.setattr(cache, "ENABLED", False)
    x, w, offsets = _inputs(4)
    with torch.no_grad():
        grouped_gemm_fp8(x, w, offsets, backend="triton")
        grouped_gemm_fp8(x, w, offsets, backend="triton")
    assert not cache._entries


def test_a_layers_second_micro_batch_launches_no_weight_quantiser(cache, triton_launches):
    """The quantiser launches of an fp8 training step, counted: the first step quantises each of the
    two expert weights once (both layouts in one launch), the next micro-batch none; the activations
    and gradients are quantised on every step."""
    from fastmoe_kernels import MoELayer

    torch.manual_seed(5)
    layer = MoELayer(d_model=64, d_ff=32, num_experts=4, top_k=2, fp8_recipe="blockwise", backend="triton").train()
    x = torch.randn(24, 64, requires_grad=True)
    per_step = []
    for _ in range(2):
        triton_launches.clear()
        layer(x).square().sum().backward()
        per_step.append(triton_launches.count("_quantize_blocks_kernel"))
    assert per_step == [2, 0]
    assert triton_launches.count("_quantize_rows_kernel") >= 2  # the activations' and gradients' quantisers still run
