"""The activation's backward as one elementwise pass: ``dh`` from the pre-activation ``h`` and the
gradient of ``a = act(h)``, for the composition's up projection (``grouped_up``'s backward).

``h [R, m·f]`` is [gate | up] (m = 2, gated) or the plain pre-activation (m = 1); ``grad_a [R, f]``.
``dh = grad_a · act'(h)``, gated: ``dh_gate = grad_a · up_fn(up) · act'(gate)`` and
``dh_up = grad_a · act(gate) · up_fn'(up)``, computed in fp32 from the stored values and rounded once
to dh's dtype (torch's composition rounds after each of its ops). dh may be h itself (each element is
read before the same program writes it): the caller gives up h, and the step's peak loses an [R, m·f]
buffer.

Why (the first H100 run, ``benchmarks/results/h100-2026-11-24/``): torch's backward of the activation
(through ``torch.func.vjp``: the recomputed activation, sigmoid, its derivative and products, each a
kernel with its own pass over [R, f] tensors, plus a cat) took most of the 1.68 ms (Qwen3) and 8.4 ms
(Mixtral) of torch elementwise time in a training step, and its temporaries are why the composition's
peak is above torch._grouped_mm's at Mixtral (9.13 vs 6.5 GiB, the CPU memory count). This pass moves
the compulsory bytes once: read h and grad_a, write dh (5·R·f elements gated).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import activation_args, cdiv, next_pow2
from ._jit import act_grad, gated_grads

# Tiles of BLOCK_R rows × BLOCK_C columns of the [R, f] grid; 4,096 elements per program (16 per
# thread with 8 warps, each thread's columns contiguous for vector loads).
_BLOCK_ELEMENTS = 4096
_MAX_BLOCK_C = 1024


@triton.jit
def _activation_grad_kernel(
    grad_a_ptr, h_ptr, dh_ptr, num_rows, f, stride_gm, stride_hm, stride_dm, alpha, limit, up_offset,
    ACT: tl.constexpr, GATED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < num_rows)[:, None] & (cols < f)[None, :]
    rows64 = rows.to(tl.int64)[:, None]  # R · m·f passes 2³¹ at DeepSeek-V3-sized batches
    g = tl.load(grad_a_ptr + rows64 * stride_gm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h_gate = h_ptr + rows64 * stride_hm + cols[None, :]
    dh_gate = dh_ptr + rows64 * stride_dm + cols[None, :]
    gate = tl.load(h_gate, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        up = tl.load(h_gate + f, mask=mask, other=0.0).to(tl.float32)
        d_gate, d_up = gated_grads(g, gate, up, ACT, alpha, limit, up_offset)
        tl.store(dh_gate, d_gate.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_gate + f, d_up.to(dh_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(dh_gate, (g * act_grad(gate, ACT, alpha, limit)).to(dh_ptr.dtype.element_ty), mask=mask)


def activation_grad(grad_a: torch.Tensor, h: torch.Tensor, activation, dh: torch.Tensor) -> torch.Tensor:
    """Fill ``dh`` (shaped as h, may be h) with the gradient of ``act(h)`` for ``grad_a`` (see the module
    docstring); ``activation`` an ``activations.Activation`` with h's halves concatenated. Returns dh."""
    gated = activation.gated
    R, f = grad_a.shape
    if activation.interleaved:
        raise ValueError("activation_grad: h must be [gate | up] (the up projection's own layout), not interleaved")
    if h.shape != ((R, 2 * f) if gated else (R, f)) or dh.shape != h.shape:
        raise ValueError(f"activation_grad: grad_a {tuple(grad_a.shape)}, h {tuple(h.shape)} and dh {tuple(dh.shape)} "
                         f"must be [R, f], [R, {'2f' if gated else 'f'}] and h's shape")
    for name, t in (("grad_a", grad_a), ("h", h), ("dh", dh)):
        if t.stride(1) != 1:
            raise ValueError(f"activation_grad: {name} must have contiguous rows (stride {tuple(t.stride())})")
    if R == 0 or f == 0:
        return dh
    block_c = min(next_pow2(f), _MAX_BLOCK_C)
    block_r = max(1, _BLOCK_ELEMENTS // block_c)
    grid = (cdiv(R, block_r), cdiv(f, block_c))
    _activation_grad_kernel[grid](
        grad_a, h, dh, R, f, grad_a.stride(0), h.stride(0), dh.stride(0), **activation_args(activation),
        GATED=gated, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8 if block_r * block_c >= 4096 else 4,
    )
    return dh
