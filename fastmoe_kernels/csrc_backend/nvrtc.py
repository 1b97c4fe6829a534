"""Compile the CUDA kernels of csrc/ with NVRTC (the run-time compiler CuPy uses).

``cuda_kernels.cuh`` is device code only, so NVRTC takes it as it is: this module builds a
translation unit that includes it, instantiates the kernels (NVRTC name expressions) and returns
PTX. It needs no GPU — only ``libnvrtc`` (from a CUDA toolkit, CuPy's ``cupy-cuda13x``, or the
``nvidia-cuda-nvrtc`` wheel) — so the tests check on every machine that the kernel sources compile
three ways: nvcc (the extension), NVRTC (here), and the host compiler (the CPU kernels).
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys
from typing import Dict, List, Optional, Sequence

from ._loader import csrc_dir

# Template instantiations to compile: every kernel at every element type / values-per-lane.
_TYPES = ("float", "fastmoe::half_t", "fastmoe::bf16_t")
KERNEL_INSTANCES: List[str] = (
    [f"fastmoe::cuda::route_topk_kernel<{t}, {v}>" for t in _TYPES for v in (1, 2, 4, 8, 16, 32)]
    + [f"fastmoe::cuda::route_topk_backward_kernel<{t}, {v}>" for t in _TYPES for v in (1, 8, 32)]
    + [f"fastmoe::cuda::gather_kernel<{t}, {v}>" for t, v in (("float", 4), ("fastmoe::half_t", 8), ("fastmoe::bf16_t", 8), ("float", 1))]
    + [f"fastmoe::cuda::combine_kernel<{t}, {v}>" for t, v in (("float", 4), ("fastmoe::bf16_t", 8), ("fastmoe::half_t", 1))]
    + [f"fastmoe::cuda::rowdot_kernel<{t}>" for t in _TYPES]
    + ["fastmoe::cuda::plan_rank_kernel<256, 16>", "fastmoe::cuda::plan_place_kernel<256, 16>",
       "fastmoe::cuda::plan_scan_kernel", "fastmoe::cuda::plan_offsets_kernel", "fastmoe::cuda::plan_mark_kept_kernel",
       "fastmoe::cuda::routing_stats_partial_kernel", "fastmoe::cuda::routing_stats_reduce_kernel"]
)


def find_libnvrtc() -> Optional[str]:
    """Path of libnvrtc, or None."""
    candidates = []
    for base in sys.path:
        candidates += glob.glob(os.path.join(base, "nvidia", "cu1*", "lib", "libnvrtc.so*"))
        candidates += glob.glob(os.path.join(base, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"))
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates += glob.glob(os.path.join(home, "lib64", "libnvrtc.so*"))
    candidates = [c for c in candidates if "alt" not in os.path.basename(c) and "builtins" not in c]
    return sorted(candidates)[0] if candidates else None


class NVRTCError(RuntimeError):
    pass


def compile_to_ptx(arch: str = "compute_90", instances: Sequence[str] = KERNEL_INSTANCES,
                   library: Optional[str] = None) -> Dict[str, object]:
    """Compile every kernel instance with NVRTC; returns {"ptx": str, "names": {instance: lowered name}}."""
    path = library or find_libnvrtc()
    if path is None:
        raise NVRTCError("libnvrtc not found (install a CUDA toolkit, cupy-cuda13x or nvidia-cuda-nvrtc)")
    # NVRTC dlopens its builtins library by soname; load it from the same folder first.
    for builtins in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*"))):
        if "alt" not in os.path.basename(builtins):
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            break
    lib = ctypes.CDLL(path)
    source = '#include "kernels/cuda_kernels.cuh"\n'.encode()
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source, b"fastmoe_kernels.cu", 0, None, None))
    try:
        for name in instances:
            _check(lib, lib.nvrtcAddNameExpression(prog, name.encode()))
        options = [f"--gpu-architecture={arch}", f"-I{csrc_dir()}", "--std=c++17", "-default-device"]
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        status = lib.nvrtcCompileProgram(prog, len(options), opts)
        if status != 0:
            raise NVRTCError(f"NVRTC failed to compile csrc/kernels/cuda_kernels.cuh:\n{_log(lib, prog)}")
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)))
        ptx = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetPTX(prog, ptx))
        names = {}
        for name in instances:
            lowered = ctypes.c_char_p()
            _check(lib, lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(lowered)))
            names[name] = lowered.value.decode()
        return {"ptx": ptx.value.decode(), "names": names, "log": _log(lib, prog)}
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _log(lib, prog) -> str:
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(max(size.value, 1))
    lib.nvrtcGetProgramLog(prog, log)
    return log.value.decode(errors="replace")


def _check(lib, status: int) -> None:
    if status != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise NVRTCError(f"NVRTC error {status}: {lib.nvrtcGetErrorString(status).decode()}")
