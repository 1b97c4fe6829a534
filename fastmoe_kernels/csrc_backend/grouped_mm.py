"""The ``cuda`` backend's GEMMs: torch's grouped matmul (``torch._grouped_mm``, CUTLASS) on CUDA tensors.

On the first H100 run it was the best baseline in training at Mixtral's shape (522 against our 386
TFLOP/s): ``backend="auto"`` takes it where the device's tuning table measured it fastest
(``fastmoe_kernels.tuning``). It applies where torch's kernel does: homogeneous experts (one matrix
each), bf16, rows of 16-byte multiples, and a grouping that covers every row (``offsets[0] = 0`` and
``offsets[E] = R``: torch's kernel leaves rows outside every group unwritten, where the op's contract
wants zeros, and a pass to zero them would cost a read and write of the output). Callers that
know their rows are all grouped say so (``grouped_gemm(..., all_rows_grouped=True)``: the layer's
dropless and padded plans). No host synchronisation: the group ends stay on the device.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import backends

_DTYPES = (torch.bfloat16,)


def grouped_mm_layout_fits(packed: str = "", k_dim: int = 0, n_dim: int = 0, element_size: int = 4,
                           **_) -> Optional[str]:
    """None when torch's grouped matmul (CPU or CUDA) takes the call's weight layout, else why not."""
    if not hasattr(torch, "_grouped_mm"):
        return "this torch has no torch._grouped_mm"
    if packed:
        return "torch._grouped_mm takes one matrix per expert (no packed heterogeneous widths)"
    if (k_dim * element_size) % 16 or (n_dim * element_size) % 16:
        return f"torch._grouped_mm needs rows of 16-byte multiples (K={k_dim}, N={n_dim})"
    return None


def grouped_mm_fits(all_rows_grouped: bool = False, **facts) -> Optional[str]:
    """None when torch's CUDA grouped matmul covers the call, else why not."""
    layout = grouped_mm_layout_fits(**facts)
    if layout is not None:
        return layout
    if not all_rows_grouped:
        return "torch._grouped_mm leaves rows outside every group unwritten: only for calls whose groups cover every row"
    return None


def _group_ends(offsets: torch.Tensor) -> torch.Tensor:
    return offsets[1:].to(torch.int32)


def _expert_of_row(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Each row's expert, computed on the device (no host sync)."""
    rows = torch.arange(num_rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets[1:].contiguous(), rows, right=True).clamp_(max=offsets.shape[0] - 2)


@backends.register("grouped_gemm", "cuda", devices=("cuda",), dtypes=_DTYPES, applies=grouped_mm_fits)
def grouped_gemm_grouped_mm(a, b, offsets, trans_b, bias, widths, packed):
    mats = b.to(a.dtype)
    out = torch._grouped_mm(a, mats.transpose(1, 2) if trans_b else mats, offs=_group_ends(offsets))
    if bias is not None:
        out += bias.to(a.dtype)[_expert_of_row(offsets, a.shape[0])]
    return out


@backends.register("grouped_gemm_wgrad", "cuda", devices=("cuda",), dtypes=_DTYPES, applies=grouped_mm_fits)
def grouped_gemm_wgrad_grouped_mm(a, grad, offsets, trans_b, has_bias, widths, packed, b_shape, out_dtype, bias_dtype):
    # [K, R] @ [R, N] split along R: torch's kernel sums each group in fp32 and writes its output dtype.
    grad_b = torch._grouped_mm(a.t(), grad.to(a.dtype), offs=_group_ends(offsets))
    if trans_b:
        grad_b = grad_b.transpose(1, 2)
    grad_b = grad_b.to(out_dtype).contiguous()
    grad_bias = grad.new_empty(0, dtype=bias_dtype)
    if has_bias:
        E = offsets.shape[0] - 1
        grad_bias = torch.zeros(E, grad.shape[1], dtype=torch.float32, device=grad.device).index_add_(
            0, _expert_of_row(offsets, grad.shape[0]), grad.float()).to(bias_dtype)
    return grad_b, grad_bias
