"""The device's ceilings, the kernel model's inputs, measured in one short call.

- ``copy_GBps``: a device copy of 1 GiB of fp32 (bytes read + written), past every cache;
- ``dense_bf16_TFLOPs``: torch's dense bf16 GEMM (8192³, random data);
- ``fill_GBps``: the rate at which the L2 feeds operand tiles into shared memory in a GEMM's own K
  loop: a persistent Triton kernel, two programs per SM, streams [128, 64] bf16 tiles of a buffer
  that fits the L2 through the same pipelined loads as our GEMMs (3 stages), each tile consumed by a
  narrow ``tl.dot`` (too little arithmetic to be the limit);
- ``latency_us``: one load's latency from HBM, unloaded (a dependent chain of loads through a random
  cycle over 1 GiB, one thread): what an unpipelined K loop waits for per step;
- ``dense_fp8_TFLOPs``: torch's dense e4m3 GEMM (``torch._scaled_mm``, 8192³, one scale per tensor,
  bf16 out): the fp8 tensor cores' rate, the ceiling the fp8 products' tiles are judged against (the
  first run measured none, so the FP8 issue's wide tiles went unpredicted);
- the device's properties (SMs, L2 size, shared memory per SM) as the driver reports them.

    python benchmarks/gpu_ceilings.py --out ceilings.json [--dry-run]   (--dry-run: tiny sizes, any device)
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict

import torch


def _median_ms(fn, device: torch.device, reps: int = 10, warmup: int = 3) -> float:
    from fastmoe_kernels.bench.timing import measure

    return measure(fn, device, warmup=warmup, min_reps=reps, max_reps=reps).median_ms


def copy_and_dense(device: torch.device, small: bool) -> Dict[str, float]:
    n = (2**20 if small else 2**30) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), device)
    size = 256 if small else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    gemm_ms = _median_ms(lambda: a @ b, device)
    return {"copy_GBps": 2 * n * 4 / copy_ms / 1e6, "dense_bf16_TFLOPs": 2 * size**3 / gemm_ms / 1e9}


def dense_fp8(device: torch.device, small: bool) -> float:
    """TFLOP/s of an e4m3 × e4m3 → bf16 GEMM with per-tensor scales (cuBLAS on a GPU)."""
    size = 256 if small else 8192
    a = torch.randn(size, size, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(size, size, device=device).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
    one = torch.tensor(1.0, device=device)
    ms = _median_ms(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), device)
    return 2 * size**3 / ms / 1e9


def _fill_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def fill_kernel(buf_ptr, out_ptr, num_tiles, steps, BM: tl.constexpr, BK: tl.constexpr):
        # Tile t of the buffer is rows [t·BM, (t+1)·BM) of a [num_tiles·BM, BK] matrix; program p reads
        # tiles p, p + P, ... (mod num_tiles) for ``steps`` steps, as a GEMM's K loop reads its A tiles.
        pid = tl.program_id(0)
        rows = tl.arange(0, BM)
        cols = tl.arange(0, BK)
        b = tl.full((BK, 16), 1.0, dtype=buf_ptr.dtype.element_ty)
        acc = tl.zeros((BM, 16), dtype=tl.float32)
        for s in range(steps):
            t = (pid + s * tl.num_programs(0)) % num_tiles
            a = tl.load(buf_ptr + (t * BM + rows)[:, None].to(tl.int64) * BK + cols[None, :])
            acc = tl.dot(a, b, acc)
        tl.store(out_ptr + pid * BM * 16 + rows[:, None] * 16 + tl.arange(0, 16)[None, :], acc)

    return fill_kernel


def fill_rate(device: torch.device, small: bool) -> float:
    """L2 → shared-memory operand bytes per second, over every SM at once (see the module docstring)."""
    BM, BK = 128, 64
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kernel = _fill_kernel()
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 2**20
    num_tiles = max(4, (l2 // 3) // (BM * BK * dtype.itemsize))  # a third of the L2: every read a hit
    buf = torch.randn(num_tiles * BM, BK, device=device).to(dtype)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    programs = 2 * sms
    steps = 8 if small else 4096
    out = torch.empty(programs * BM * 16, device=device, dtype=torch.float32)
    run = lambda: kernel[(programs,)](buf, out, num_tiles, steps, BM=BM, BK=BK, num_warps=8, num_stages=3)
    ms = _median_ms(run, device, reps=5 if small else 10, warmup=1 if small else 3)
    return programs * steps * BM * BK * dtype.itemsize / ms / 1e6


def _chase_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def chase_kernel(next_ptr, out_ptr, hops):
        i = tl.load(next_ptr)  # start at 0's successor
        for _ in range(hops):
            i = tl.load(next_ptr + i)
        tl.store(out_ptr, i)

    return chase_kernel


def latency_us(device: torch.device, small: bool) -> float:
    """One dependent load's latency through a random cycle over a buffer far past the L2."""
    n = 2**14 if small else 2**28  # int32 entries: 1 GiB on a GPU
    g = torch.Generator(device="cpu").manual_seed(0)
    order = torch.randperm(n, generator=g)
    nxt = torch.empty(n, dtype=torch.int64)
    nxt[order] = order.roll(-1)  # one cycle through every entry, in random order
    nxt = nxt.to(torch.int32).to(device)
    out = torch.empty(1, dtype=torch.int32, device=device)
    hops = 64 if small else 20000
    kernel = _chase_kernel()
    ms = _median_ms(lambda: kernel[(1,)](nxt, out, hops, num_warps=1), device, reps=3, warmup=1)
    return ms * 1e3 / hops


def properties(device: torch.device) -> Dict[str, object]:
    if device.type != "cuda":
        return {"name": device.type}
    p = torch.cuda.get_device_properties(device)
    return {"name": p.name, "sms": p.multi_processor_count, "l2_bytes": p.L2_cache_size,
            "smem_per_sm": getattr(p, "shared_memory_per_multiprocessor", None), "total_memory": p.total_memory}


def measure_all(device: torch.device, small: bool = False) -> Dict[str, object]:
    out: Dict[str, object] = {"device": properties(device)}
    out.update(copy_and_dense(device, small))
    for name, fn in (("fill_GBps", fill_rate), ("latency_us", latency_us), ("dense_fp8_TFLOPs", dense_fp8)):
        try:
            out[name] = fn(device, small)
        except Exception as exc:  # a ceiling that cannot be measured is reported, not fatal
            out[name] = None
            out[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes (a CPU run of the script itself)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = measure_all(device, small=args.dry_run or device.type != "cuda")
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
