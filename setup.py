"""Build script.

The package is pure Python plus the kernel sources of csrc/ (shipped as package data). The compiled
extension ``fastmoe_kernels._C`` is built only when torch is importable here, i.e. with
``pip install --no-build-isolation .`` in an environment that already has torch:

- the C++ CPU kernels always;
- the CUDA kernels too when ``FASTMOE_BUILD_CUDA`` is 1, or "auto" (default) and both a CUDA build of
  torch and a CUDA toolkit (nvcc, ``CUDA_HOME``) are present. No GPU is needed or probed.
  ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default "8.0;9.0": sm_80 and sm_90).
- ``FASTMOE_BUILD_EXT=0`` skips the extension; ``MAX_JOBS`` limits ninja's parallelism.

A plain ``pip install .`` builds in an isolated environment without torch. There nothing is compiled
(and torch is never downloaded into the build): the ``cuda`` backend compiles the shipped sources on
first use instead and caches the result.
"""
import os
import sys

from setuptools import find_packages, setup

CSRC = "csrc"


def read_build_list() -> dict:
    """csrc/build.txt, the one list of sources and flags (the JIT loader and CMake read it too)."""
    entries = {}
    with open(os.path.join(CSRC, "build.txt")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition(":")
                entries.setdefault(key.strip(), []).extend(value.split())
    return entries


def log(message: str) -> None:
    print(f"fastmoe_kernels setup: {message}", file=sys.stderr)


def extension_modules():
    if os.environ.get("FASTMOE_BUILD_EXT", "1") == "0":
        log("FASTMOE_BUILD_EXT=0: not building the compiled extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        log("torch is not importable in this build environment (an isolated `pip install .`): installing without "
            "the compiled extension; the cuda backend compiles its kernels on first use. To build it now: "
            "`pip install --no-build-isolation .` in an environment that has torch.")
        return [], {}
    mode = os.environ.get("FASTMOE_BUILD_CUDA", "auto").lower()
    if mode not in ("0", "1", "auto"):
        raise ValueError(f"FASTMOE_BUILD_CUDA must be 0, 1 or auto, got {mode!r}")
    cuda_possible = torch.version.cuda is not None and CUDA_HOME is not None
    if mode == "1" and not cuda_possible:
        raise RuntimeError(
            f"FASTMOE_BUILD_CUDA=1 but torch {torch.__version__} is not a CUDA build or no CUDA toolkit was found "
            f"(CUDA_HOME={CUDA_HOME})")
    with_cuda = mode == "1" or (mode == "auto" and cuda_possible)
    if not with_cuda:
        why = "FASTMOE_BUILD_CUDA=0" if mode == "0" else (
            "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit (set CUDA_HOME)")
        log(f"building the C++ CPU kernels only ({why})")
    build = read_build_list()
    cpu_sources = [os.path.join(CSRC, s) for s in build["cpu_source"]]
    cuda_sources = [os.path.join(CSRC, s) for s in build["cuda_source"]]
    cxx = build["cxx_flags"]
    common = dict(
        name="fastmoe_kernels._C",
        include_dirs=[os.path.abspath(CSRC)],
        extra_link_args=build["ld_flags"],
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        log(f"building the CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        ext = CUDAExtension(
            sources=cpu_sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DFASTMOE_WITH_CUDA"], "nvcc": build["nvcc_flags"] + ["-DFASTMOE_WITH_CUDA"]},
            **common,
        )
    else:
        ext = CppExtension(sources=cpu_sources, extra_compile_args={"cxx": cxx}, **common)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    # The kernel sources travel inside the package as fastmoe_kernels/csrc for the JIT build.
    packages=find_packages(include=["fastmoe_kernels", "fastmoe_kernels.*"]) + ["fastmoe_kernels.csrc"],
    package_dir={"fastmoe_kernels.csrc": CSRC},
    package_data={"fastmoe_kernels.csrc": ["kernels/*.h", "kernels/*.cuh", "kernels/*.cpp", "kernels/*.cu",
                                           "bindings/*.h", "bindings/*.cpp", "README.md", "build.txt"],
                  # The per-device tuning tables (fastmoe_kernels.tuning) travel with the package.
                  "fastmoe_kernels": ["tuned/*.json", "tuned/README.md"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
