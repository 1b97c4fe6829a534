"""The fp8 blockwise recipe's specification (fastmoe_kernels/fp8.py): tile and block scales, e4m3
rounding bounds, ragged edges, and the grouped GEMM's forward, dgrad and wgrad against the recipe
written out by hand, with uneven and empty groups."""
import pytest
import torch

from fastmoe_kernels import fp8

E4M3_REL = 2.0 ** -4      # 3 mantissa bits: half an ulp of a normal number, relative
E4M3_SUB = 2.0 ** -10     # half the smallest subnormal (2^-9), in units of the scale


def _bound(x, scale_per_elem):
    return torch.maximum(E4M3_REL * x.abs(), E4M3_SUB * scale_per_elem)


@pytest.mark.parametrize("shape", [(5, 128), (3, 200), (7, 1), (4, 384)])
def test_row_tiles_scale_by_their_own_maximum(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g) * torch.logspace(-3, 3, shape[0])[:, None]
    q, scale = fp8.quantize_tiles(x)
    assert q.dtype == fp8.FP8 and q.shape == x.shape and scale.shape == (shape[0], -(-shape[1] // 128))
    tiles = torch.nn.functional.pad(x, (0, scale.shape[1] * 128 - shape[1])).unflatten(-1, (scale.shape[1], 128))
    torch.testing.assert_close(scale, tiles.abs().amax(-1) / 448.0)
    back = fp8.dequantize_tiles(q, scale)
    per_elem = scale.repeat_interleave(128, dim=-1)[:, : shape[1]]
    assert ((back - x).abs() <= _bound(x, per_elem)).all()
    # Each tile's largest element maps to ±448 and comes back to within an fp32 rounding of the
    # scale's division, and quantising again changes nothing beyond that.
    top = x.abs().argmax(-1) if shape[1] <= 128 else None
    if top is not None:
        torch.testing.assert_close(back.gather(1, top[:, None]), x.gather(1, top[:, None]), rtol=1e-6, atol=0)
    torch.testing.assert_close(fp8.fake_quant_rows(back), back, rtol=1e-6, atol=0)


def test_zero_tiles_and_non_finite_free_scales():
    x = torch.zeros(3, 256)
    x[1, 130] = 5.0
    q, scale = fp8.quantize_tiles(x)
    assert torch.equal(scale, torch.tensor([[1.0, 1.0], [1.0, 5.0 / 448.0], [1.0, 1.0]]))
    assert torch.equal(fp8.dequantize_tiles(q, scale), x)
    with pytest.raises(TypeError, match="`x` must be floating point"):
        fp8.quantize_tiles(torch.ones(2, 2, dtype=torch.int32))


@pytest.mark.parametrize("shape", [(2, 128, 256), (3, 200, 72), (1, 5, 300)])
def test_weight_blocks_scale_by_their_own_maximum(shape):
    g = torch.Generator().manual_seed(shape[1])
    w = torch.randn(*shape, generator=g)
    q, scale = fp8.quantize_blocks(w)
    nb, kb = -(-shape[1] // 128), -(-shape[2] // 128)
    assert q.dtype == fp8.FP8 and q.shape == w.shape and scale.shape == (shape[0], nb, kb)
    for e in range(shape[0]):
        for i in range(nb):
            for j in range(kb):
                block = w[e, i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
                assert scale[e, i, j] == block.abs().max() / 448.0
    back = fp8.dequantize_blocks(q, scale)
    per_elem = scale.repeat_interleave(128, -2).repeat_interleave(128, -1)[:, : shape[1], : shape[2]]
    assert ((back - w).abs() <= _bound(w, per_elem)).all()
    # Changing one block changes only that block's scale.
    w2 = w.clone()
    w2[0, 0, 0] = 1e4
    _, scale2 = fp8.quantize_blocks(w2)
    changed = (scale2 != scale).nonzero().tolist()
    assert changed == [[0, 0, 0]]


def _groups(counts, total=None):
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    rows = total if total is not None else int(offsets[-1])
    return offsets, rows


def _by_hand(x, w, offsets, grad):
    """The recipe written out: what the fp8 kernels must compute."""
    b = offsets.tolist()
    wq = fp8.fake_quant_weight(w)
    y = torch.zeros(x.shape[0], w.shape[1])
    gx = torch.zeros(x.shape)
    gw = torch.zeros(w.shape)
    for e in range(w.shape[0]):
        lo, hi = b[e], b[e + 1]
        if hi > lo:
            y[lo:hi] = fp8.fake_quant_rows(x[lo:hi]) @ wq[e].t()
            gx[lo:hi] = fp8.fake_quant_rows(grad[lo:hi]) @ wq[e]
            gw[e] = fp8.fake_quant_cols(grad[lo:hi]).t() @ fp8.fake_quant_cols(x[lo:hi])
    return y, gx, gw


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("counts", [[130, 0, 7, 300], [64], [0, 0, 1]])
def test_grouped_gemm_fp8_equals_the_recipe_forward_and_backward(seed, counts):
    g = torch.Generator().manual_seed(seed)
    E, N, K = len(counts), 96, 200
    offsets, R = _groups(counts)
    R += 3  # rows after the last group: zeros out, zero gradient
    x = torch.randn(R, K, generator=g).requires_grad_()
    w = (torch.randn(E, N, K, generator=g) * 0.05).requires_grad_()
    grad = torch.randn(R, N, generator=g)
    y = fp8.grouped_gemm_fp8_reference(x, w, offsets)
    y.backward(grad)
    ref_y, ref_gx, ref_gw = _by_hand(x.detach(), w.detach(), offsets, grad)
    torch.testing.assert_close(y, ref_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, ref_gx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, ref_gw, rtol=1e-6, atol=1e-6)
    assert (y[int(offsets[-1]):] == 0).all() and (x.grad[int(offsets[-1]):] == 0).all()
    for e, count in enumerate(counts):
        if count == 0:
            assert (w.grad[e] == 0).all()
    # And it is an fp8 product: close to the exact one, not equal to it.
    exact = torch.zeros_like(ref_y)
    b = offsets.tolist()
    for e in range(E):
        exact[b[e]:b[e + 1]] = x.detach()[b[e]:b[e + 1]] @ w.detach()[e].t()
    if exact.abs().sum() > 0:
        err = (y.detach() - exact).norm() / exact.norm()
        assert 1e-4 < err < 0.08


def test_wgrad_tiles_never_mix_experts():
    g = torch.Generator().manual_seed(3)
    offsets, R = _groups([100, 60])
    x = torch.randn(R, 128, generator=g)
    w = torch.randn(2, 64, 128, generator=g)
    grad = torch.randn(R, 64, generator=g)
    _, _, gw = _by_hand(x, w, offsets, grad)
    x2, grad2 = x.clone(), grad.clone()
    x2[100:] *= 1000.0  # expert 1's rows only: a shared 128-row tile would change expert 0's scales
    grad2[100:] *= 1000.0
    xa, wa = x2.clone().requires_grad_(), w.clone().requires_grad_()
    fp8.grouped_gemm_fp8_reference(xa, wa, offsets).backward(grad2)
    assert torch.equal(wa.grad[0], gw[0])


def test_bf16_in_bf16_out_and_bad_shapes():
    x = torch.randn(10, 128, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2, 32, 128, dtype=torch.bfloat16, requires_grad=True)
    offsets = torch.tensor([0, 4, 10], dtype=torch.int32)
    y = fp8.grouped_gemm_fp8_reference(x, w, offsets)
    y.sum().backward()
    assert y.dtype == x.grad.dtype == w.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="same K"):
        fp8.grouped_gemm_fp8_reference(x, w[:, :, :64], offsets)
    with pytest.raises(ValueError, match="`offsets` must be"):
        fp8.grouped_gemm_fp8_reference(x, w, offsets[:2])
