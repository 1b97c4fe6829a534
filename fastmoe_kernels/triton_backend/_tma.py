"""The weights (B operands) through Hopper's tensor memory accelerator (host side), and the grouped
matmul's and the up projection's output tiles by TMA stores (``C_STORES``, below).

``FASTMOE_B_LOADS=tma`` (default "pointer", the loads the first H100 run measured): the forward's grouped
GEMMs (the up projection with its activation epilogue, the down projection) read each expert's weight
tile with a TMA copy from one 3-D tensor descriptor of the whole stacked weight ``[E, rows, cols]``,
built on the device at the kernel's start (``tl.make_tensor_descriptor``), instead of per-thread
pointer loads. The gathered activation rows (A) stay on asynchronous pointer copies: Hopper has no TMA
gather. The descriptor is 3-D, so its bounds are each expert's own: a box past an expert's last row or
column reads zeros, never another expert's weights (whose values may be anything, NaN included); only
a gate tile that runs past f reads the same expert's up rows, into output columns the store masks off.

Why: the B tile's address arithmetic and masks leave the registers, the copy is one instruction per
tile, and Triton's pipeliner overlaps it with the wgmma of the previous stage. Predicted (no roofline
term models it; the A/B measures it): 1.0-1.1x on the forward's GEMMs at the model shapes, most where
the B tile is the larger operand (Mixtral's and gpt-oss's up projections, BN 256).

Applies to homogeneous experts whose weight is read transposed with unit column stride and 16-byte
aligned strides (every model shape); other layouts (packed heterogeneous widths, gpt-oss's interleaved
gate/up rows, a strided view) keep pointer loads. On the GPU it needs compute capability 9.0 or newer.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .._variants import flag
from ._common import interpreted
from ._layout import ExpertMatrices, Stack

B_LOADS = flag("FASTMOE_B_LOADS", "pointer", ("pointer", "tma"))
# The forward's grouped matmul writing its contiguous output tiles by TMA stores (FASTMOE_C_STORES=tma;
# default "pointer", the stores the first H100 run measured). One 2-D descriptor of the whole output
# [rows, N], built on the device: a tile whose rows all belong to its expert is staged in shared memory and
# written by one TMA copy that the next tile's K loop does not wait for (the descriptor's bounds clip the
# last columns and the last rows of the output); an expert's last, partial row tile keeps masked pointer
# stores, as a box would run into the next expert's rows. Rows written through an index (the fused
# scatter) keep pointer stores. Predicted (the kernel model's epilogue term, bench/predictions.py):
# the epilogue's HBM stores overlap the next tile's loop instead of stalling the one program an SM
# holds at 128×256 tiles: see benchmarks/results/model-2026-12-07-tma-stores/. The up projection writes
# act(h) by TMA too; "tma+h" also its h halves, which the compiler stages through the same tile, each
# store waiting for the previous one's completion on Triton 3.6 (up_projection.py): see
# benchmarks/results/model-2026-12-07-latency/.
C_STORES = flag("FASTMOE_C_STORES", "pointer", ("pointer", "tma", "tma+h"))


@functools.lru_cache(maxsize=None)
def _device_has_tma(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def _tma_capable(t: torch.Tensor) -> bool:
    """Whether ``t``'s kernels can use the TMA: a device of compute capability 9.0 or newer, or the
    interpreter for CPU tensors."""
    if t.device.type == "cuda":
        return _device_has_tma(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return interpreted()


def tma_stack(w: torch.Tensor, mats: ExpertMatrices, transpose: bool) -> Optional[Stack]:
    """The stacked layout a kernel can describe to the TMA for reading ``mats`` (inside ``w``) as its
    B operand, or None for pointer loads (the flag off, another layout, an unaligned stride)."""
    if B_LOADS != "tma" or not transpose or mats.stack is None or not _tma_capable(w):
        return None
    st, size = mats.stack, w.element_size()
    # TMA: a 16-byte aligned base, strides in multiples of 16 bytes, rows of at least 16 bytes.
    if w.data_ptr() % 16 or (st.stride_e * size) % 16 or (st.stride_r * size) % 16 or st.cols * size < 16:
        return None
    return st


def tma_args(stack: Optional[Stack]) -> dict:
    """The kernels' descriptor arguments (zeros and B_TMA off for pointer loads)."""
    if stack is None:
        return dict(tma_rows=0, tma_cols=0, tma_stride_e=0, tma_stride_r=0, tma_row0=0, B_TMA=False)
    return dict(tma_rows=stack.rows, tma_cols=stack.cols, tma_stride_e=stack.stride_e, tma_stride_r=stack.stride_r,
                tma_row0=stack.row_start, B_TMA=True)


def _torch_scratch(size: int, alignment: int, stream: Optional[int]):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Device-side descriptors live in a small global scratch buffer per launch (128 bytes a program),
    which Triton allocates through ``triton.set_allocator``: install torch's allocator unless the caller
    set one (in this thread's context)."""
    import triton
    from triton.runtime import _allocation

    current = _allocation._allocator.get()
    if isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)


def tma_h_stores() -> bool:
    """Whether the up projection writes h's halves by TMA boxes too (FASTMOE_C_STORES=tma+h)."""
    return C_STORES == "tma+h"


def tma_store_ok(out: torch.Tensor) -> bool:
    """Whether ``out`` [rows, N] can be written by TMA boxes of one 2-D descriptor (FASTMOE_C_STORES=tma or tma+h,
    a Hopper device or the interpreter, unit column stride, 16-byte aligned base and row stride, rows of
    at least 16 bytes)."""
    if C_STORES == "pointer" or out.dim() != 2 or out.shape[0] == 0 or out.stride(1) != 1 or not _tma_capable(out):
        return False
    size = out.element_size()
    return out.data_ptr() % 16 == 0 and (out.stride(0) * size) % 16 == 0 and out.shape[1] * size >= 16
