"""grouped_gemm_fp8: the grouped GEMM with DeepSeek-V3's blockwise fp8 recipe, forward and backward.

``grouped_gemm_fp8(x [R, K], w [E, N, K], offsets [E+1]) → [R, N]`` in x's dtype: group e's rows
times ``w[e]ᵀ`` (nn.Linear layout), each operand rounded to e4m3 with one fp32 scale per 1×128
tile (x, the output gradient) or 128×128 block (w), products accumulated in fp32. Rows outside
every group are zeros. The dgrad and the wgrad run the same recipe (the wgrad's tiles run along the
tokens, starting at each expert's first row). :mod:`fastmoe_kernels.fp8` is the specification.

One custom op (``fastmoe::grouped_gemm_fp8``, its backward ``fastmoe::grouped_gemm_fp8_backward``)
runs the three forms the experts use, so that ``torch.compile`` sees one opaque node per product
(one graph, no break on the kernels' data-dependent shapes):

- plain: x's rows as they are;
- gathered (``src``, ``row``: a plan's): row r is ``x[src[r]]``, the up projection straight from the
  tokens (:func:`~fastmoe_kernels.ops.fp8_mlp.gathered_gemm_fp8`);
- activated (an activation): x is the pre-activation h and the product takes ``act(h)``, the down
  projection (:func:`~fastmoe_kernels.ops.fp8_mlp.activated_gemm_fp8`).

Where it runs: the ``triton`` backend on GPUs of compute capability ≥ 8.9 (fp8 tensor cores) and
in Triton's interpreter; everywhere else the ``torch`` backend — the specification itself, an fp32
emulation (quantise, dequantise, multiply) that gives the same numbers slowly. On a CUDA GPU the
emulation says so once with a warning: a user asking for fp8 speed should know they do not get it.
"""
from __future__ import annotations

import functools
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from .._checks import FLOAT_DTYPES, INDEX_DTYPES, check_tensor
from ..activations import Activation
from ..fp8 import backward_expected, grouped_gemm_fp8_backward_reference, grouped_gemm_fp8_forward_reference
from .grouped_gemm import check_offsets
from .permute import _combine_op

backends.register("grouped_gemm_fp8", "torch")(grouped_gemm_fp8_forward_reference)
backends.register("grouped_gemm_fp8_backward", "torch")(grouped_gemm_fp8_backward_reference)


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


@torch.compiler.assume_constant_result  # a fact of the machine: torch.compile takes it as a constant
def compute_capability(device: torch.device) -> int:
    """``10·major + minor`` of a CUDA device, 0 for any other device (the resolution fact ``cc``)."""
    if device.type != "cuda":
        return 0
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


_warned_emulation = False


def _warn_emulation(device: torch.device) -> None:
    global _warned_emulation
    if device.type == "cuda" and not _warned_emulation and not torch.compiler.is_compiling():
        _warned_emulation = True
        warnings.warn(
            "fastmoe_kernels: the fp8 grouped GEMMs run as the fp32 emulation on this GPU (the fp8 kernels' "
            "numbers, none of their speed): the fp8 kernels need the triton backend and compute capability 8.9 "
            "or later; backends.describe() and recorded_fallbacks() say which one is missing", RuntimeWarning,
            stacklevel=4)


# ---- the op: one for the three forms ----------------------------------------------------------------
def _kernel_name(src: Optional[Tensor], act_name: str) -> str:
    return "grouped_gemm_fp8" + ("_gathered" if src is not None else "_activated" if act_name else "")


def _form_args(src: Optional[Tensor], act_name: str, act_params: List[float]) -> tuple:
    """The kernels' arguments after (x, w, offsets): the gather index, the activation, or none."""
    if src is not None:
        return (src,)
    if act_name:
        return (Activation(act_name, act_params[0], act_params[1], bool(act_params[2])),)
    return ()


@torch.library.custom_op("fastmoe::grouped_gemm_fp8", mutates_args=())
def _fp8_op(x: Tensor, w: Tensor, offsets: Tensor, src: Optional[Tensor], row: Optional[Tensor], act_name: str,
            act_params: List[float], backend_names: str) -> Tensor:
    # Value checks live inside the op, where torch.compile does not trace them.
    check_offsets("grouped_gemm_fp8", offsets, x.shape[0] if src is None else src.shape[0])
    kernel = backends.get_kernel(_kernel_name(src, act_name), backend_names.split(",")[0])
    return kernel(x, w, offsets, *_form_args(src, act_name, act_params))


@_fp8_op.register_fake
def _(x, w, offsets, src, row, act_name, act_params, backend_names):
    return x.new_empty((x.shape[0] if src is None else src.shape[0], w.shape[1]))


@torch.library.custom_op("fastmoe::grouped_gemm_fp8_backward", mutates_args=())
def _fp8_backward_op(grad: Tensor, x: Tensor, w: Tensor, offsets: Tensor, src: Optional[Tensor], act_name: str,
                     act_params: List[float], backend: str) -> Tuple[Tensor, Tensor]:
    """(gradient of the product's rows — of x, of the gathered rows, or of h — , gradient of w)."""
    kernel = backends.get_kernel(_kernel_name(src, act_name) + "_backward", backend)
    return kernel(grad, x, w, offsets, *_form_args(src, act_name, act_params))


@_fp8_backward_op.register_fake
def _(grad, x, w, offsets, src, act_name, act_params, backend):
    rows = x if src is None else x.new_empty((src.shape[0], x.shape[1]))
    return torch.empty_like(rows), torch.empty_like(w)


def _setup(ctx, inputs, output):
    x, w, offsets, src, row, act_name, act_params, backend_names = inputs
    ctx.save_for_backward(x, w, offsets, src, row)  # h only for the activated form: act(h) is recomputed
    ctx.act_name, ctx.act_params, ctx.backend_names = act_name, act_params, backend_names


def _backward(ctx, grad):
    x, w, offsets, src, row = ctx.saved_tensors
    _, backward, combine = ctx.backend_names.split(",")
    grad_x, grad_w = _fp8_backward_op(grad.contiguous(), x, w, offsets, src, ctx.act_name, ctx.act_params, backward)
    if src is not None:  # the gathered rows' gradient, summed over each token's rows (permute's backward)
        grad_x = _combine_op(grad_x.contiguous(), row, grad_x.new_empty(0, dtype=torch.float32), combine)
    return grad_x, grad_w, None, None, None, None, None, None


_fp8_op.register_autograd(_backward, setup_context=_setup)


def apply_fp8_gemm(x: Tensor, w: Tensor, offsets: Tensor, *, src: Optional[Tensor] = None,
                   row: Optional[Tensor] = None, activation: Optional[Activation] = None,
                   backend: Optional[str] = None) -> Tensor:
    """The op in one of its forms (see the module docstring), its backends resolved here."""
    cc = compute_capability(x.device)
    kernel = _kernel_name(src, activation.name if activation is not None else "")
    forward = backends.resolve(kernel, backend, x.device, x.dtype, cc=cc)
    backward = backends.resolve(kernel + "_backward", backend, x.device, x.dtype, cc=cc)
    combine = backends.resolve("combine", backend, x.device, x.dtype) if src is not None else ""
    if "torch" in (forward, backward):
        _warn_emulation(x.device)
    act_name, act_params = "", []
    if activation is not None:
        act_name = activation.name
        act_params = [float(activation.alpha), float(activation.limit), float(activation.interleaved)]
    names = ",".join([forward, backward, combine])
    if torch.compiler.is_compiling():
        # (Dynamo cannot trace a ContextVar: a compiled graph's cache writes each layout when first asked.)
        return _fp8_op(x.contiguous(), w, offsets, src, row, act_name, act_params, names)
    # The weight cache writes the dgrad's layout in the forward's pass when a backward will follow.
    token = backward_expected.set(torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    try:
        return _fp8_op(x.contiguous(), w, offsets, src, row, act_name, act_params, names)
    finally:
        backward_expected.reset(token)


def grouped_gemm_fp8(x: Tensor, w: Tensor, offsets: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """The fp8 grouped GEMM (see the module docstring). Differentiable in x and w; the gradients come
    back in their dtypes (a bf16 or fp32 master weight keeps its own)."""
    where = "grouped_gemm_fp8"
    check_tensor(where, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(where, "w", w, ndim=3, dtypes=FLOAT_DTYPES, shape=(None, None, x.shape[1]), device=x.device)
    if w.shape[0] < 1:
        raise ValueError(f"{where}: `w` must hold at least one expert, got shape {list(w.shape)}")
    check_tensor(where, "offsets", offsets, ndim=1, dtypes=INDEX_DTYPES, shape=(w.shape[0] + 1,), device=x.device)
    return apply_fp8_gemm(x, w, offsets, backend=backend)
