"""Backends: which implementation runs each kernel, decided in one place.

A *kernel* is one unit of work an op needs (``route_topk``, ``make_plan``, ``permute``, ``combine``,
``grouped_gemm``, ``moe_mlp``, their backward kernels, ``routing_stats``). A *backend* is a family of
implementations, named after what runs:

- ``torch``  — the pure-PyTorch reference: the specification; every kernel, device and dtype;
- ``triton`` — Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``, for tests);
- ``cuda``   — the compiled CUDA kernels of ``csrc/`` (CUDA tensors);
- ``cpp``    — the compiled C++ CPU kernels of ``csrc/``, with torch's grouped matmul for the GEMMs
  (CPU tensors).

Each implementation is registered with what it covers (:func:`register`): device types, dtypes, and
where needed a predicate on the call's static facts (expert count, top-k, weight packing).
:func:`resolve` is the only place that picks an implementation and the only place a fallback
happens; :func:`get_kernel` returns exactly what was resolved and never substitutes.

Choosing, most specific first: the ``backend=`` argument of an op or module (anything but "auto"),
then :func:`set_default_backend` or the ``FASTMOE_BACKEND`` environment variable (read once, at the
first resolution), then "auto": per kernel and device type, the first backend of
:data:`AUTO_PREFERENCE` that is available and covers the call. A backend asked for by name must be
available (else :class:`BackendUnavailableError` says why); for a kernel it has no implementation
for, or whose coverage the call falls outside of, the kernel runs on auto's choice among the
others. Every fallback is recorded with its reason: :func:`describe` and :func:`recorded_fallbacks`
show them. ``backend="cuda"`` on CPU tensors, which ran the C++ kernels before they had a name of
their own, still does (as ``cpp``) and says so once.

Resolution is trace-safe: ``torch.compile`` evaluates it once per call site and kind of input
(``assume_constant_result``) instead of tracing it, so no import, environment read or backend load
ever happens inside a traced forward. The backends themselves are loaded on first use through
loaders that the package registers (:func:`add_loader`), so this module imports nothing above it.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

BACKENDS = ("torch", "triton", "cuda", "cpp")
KERNEL_FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})

# "auto", per device type and kernel: the order in which backends are tried (or a function of the
# call's facts giving it). The first available one that covers the call runs it. Sources of each
# order are given beside it; `benchmarks/cpu_kernel_choice.py` and `fastmoe-bench` measure the same
# kernels on any machine, and `set_auto_preference` changes an order.
Order = Union[Tuple[str, ...], Callable[..., Tuple[str, ...]]]


def _cpu_router_order(num_experts: int = 1, top_k: int = 1, **_) -> Tuple[str, ...]:
    # The C++ router selects k experts in k rounds over E scores; the reference sorts E scores once.
    # Measured crossover (1 thread): k ≈ 7 at E=32, ≈ 14 at E=128, > 16 at E=256.
    return ("cpp", "torch") if top_k <= max(6, num_experts // 16) else ("torch", "cpp")


AUTO_PREFERENCE: Dict[str, Dict[str, Order]] = {
    # No GPU measurement exists yet (no session has had a GPU): the GEMMs and the fused expert MLP go
    # to Triton (the csrc kernels have no GEMM), the memory-bound index kernels to the csrc CUDA kernels.
    "cuda": {
        "grouped_gemm": ("triton", "torch"),
        "grouped_gemm_wgrad": ("triton", "torch"),
        "moe_mlp": ("triton", "torch"),
        "moe_mlp_backward": ("triton", "torch"),
        "grouped_up": ("triton", "torch"),  # the composition's up projection with its activation
        "grouped_up_backward": ("triton", "torch"),
        "grouped_mlp_node": ("triton", "torch"),  # the composition as one node (FASTMOE_MLP_BACKWARD=epilogue)
        "grouped_mlp_node_backward": ("triton", "torch"),
        # The router's fp32 GEMMs on tensor cores at fp32's accuracy (the router takes them where
        # FASTMOE_ROUTER_GEMM=tensor-cores; torch's F.linear otherwise).
        "router_logits": ("triton", "torch"),
        "router_logits_backward": ("triton", "torch"),
        # fp8 (e4m3) products: Triton on fp8 tensor cores (cc >= 8.9), else the emulation.
        "grouped_gemm_fp8": ("triton", "torch"),
        "grouped_gemm_fp8_backward": ("triton", "torch"),
        "grouped_gemm_fp8_gathered": ("triton", "torch"),
        "grouped_gemm_fp8_gathered_backward": ("triton", "torch"),
        "grouped_gemm_fp8_activated": ("triton", "torch"),
        "grouped_gemm_fp8_activated_backward": ("triton", "torch"),
        "moe_mlp_fp8_node": ("triton", "torch"),  # the fp8 experts as one node (FASTMOE_FP8_QUANTISERS=fused)
        "moe_mlp_fp8_node_backward": ("triton", "torch"),
        "route_topk": ("cuda", "triton", "torch"),
        "route_topk_backward": ("cuda", "triton", "torch"),
        "make_plan": ("cuda", "triton", "torch"),
        "permute": ("cuda", "triton", "torch"),
        "combine": ("cuda", "triton", "torch"),
        "unpermute_backward": ("cuda", "triton", "torch"),
        "routing_stats": ("cuda", "triton", "torch"),
    },
    # CPU, 1 thread, measured side by side (benchmarks/results/cpu-2026-11-24/README.md): the C++ plan,
    # gather/combine and routing statistics are 1.4–14× faster than the reference in every case; the
    # C++ router while k is small against E. torch's grouped matmul (cpp's GEMMs) ties with the
    # reference's loop of matmuls op by op (within the noise of this machine) and makes the whole layer
    # faster than the reference's GEMMs in two runs of seven cases each.
    "cpu": {
        "grouped_gemm": ("cpp", "torch"),
        "grouped_gemm_wgrad": ("cpp", "torch"),
        "moe_mlp": ("torch",),
        "moe_mlp_backward": ("torch",),
        "grouped_up": ("torch",),  # the reference: the cpp GEMMs and torch's activation, composed
        "grouped_up_backward": ("torch",),
        "grouped_mlp_node": ("torch",),
        "grouped_mlp_node_backward": ("torch",),
        "router_logits": ("torch",),  # fp32 on the CPU is the reference's own product
        "router_logits_backward": ("torch",),
        "grouped_gemm_fp8": ("torch",),  # the emulation: no CPU has fp8 arithmetic worth a kernel
        "grouped_gemm_fp8_backward": ("torch",),
        "grouped_gemm_fp8_gathered": ("torch",),
        "grouped_gemm_fp8_gathered_backward": ("torch",),
        "grouped_gemm_fp8_activated": ("torch",),
        "grouped_gemm_fp8_activated_backward": ("torch",),
        "moe_mlp_fp8_node": ("torch",),
        "moe_mlp_fp8_node_backward": ("torch",),
        "route_topk": _cpu_router_order,
        "route_topk_backward": _cpu_router_order,
        "make_plan": ("cpp", "torch"),
        "permute": ("cpp", "torch"),
        "combine": ("cpp", "torch"),
        "unpermute_backward": ("cpp", "torch"),
        "routing_stats": ("cpp", "torch"),
    },
}
_DEFAULT_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}

logger = logging.getLogger("fastmoe_kernels")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here."""


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of one kernel, and what it covers."""

    kernel: str
    backend: str
    fn: Callable
    devices: Optional[FrozenSet[str]]  # device types; None: any
    dtypes: Optional[FrozenSet[torch.dtype]]  # of the call's data; None: any
    applies: Optional[Callable[..., Optional[str]]]  # facts -> None when covered, else why not

    def why_not(self, device_type: str, dtype: Optional[torch.dtype], facts: Dict[str, object]) -> Optional[str]:
        """None when this implementation covers the call, else the reason it does not."""
        if self.devices is not None and device_type not in self.devices:
            return f"{self.backend} has no {self.kernel} for {device_type} tensors"
        if dtype is not None and self.dtypes is not None and dtype not in self.dtypes:
            return f"{self.backend} has no {str(dtype).replace('torch.', '')} {self.kernel}"
        return self.applies(**facts) if self.applies is not None else None


class Choice(NamedTuple):
    """What runs a kernel: the backend, and why it is not the one asked for ("" when it is)."""

    backend: str
    fallback: str = ""

    def __str__(self) -> str:
        return self.backend if not self.fallback else f"{self.backend} (fallback: {self.fallback})"


_IMPLEMENTATIONS: Dict[str, Dict[str, Implementation]] = {}
_LOADERS: Dict[str, Callable[[], None]] = {}
_DEVICE_CHECKS: Dict[str, Callable[[torch.device], Tuple[bool, str]]] = {}
_load_errors: Dict[str, str] = {}
_loaded: Dict[str, bool] = {"torch": True}
_resolved: Dict[tuple, str] = {}
_fallbacks: Dict[tuple, Choice] = {}
_default_backend: Optional[str] = None  # set by set_default_backend
_env_backend: Optional[str] = None  # FASTMOE_BACKEND, read at the first resolution that needs it
_warned_alias = False


# ---- registration -------------------------------------------------------------------------------
def register(
    kernel: str,
    backend: str,
    *,
    devices: Optional[Iterable[str]] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    applies: Optional[Callable[..., Optional[str]]] = None,
) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``kernel`` for ``backend`` on ``devices`` (device types; None: any) and
    ``dtypes`` of the call's data (None: any); ``applies(**facts)`` returns None when it covers a call
    with those static facts, else the reason it does not."""
    if backend not in BACKENDS:
        raise ValueError(f"register: `backend` must be one of {BACKENDS}, got {backend!r}")

    def wrap(fn: Callable) -> Callable:
        impl = Implementation(kernel, backend, fn, None if devices is None else frozenset(devices),
                              None if dtypes is None else frozenset(dtypes), applies)
        _IMPLEMENTATIONS.setdefault(kernel, {})[backend] = impl
        _resolved.clear()
        return fn

    return wrap


def add_loader(backend: str, loader: Callable[[], None]) -> None:
    """How to load ``backend`` (import the module that registers its kernels): run on first use."""
    _LOADERS[backend] = loader


def set_device_check(backend: str, check: Callable[[torch.device], Tuple[bool, str]]) -> None:
    """A loaded backend's own word on whether it runs on a device, ``(ok, why not)``."""
    _DEVICE_CHECKS[backend] = check


def kernels() -> List[str]:
    """Every registered kernel name."""
    return sorted(_IMPLEMENTATIONS)


def implementations(kernel: str) -> Dict[str, Implementation]:
    """Backend name -> implementation of ``kernel`` (loaded backends only)."""
    return dict(_IMPLEMENTATIONS.get(kernel, {}))


# ---- availability ---------------------------------------------------------------------------------
def _load(backend: str) -> bool:
    """Run ``backend``'s loader once; remember why it failed."""
    if backend in _loaded:
        return _loaded[backend]
    loader = _LOADERS.get(backend)
    if loader is None:
        _loaded[backend], _load_errors[backend] = False, "no loader registered (import fastmoe_kernels first)"
        return False
    try:
        loader()
        _loaded[backend] = True
    except Exception as exc:  # an ImportError, or a broken toolchain: report it once, never crash
        _loaded[backend] = False
        _load_errors[backend] = f"{type(exc).__name__}: {exc}"
        logger.warning("fastmoe_kernels: the %s backend is unavailable (%s); the other backends are used instead",
                       backend, _load_errors[backend])
    return _loaded[backend]


def triton_interpreted() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (tests on machines without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def availability(backend: str, device: torch.device) -> Tuple[bool, str]:
    """Whether ``backend`` can run on ``device``, and if not, why."""
    device = torch.device(device)
    if backend not in BACKENDS:
        return False, f"unknown backend {backend!r}; choose from {BACKENDS} or 'auto'"
    if backend == "torch":
        return True, ""
    if backend == "triton" and device.type != "cuda" and not triton_interpreted():
        return False, f"Triton kernels need CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to interpret them on the CPU"
    if backend == "cuda" and device.type != "cuda":
        return False, f"the cuda backend runs CUDA tensors (got {device.type}); the C++ CPU kernels are backend 'cpp'"
    if backend == "cpp" and device.type != "cpu":
        return False, f"the cpp backend runs CPU tensors (got {device.type}); the CUDA kernels are backend 'cuda'"
    if not _load(backend):
        return False, f"the {backend} backend failed to load ({_load_errors[backend]})"
    check = _DEVICE_CHECKS.get(backend)
    return check(device) if check is not None else (True, "")


# ---- resolution -------------------------------------------------------------------------------------
def set_default_backend(name: Optional[str]) -> None:
    """The process-wide backend for calls that do not name one (None: back to ``FASTMOE_BACKEND``).
    Takes effect for call sites compiled afterwards."""
    global _default_backend
    if name is not None:
        _check_name("set_default_backend", name)
    _default_backend = name
    _resolved.clear()


def set_auto_preference(device_type: str, kernel: str, order: Union[Sequence[str], Callable[..., Sequence[str]]]) -> None:
    """Change the order in which "auto" tries backends for ``kernel`` on ``device_type`` (for instance
    after measuring this machine with ``fastmoe-bench``): a sequence of backend names, or a function
    of the call's facts (``num_experts``, ``top_k``, ...) returning one."""
    if not callable(order):
        for name in order:
            _check_name("set_auto_preference", name, allow_auto=False)
        order = tuple(order)
    AUTO_PREFERENCE.setdefault(device_type, {})[kernel] = order
    _resolved.clear()


def refresh() -> None:
    """Forget every resolution, recorded fallback and default (``FASTMOE_BACKEND`` is read again)."""
    global _default_backend, _env_backend
    _default_backend = _env_backend = None
    _resolved.clear()
    _fallbacks.clear()


def _check_name(source: str, name: str, allow_auto: bool = True) -> str:
    allowed = BACKENDS + (("auto",) if allow_auto else ())
    if name not in allowed:
        raise ValueError(f"{source}: expected one of {allowed}, got {name!r}")
    return name


def _requested(requested: Optional[str]) -> str:
    if requested not in (None, "auto"):
        return _check_name("backend argument", str(requested).strip().lower())
    if _default_backend is not None:
        return _default_backend
    global _env_backend
    if _env_backend is None:
        _env_backend = _check_name("FASTMOE_BACKEND", (os.environ.get("FASTMOE_BACKEND") or "auto").strip().lower())
    return _env_backend


def _alias(name: str, device: torch.device) -> str:
    """``cuda`` on CPU tensors meant the C++ kernels before they were called ``cpp``."""
    global _warned_alias
    if name == "cuda" and device.type == "cpu":
        if not _warned_alias:
            _warned_alias = True
            warnings.warn("fastmoe_kernels: backend='cuda' on CPU tensors runs the C++ CPU kernels, now named "
                          "backend='cpp'; 'cuda' keeps working for them", FutureWarning, stacklevel=_caller_level())
        return "cpp"
    return name


def _caller_level() -> int:
    """``stacklevel`` of the first frame outside this package and torch (the user's call)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and any(part in frame.f_code.co_filename for part in _INTERNAL_PATHS):
        level, frame = level + 1, frame.f_back
    return level


_INTERNAL_PATHS = (os.sep + "fastmoe_kernels" + os.sep, os.sep + "torch" + os.sep)


def _order(kernel: str, device_type: str, facts: Dict[str, object]) -> Tuple[str, ...]:
    per_kernel = AUTO_PREFERENCE.get(device_type, {})
    order = per_kernel.get(kernel, _DEFAULT_ORDER.get(device_type, ()))
    order = tuple(order(**facts) if callable(order) else order)
    return order + (() if "torch" in order else ("torch",))


def _covers(backend: str, kernel: str, device: torch.device, dtype, facts) -> Optional[str]:
    """None when ``backend`` can run this call, else why not."""
    ok, why = availability(backend, device)
    if not ok:
        return why
    impl = _IMPLEMENTATIONS.get(kernel, {}).get(backend)
    if impl is None:
        return f"{backend} has no {kernel}"
    return impl.why_not(device.type, dtype, facts)


def _choose(kernel: str, requested: str, device: torch.device, dtype, facts) -> Choice:
    if kernel not in _IMPLEMENTATIONS:
        raise KeyError(f"no kernel named {kernel!r} is registered")
    name = _requested(requested)
    if name != "auto":
        name = _alias(name, device)
        ok, why = availability(name, device)
        if not ok:
            raise BackendUnavailableError(f"backend {name!r} is not available: {why}")
        why_not = _covers(name, kernel, device, dtype, facts)
        if why_not is None:
            return Choice(name)
        for candidate in _order(kernel, device.type, facts):
            if candidate != name and _covers(candidate, kernel, device, dtype, facts) is None:
                return Choice(candidate, why_not)
        raise AssertionError(f"the torch reference must cover {kernel}")  # pragma: no cover
    reasons = []
    for candidate in _order(kernel, device.type, facts):
        why_not = _covers(candidate, kernel, device, dtype, facts)
        if why_not is None:
            return Choice(candidate, "; ".join(reasons))
        reasons.append(why_not)
    raise AssertionError(f"the torch reference must cover {kernel}")  # pragma: no cover


def _facts_key(facts: Dict[str, object]) -> tuple:
    return tuple(sorted(facts.items()))


def _resolve(kernel: str, requested: Optional[str], device: torch.device, dtype: Optional[torch.dtype],
             facts_key: tuple) -> str:
    key = (kernel, requested, device.type, dtype, facts_key)
    name = _resolved.get(key)
    if name is None:
        choice = _choose(kernel, requested, device, dtype, dict(facts_key))
        if choice.fallback:
            record = (kernel, device.type, _requested(requested), str(dtype).replace("torch.", ""), facts_key)
            if record not in _fallbacks:
                logger.info("fastmoe_kernels: %s on %s runs on %s (%s)", kernel, device.type, choice.backend,
                            choice.fallback)
            _fallbacks[record] = choice
        name = _resolved[key] = choice.backend
    return name


# torch.compile evaluates this once per call site and input kind and keeps the answer as a constant.
_resolve_traced = torch.compiler.assume_constant_result(_resolve)


def resolve(kernel: str, requested: Optional[str], device: torch.device, dtype: Optional[torch.dtype] = None,
            **facts) -> str:
    """The backend that runs ``kernel`` for a call on ``device`` with data of ``dtype`` (None for index
    data) and the given static ``facts`` (plain ints, strings, bools; see each backend's registration)."""
    facts_key = _facts_key(facts)
    if torch.compiler.is_compiling():
        return _resolve_traced(kernel, requested, device, dtype, facts_key)
    return _resolve(kernel, requested, torch.device(device), dtype, facts_key)


def get_kernel(kernel: str, backend: str) -> Callable:
    """The implementation of ``kernel`` by the resolved ``backend``: exactly that one (loading the
    backend if nothing has yet, e.g. for an op called directly or a graph run in a fresh process)."""
    impl = _IMPLEMENTATIONS.get(kernel, {}).get(backend)
    if impl is None and backend in BACKENDS and _load(backend):
        impl = _IMPLEMENTATIONS.get(kernel, {}).get(backend)
    if impl is None:
        raise KeyError(f"kernel {kernel!r} has no {backend!r} implementation (resolve() chooses one that exists)")
    return impl.fn


# ---- reports ---------------------------------------------------------------------------------------
def _default_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _load_all() -> None:
    for backend in BACKENDS:
        _load(backend)


def describe(device=None, requested: Optional[str] = None, dtype: torch.dtype = torch.float32) -> Dict[str, Choice]:
    """Kernel -> :class:`Choice` (the backend that runs it, and the fallback and its reason where it is
    not the one asked for) for ``dtype`` data on ``device`` (default: CUDA if present, else CPU).
    Fallbacks that depend on a call's facts (an expert count beyond a kernel's limit, say) show once
    such a call has run: :func:`recorded_fallbacks`."""
    device = _default_device(device)
    _load_all()
    return {kernel: _choose(kernel, requested, device, None if kernel in _INDEX_KERNELS else dtype, {})
            for kernel in kernels()}


# Kernels whose data are indices only (their choice does not depend on a float dtype).
_INDEX_KERNELS = frozenset({"make_plan"})


def recorded_fallbacks() -> Dict[tuple, Choice]:
    """Every fallback resolution made so far: ``(kernel, device type, requested, dtype, facts) -> Choice``."""
    return dict(_fallbacks)


def backend_report(device=None) -> Dict[str, str]:
    """Backend name -> "available" or the reason it is not, for ``device``."""
    device = _default_device(device)
    return {backend: ("available" if ok else why) for backend, (ok, why) in
            ((b, availability(b, device)) for b in BACKENDS)}


def format_describe(device=None, requested: Optional[str] = None, dtype: torch.dtype = torch.float32) -> str:
    """:func:`describe` as a text table, for logs."""
    device = _default_device(device)
    rows = describe(device, requested, dtype)
    width = max(len(k) for k in rows)
    lines = [f"fastmoe_kernels backends on {device.type} (requested: {requested or 'default'}, "
             f"{str(dtype).replace('torch.', '')}):"]
    lines += [f"  {kernel:<{width}}  {choice}" for kernel, choice in rows.items()]
    return "\n".join(lines)
