"""Backends: which implementation runs each kernel.

A *kernel* is one unit of work an op needs (``route_topk``, ``route_topk_backward``, ``make_plan``,
``permute``, ``combine``, ``unpermute_backward``, ``grouped_gemm``, ``grouped_gemm_wgrad``,
``routing_stats``, ...). Each backend registers the kernels it implements:

- ``torch``  — the pure-PyTorch reference (the specification; every kernel, every device);
- ``triton`` — Triton kernels (CUDA tensors, or any tensor under ``TRITON_INTERPRET=1``);
- ``cuda``   — the compiled kernels of ``csrc/`` (CUDA kernels and their C++ CPU twins).

Choosing, most specific first: the ``backend=`` argument of an op call or module (anything but
"auto"), then the ``FASTMOE_BACKEND`` environment variable, then "auto" — for each kernel, the first
backend in :data:`AUTO_PREFERENCE` that is available on the tensor's device and implements it. A
backend asked for by name must be available (else :class:`BackendUnavailableError` says why); a
kernel it does not implement runs on the ``torch`` reference, which :func:`describe` reports.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Callable, Dict, Optional, Tuple

import torch

BACKENDS = ("torch", "triton", "cuda")

# Preference of "auto", per device type. The benchmark suite is what justifies this order.
AUTO_PREFERENCE: Dict[str, Tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("torch",),
}

# Modules that register a backend's kernels when imported.
_BACKEND_MODULES = {"triton": "fastmoe_kernels.triton_backend", "cuda": "fastmoe_kernels.cuda_backend"}

_KERNELS: Dict[str, Dict[str, Callable]] = {}
_load_errors: Dict[str, str] = {}
_loaded: Dict[str, bool] = {"torch": True}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here."""


def register_kernel(name: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements kernel ``name`` for ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"register_kernel: `backend` must be one of {BACKENDS}, got {backend!r}")

    def wrap(fn: Callable) -> Callable:
        _KERNELS.setdefault(name, {})[backend] = fn
        return fn

    return wrap


def register_accelerated(kernel: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator for kernel backends: register ``fn`` for ``kernel``, but run the torch reference
    whenever a tensor argument is float64 (the kernels compute in fp32 and 16-bit types)."""
    reference = get_kernel(kernel, "torch")

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def dispatch(*args, **kwargs):
            if any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args):
                return reference(*args, **kwargs)
            return fn(*args, **kwargs)

        register_kernel(kernel, backend)(dispatch)
        return fn

    return wrap


def _load(backend: str) -> bool:
    """Import the module that registers ``backend``'s kernels, once; remember why it failed."""
    if backend in _loaded:
        return _loaded[backend]
    try:
        importlib.import_module(_BACKEND_MODULES[backend])
        _loaded[backend] = True
    except Exception as exc:  # an ImportError, or a broken toolchain: report it once, never crash
        _loaded[backend] = False
        _load_errors[backend] = f"{type(exc).__name__}: {exc}"
        logging.getLogger("fastmoe_kernels").warning(
            "fastmoe_kernels: the %s backend is unavailable (%s); the other backends are used instead",
            backend, _load_errors[backend],
        )
    return _loaded[backend]


def availability(backend: str, device: torch.device) -> Tuple[bool, str]:
    """Whether ``backend`` can run on ``device``, and if not, why."""
    if backend not in BACKENDS:
        return False, f"unknown backend {backend!r}; choose from {BACKENDS} or 'auto'"
    if backend == "torch":
        return True, ""
    if backend == "triton":
        interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if device.type != "cuda" and not interpreted:
            return False, f"Triton kernels need CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to interpret them on the CPU"
    if not _load(backend):
        return False, f"the {backend} backend failed to load ({_load_errors[backend]})"
    if backend == "cuda":
        mod = importlib.import_module(_BACKEND_MODULES["cuda"])
        return mod.supports_device(device)
    return True, ""


def _requested(requested: Optional[str]) -> str:
    name = requested if requested not in (None, "auto") else os.environ.get("FASTMOE_BACKEND", "auto")
    name = (name or "auto").strip().lower()
    if name != "auto" and name not in BACKENDS:
        source = "backend argument" if requested not in (None, "auto") else "FASTMOE_BACKEND"
        raise ValueError(f"{source}: expected one of {BACKENDS} or 'auto', got {name!r}")
    return name


def resolve(kernel: str, requested: Optional[str], device: torch.device) -> str:
    """The backend that runs ``kernel`` for tensors on ``device`` given the request."""
    name = _requested(requested)
    if name == "auto":
        for candidate in AUTO_PREFERENCE.get(device.type, ("torch",)):
            # availability() imports the backend first, which registers its kernels.
            if availability(candidate, device)[0] and candidate in _KERNELS.get(kernel, {}):
                return candidate
        return "torch"
    ok, why = availability(name, device)
    if not ok:
        raise BackendUnavailableError(f"backend {name!r} is not available: {why}")
    return name if name in _KERNELS.get(kernel, {}) else "torch"


def get_kernel(kernel: str, backend: str) -> Callable:
    """The implementation of ``kernel`` for a resolved ``backend`` (torch when it has none)."""
    impls = _KERNELS.get(kernel)
    if impls is None:
        raise KeyError(f"no kernel named {kernel!r} is registered")
    if backend in impls:
        return impls[backend]
    if "torch" not in impls:
        raise KeyError(f"kernel {kernel!r} has no {backend!r} implementation and no torch reference")
    return impls["torch"]


def describe(device: Optional[torch.device] = None, requested: Optional[str] = None) -> Dict[str, str]:
    """Kernel name → backend that would run it on ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _register_builtin()
    for backend in BACKENDS:
        availability(backend, device)
    return {kernel: resolve(kernel, requested, device) for kernel in sorted(_KERNELS)}


def backend_report(device: Optional[torch.device] = None) -> Dict[str, str]:
    """Backend name → "available" or the reason it is not, for ``device``."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {}
    for backend in BACKENDS:
        ok, why = availability(backend, device)
        report[backend] = "available" if ok else why
    return report


def _register_builtin() -> None:
    importlib.import_module("fastmoe_kernels.ops")
