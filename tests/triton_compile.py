"""Compile every Triton kernel the layer launches for a real GPU target, on a machine without one.

The interpreter runs the kernels' logic on the CPU but never compiles them, so it cannot see what
only the compiler rejects (a loop bound of the wrong type, an unsupported dot shape, a
missing cast) nor what a config costs (registers, spills, shared memory). This script drives
MoELayer forward and backward through the ``triton`` backend with Triton's real compiler pointed
at a GPU target by a stand-in driver: every ``kernel[grid](...)`` compiles (PTX → cubin with
Triton's own ptxas) and returns without launching, and every autotune config is compiled, not
only the one a benchmark would pick. The tensors stay on the CPU and are never read by a kernel,
so the layer's outputs are meaningless here; only the compiled kernels are checked.

    python tests/triton_compile.py --arch 90 [--arch 80] [--json out.json] [--part-b | --part-b-only | --router-only |
                                   --fp8-only | --activation-grad-only | --decode-only]

Exits non-zero when a kernel fails to compile; when a config that the autotuner's pruner keeps does
not fit the target's shared memory (the pruner's estimate is too low), or variants that share an
autotune key keep different configs (a config tuned on one would be reused for the other: the
backward's shared-memory crash of a key that ignored a second operand); when a kernel has no
usable config; or when a grouped GEMM's K loop is not software-pipelined. Prints one line per
compiled kernel.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from typing import Optional

os.environ.pop("TRITON_INTERPRET", None)  # must precede `import triton`: compile, do not interpret
os.environ["FASTMOE_CHECKS"] = "0"  # value checks would read the (never written) kernel outputs

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction, _patch_lang  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

GEMM_KERNELS = ("_grouped_matmul_kernel", "_up_projection_kernel", "_activation_backward_kernel", "_grouped_wgrad_kernel")
# The fp8 GEMMs (fp8_recipe="blockwise"), compiled for targets with fp8 tensor cores (sm_89 and later):
# their K loops must be pipelined and, on sm_90, their products fp8 wgmma.
FP8_KERNELS = ("_fp8_matmul_kernel", "_fp8_wgrad_kernel", "_fp8_up_quant_kernel", "_fp8_dgrad_quant_kernel")
FP8_ARCH = 89
# A spill of a few registers outside the K loop costs nothing measurable; more makes a config unusable.
SPILL_TOLERANCE = 64
# Opt-in shared memory per block (bytes): A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}


class CompileOnlyDriver:
    """Just enough of a Triton driver for ``JITFunction.run`` to pick a target and compile."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class Recorder:
    def __init__(self):
        self.kernels = {}  # (name, config text) -> record
        self.failures = []
        self.pruned = 0  # configs the pruners dropped (over the target's shared memory, or spilling accumulators)
        self.dump_dir = None  # --dump-ir: each kernel's TTGIR and PTX written here

    def add(self, fn: JITFunction, compiled, kwargs: dict, tuning: Optional[dict] = None):
        meta = compiled.metadata
        consts = {k: v for k, v in kwargs.items() if k.isupper() and isinstance(v, (int, bool, str))}
        key = (fn.__name__, json.dumps(consts, sort_keys=True), meta.num_warps, meta.num_stages)
        if key in self.kernels:
            if tuning:
                self.kernels[key].setdefault("tuning", []).append(tuning)
            return
        regs, spills = cubin_resources(compiled.asm.get("cubin"))
        ttgir = compiled.asm.get("ttgir", "")
        if self.dump_dir:
            stem = os.path.join(self.dump_dir, f"{fn.__name__}-{len(self.kernels)}")
            with open(stem + ".ttgir", "w") as f:
                f.write(f"// {key}\n" + ttgir)
            with open(stem + ".ptx", "w") as f:
                f.write(compiled.asm.get("ptx", ""))
        self.kernels[key] = dict(kernel=fn.__name__, constexprs=consts, num_warps=meta.num_warps,
                                 tuning=[tuning] if tuning else [],
                                 num_stages=meta.num_stages, shared=meta.shared, registers=regs, spill_bytes=spills,
                                 # Software pipelining shows as asynchronous global→shared copies.
                                 async_copies=ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy"),
                                 wgmma=ttgir.count("ttng.warp_group_dot "),
                                 # TMA copies (pipelined descriptor loads), and descriptor loads left unpipelined.
                                 tma_copies=ttgir.count("async_tma_copy_global_to_local"),
                                 tma_stores=ttgir.count("async_tma_copy_local_to_global"),
                                 descriptor_loads=ttgir.count("tt.descriptor_load"),
                                 fp8_wgmma=sum("ttng.warp_group_dot " in line and "f8E4M3FN" in line
                                               for line in ttgir.splitlines()),
                                 # The wgmma groups each wait leaves in flight (0: the tensor cores drain;
                                 # ≥ 1: a product still runs while the code after the wait does).
                                 wgmma_waits=sorted(int(m) for m in re.findall(
                                     r"ttng\.warp_group_dot_wait .*?pendings = (\d+)", ttgir)))


RECORDER = Recorder()
_jit_run = JITFunction.run
_interpreted = {}


def _interpreter(fn: JITFunction) -> InterpretedFunction:
    if fn not in _interpreted:
        _interpreted[fn] = InterpretedFunction(fn.fn)
    return _interpreted[fn]


def _compile(fn: JITFunction, args, kwargs, tuning: Optional[dict] = None) -> None:
    kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    try:
        compiled = _jit_run(fn, *args, grid=None, warmup=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure is reported with the kernel's name
        consts = {k: v for k, v in kwargs.items() if k.isupper()}
        RECORDER.failures.append(f"{fn.__name__} {consts}: {type(exc).__name__}: {str(exc)[:2000]}")
        return
    RECORDER.add(fn, compiled, kwargs, tuning)


def autotune_key(tuner: Autotuner, args, kwargs) -> str:
    """The key under which Triton's autotuner caches a tuned config: the values of the ``key``
    arguments, then the dtypes of every tensor argument (Triton's own rule)."""
    named = {k: v for k, v in {**dict(zip(tuner.arg_names, args)), **kwargs}.items() if k in tuner.arg_names}
    key = [named[k] for k in tuner.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return json.dumps([str(k) for k in key])


def _compile_then_interpret(self, *args, grid, warmup, **kwargs):
    # Compile for the target, then compute the outputs in the interpreter so that the host code
    # after the launch (indexing with plan outputs, say) sees real values and reaches every kernel.
    _compile(self, args, kwargs)
    if not warmup:
        _interpreter(self).run(*args, grid=grid, warmup=False, **kwargs)


def _compile_every_config(self, *args, **kwargs):
    # Compile every config the pruner keeps for this launch (not only a benchmark's winner), noting its
    # autotune key; count the pruned ones (never launched, so not compiled); interpret with the first.
    self.nargs = dict(zip(self.arg_names, args))
    kept = self.prune_configs(kwargs)
    key = autotune_key(self, args, kwargs)
    RECORDER.pruned += len(self.configs) - len(kept)
    for config in kept:
        tuning = dict(key=key, kept=True, estimate=_estimate(self, config, args, kwargs))
        _compile(self.fn, args, {**kwargs, **config.all_kwargs()}, tuning)
    self.nargs = None
    launch = {k: v for k, v in kwargs.items() if k != "warmup"}
    _interpreter(self.fn).run(*args, warmup=False, **launch, **kept[0].all_kwargs())


def _estimate(tuner: Autotuner, config, args, kwargs) -> Optional[int]:
    """The pruner's shared-memory estimate for ``config`` at this launch (None without a pruner)."""
    prune = getattr(tuner.early_config_prune, "estimate", None)
    if prune is None:
        return None
    return prune(config, {**dict(zip(tuner.arg_names, args)), **kwargs})


def _call_helper(self, *args, **kwargs):
    # Inside an interpreted kernel, @triton.jit helpers (ours and triton.language's, e.g. tl.sum)
    # run as interpreted device functions. The patches of triton.language they need are undone on
    # return (the interpreter's own device-function call leaves them, which would break the next
    # real compilation).
    scope = _patch_lang(self.fn)
    try:
        return _interpreter(self).rewrite()(*args, **kwargs)
    finally:
        scope.restore()


def _prepare_interpreters(module_names) -> None:
    # Rewrite every kernel for the interpreter up front, while triton.language is unpatched
    # (the rewrite inspects the function's globals, which a running interpreter has patched).
    for name in module_names:
        module = sys.modules[name]
        for value in list(vars(module).values()):
            fn = value.fn if isinstance(value, Autotuner) else value
            if isinstance(fn, JITFunction):
                _interpreter(fn).rewrite()


def cubin_resources(cubin):
    """(registers per thread, spill bytes) from cuobjdump (Triton ships one), or (None, None)."""
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = bundled if os.path.exists(bundled) else shutil.which("cuobjdump")
    if not cubin or not tool:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    # Triton kernels keep no arrays on the stack: a stack frame is spilled registers.
    stack = re.search(r"STACK:(\d+)", out)
    return (int(regs.group(1)) if regs else None), (int(stack.group(1)) if stack else None)


# The subsets a run can be limited to (``--<name>-only``): what each drives, given (layer class, dtype, arch).
ONLY = {
    "fp8": lambda layer, dtype, arch: _fp8_steps(layer, dtype, arch),
    "part-b": lambda layer, dtype, arch: _part_b_steps(layer, 96, 64, dtype),
    "router": lambda layer, dtype, arch: [_part_b_steps(layer, 96, 64, t, only=[ROUTER]) for t in (dtype, torch.float32)],
    "activation-grad": lambda layer, dtype, arch: _activation_grad_steps(layer, 96, 64, dtype),
    "decode": lambda layer, dtype, arch: [_decode_forwards(layer, 64, dtype), _fp8_decode_forward(layer, dtype, arch)],
    "tma": lambda layer, dtype, arch: _tma_steps(layer, 96, 64, dtype),
    "tma-stores": lambda layer, dtype, arch: _tma_store_steps(layer, 96, 64, dtype),
    "fp8-fused": lambda layer, dtype, arch: _fp8_fused_steps(layer, dtype, arch),
}


def drive_layer(dtype: torch.dtype, arch: int, only: Optional[str] = None, part_b: bool = False) -> None:
    """Every kernel variant the layer's defaults can launch: activations, bias, widths, dispatch,
    routing, the fp8 GEMMs where the target has fp8 tensor cores, the activation-gradient kernel and
    the decode tiles; the training issue's part B variants too with ``part_b`` (CI's time holds the
    defaults' kernels for two targets, not these; their record is committed,
    benchmarks/results/sm90-compile-2026-12-03-part-b/). ``only``: one subset of ``ONLY`` instead."""
    from fastmoe_kernels import MoELayer

    if only is not None:
        ONLY[only](MoELayer, dtype, arch)
        return

    T, d = 96, 64
    variants = []
    for act in ("swiglu", "geglu", "gelu", "relu"):
        for fused in (True, False):
            variants.append(dict(activation=act, fused_experts=fused))
            variants.append(dict(activation=act, fused_experts=fused, bias=True, d_ff=[32, 64, 48, 16]))
    variants += [
        # Widths that are multiples of 8 only (still pipelined), and odd ones (hints of 1).
        dict(d_ff=[24, 40, 8, 56]),
        dict(activation="gelu", bias=True, d_ff=[5, 7, 3, 9]),
        dict(capacity_factor=1.25, drop_policy="probs"),
        dict(capacity_factor=1.0, drop_policy="position", pad_to_capacity=True),
        dict(score_func="sigmoid", num_groups=2, topk_groups=1, expert_bias=True, routed_scaling_factor=2.5),
        dict(num_shared_experts=1, shared_d_ff=64, shared_expert_gate=True, normalize_topk=False),
    ]
    # The other activations' epilogues (their own constexpr codes), fused, with bias.
    variants += [dict(activation=act, bias=True) for act in ("swiglu_oai", "geglu_tanh", "silu", "gelu_tanh", "relu2")]
    for extra in variants:
        _train_step(MoELayer, T, d, dtype, extra)
    _fp8_steps(MoELayer, dtype, arch)
    _interleaved_step(T, d, dtype)
    _activation_grad_steps(MoELayer, T, d, dtype)
    _decode_forwards(MoELayer, d, dtype)
    if part_b:
        _part_b_steps(MoELayer, T, d, dtype)
    # The int64-offset variants (weights whose in-matrix offsets pass 2³¹) compile and pipeline too.
    from fastmoe_kernels.triton_backend._layout import ExpertMatrices

    int32_offsets = ExpertMatrices.offsets_64
    ExpertMatrices.offsets_64 = property(lambda self: True)
    try:
        for extra in (dict(), dict(activation="geglu", bias=True, d_ff=[32, 64, 48, 16], fused_experts=False)):
            _train_step(MoELayer, T, d, dtype, extra)
    finally:
        ExpertMatrices.offsets_64 = int32_offsets


# The training issue's part B variants (selected by environment flags read at import; set here on the
# modules): the composition as one node, the fused path's stored backward with contiguous rows and
# x[src] materialised, and the dH epilogue whole or split.
# The router's fp32 GEMMs on tensor cores (FASTMOE_ROUTER_GEMM): bf16 operands take one tf32 pass, fp32
# ones (and the backward's fp32 gradient) tf32x3.
ROUTER = ({"fastmoe_kernels.router": {"ROUTER_GEMM": "tensor-cores"}}, dict())
PART_B = [
    ({"fastmoe_kernels.ops.grouped_mlp": {"MLP_BACKWARD": "epilogue"}}, dict(fused_experts=False)),
    ({"fastmoe_kernels.ops.grouped_mlp": {"MLP_BACKWARD": "epilogue"}},
     dict(fused_experts=False, activation="geglu", bias=True, d_ff=[32, 64, 48, 16])),
    ({"fastmoe_kernels.triton_backend.moe_mlp": {"FUSED_BACKWARD": "stored", "DOWN_OUTPUT": "rows"}},
     dict(fused_experts=True)),
    ({"fastmoe_kernels.triton_backend.moe_mlp": {"FUSED_BACKWARD": "stored", "DOWN_OUTPUT": "rows",
                                                  "UP_WGRAD_X": "permuted"}},
     dict(fused_experts=True, activation="gelu", bias=True, d_ff=[32, 64, 48, 16])),
    ROUTER,
]


def _flagged(settings: dict, run) -> None:
    """``run()`` with module flags set (module name → {attribute: value}), restored after."""
    import importlib

    saved = []
    for module_name, values in settings.items():
        module = importlib.import_module(module_name)
        for name, value in values.items():
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, value)
    try:
        run()
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def _flagged_step(layer_cls, T: int, d: int, dtype: torch.dtype, settings: dict, extra: dict) -> None:
    """A training step with module flags set (module name → {attribute: value}), restored after."""
    _flagged(settings, lambda: _train_step(layer_cls, T, d, dtype, extra))


def _part_b_steps(layer_cls, T: int, d: int, dtype: torch.dtype, only=None) -> None:
    for flags, extra in (only or PART_B):
        for epilogue in ("whole", "split"):
            settings = {**flags, "fastmoe_kernels.triton_backend.activation_backward": {"EPILOGUE": epilogue}}
            _flagged_step(layer_cls, T, d, dtype, settings, extra)


# The composition's activation backward as one elementwise kernel (FASTMOE_ACTIVATION_BACKWARD=kernel):
# gated and not. The GEMMs of these steps are the defaults' (compiled already: only the new kernel is).
ACTIVATION_GRAD = {"fastmoe_kernels.triton_backend.grouped_up": {"ACTIVATION_BACKWARD": "kernel"}}


def _decode_forwards(layer_cls, d: int, dtype: torch.dtype) -> None:
    """Inference at 4 tokens over 4 experts (2 rows per expert: the M_BUCKET where the forward's GEMMs
    offer the decode tiles), fused and composed, gated and not, heterogeneous widths, a shared expert."""
    for extra in (dict(), dict(fused_experts=False), dict(activation="gelu", bias=True, d_ff=[32, 64, 48, 16]),
                  dict(activation="swiglu_oai", num_shared_experts=1, shared_d_ff=64)):
        kw = dict(d_model=d, d_ff=32, num_experts=4, top_k=2, backend="triton")
        kw.update(extra)
        layer = layer_cls(**kw).to(dtype)
        with torch.no_grad():
            layer(torch.randn(4, d, dtype=dtype))


# The forward's weights through TMA descriptors (FASTMOE_B_LOADS=tma): both forward GEMM kernels.
# (The tool compiles CPU tensors for a GPU target: the layouts' device check is told it has TMA.)
TMA_B = {"fastmoe_kernels.triton_backend._tma": {"B_LOADS": "tma", "interpreted": lambda: True}}


def _pointer_and_tma_steps(layer_cls, T: int, d: int, dtype: torch.dtype, flags: dict, name: str, extras,
                           values=("pointer", "tma")) -> None:
    """Training steps (``extras``) and a 4-token forward (the decode tiles) with the module flag ``name``
    "pointer", then "tma" (then any other of ``values``), so that the record compares them at the same configs."""
    for value in values:
        settings = {module: dict(module_flags, **{name: value}) for module, module_flags in flags.items()}
        for extra in extras:
            _flagged_step(layer_cls, T, d, dtype, settings, extra)
        _flagged(settings, lambda: _decode_forwards(layer_cls, d, dtype))


def _tma_steps(layer_cls, T: int, d: int, dtype: torch.dtype) -> None:
    """The forward's kernels with descriptors (the backward's are the defaults'), fused and composed,
    gated and not."""
    _pointer_and_tma_steps(layer_cls, T, d, dtype, TMA_B, "B_LOADS",
                           (dict(), dict(fused_experts=False), dict(activation="gelu", bias=True),
                            dict(activation="gelu", fused_experts=False)))


# The contiguous output tiles by TMA stores (FASTMOE_C_STORES=tma): the up projection's act(h) (and h with tma+h), the
# composition's down projection and input gradient, and a 4-token forward; each also with pointer stores.
TMA_C = {"fastmoe_kernels.triton_backend._tma": {"C_STORES": "tma", "interpreted": lambda: True}}


def _tma_store_steps(layer_cls, T: int, d: int, dtype: torch.dtype) -> None:
    _pointer_and_tma_steps(layer_cls, T, d, dtype, TMA_C, "C_STORES",
                           (dict(), dict(fused_experts=False), dict(activation="gelu", bias=True, fused_experts=False)),
                           values=("pointer", "tma", "tma+h"))


def expected_tma_stores(row: dict) -> int:
    """TMA stores a C_TMA kernel's TTGIR must hold: one per output it writes."""
    c = row["constexprs"]
    if row["kernel"] == "_up_projection_kernel" and c.get("STORE_H") and c.get("H_TMA"):
        return 1 + (2 if c.get("GATED") else 1)
    return 1


def _activation_grad_steps(layer_cls, T: int, d: int, dtype: torch.dtype) -> None:
    for extra in (dict(fused_experts=False), dict(activation="gelu", fused_experts=False, bias=True,
                                                  d_ff=[32, 64, 48, 16])):
        _flagged_step(layer_cls, T, d, dtype, ACTIVATION_GRAD, extra)


def _fp8_steps(layer_cls, dtype: torch.dtype, arch: int) -> None:
    if arch >= FP8_ARCH:
        # d and f of 2-3 scaling tiles, so that every K loop runs more than once.
        for extra in (dict(d_ff=384), dict(d_ff=256, bias=True, activation="gelu", capacity_factor=1.0,
                                           pad_to_capacity=True)):
            _train_step(layer_cls, 96, 256, dtype, dict(extra, fp8_recipe="blockwise"))
        _fp8_decode_forward(layer_cls, dtype, arch)


def _fp8_decode_forward(layer_cls, dtype: torch.dtype, arch: int) -> None:
    """The fp8 layer's forward at 4 tokens (M_BUCKET 2: the fp8 product's decode tiles offered)."""
    if arch >= FP8_ARCH:
        layer = layer_cls(d_model=256, d_ff=256, num_experts=4, top_k=2, backend="triton",
                          fp8_recipe="blockwise").to(dtype)
        with torch.no_grad():
            layer(torch.randn(4, 256, dtype=dtype))


# The fp8 quantisers fused into their producers (FASTMOE_FP8_QUANTISERS=fused, ops/fp8_moe_node.py): gated
# with the halves side by side and interleaved (gpt-oss), ungated with a padded capacity plan, and folded.
FP8_FUSED = {"fastmoe_kernels.ops.fp8_moe_node": {"QUANTISERS": "fused"}}


def _fp8_fused_steps(layer_cls, dtype: torch.dtype, arch: int) -> None:
    if arch < FP8_ARCH:
        return
    for extra in (dict(d_ff=384), dict(d_ff=256, activation="relu2", capacity_factor=1.0, pad_to_capacity=True)):
        _flagged_step(layer_cls, 96, 256, dtype, FP8_FUSED, dict(extra, fp8_recipe="blockwise"))
    _flagged(FP8_FUSED, lambda: _interleaved_fp8_step(96, 256, dtype))
    # the routing weight folded into the dgrad's row scales (the dgrad's FOLDED variant)
    folded = {"fastmoe_kernels.ops.fp8_moe_node": {"QUANTISERS": "fused-folded"}}
    _flagged_step(layer_cls, 96, 256, dtype, folded, dict(d_ff=384, fp8_recipe="blockwise"))


def _interleaved_fp8_step(T: int, d: int, dtype: torch.dtype) -> None:
    from fastmoe_kernels.activations import Activation
    from fastmoe_kernels.ops import make_plan
    from fastmoe_kernels.ops.fp8_mlp import moe_mlp_fp8

    E, f, k = 4, 160, 2
    x = torch.randn(T, d, dtype=dtype, requires_grad=True)
    w_up = torch.randn(E, 2 * f, d, dtype=dtype, requires_grad=True)
    w_down = torch.randn(E, d, f, dtype=dtype, requires_grad=True)
    plan = make_plan(torch.randint(0, E, (T, k)), E)
    weight = torch.rand(T, k, dtype=dtype)
    y = moe_mlp_fp8(x, plan, weight, w_up, w_down, Activation("swiglu_oai", 1.702, 7.0, interleaved=True),
                    backend="triton")
    y.backward(torch.ones_like(y))


def _train_step(layer_cls, T: int, d: int, dtype: torch.dtype, extra: dict) -> None:
    kw = dict(d_model=d, d_ff=32, num_experts=4, top_k=2, backend="triton")
    kw.update(extra)
    layer = layer_cls(**kw).to(dtype)
    x = torch.randn(T, d, dtype=dtype, requires_grad=True)
    y = layer(x)
    y.backward(torch.ones_like(y))


def _interleaved_step(T: int, d: int, dtype: torch.dtype) -> None:
    """gpt-oss's layout: gate/up rows interleaved, read in place (every other row)."""
    from fastmoe_kernels.activations import Activation
    from fastmoe_kernels.ops import make_plan, moe_mlp

    E, f, k = 4, 32, 2
    x = torch.randn(T, d, dtype=dtype, requires_grad=True)
    w_up = torch.randn(E, 2 * f, d, dtype=dtype, requires_grad=True)
    w_down = torch.randn(E, d, f, dtype=dtype, requires_grad=True)
    b_up = torch.randn(E, 2 * f, dtype=dtype, requires_grad=True)
    plan = make_plan(torch.randint(0, E, (T, k)), E)
    weight = torch.rand(T, k, dtype=dtype)
    y = moe_mlp(x, plan, weight, w_up, w_down, Activation("swiglu_oai", 1.702, 7.0, interleaved=True), b_up,
                backend="triton")
    y.backward(torch.ones_like(y))


# The constexprs an autotune config sets: tile sizes and the tile orders (_gemm.expert_tile's GROUP_M, the
# weight gradient's GROUP_K).
CONFIG_CONSTEXPRS = ("BM", "BN", "BK", "GROUP_M", "GROUP_K", "PARTS")


def _variant(record: dict) -> str:
    """A launch's constexprs without the config's own (tile sizes, tile order): which variant of a
    kernel it compiled."""
    return json.dumps({k: v for k, v in record["constexprs"].items() if k not in CONFIG_CONSTEXPRS}, sort_keys=True)


def check_configs(rows, limit: int) -> list:
    """What would break or mislead autotuning on this target (see the module docstring)."""
    problems = []
    kept_by_key = defaultdict(lambda: defaultdict(set))  # (kernel, key) -> variant -> kept configs
    usable = defaultdict(bool)  # (kernel, variant) -> some kept config fits without spilling
    for r in rows:
        r["fits"] = r["shared"] <= limit
        config = (*(r["constexprs"].get(k) for k in CONFIG_CONSTEXPRS), r["num_warps"], r["num_stages"])
        variant = _variant(r)
        if not r["tuning"]:  # not autotuned: its one config must fit
            usable[(r["kernel"], variant)] |= r["fits"]
        for t in r["tuning"]:
            if not t["kept"]:
                continue
            kept_by_key[(r["kernel"], t["key"])][variant].add(config)
            usable[(r["kernel"], variant)] |= r["fits"] and (r["spill_bytes"] or 0) <= SPILL_TOLERANCE
            if not r["fits"]:
                problems.append(f"{r['kernel']}: a kept config needs {r['shared']} bytes of shared memory > {limit} "
                                f"(the pruner estimated {t['estimate']}) {r['constexprs']}")
    for (kernel, key), variants in kept_by_key.items():
        if len({frozenset(v) for v in variants.values()}) > 1:
            problems.append(f"{kernel}: variants sharing autotune key {key} keep different configs "
                            f"({len(variants)} variants): a config tuned on one would be reused for another")
    for (kernel, variant), ok in usable.items():
        if not ok:
            problems.append(f"{kernel}: no kept config fits in shared memory without spilling more than "
                            f"{SPILL_TOLERANCE} bytes {variant}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability ×10 (80, 90); repeatable")
    parser.add_argument("--dtype", action="append", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--json", help="write every compiled kernel's resources here")
    parser.add_argument("--dump-ir", metavar="DIR", help="write every compiled kernel's TTGIR and PTX into DIR")
    parser.add_argument("--part-b", action="store_true",
                        help="also the training issue's part B variants (node, stored backward, split dH)")
    only = parser.add_mutually_exclusive_group()
    for name, what in (("fp8", "the fp8 kernels (fp8_recipe='blockwise')"), ("part-b", "the part B variants"),
                       ("router", "the router's tensor-core GEMMs"),
                       ("activation-grad", "the composition's activation-gradient kernel (FASTMOE_ACTIVATION_BACKWARD=kernel)"),
                       ("decode", "the forward at 4 tokens (the decode tiles, FASTMOE_DECODE_TILES)"),
                       ("tma", "the forward's GEMMs with the weights through TMA descriptors (FASTMOE_B_LOADS=tma)"),
                       ("tma-stores", "the up projection's and the grouped matmul's contiguous tiles by TMA stores (FASTMOE_C_STORES=tma)"),
                       ("fp8-fused", "the fp8 quantisers fused into their producers (FASTMOE_FP8_QUANTISERS=fused)")):
        only.add_argument(f"--{name}-only", dest="only", action="store_const", const=name, help=f"only {what}")
    args = parser.parse_args(argv)
    arches = args.arch or [90]
    if args.dump_ir:
        os.makedirs(args.dump_ir, exist_ok=True)
        RECORDER.dump_dir = args.dump_ir
    dtypes = [getattr(torch, name) for name in (args.dtype or ["bfloat16", "float16", "float32"])]

    from fastmoe_kernels import backends
    import fastmoe_kernels.triton_backend  # noqa: F401 - registers the triton kernels
    from fastmoe_kernels.triton_backend import _common

    _prepare_interpreters([m for m in list(sys.modules)
                           if m.startswith(("fastmoe_kernels.triton_backend.", "triton.language"))])

    JITFunction.run = _compile_then_interpret
    JITFunction.__call__ = _call_helper
    Autotuner.run = _compile_every_config
    # The triton backend refuses CPU tensors unless interpreted; here nothing is launched.
    backends.availability = lambda backend, device: (True, "")
    backends.set_default_backend("triton")
    print(f"triton {triton.__version__}, torch {torch.__version__}, targets sm_{arches}, dtypes {dtypes}")
    report = {}
    status = 0
    for arch in arches:
        RECORDER.kernels.clear()
        RECORDER.failures.clear()
        RECORDER.pruned = 0
        triton.runtime.driver.set_active(CompileOnlyDriver(arch))
        limit = SHARED_LIMIT.get(arch, SHARED_LIMIT[80])
        _common.shared_memory_override = limit  # what the pruners compare with on this target
        for dtype in dtypes:
            drive_layer(dtype, arch, args.only, args.part_b)
        rows = sorted(RECORDER.kernels.values(), key=lambda r: (r["kernel"], r["constexprs"].get("BM", 0)))
        problems = check_configs(rows, limit)
        for r in rows:
            kept = any(t["kept"] for t in r["tuning"]) if r["tuning"] else True
            estimate = max((t["estimate"] or 0 for t in r["tuning"]), default=None)
            print(f"sm_{arch} {r['kernel']:<28} warps={r['num_warps']} stages={r['num_stages']} "
                  f"shared={r['shared']:>6} estimate={estimate} async={r['async_copies']} wgmma={r['wgmma']} "
                  f"fp8_wgmma={r['fp8_wgmma']} tma={r['tma_copies']}/{r['descriptor_loads']} tma_st={r['tma_stores']} "
                  f"regs={r['registers']} spills={r['spill_bytes']} {'' if kept else 'PRUNED '}"
                  f"{'' if r['fits'] else 'EXCEEDS SHARED MEMORY '}{r['constexprs']}")
        for failure in RECORDER.failures:
            print(f"sm_{arch} COMPILE FAILURE {failure}")
        for problem in problems:
            print(f"sm_{arch} {problem}")
        # A GEMM whose sizes and offsets are multiples of 8 elements must have its K loop
        # software-pipelined (asynchronous copies); one that is not has lost an alignment or
        # contiguity fact. (Odd widths cannot be vector-loaded, so they are exempt.)
        unpipelined = [r for r in rows if r["kernel"] in GEMM_KERNELS and r["async_copies"] == 0
                       and min(v for k, v in r["constexprs"].items() if k.endswith("_ALIGN")) >= 8
                       and any(t["kept"] for t in r["tuning"])]
        for r in unpipelined:
            print(f"sm_{arch} {r['kernel']}: K loop not pipelined (no async copies) {r['constexprs']}")
        for r in (r for r in rows if r["kernel"] in FP8_KERNELS):
            if r["async_copies"] == 0:
                unpipelined.append(r)
                print(f"sm_{arch} {r['kernel']}: fp8 K loop not pipelined (no async copies) {r['constexprs']}")
            # (a 16-row decode tile is under wgmma's 64 rows: mma.sync, as the bf16 decode tiles)
            if arch >= 90 and r["fp8_wgmma"] == 0 and r["constexprs"].get("BM") != 16:
                problems.append(f"{r['kernel']}: no fp8 wgmma on sm_{arch} {r['constexprs']}")
                print(f"sm_{arch} {problems[-1]}")
        for r in (r for r in rows if r["constexprs"].get("C_TMA")):
            # The output tiles through TMA: a TMA store for each output the kernel writes (the up
            # projection: act(h), and h's gate and up halves when it keeps h).
            if arch >= 90 and r["tma_stores"] != expected_tma_stores(r):
                problems.append(f"{r['kernel']}: C_TMA with {r['tma_stores']} TMA stores, not "
                                f"{expected_tma_stores(r)}, on sm_{arch} {r['constexprs']}")
                print(f"sm_{arch} {problems[-1]}")
        for r in (r for r in rows if r["constexprs"].get("B_TMA")):
            # The weights through TMA: each descriptor load a pipelined TMA copy, none left as a plain load.
            if arch >= 90 and (r["tma_copies"] == 0 or r["descriptor_loads"]):
                problems.append(f"{r['kernel']}: descriptor loads not pipelined TMA copies on sm_{arch} "
                                f"({r['tma_copies']} copies, {r['descriptor_loads']} plain) {r['constexprs']}")
                print(f"sm_{arch} {problems[-1]}")
        print(f"sm_{arch}: {len(rows)} kernels compiled ({RECORDER.pruned} launch configs pruned before compiling), "
              f"{len(RECORDER.failures)} failures, {len(problems)} config problems, "
              f"{sum(bool(r['spill_bytes']) for r in rows)} with spills, {len(unpipelined)} GEMMs not pipelined")
        if RECORDER.failures or problems or unpipelined or not rows:
            status = 1
        report[f"sm_{arch}"] = dict(kernels=rows, failures=list(RECORDER.failures), problems=problems)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
