"""grouped_gemm_fp8: the grouped GEMM with DeepSeek-V3's blockwise fp8 recipe, forward and backward.

``grouped_gemm_fp8(x [R, K], w [E, N, K], offsets [E+1]) → [R, N]`` in x's dtype: group e's rows
times ``w[e]ᵀ`` (nn.Linear layout), each operand rounded to e4m3 with one fp32 scale per 1×128
tile (x, the output gradient) or 128×128 block (w), products accumulated in fp32. Rows outside
every group are zeros. The dgrad and the wgrad run the same recipe (the wgrad's tiles run along the
tokens, starting at each expert's first row). :mod:`fastmoe_kernels.fp8` is the specification.

Where it runs: the ``triton`` backend on GPUs of compute capability ≥ 8.9 (fp8 tensor cores) and
in Triton's interpreter; everywhere else the ``torch`` backend — the specification itself, an fp32
emulation (quantise, dequantise, multiply) that gives the same numbers slowly. On a CUDA GPU the
emulation says so once with a warning: a user asking for fp8 speed should know they do not get it.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .._checks import FLOAT_DTYPES, INDEX_DTYPES, check_tensor
from ..fp8 import grouped_gemm_fp8_backward_reference, grouped_gemm_fp8_forward_reference
from .grouped_gemm import check_offsets

backends.register("grouped_gemm_fp8", "torch")(grouped_gemm_fp8_forward_reference)
backends.register("grouped_gemm_fp8_backward", "torch")(grouped_gemm_fp8_backward_reference)


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def compute_capability(device: torch.device) -> int:
    """``10·major + minor`` of a CUDA device, 0 for any other device (the resolution fact ``cc``)."""
    if device.type != "cuda":
        return 0
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


_warned_emulation = False


def _warn_emulation(device: torch.device) -> None:
    global _warned_emulation
    if device.type == "cuda" and not _warned_emulation:
        _warned_emulation = True
        warnings.warn(
            "fastmoe_kernels: the fp8 grouped GEMMs run as the fp32 emulation on this GPU (the fp8 kernels' "
            "numbers, none of their speed): the fp8 kernels need the triton backend and compute capability 8.9 "
            "or later; backends.describe() and recorded_fallbacks() say which one is missing", RuntimeWarning,
            stacklevel=3)


class _GroupedGemmFp8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, offsets: Tensor, forward: str, backward: str) -> Tensor:
        ctx.save_for_backward(x, w, offsets)
        ctx.backward_backend = backward
        return backends.get_kernel("grouped_gemm_fp8", forward)(x, w, offsets)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w, offsets = ctx.saved_tensors
        fn = backends.get_kernel("grouped_gemm_fp8_backward", ctx.backward_backend)
        grad_x, grad_w = fn(grad.contiguous(), x, w, offsets)
        return grad_x, grad_w, None, None, None


def grouped_gemm_fp8(x: Tensor, w: Tensor, offsets: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """The fp8 grouped GEMM (see the module docstring). Differentiable in x and w; the gradients come
    back in their dtypes (a bf16 or fp32 master weight keeps its own)."""
    where = "grouped_gemm_fp8"
    check_tensor(where, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(where, "w", w, ndim=3, dtypes=FLOAT_DTYPES, shape=(None, None, x.shape[1]), device=x.device)
    if w.shape[0] < 1:
        raise ValueError(f"{where}: `w` must hold at least one expert, got shape {list(w.shape)}")
    check_tensor(where, "offsets", offsets, ndim=1, dtypes=INDEX_DTYPES, shape=(w.shape[0] + 1,), device=x.device)
    check_offsets(where, offsets, x.shape[0])
    cc = compute_capability(x.device)
    forward = backends.resolve("grouped_gemm_fp8", backend, x.device, x.dtype, cc=cc)
    backward = backends.resolve("grouped_gemm_fp8_backward", backend, x.device, x.dtype, cc=cc)
    if "torch" in (forward, backward):
        _warn_emulation(x.device)
    return _GroupedGemmFp8.apply(x.contiguous(), w, offsets, forward, backward)
