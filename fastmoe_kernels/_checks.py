"""Input validation shared by the ops and modules.

Every public entry point checks what it is given and raises an error that names the argument and
what was expected. Checks of shapes, dtypes and devices cost nothing. Checks that read tensor
*values* (expert ids in range, finite logits, monotone offsets) run in one of three modes:

- ``"sync"``: the error is raised by the call that was given the bad value. On a GPU this reads a
  result back, which synchronises the host with the device once per check.
- ``"async"``: the check's result is copied to the host without waiting; the error is raised by the
  first value check (of any op) after the GPU has finished the bad call — typically one call later —
  or by :func:`flush_value_checks`. No synchronisation, and CUDA-graph capture is not disturbed
  (checks are skipped while a graph is being captured). A bad input given to the very last call of a
  run is reported only by a flush: call :func:`flush_value_checks` after a step to be sure.
- ``"off"``: nothing is read. The kernels still never read or write out of bounds for the values these
  checks cover (out-of-range ids are dropped, group offsets clamped to the rows; they skip what is
  out of range), but bad input then gives undefined values.

The default, ``"auto"``, is ``"sync"`` for CPU tensors (no device to wait for) and ``"async"`` for
GPU tensors. ``FASTMOE_CHECKS`` (1/auto, sync, async, 0/off) or :func:`set_value_checks` choose.
"""
from __future__ import annotations

import collections
import contextlib
import os
import threading
import weakref
from typing import Callable, Iterable, List, Optional, Union

import torch

from ._variants import flag

CHECK_MODES = ("auto", "sync", "async", "off")
_mode_override: Optional[str] = None


def _normalise_mode(value: Union[bool, str, None], source: str) -> str:
    if value is True:
        return "auto"
    if value is False:
        return "off"
    name = str(value).strip().lower()
    aliases = {"1": "auto", "on": "auto", "true": "auto", "yes": "auto", "": "auto",
               "0": "off", "false": "off", "no": "off"}
    name = aliases.get(name, name)
    if name not in CHECK_MODES:
        raise ValueError(f"{source}: expected one of {CHECK_MODES} (or 1/0), got {value!r}")
    return name


def value_check_mode(device: Optional[torch.device] = None) -> str:
    """How value checks run for tensors on ``device``: "sync", "async" or "off"."""
    mode = _mode_override if _mode_override is not None else _normalise_mode(
        os.environ.get("FASTMOE_CHECKS", "auto"), "FASTMOE_CHECKS")
    if mode == "auto":
        return "sync" if device is None or device.type == "cpu" else "async"
    return mode


def value_checks_enabled() -> bool:
    """Whether checks that read tensor values run at all."""
    return value_check_mode() != "off"


def set_value_checks(mode: Union[bool, str, None]) -> None:
    """Value checks on (True / "auto"), "sync", "async" or off (False / "off"); None returns to the
    ``FASTMOE_CHECKS`` environment variable."""
    global _mode_override
    _mode_override = None if mode is None else _normalise_mode(mode, "set_value_checks")


class _PendingChecks:
    """Results of asynchronous checks on their way to the host, oldest first."""

    def __init__(self):
        self.queue = collections.deque()  # (host values, event or None, message builder)
        self.lock = threading.Lock()

    def submit(self, values: torch.Tensor, message: Callable[[List], str]) -> None:
        """Queue ``values`` (computed on the current stream of their device, which is current)."""
        if values.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(values.device))
            entry = (host, event, message)
        else:  # nothing to wait for; still reported later, like on a GPU
            entry = (values, None, message)
        with self.lock:
            self.queue.append(entry)

    def poll(self, wait: bool = False) -> None:
        """Raise the first failure among the checks whose results have arrived (all, with ``wait``)."""
        while True:
            with self.lock:
                if not self.queue:
                    return
                host, event, message = self.queue[0]
                if event is not None:
                    if wait:
                        event.synchronize()
                    elif not event.query():
                        return
                self.queue.popleft()
                values = host.tolist()
                if values[0]:
                    self.queue.clear()
                    raise ValueError(message(values) + " (found by an asynchronous value check after that call "
                                     "ran; FASTMOE_CHECKS=sync raises at the call itself)")


_PENDING = _PendingChecks()


def flush_value_checks() -> None:
    """Wait for every pending asynchronous value check and raise the first failure (call it after a
    step, or in tests, to make sure the inputs of the calls so far were valid)."""
    _PENDING.poll(wait=True)


def _on(device: torch.device):
    """Make the data's device current: its current stream is the one the check must follow."""
    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


def check_values(device: torch.device, stats: Callable[[], torch.Tensor], message: Callable[[List], str]) -> None:
    """Run one value check: ``stats()`` computes a small 1-D integer tensor on ``device`` whose first
    element is nonzero on failure; ``message(values)`` builds the error from its values."""
    mode = value_check_mode(device)
    if mode == "off":
        return
    with _on(device):
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return  # a CUDA graph is being captured: the check would be replayed with nobody reading it
        _PENDING.poll()
        values = stats()
        if mode == "sync":
            host = values.tolist()
            if host[0]:
                raise ValueError(message(host))
        else:
            _PENDING.submit(values, message)


# ---- values the package made itself --------------------------------------------------------------
# A dispatch plan from make_plan and the expert ids from route_topk are valid by construction: their
# value checks would only cost launches (each ~9 tiny kernels and a device-to-host copy, ~0.5 ms of
# host and launch time per GEMM on the first H100 run's traces). They are trusted while unchanged: the
# tensor is still alive (so its memory cannot have been reused by another) and its version counter,
# which every in-place edit increments (views share it), has not moved. Anything else is checked.
_trusted: dict = {}
# FASTMOE_TRUST_VALUES=0 checks everything as before (kept selectable for the GPU session's A/B of
# host time; read once).
TRUST_VALUES = flag("FASTMOE_TRUST_VALUES", "1", ("0", "1")) == "1"


def _trust_key(t: torch.Tensor) -> tuple:
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), tuple(t.stride()))


def trust(*tensors: torch.Tensor) -> None:
    """Mark tensors the package computed as valid inputs of the value checks (see above)."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and not _is_fake(t) and t.numel():
            _trusted[_trust_key(t)] = (weakref.ref(t), t._version)


def is_trusted(t: torch.Tensor) -> bool:
    """Whether ``t`` is (an alias of) a tensor the package made and nobody has changed since."""
    if not TRUST_VALUES or _is_fake(t):
        return False
    key = _trust_key(t)
    entry = _trusted.get(key)
    if entry is None:
        return False
    original, version = entry
    if original() is None:  # freed: the memory may now hold another tensor
        del _trusted[key]
        return False
    return t._version == version


def _is_fake(t: torch.Tensor) -> bool:
    # Fake and functional tensors (torch.compile's tracing) have no memory to identify them by.
    return type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter)


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accum_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 for half/bf16/fp32 data, fp64 when any input is fp64 (tests and gradcheck run in fp64)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
INDEX_DTYPES = (torch.int32, torch.int64)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    where: str,
    name: str,
    t,
    *,
    ndim: Optional[int] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    shape: Optional[tuple] = None,
    device: Optional[torch.device] = None,
) -> None:
    """Raise TypeError/ValueError naming ``where`` and ``name`` if ``t`` is not as expected.

    ``shape`` entries that are None are not checked.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        expected = f"[{', '.join('?' if s is None else str(s) for s in shape)}]" if shape else f"{ndim}-D"
        raise ValueError(f"{where}: `{name}` must be {expected}, got shape {list(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{where}: `{name}` must have dtype {_dtype_names(dtypes)}, got {t.dtype}")
    if shape is not None:
        ok = len(shape) == t.dim() and all(s is None or s == d for s, d in zip(shape, t.shape))
        if not ok:
            expected = ", ".join("?" if s is None else str(s) for s in shape)
            raise ValueError(f"{where}: `{name}` must have shape [{expected}], got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{where}: `{name}` is on {t.device} but must be on {device} like the other inputs")


def check_int(where: str, name: str, value, *, low: Optional[int] = None, high: Optional[int] = None) -> None:
    """Raise if ``value`` is not an int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{where}: `{name}` must be an int, got {type(value).__name__}")
    if isinstance(value, torch.SymInt):
        return
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{where}: `{name}` must be in [{lo}, {hi}], got {value}")


def check_optional_bool(where: str, name: str, value) -> None:
    """``value`` is None (the package decides), True or False."""
    if value not in (None, True, False):
        raise TypeError(f"{where}: `{name}` must be None, True or False, got {value!r}")


def check_choice(where: str, name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{where}: `{name}` must be one of {choices}, got {value!r}")


def check_ids_in_range(where: str, name: str, ids: torch.Tensor, upper: int, allow_unassigned: bool = False) -> None:
    """Value check: every entry of ``ids`` lies in [0, upper) (or is -1 when ``allow_unassigned``); ids
    from the package's own router (trusted, unchanged) need none."""
    if ids.numel() == 0 or is_trusted(ids):
        return
    low = -1 if allow_unassigned else 0

    def stats():
        lo, hi = torch.aminmax(ids)
        lo, hi = lo.long(), hi.long()
        return torch.stack([((lo < low) | (hi >= upper)).long(), lo, hi])

    def message(values):
        allowed = f"[0, {upper}) or -1 (no expert)" if allow_unassigned else f"[0, {upper})"
        return f"{where}: `{name}` must hold ids in {allowed}, found values in [{values[1]}, {values[2]}]"

    check_values(ids.device, stats, message)


def check_finite(where: str, name: str, t: torch.Tensor) -> None:
    """Value check: no NaN or Inf in ``t``."""
    if t.numel() == 0:
        return

    def stats():
        return (~torch.isfinite(t)).sum().reshape(1)

    def message(values):
        return f"{where}: `{name}` contains {values[0]} NaN/Inf values; router logits must be finite"

    check_values(t.device, stats, message)
