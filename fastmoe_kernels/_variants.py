"""The selectable variants kept for the GPU session's A/B: environment flags read once, at import,
each with its default and the values it accepts, in one registry (``FLAGS``) that the A/B script
(``benchmarks/gpu_ab.py``) and its test read. A value outside a flag's choices is an error naming the
flag, never a silent fallback to the default."""
from __future__ import annotations

import os
from typing import Dict, Tuple

FLAGS: Dict[str, Tuple[str, Tuple[str, ...]]] = {}  # name → (default, accepted values)


def flag(name: str, default: str, choices: Tuple[str, ...], doc: str = "") -> str:
    """The value of environment flag ``name`` (lower-cased, stripped; ``default`` when unset)."""
    if default not in choices:
        raise AssertionError(f"{name}: default {default!r} not among {choices}")
    FLAGS[name] = (default, tuple(choices))
    value = os.environ.get(name, default).strip().lower()
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


# How the composition's dh is computed: by torch's elementwise ops through torch.func.vjp ("torch", the
# kernels the first H100 run measured), by one elementwise kernel ("kernel", the triton backend's
# activation_grad.py), or by that kernel into h's own buffer ("kernel-in-place"). Read by two layers
# (ops/grouped_up.py gives h up in place; triton_backend/grouped_up.py picks the kernel), so it lives here.
# Predicted (bench/predictions.py, H100 rates; benchmarks/results/model-2026-12-03/): the step's GEMMs and
# activation passes Qwen3 8.20 → 7.45 ms (1.10×), Mixtral 58.28 → 54.82 (1.06×); peak memory (the CPU
# memory count, benchmarks/results/cpu-2026-12-03-memory/) at Mixtral 9.13 → 7.63 GiB with the kernel,
# 5.88 in place (torch._grouped_mm's pipeline: 6.5 on the H100).
ACTIVATION_BACKWARD = flag("FASTMOE_ACTIVATION_BACKWARD", "torch", ("torch", "kernel", "kernel-in-place"))


# Where the dH kernel's backward writes dh: a new [R, m·f] buffer ("off", default) or h's own ("on"; h
# is dead once dh exists), on the two paths whose dH kernel is the last reader of h: the composition as
# one node (FASTMOE_MLP_BACKWARD=epilogue) and the fused path's stored backward (FASTMOE_FUSED_BACKWARD=
# stored; its recomputing backward reads h again for dW_down, so it keeps the new buffer). The op layer
# gives h up through ops that declare it mutated, so that a second backward through a retained graph
# fails on h's version instead of reading dh as h; the backend writes into it where dh's layout is h's
# ([gate | up]: all but gpt-oss's interleaved dh on homogeneous experts, written in W_up's row order so
# that dx and dW_up are one GEMM each). Read by two layers (ops/, triton_backend/), so it lives here.
# Predicted (the CPU memory count, benchmarks/results/cpu-2026-12-07-memory-dh-into-h/): the node's step
# peak at Mixtral 7.00 → 5.25 GiB and the fused stored one's 6.73 → 4.98, below torch._grouped_mm's 6.5;
# no time change (the same launches, one [R, 2f] allocation fewer).
DH_INTO_H = flag("FASTMOE_DH_INTO_H", "off", ("off", "on")) == "on"
