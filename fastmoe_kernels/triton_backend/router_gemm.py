"""The router's fp32 GEMMs on tensor cores (``ops.router_logits``): ``logits = x · Wᵀ`` forward,
``dx = G · W`` and ``dW = Gᵀ · x`` backward, each a plain dense GEMM ``C = A · B`` with fp32
accumulation, A and B read in their own dtypes (no fp32 copy of x is made) and C stored in its own.

Why: the default router computes its logits in fp32 so that near-tied experts are ranked as an fp32
product ranks them; torch runs that product on CUDA cores (~0.8 ms of a Qwen3 training step on the
first H100 run, forward and backward, with the cast of x). The products here keep that precision:

- both operands 16-bit (bf16/fp16 x and W): TF32 holds them exactly, so one TF32 product per
  element is exact and the accumulation is fp32's (``input_precision="tf32"``);
- otherwise (an fp32 operand, the backward's fp32 gradient): three TF32 products per element
  (``"tf32x3"``: hi·hi + hi·lo + lo·hi), an error of ~2⁻²² of each product, below fp32's own
  accumulation error over K ≥ 4 terms;
- ``FASTMOE_ROUTER_GEMM_PRECISION=ieee`` (and the interpreter's arithmetic): fp32 FMA, no tensor cores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import empty
from .._variants import flag
from ._common import cdiv, interpreted, launch, next_pow2, register

# "auto": tf32 where both operands are 16-bit, else tf32x3 (above). Kept selectable for the A/B.
PRECISION = flag("FASTMOE_ROUTER_GEMM_PRECISION", "auto", ("auto", "tf32x3", "ieee"))
EXACT_IN_TF32 = (torch.bfloat16, torch.float16)


def precision_for(a_dtype: torch.dtype, b_dtype: torch.dtype) -> str:
    """The ``tl.dot`` input precision that keeps an fp32 product's accuracy for these operands."""
    if PRECISION != "auto":
        return PRECISION
    return "tf32" if a_dtype in EXACT_IN_TF32 and b_dtype in EXACT_IN_TF32 else "tf32x3"


def _configs():
    # (128×64 with 4 warps spilled 112 B in tf32x3 on sm_90: 8 warps there.)
    if interpreted():  # one small tile: the interpreter cannot time configs, and small tiles run fastest
        return [triton.Config(dict(BM=16, BN=16, BK=16), num_warps=1)]
    return [triton.Config(dict(BM=bm, BN=bn, BK=bk), num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 4, 3),
                                     (128, 128, 32, 8, 3), (32, 64, 64, 4, 2), (16, 64, 64, 4, 2))]


# Keyed on powers of two of M and K (the token count is one of them): not retuned per batch size.
@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K_BUCKET", "PRECISION"], cache_results=True)
@triton.jit
def _router_matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, M_BUCKET, K_BUCKET, stride_am, stride_ak, stride_bk, stride_bn,
                          stride_cm, stride_cn, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # int64 offsets: the token dimension (M, or K for dW) times d passes 2³¹ at a few hundred thousand tokens.
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    cols = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    ks = tl.arange(0, BK).to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + ks
        a = tl.load(a_ptr + rows[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + k[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(k[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, precision: str) -> torch.Tensor:
    """``a [M, K] @ b [K, N]`` (any strides) accumulated in fp32, stored as ``out_dtype``."""
    M, K = a.shape
    N = b.shape[1]
    c = empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()

    def grid(meta):
        return cdiv(M, meta["BM"]), cdiv(N, meta["BN"])

    launch(_router_matmul_kernel, grid, a, b, c, M, N, K, next_pow2(M), next_pow2(K), a.stride(0), a.stride(1), b.stride(0),
           b.stride(1), c.stride(0), c.stride(1), PRECISION=precision)
    return c


@register("router_logits")
def router_logits_triton(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return matmul(x, weight.t(), torch.float32, precision_for(x.dtype, weight.dtype))


@register("router_logits_backward")
def router_logits_backward_triton(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor):
    """``(dx in x's dtype, dW in W's dtype)`` from the fp32 logits' gradient."""
    grad_x = matmul(grad, weight, x.dtype, precision_for(grad.dtype, weight.dtype))
    grad_w = matmul(grad.t(), x, weight.dtype, precision_for(grad.dtype, x.dtype))
    return grad_x, grad_w
