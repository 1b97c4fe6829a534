"""FP8 (e4m3) blockwise scaling: the specification of the fp8 expert GEMMs (issue 16, first part).

DeepSeek-V3's fine-grained recipe, as a quantise–dequantise emulation in fp32 that the fp8 kernels
must equal:

- activations and gradients: one scale per 1×128 tile along the reduction's partner dimension —
  per row and 128 columns in the forward (x) and the dgrad (dy); per column and 128 *rows* for the
  wgrad (x and dy along the tokens, tiles starting at each expert's first row so that no tile mixes
  experts);
- weights: one scale per 128×128 block;
- the scale is the tile's absolute maximum over 448 (e4m3's largest finite value), so the largest
  element maps to ±448 exactly; an all-zero tile has scale 1; values are rounded to nearest even by
  torch's float8_e4m3fn cast;
- products accumulate in fp32; outputs and gradients come back in the input's dtype (bf16 in
  training, with bf16 master weights).

Tiles at a ragged edge (K or N not a multiple of 128, an expert's last rows) are the partial tiles
that remain: their scale comes from the elements present. The ``grouped_gemm_fp8`` op
(:mod:`fastmoe_kernels.ops.grouped_gemm_fp8`) runs this as its torch backend and the Triton kernels
of :mod:`fastmoe_kernels.triton_backend.fp8` on GPUs; ``MoEConfig(fp8_recipe="blockwise")`` uses it
for the routed experts' GEMMs.
"""
from __future__ import annotations

import contextvars
from typing import Tuple

import torch
from torch import Tensor

FP8_RECIPES = ("blockwise",)  # MoEConfig.fp8_recipe


def check_recipe(where: str, recipe) -> None:
    """``recipe`` is None (no fp8) or one of FP8_RECIPES."""
    if recipe is not None and recipe not in FP8_RECIPES:
        raise ValueError(f"{where}: `fp8_recipe` must be None or one of {FP8_RECIPES}, got {recipe!r}")
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# Whether the fp8 GEMM being called will run a backward (set by the op layer around the call; read by
# the Triton backend's weight cache, which then writes the dgrad's transposed layout in the same pass).
# Inside a custom op autograd is off, so the op cannot see it otherwise.
backward_expected: "contextvars.ContextVar[bool]" = contextvars.ContextVar("fastmoe_fp8_backward_expected",
                                                                           default=False)

TILE = 128


def _pad_to(x: Tensor, dim: int, multiple: int) -> Tensor:
    size = x.shape[dim]
    pad = (-size) % multiple
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _scales(amax: Tensor) -> Tensor:
    """amax / 448, and 1 for an all-zero tile (any scale represents it; 1 keeps it finite).

    Divided by a tensor, not the Python number: torch on CUDA divides by a scalar as a multiplication
    by its reciprocal, one rounding off the true quotient for some amax (1/448 is inexact), which made
    the specification's scales differ between devices (seen on an H100 against the kernels' IEEE
    division)."""
    return torch.where(amax > 0, amax / torch.full_like(amax, FP8_MAX), torch.ones_like(amax))


def quantize_tiles(x: Tensor, tile: int = TILE) -> Tuple[Tensor, Tensor]:
    """``x [..., M, K]`` → (``q [..., M, K]`` in e4m3, ``scale [..., M, ceil(K/tile)]`` fp32): one
    scale per row and ``tile`` columns, so that ``q * scale`` (broadcast per tile) ≈ x."""
    if not x.is_floating_point():
        raise TypeError(f"quantize_tiles: `x` must be floating point, got {x.dtype}")
    k = x.shape[-1]
    xp = _pad_to(x.float(), -1, tile)
    tiles = xp.unflatten(-1, (xp.shape[-1] // tile, tile))
    scale = _scales(tiles.abs().amax(-1))
    q = (tiles / scale.unsqueeze(-1)).to(FP8).flatten(-2)[..., :k]
    return q, scale


def dequantize_tiles(q: Tensor, scale: Tensor, tile: int = TILE) -> Tensor:
    k = q.shape[-1]
    values = _pad_to(q.float(), -1, tile).unflatten(-1, (scale.shape[-1], tile))
    return (values * scale.unsqueeze(-1)).flatten(-2)[..., :k]


def quantize_blocks(w: Tensor, block: int = TILE) -> Tuple[Tensor, Tensor]:
    """``w [..., N, K]`` → (``q`` in e4m3, ``scale [..., ceil(N/block), ceil(K/block)]``): one scale
    per ``block``×``block`` block."""
    if not w.is_floating_point():
        raise TypeError(f"quantize_blocks: `w` must be floating point, got {w.dtype}")
    n, k = w.shape[-2:]
    wp = _pad_to(_pad_to(w.float(), -1, block), -2, block)
    nb, kb = wp.shape[-2] // block, wp.shape[-1] // block
    blocks = wp.unflatten(-1, (kb, block)).unflatten(-3, (nb, block))  # [..., nb, block, kb, block]
    scale = _scales(blocks.abs().amax(dim=(-3, -1)))  # [..., nb, kb]
    q = (blocks / scale[..., :, None, :, None]).to(FP8).flatten(-4, -3).flatten(-2)[..., :n, :k]
    return q, scale


def dequantize_blocks(q: Tensor, scale: Tensor, block: int = TILE) -> Tensor:
    n, k = q.shape[-2:]
    qp = _pad_to(_pad_to(q.float(), -1, block), -2, block)
    blocks = qp.unflatten(-1, (scale.shape[-1], block)).unflatten(-3, (scale.shape[-2], block))
    return (blocks * scale[..., :, None, :, None]).flatten(-4, -3).flatten(-2)[..., :n, :k]


def fake_quant_rows(x: Tensor) -> Tensor:
    """x as the fp8 forward/dgrad sees it (1×128 tiles along the last dimension), in fp32."""
    return dequantize_tiles(*quantize_tiles(x))


def fake_quant_cols(x: Tensor) -> Tensor:
    """x as the fp8 wgrad sees it (128×1 tiles: 128 rows of one column), in fp32."""
    return fake_quant_rows(x.transpose(-2, -1)).transpose(-2, -1)


def fake_quant_weight(w: Tensor) -> Tensor:
    """A weight as the fp8 GEMMs see it (128×128 blocks), in fp32."""
    return dequantize_blocks(*quantize_blocks(w))


def grouped_gemm_fp8_forward_reference(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """``y[rows of e] = x[rows of e] · w[e]ᵀ`` with the recipe (``w [E, N, K]``), in x's dtype."""
    bounds = offsets.tolist()
    wq = fake_quant_weight(w)
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = fake_quant_rows(x[lo:hi]) @ wq[e].t()
    return out.to(x.dtype)


def grouped_gemm_fp8_backward_reference(grad: Tensor, x: Tensor, w: Tensor, offsets: Tensor) -> Tuple[Tensor, Tensor]:
    """(dgrad in x's dtype, wgrad in w's dtype) of the forward above."""
    bounds = offsets.tolist()
    wq = fake_quant_weight(w)
    grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi <= lo:
            continue
        g = grad[lo:hi]
        grad_x[lo:hi] = fake_quant_rows(g) @ wq[e]
        # wgrad: both operands tiled along the tokens, the tiles starting at this expert's first row.
        grad_w[e] = fake_quant_cols(g).t() @ fake_quant_cols(x[lo:hi])
    return grad_x.to(x.dtype), grad_w.to(w.dtype)


def grouped_gemm_fp8_folded_dgrad_reference(grad_tokens: Tensor, token: Tensor, row_weight: Tensor, w: Tensor,
                                            offsets: Tensor, out_dtype: torch.dtype) -> Tensor:
    """The dgrad with the routing weight folded into the output gradient's row scales (the fused fp8 node's
    ``FASTMOE_FP8_QUANTISERS=fused-folded``): row r of expert e is ``row_weight[r] · (Q(g)[token[r]] · w[e])``,
    Q the 1×128 row quantisation of the *tokens'* gradient ``grad_tokens [T, N]`` — each token quantised
    once, not each of its k weighted copies ``w·g`` (rows with ``token < 0`` are zeros) — in ``out_dtype``."""
    bounds = offsets.tolist()
    wq = fake_quant_weight(w)
    gq = torch.cat([fake_quant_rows(grad_tokens), grad_tokens.new_zeros(1, grad_tokens.shape[1], dtype=torch.float32)])
    rows = gq[torch.where(token >= 0, token, grad_tokens.shape[0]).long()]
    out = torch.zeros(token.shape[0], w.shape[2], dtype=torch.float32, device=grad_tokens.device)
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = (rows[lo:hi] @ wq[e]) * row_weight[lo:hi, None].float()
    return out.to(out_dtype)


class _GroupedGemmFp8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
        ctx.save_for_backward(x, w, offsets)
        return grouped_gemm_fp8_forward_reference(x, w, offsets)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (*grouped_gemm_fp8_backward_reference(grad, *ctx.saved_tensors), None)


def grouped_gemm_fp8_reference(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """The specification of the fp8 grouped GEMM: ``x [R, K]``, ``w [E, N, K]`` (nn.Linear layout),
    ``offsets [E+1]`` (group e is rows ``offsets[e]:offsets[e+1]``; rows outside every group are
    zeros) → ``[R, N]`` in x's dtype; differentiable in x and w."""
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[2]:
        raise ValueError(f"grouped_gemm_fp8_reference: `x` must be [R, K] and `w` [E, N, K] with the same K, got "
                         f"{tuple(x.shape)} and {tuple(w.shape)}")
    if offsets.shape != (w.shape[0] + 1,):
        raise ValueError(f"grouped_gemm_fp8_reference: `offsets` must be [E+1] = [{w.shape[0] + 1}], got "
                         f"{tuple(offsets.shape)}")
    return _GroupedGemmFp8.apply(x, w, offsets)


# ---- the Triton backend's fp8 weight cache, from anywhere (a no-op while that backend is not loaded) ----
def _weight_cache():
    import sys

    return sys.modules.get("fastmoe_kernels.triton_backend.fp8_weight_cache")


def clear_weight_cache() -> None:
    """Forget every cached fp8 weight (see triton_backend/fp8_weight_cache.py)."""
    cache = _weight_cache()
    if cache is not None:
        cache.clear()


def refresh_weight_cache(weight: Tensor) -> None:
    """Forget ``weight``'s cached fp8 copy: for a change its version counter cannot show (its memory
    rewritten behind torch's back, e.g. by a framework reusing a flat buffer)."""
    cache = _weight_cache()
    if cache is not None:
        cache.refresh(weight)


def weight_cache_bytes(device=None) -> int:
    """Bytes the cached fp8 weights hold (on ``device``, or on all)."""
    cache = _weight_cache()
    return cache.cached_bytes(device) if cache is not None else 0
