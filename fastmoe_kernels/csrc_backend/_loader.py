"""Loading the compiled kernels of csrc/: the prebuilt extension, else a JIT build.

Order (``FASTMOE_EXTENSION`` = "auto", the default): ``fastmoe_kernels._C`` built by setup.py, else
compile the shipped sources with ``torch.utils.cpp_extension.load`` (ninja) into a cache directory
keyed by torch version, CUDA version, GPU architectures, Python version and a hash of the sources
— so a rebuild happens only when one of them changes. cpp_extension holds a file lock in that
directory while it builds, so parallel ranks compile once and the others wait and load.
"prebuilt" or "jit" force one path. ``FASTMOE_CACHE_DIR`` moves the cache (default
``~/.cache/fastmoe_kernels``); ``FASTMOE_BUILD_CUDA=0`` builds the CPU kernels only.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import os
import pathlib
import sys
from types import ModuleType
from typing import Dict, List, Optional

import torch

logger = logging.getLogger("fastmoe_kernels")

def read_build_list(root: pathlib.Path) -> Dict[str, List[str]]:
    """``csrc/build.txt``: key → values (sources one per line, flags split on spaces)."""
    entries: Dict[str, List[str]] = {}
    for line in (root / "build.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(":")
        entries.setdefault(key.strip(), []).extend(value.split())
    return entries


def csrc_dir() -> pathlib.Path:
    """The kernel sources: shipped inside the package, or the repository's csrc/ (editable installs)."""
    package = pathlib.Path(__file__).resolve().parent.parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "kernels" / "common.h").is_file():
            return candidate
    raise ImportError("fastmoe_kernels: the csrc/ kernel sources are missing from this installation")


def cuda_build_wanted() -> bool:
    """Build the CUDA kernels too: a CUDA torch, a visible GPU, an nvcc, and not FASTMOE_BUILD_CUDA=0."""
    if os.environ.get("FASTMOE_BUILD_CUDA", "auto") == "0":
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and torch.cuda.is_available() and CUDA_HOME is not None


def _source_digest(root: pathlib.Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in (".h", ".cuh", ".cpp", ".cu", ".txt"):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _arch_tag(with_cuda: bool) -> str:
    if not with_cuda:
        return "cpu"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        archs = ";".join(
            "{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())
        )
    return "cu{}-sm{}".format(torch.version.cuda, archs.replace(";", "_").replace(".", "").replace(" ", ""))


def cache_dir(with_cuda: bool) -> pathlib.Path:
    base = pathlib.Path(os.environ.get("FASTMOE_CACHE_DIR", pathlib.Path.home() / ".cache" / "fastmoe_kernels"))
    tag = "torch{}-{}-py{}{}-{}".format(
        torch.__version__.replace("+", "_"), _arch_tag(with_cuda), sys.version_info.major, sys.version_info.minor,
        _source_digest(csrc_dir()),
    )
    return base / tag


def jit_build(with_cuda: Optional[bool] = None, verbose: bool = False) -> ModuleType:
    """Compile (or load the cached build of) the csrc/ kernels."""
    from torch.utils import cpp_extension

    with_cuda = cuda_build_wanted() if with_cuda is None else with_cuda
    root = csrc_dir()
    build_dir = cache_dir(with_cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    name = "fastmoe_C_jit_cuda" if with_cuda else "fastmoe_C_jit_cpu"
    build = read_build_list(root)
    sources: List[str] = [str(root / s) for s in build["cpu_source"] + (build["cuda_source"] if with_cuda else [])]
    cached = any(build_dir.glob(f"{name}*.so"))
    if not cached:
        logger.warning(
            "fastmoe_kernels: compiling the %s kernels of csrc/ once (no prebuilt extension); "
            "cached in %s", "CPU and CUDA" if with_cuda else "CPU", build_dir,
        )
    defines = ["-DFASTMOE_WITH_CUDA"] if with_cuda else []
    return cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=build["cxx_flags"] + defines,
        extra_cuda_cflags=build["nvcc_flags"] + defines,
        extra_ldflags=build["ld_flags"],
        extra_include_paths=[str(root)],
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        verbose=verbose,
    )


def load_extension() -> ModuleType:
    """The compiled kernels module; raises ImportError (with the reason) when none can be had."""
    mode = os.environ.get("FASTMOE_EXTENSION", "auto").strip().lower()
    if mode not in ("auto", "prebuilt", "jit"):
        raise ImportError(f"FASTMOE_EXTENSION must be auto, prebuilt or jit, got {mode!r}")
    if mode in ("auto", "prebuilt"):
        try:
            return importlib.import_module("fastmoe_kernels._C")
        except ImportError as exc:
            if mode == "prebuilt":
                raise ImportError(f"no prebuilt fastmoe_kernels._C extension ({exc})") from exc
    try:
        return jit_build()
    except Exception as exc:  # no compiler, no ninja, a compile error: say why, let the caller fall back
        raise ImportError(f"could not compile the csrc/ kernels: {type(exc).__name__}: {str(exc)[:2000]}") from exc
