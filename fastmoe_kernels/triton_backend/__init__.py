"""The ``triton`` backend: Triton kernels for every op, forward and backward.

Importing this package registers its kernels with :mod:`fastmoe_kernels.backends`; it raises
ImportError when Triton is missing, which makes the backend report itself unavailable.

Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests). Float64 data
falls back to the torch reference (Triton's tensor cores have no fp64 path worth using).
Files: one per kernel family — ``routing`` (router top-k), ``plan`` (counting-based dispatch
plan), ``permute`` (gather / combine), ``grouped_gemm`` (persistent grouped GEMM with fused
gather, scatter and activation epilogues, and its weight gradient), ``grouped_up`` (the composition's up projection with its activation), ``grouped_mlp_node`` (the composition as one autograd node), ``moe_mlp`` (the fused
expert MLP), ``fp8`` (the blockwise fp8 grouped GEMMs), ``fp8_fused`` (their quantisers fused into the kernels producing their inputs), ``router_gemm`` (the router's fp32 GEMMs on tensor cores), ``routing_stats``; ``_common`` (launch helpers) and ``_jit`` (shared device code).
"""
import triton  # noqa: F401  (ImportError here = backend unavailable)

from . import (fp8, fp8_fused, grouped_gemm, grouped_mlp_node, grouped_up, moe_mlp, permute, plan,  # noqa: F401
               router_gemm, routing, routing_stats)  # (registration)
