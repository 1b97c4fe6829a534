"""The decode path (the forward issue): 16-row, narrow-N tiles offered to the forward's grouped GEMMs
where the mean rows per expert is small (``_gemm.DECODE_TILES``, ``FASTMOE_DECODE_TILES``), chosen by
the autotune key, and the layer's small-batch forward with those tiles against the fp64 reference:
1 token, fewer tokens than experts, experts without tokens (their weights NaN: never read),
heterogeneous widths, a shared expert; fp32 and fp16."""
import pytest
import torch

from fastmoe_kernels import ops
from kernel_tests.conftest import low_precision_dtypes
from kernel_tests.helpers import assert_rel, rel_err, routing

triton = pytest.importorskip("triton")
_gemm = pytest.importorskip("fastmoe_kernels.triton_backend._gemm")
from fastmoe_kernels.triton_backend import _common, grouped_gemm, up_projection  # noqa: E402

SM90_SHARED = 232448


@pytest.fixture
def gpu_configs(monkeypatch):
    """The config lists a GPU sees (the interpreter has one tile), on sm_90's shared memory."""
    monkeypatch.setattr(_gemm, "interpreted", lambda: False)
    monkeypatch.setattr(_common, "shared_memory_override", SM90_SHARED)
    return lambda decode=True: _gemm.matmul_configs(decode=decode)


def _bm(configs):
    return sorted({c.kwargs["BM"] for c in configs})


def test_decode_tiles_are_offered_by_rows_per_expert(gpu_configs, monkeypatch):
    configs = gpu_configs()
    decode = [c for c in configs if c.kwargs["BM"] == 16]
    assert len(decode) == len(_gemm.DECODE_TILES)
    prune = _gemm.pruner(grouped_gemm._footprint, "a_ptr")
    bf16 = torch.empty(0, dtype=torch.bfloat16)
    for m_bucket in (1, 4, 16):
        kept = prune(configs, {}, a_ptr=bf16, DUAL_AB=False, M_BUCKET=m_bucket)
        assert 16 in _bm(kept) and 128 in _bm(kept), m_bucket  # the autotuner measures both
        assert all(c in kept for c in decode)  # every decode tile fits sm_90 (the compile record agrees)
    for m_bucket in (32, 1024):
        kept = prune(configs, {}, a_ptr=bf16, DUAL_AB=False, M_BUCKET=m_bucket)
        assert 16 not in _bm(kept) and 128 in _bm(kept), m_bucket
    # The gated up projection (two B tiles per step) keeps them too.
    up = _gemm.pruner(up_projection._footprint, "x_ptr")
    kept = up(configs, {}, x_ptr=bf16, GATED=True, M_BUCKET=1)
    assert any(c.kwargs["BM"] == 16 for c in kept)
    # The kernels that do not ask for them (the dH kernel) never see them; nor does anyone with the flag off.
    assert 16 not in _bm(gpu_configs(decode=False))
    monkeypatch.setattr(_gemm, "DECODE_TILES_ON", False)
    assert 16 not in _bm(gpu_configs())


def test_the_forward_kernels_autotune_over_the_decode_tiles():
    if _common.interpreted():
        # The decorated kernels were built with the interpreter's one tile; the lists are checked above.
        assert _gemm.matmul_configs(decode=True) == _gemm.matmul_configs()
    else:
        for kernel in (grouped_gemm._grouped_matmul_kernel, up_projection._up_projection_kernel):
            assert any(c.kwargs["BM"] == 16 for c in kernel.configs)


def test_the_pruners_fallback_is_the_smallest_config(gpu_configs, monkeypatch):
    """Where nothing fits (a tiny shared memory), the pruner keeps the config of the smallest footprint,
    whatever the list's order (the decode tiles come last)."""
    prune = _gemm.pruner(grouped_gemm._footprint, "a_ptr")
    monkeypatch.setattr(_common, "shared_memory_override", 1024)
    kept = prune(gpu_configs(), {}, a_ptr=torch.empty(0, dtype=torch.bfloat16), DUAL_AB=True, M_BUCKET=1)
    assert len(kept) == 1 and kept[0].kwargs["BM"] * kept[0].kwargs["BK"] <= 16 * 128


DECODE_PIN = dict(BM=16, BN=32, BK=128, GROUP_M=1, num_warps=4, num_stages=4)


@pytest.mark.parametrize("tokens,widths,shared", [(1, None, 0), (3, None, 1), (5, [24, 8, 40, 16, 32, 8], 0)],
                         ids=["1-token", "3-tokens-shared", "5-tokens-heterogeneous"])
@pytest.mark.parametrize("dtype", [torch.float32, *low_precision_dtypes()])
def test_a_small_batch_forward_with_decode_tiles_equals_the_reference(backend, device, monkeypatch, tokens, widths,
                                                                      shared, dtype):
    """Few tokens over 6 experts (most without a token): the weights of experts without rows are NaN,
    and the output is the reference's (they are never read), with the decode tile pinned."""
    if backend != "triton":
        pytest.skip("the decode tiles are the Triton kernels'")
    for kernel in ("_grouped_matmul_kernel", "_up_projection_kernel"):
        monkeypatch.setitem(_common.pinned_configs, kernel, dict(DECODE_PIN))
    import copy
    import itertools

    from fastmoe_kernels import MoELayer

    torch.manual_seed(tokens)
    E, d = 6, 48
    layer = MoELayer(d_model=d, d_ff=widths or 32, num_experts=E, top_k=2, backend="triton",
                     num_shared_experts=shared, shared_d_ff=24 if shared else None).to(device)
    x = torch.randn(tokens, d, device=device)
    with torch.no_grad():
        reference = copy.deepcopy(layer).double()(x.double())
        layer = layer.to(dtype)
        hit = set(layer.router(x.to(dtype)).expert_idx.flatten().tolist())
        assert len(hit) < E
        experts = layer.experts
        starts = [0, *itertools.accumulate(experts.widths)]
        for e in set(range(E)) - hit:  # NaN weights for every expert without a token
            if experts.homogeneous:
                experts.w_up[e] = float("nan")
                experts.w_down[e] = float("nan")
            else:
                lo, hi, total = starts[e], starts[e + 1], starts[-1]
                experts.w_up[lo:hi] = float("nan")
                experts.w_up[total + lo:total + hi] = float("nan")
                experts.w_down[:, lo:hi] = float("nan")
        out = layer(x.to(dtype))
    assert _common.tuned_launches["_up_projection_kernel"]["BM"] == 16
    assert not out.isnan().any()
    assert_rel(out, reference.to(dtype), dtype, scale=2 if dtype != torch.float32 else 1, what="decode forward")


@pytest.fixture
def fp8_kernels(monkeypatch):
    fp8 = pytest.importorskip("fastmoe_kernels.triton_backend.fp8")
    monkeypatch.setattr(fp8, "interpreted", lambda: False)  # the lists a GPU sees
    monkeypatch.setattr(_common, "shared_memory_override", SM90_SHARED)
    return fp8


def test_the_fp8_product_is_offered_its_decode_tiles_by_rows_per_expert(fp8_kernels, monkeypatch):
    fp8 = fp8_kernels
    configs = fp8._matmul_configs()
    assert len([c for c in configs if c.kwargs["BM"] == 16]) == len(fp8.FP8_DECODE_TILES)
    prune = _gemm.pruner(fp8._matmul_footprint, "a_ptr")
    e4m3 = torch.empty(0, dtype=torch.float8_e4m3fn)
    for m_bucket in (1, 16):
        kept = prune(configs, {}, a_ptr=e4m3, GATED=False, M_BUCKET=m_bucket)
        assert 16 in _bm(kept) and 128 in _bm(kept), m_bucket  # measured beside the others
    for m_bucket in (32, 1024):
        assert 16 not in _bm(prune(configs, {}, a_ptr=e4m3, GATED=False, M_BUCKET=m_bucket)), m_bucket
    monkeypatch.setattr(_gemm, "DECODE_TILES_ON", False)
    assert 16 not in _bm(fp8._matmul_configs())


@pytest.mark.parametrize("tokens,shared", [(1, 0), (3, 1)], ids=["1-token", "3-tokens-shared"])
def test_an_fp8_small_batch_forward_reads_only_the_hit_experts(device, tokens, shared):
    """The fp8 layer at 1 and 3 tokens over 6 experts, the weights of experts without a token NaN: the
    Triton kernels (16-row tiles in the interpreter, the decode tiles' row count) equal the emulation."""
    from fastmoe_kernels import MoELayer, backends
    from fastmoe_kernels.fp8 import clear_weight_cache

    if not backends.availability("triton", device)[0]:
        pytest.skip("the triton backend is unavailable here")
    torch.manual_seed(tokens)
    layer = MoELayer(d_model=136, d_ff=160, num_experts=6, top_k=2, fp8_recipe="blockwise", num_shared_experts=shared,
                     shared_d_ff=32 if shared else None).to(device)
    x = torch.randn(tokens, 136, device=device)
    with torch.no_grad():
        hit = set(layer.router(x).expert_idx.flatten().tolist())
        assert len(hit) < 6
        for e in set(range(6)) - hit:
            layer.experts.w_up[e] = float("nan")
            layer.experts.w_down[e] = float("nan")
        clear_weight_cache()
        got = layer(x, backend="triton")
        want = layer(x, backend="torch")
    assert not got.isnan().any()
    # test_fp8's layer tolerance: an fp32 summation difference can move one activation across an e4m3 step
    assert rel_err(got, want) < 5e-3
