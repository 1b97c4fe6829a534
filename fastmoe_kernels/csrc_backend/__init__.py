"""The ``cuda`` and ``cpp`` backends: the hand-written kernels of csrc/, reached through the
``torch.ops.fastmoe_C`` op library — CUDA kernels for CUDA tensors (``cuda``), their C++ twins for
CPU tensors (``cpp``).

Importing this package loads the compiled extension (prebuilt or JIT, see ``_loader``) and registers
its kernels; an ImportError says why it could not. It covers the memory-bound, index-heavy kernels:
routing top-k, the dispatch plan, gather / combine and their backward, and routing statistics. The
GEMMs of both are torch's own grouped matmul (``torch._grouped_mm``), where its layout limits allow
(``cuda``'s in ``grouped_mm``: the tuning table decides where auto takes them over Triton's). Float64
data is left to the reference.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import backends
from .._alloc import empty
from .._shapes import num_plan_rows
from ._loader import load_extension
from . import grouped_mm  # noqa: F401  (registers the cuda GEMMs)

extension = load_extension()
_ops = torch.ops.fastmoe_C
MAX_ROUTING_EXPERTS = 1024  # the warp-per-token CUDA routing kernels (CPU: any E)
MAX_ROUTING_K = 32


def _cuda_device_check(device: torch.device) -> Tuple[bool, str]:
    if getattr(extension, "with_cuda", False):
        return True, ""
    return False, "the compiled kernels were built without CUDA (no nvcc or a CPU-only torch at build time)"


backends.set_device_check("cuda", _cuda_device_check)


def _register(kernel: str, applies_on_cuda=None, cpp: bool = True):
    """Register ``fn`` as the ``cuda`` implementation (CUDA tensors) and, with ``cpp``, the ``cpp`` one
    (CPU tensors) of ``kernel``: one Python wrapper, the op library dispatches on the device."""

    def wrap(fn):
        backends.register(kernel, "cuda", devices=("cuda",), dtypes=backends.KERNEL_FLOAT_DTYPES,
                          applies=applies_on_cuda)(fn)
        if cpp:
            backends.register(kernel, "cpp", devices=("cpu",), dtypes=backends.KERNEL_FLOAT_DTYPES)(fn)
        return fn

    return wrap


def _ids32(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int32 ids for the kernels, ids outside [0, E) made -1 first: an int64 id such as 2³² + 1 would
    otherwise wrap into range when cast (the other backends drop it)."""
    if expert_idx.dtype != torch.int32:
        expert_idx = torch.where((expert_idx >= 0) & (expert_idx < num_experts), expert_idx, -1).to(torch.int32)
    return expert_idx.contiguous()


def _routing_fits(num_experts: int = 1, top_k: int = 1, **_) -> Optional[str]:
    if num_experts > MAX_ROUTING_EXPERTS or top_k > MAX_ROUTING_K:
        return (f"the CUDA router holds a token in one warp: E <= {MAX_ROUTING_EXPERTS} and k <= {MAX_ROUTING_K}, "
                f"got E={num_experts}, k={top_k}")
    return None


@_register("route_topk", _routing_fits)
def route_topk_csrc(logits, k, score, normalize, expert_bias, num_groups, topk_groups, scaling, return_probs):
    T, E = logits.shape
    dev = logits.device
    idx = empty(T, k, dtype=torch.int32, device=dev)
    weight = empty(T, k, dtype=torch.float32, device=dev)
    probs = empty((T, E) if return_probs else (0,), dtype=torch.float32, device=dev)
    bias = None if expert_bias is None else expert_bias.float().contiguous()
    _ops.route_topk(logits.contiguous(), k, score == "sigmoid", normalize, bias, num_groups, topk_groups, scaling,
                    idx, weight, probs)
    return idx, weight, probs


@_register("route_topk_backward", _routing_fits)
def route_topk_backward_csrc(grad_weight, grad_probs, logits, expert_idx, score, normalize, scaling):
    grad_logits = empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _ops.route_topk_backward(grad_weight.float().contiguous(), grad_probs.float().contiguous(), logits.contiguous(),
                             expert_idx.to(torch.int32).contiguous(), score == "sigmoid", normalize, scaling,
                             grad_logits)
    return grad_logits


@_register("make_plan")
def make_plan_csrc(expert_idx, num_experts, capacity, drop_policy, weight, pad):
    T, k = expert_idx.shape
    dev = expert_idx.device
    R = num_plan_rows(T, k, num_experts, capacity, pad)
    counts = empty(num_experts, dtype=torch.int32, device=dev)
    routed = empty(num_experts, dtype=torch.int32, device=dev)
    offsets = empty(num_experts + 1, dtype=torch.int32, device=dev)
    row = empty(T, k, dtype=torch.int32, device=dev)
    assignment = empty(R, dtype=torch.int32, device=dev)
    by_weight = capacity >= 0 and drop_policy == "probs"
    _ops.make_plan(_ids32(expert_idx, num_experts), num_experts, capacity, by_weight,
                   weight.float().contiguous() if by_weight else None, pad, counts, routed, offsets, row, assignment)
    return counts, routed, offsets, row, assignment


def _gather(x, index, num_rows, div=1, scale=None, out_dtype=None):
    out = empty(num_rows, x.shape[1], dtype=out_dtype or x.dtype, device=x.device)
    x = x if x.dtype == out.dtype else x.to(out.dtype)
    _ops.gather(x if x.stride(-1) == 1 else x.contiguous(), index.contiguous(), div, scale, out)
    return out


def _combine(y, row, weight, ordered=False):
    out = empty(row.shape[0], y.shape[1], dtype=y.dtype, device=y.device)
    w = weight.float().contiguous() if weight is not None and weight.numel() else None
    _ops.combine(y if y.stride(-1) == 1 else y.contiguous(), row.contiguous(), w, ordered, out)
    return out


@_register("permute")
def permute_csrc(x, src):
    return _gather(x, src, src.shape[0])


@_register("combine")
def combine_csrc(y, row, weight):
    return _combine(y, row, weight)


@_register("unpermute_backward")
def unpermute_backward_csrc(grad_out, y, row, weight, assignment):
    k = row.shape[1]
    scale = weight.reshape(-1).float().contiguous() if weight.numel() else None
    grad_y = _gather(grad_out, assignment, assignment.shape[0], div=k, scale=scale, out_dtype=y.dtype)
    grad_weight = empty(row.shape, dtype=torch.float32, device=y.device)
    g = grad_out.to(y.dtype).contiguous()
    _ops.rowdot(g, y.contiguous(), row.contiguous(), grad_weight)
    return grad_y, grad_weight


@_register("routing_stats")
def routing_stats_csrc(probs, expert_idx, num_segments):
    E = probs.shape[1]
    tokens = empty(num_segments, E, dtype=torch.float32, device=probs.device)
    prob_mean = empty(num_segments, E, dtype=torch.float32, device=probs.device)
    _ops.routing_stats(probs.float().contiguous(), _ids32(expert_idx, E), num_segments, tokens, prob_mean)
    return tokens, prob_mean.to(probs.dtype)


# ---- cpp GEMMs: torch's grouped matmul on CPU tensors ----------------------------------------------
# One call for all experts instead of the reference's loop. Its CPU kernel needs 16-byte strides and
# takes fp32/bf16 with homogeneous (not packed) weights; other calls resolve to the reference.
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16)


_grouped_mm_fits = grouped_mm.grouped_mm_layout_fits


def _valid_offsets(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``offsets`` clamped to non-decreasing values in [0, num_rows]: a value check may report bad ones
    only after the call (asynchronous mode), and torch._grouped_mm would read past the rows."""
    return torch.cummax(offsets.clamp(0, num_rows), 0).values


def _group_bounds(offsets: torch.Tensor) -> Tuple[int, int]:
    """(first, last) grouped row: reading them is free on CPU tensors."""
    return int(offsets[0]), int(offsets[-1])


def _expert_of_row(offsets: torch.Tensor, first: int, last: int) -> torch.Tensor:
    counts = (offsets[1:] - offsets[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.shape[0]), counts)[: last - first]


@backends.register("grouped_gemm", "cpp", devices=("cpu",), dtypes=_GROUPED_MM_DTYPES, applies=_grouped_mm_fits)
def grouped_gemm_cpp(a, b, offsets, trans_b, bias, widths, packed):
    offsets = _valid_offsets(offsets, a.shape[0])
    first, last = _group_bounds(offsets)
    mats = b.to(a.dtype).contiguous()
    n = mats.shape[1] if trans_b else mats.shape[2]
    if first == 0 and last == a.shape[0] and last > 0:
        # Every row grouped (the layer's dropless and padded plans): the product is the output, with no
        # zeroed buffer to copy it into (a fill and a copy of the output per GEMM, measured on the CPU
        # profile of a training step: benchmarks/results/cpu-2026-12-02-layer-gap).
        out = torch._grouped_mm(a.contiguous(), mats.transpose(1, 2) if trans_b else mats,
                                offs=offsets[1:].to(torch.int32))
        if bias is not None:
            out += bias.to(a.dtype)[_expert_of_row(offsets, first, last)]
        return out
    out = a.new_zeros(a.shape[0], n)  # rows outside every group are zeros
    if last > first:
        out[first:last] = torch._grouped_mm(a[first:last].contiguous(), mats.transpose(1, 2) if trans_b else mats,
                                            offs=(offsets[1:] - first).to(torch.int32))
        if bias is not None:
            out[first:last] += bias.to(a.dtype)[_expert_of_row(offsets, first, last)]
    return out


@backends.register("grouped_gemm_wgrad", "cpp", devices=("cpu",), dtypes=_GROUPED_MM_DTYPES, applies=_grouped_mm_fits)
def grouped_gemm_wgrad_cpp(a, grad, offsets, trans_b, has_bias, widths, packed, b_shape, out_dtype, bias_dtype):
    offsets = _valid_offsets(offsets, a.shape[0])
    first, last = _group_bounds(offsets)
    E = offsets.shape[0] - 1
    # fp32 operands: the weight gradient of bf16 data is accumulated in fp32, then rounded once to the
    # parameters' dtype (fp32 master weights keep it).
    a_rows, g_rows = a[first:last].float().contiguous(), grad[first:last].float().contiguous()
    offs = (offsets[1:] - first).to(torch.int32)
    # Computed in the weight's own layout ([E, N, K] = Gᵀ·A with trans_b): no transposed copy after.
    left, right = (g_rows, a_rows) if trans_b else (a_rows, g_rows)
    grad_b = torch._grouped_mm(left.t(), right, offs=offs) if last > first else \
        torch.zeros(E, left.shape[1], right.shape[1])
    grad_b = grad_b.to(out_dtype).contiguous()
    grad_bias = grad.new_empty(0, dtype=bias_dtype)
    if has_bias:
        grad_bias = torch.zeros(E, grad.shape[1], dtype=torch.float32).index_add_(
            0, _expert_of_row(offsets, first, last), g_rows.float()).to(bias_dtype)
    return grad_b, grad_bias
