"""The fp8 weights, quantised once per weight version instead of once per call.

Without it every fp8 GEMM quantised its weight again (and the backward once more, transposed): ~3.6 GB
of traffic per Qwen3 training step at the first H100 run's sizes, and at decode a re-quantisation of
every expert to read the few that tokens hit. An entry holds, per weight, its e4m3 blocks and their
128×128 scales: in training both layouts (the forward's and the dgrad's transposed one), written from
one read of the weight; in inference (no backward to follow) the forward's only, until a backward
asks for the other.

When an entry is valid: the weight is the same tensor (its base, for a view, is alive: the memory
cannot have been given to another tensor), at the same address, shape, strides and dtype, and its
version counter has not moved. In-place updates (an optimizer step, ``copy_``, ``load_state_dict``)
move the version; ``param.data = …`` moves the address; either makes the next call quantise again and
replace the entry (one entry per weight: old copies are freed). What a key cannot see — memory
rewritten behind torch's back, e.g. by a sharding framework reusing a flat buffer — needs ``refresh(w)``
or ``clear()``. ``cached_bytes()`` reports the memory the entries hold.

``FASTMOE_FP8_WEIGHT_CACHE=off`` quantises on every call, as before (kept for the GPU session's A/B).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .._checks import _is_fake, _trust_key  # a tensor's identity, as the trusted value checks key it
from .._variants import flag
from ..fp8 import backward_expected

ENABLED = flag("FASTMOE_FP8_WEIGHT_CACHE", "on", ("on", "off")) == "on"

# (forward?, transposed?) → (q [E, N, K] or None, qt [E, K, N] or None, scales)
Quantiser = Callable[..., Tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]]


@dataclass
class _Entry:
    owner: "weakref.ref[torch.Tensor]"
    key: tuple
    version: int
    q: Optional[torch.Tensor]
    qt: Optional[torch.Tensor]
    scales: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.qt, self.scales) if t is not None)


_entries: Dict[int, _Entry] = {}  # id(owner) → its entry
quantisations = 0  # weight quantiser launches through the cache (tests count them)


def _owner(w: torch.Tensor) -> torch.Tensor:
    return w._base if w._base is not None else w


def _cacheable(w: torch.Tensor) -> bool:
    # Fake and functional tensors (torch.compile's tracing) have no memory to identify them by.
    return ENABLED and not _is_fake(w)


def cached_weight(w: torch.Tensor, transposed: bool, quantise: Quantiser) -> Tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight in the asked layout, its block scales) for ``w [E, N, K]``, from the cache when
    ``w`` is unchanged since it was quantised (see the module docstring)."""
    global quantisations
    if not _cacheable(w):
        q, qt, s = quantise(w, forward=not transposed, transposed=transposed)
        return (qt if transposed else q), s
    owner = _owner(w)
    entry = _entries.get(id(owner))
    valid = (entry is not None and entry.owner() is owner and entry.key == _trust_key(w) and entry.version == w._version)
    if valid and (entry.qt if transposed else entry.q) is not None:
        return (entry.qt if transposed else entry.q), entry.scales
    # A backward will ask for the dgrad's layout: one pass writes both (the op layer says whether one
    # follows; inside the op autograd is off).
    both = backward_expected.get()
    forward = not transposed or both or (valid and entry.q is not None)
    q, qt, s = quantise(w, forward=forward, transposed=transposed or both)
    quantisations += 1
    if id(owner) not in _entries:
        weakref.finalize(owner, _entries.pop, id(owner), None)
    _entries[id(owner)] = _Entry(weakref.ref(owner), _trust_key(w), w._version, q, qt, s)
    return (qt if transposed else q), s


def refresh(w: torch.Tensor) -> None:
    """Forget ``w``'s entry: its next use quantises again (for changes its version cannot show)."""
    _entries.pop(id(_owner(w)), None)


def clear() -> None:
    """Forget every entry (their memory is freed once no running GEMM holds it)."""
    _entries.clear()


def cached_bytes(device: Optional[torch.device] = None) -> int:
    """Bytes the cache's live entries hold (on ``device``, or on all)."""
    return sum(e.nbytes() for e in _entries.values() if e.owner() is not None
               and (device is None or e.scales.device == torch.device(device)))
