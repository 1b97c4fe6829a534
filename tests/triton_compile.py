"""Compile every Triton kernel the layer launches for a real GPU target, on a machine without one.

The interpreter runs the kernels' logic on the CPU but never compiles them, so it cannot see what
only the compiler rejects (a loop bound of the wrong type, an unsupported dot shape, a
missing cast) nor what a config costs (registers, spills, shared memory). This script drives
MoELayer forward and backward through the ``triton`` backend with Triton's real compiler pointed
at a GPU target by a stand-in driver: every ``kernel[grid](...)`` compiles (PTX → cubin with
Triton's own ptxas) and returns without launching, and every autotune config is compiled, not
only the one a benchmark would pick. The tensors stay on the CPU and are never read by a kernel,
so the layer's outputs are meaningless here; only the compiled kernels are checked.

    python tests/triton_compile.py --arch 90 [--arch 80] [--json out.json]

Exits non-zero when a kernel fails to compile, a kernel has no config that fits the target's
shared memory or spills registers in every config, or a grouped GEMM's K loop is not
software-pipelined; prints one line per compiled kernel.
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

os.environ.pop("TRITON_INTERPRET", None)  # must precede `import triton`: compile, do not interpret
os.environ["FASTMOE_CHECKS"] = "0"  # value checks would read the (never written) kernel outputs

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction, _patch_lang  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

GEMM_KERNELS = ("_grouped_matmul_kernel", "_grouped_wgrad_kernel")
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

    def add(self, fn: JITFunction, compiled, kwargs: dict):
        meta = compiled.metadata
        consts = {k: v for k, v in kwargs.items() if k.isupper() and isinstance(v, (int, bool, str))}
        key = (fn.__name__, json.dumps(consts, sort_keys=True), meta.num_warps, meta.num_stages)
        if key in self.kernels:
            return
        regs, spills = cubin_resources(compiled.asm.get("cubin"))
        ttgir = compiled.asm.get("ttgir", "")
        self.kernels[key] = dict(kernel=fn.__name__, constexprs=consts, num_warps=meta.num_warps,
                                 num_stages=meta.num_stages, shared=meta.shared, registers=regs, spill_bytes=spills,
                                 # Software pipelining shows as asynchronous global→shared copies.
                                 async_copies=ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy"),
                                 wgmma=ttgir.count("ttng.warp_group_dot "))


RECORDER = Recorder()
_jit_run = JITFunction.run
_interpreted = {}


def _interpreter(fn: JITFunction) -> InterpretedFunction:
    if fn not in _interpreted:
        _interpreted[fn] = InterpretedFunction(fn.fn)
    return _interpreted[fn]


def _compile(fn: JITFunction, args, kwargs) -> None:
    kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    try:
        compiled = _jit_run(fn, *args, grid=None, warmup=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure is reported with the kernel's name
        consts = {k: v for k, v in kwargs.items() if k.isupper()}
        RECORDER.failures.append(f"{fn.__name__} {consts}: {type(exc).__name__}: {str(exc)[:2000]}")
        return
    RECORDER.add(fn, compiled, kwargs)


def _compile_then_interpret(self, *args, grid, warmup, **kwargs):
    # Compile for the target, then compute the outputs in the interpreter so that the host code
    # after the launch (indexing with plan outputs, say) sees real values and reaches every kernel.
    _compile(self, args, kwargs)
    if not warmup:
        _interpreter(self).run(*args, grid=grid, warmup=False, **kwargs)


def _compile_every_config(self, *args, **kwargs):
    # Compile each config (not only the winner of a benchmark); interpret with the first.
    self.nargs = dict(zip(self.arg_names, args))
    configs = self.prune_configs(kwargs)
    for config in configs:
        _compile(self.fn, args, {**kwargs, **config.all_kwargs()})
    self.nargs = None
    launch = {k: v for k, v in kwargs.items() if k != "warmup"}
    _interpreter(self.fn).run(*args, warmup=False, **launch, **configs[0].all_kwargs())


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


def drive_layer(dtype: torch.dtype) -> None:
    """Every kernel variant the layer can launch: activations, bias, widths, dispatch, routing."""
    from fastmoe_kernels import MoELayer

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
    for extra in variants:
        kw = dict(d_model=d, d_ff=32, num_experts=4, top_k=2, backend="triton")
        kw.update(extra)
        layer = MoELayer(**kw).to(dtype)
        x = torch.randn(T, d, dtype=dtype, requires_grad=True)
        y = layer(x)
        y.backward(torch.ones_like(y))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability ×10 (80, 90); repeatable")
    parser.add_argument("--dtype", action="append", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--json", help="write every compiled kernel's resources here")
    args = parser.parse_args(argv)
    arches = args.arch or [90]
    dtypes = [getattr(torch, name) for name in (args.dtype or ["bfloat16", "float16", "float32"])]

    from fastmoe_kernels import backends
    import fastmoe_kernels.triton_backend  # noqa: F401 - registers the triton kernels

    _prepare_interpreters([m for m in list(sys.modules)
                           if m.startswith(("fastmoe_kernels.triton_backend.", "triton.language"))])

    JITFunction.run = _compile_then_interpret
    JITFunction.__call__ = _call_helper
    Autotuner.run = _compile_every_config
    # The triton backend refuses CPU tensors unless interpreted; here nothing is launched.
    backends.availability = lambda backend, device: (True, "")
    print(f"triton {triton.__version__}, torch {torch.__version__}, targets sm_{arches}, dtypes {dtypes}")
    report = {}
    status = 0
    for arch in arches:
        RECORDER.kernels.clear()
        RECORDER.failures.clear()
        triton.runtime.driver.set_active(CompileOnlyDriver(arch))
        for dtype in dtypes:
            drive_layer(dtype)
        rows = sorted(RECORDER.kernels.values(), key=lambda r: (r["kernel"], r["constexprs"].get("BM", 0)))
        limit = SHARED_LIMIT.get(arch, SHARED_LIMIT[80])
        fits = defaultdict(list)
        for r in rows:
            r["fits"] = r["shared"] <= limit
            fits[r["kernel"]].append(r["fits"] and not r["spill_bytes"])
            print(f"sm_{arch} {r['kernel']:<28} warps={r['num_warps']} stages={r['num_stages']} "
                  f"shared={r['shared']:>6} async={r['async_copies']} wgmma={r['wgmma']} regs={r['registers']} spills={r['spill_bytes']} "
                  f"{'' if r['fits'] else 'EXCEEDS SHARED MEMORY '}{r['constexprs']}")
        for failure in RECORDER.failures:
            print(f"sm_{arch} COMPILE FAILURE {failure}")
        unusable = [name for name, ok in fits.items() if not any(ok)]
        for name in unusable:
            print(f"sm_{arch} {name}: no config fits in shared memory without spilling")
        # A GEMM whose sizes and offsets are multiples of 8 elements must have its K loop
        # software-pipelined (asynchronous copies); one that is not has lost an alignment or
        # contiguity fact. (Odd widths cannot be vector-loaded, so they are exempt.)
        unpipelined = [r for r in rows if r["kernel"] in GEMM_KERNELS and r["async_copies"] == 0
                       and min(v for k, v in r["constexprs"].items() if k.endswith("_ALIGN")) >= 8]
        for r in unpipelined:
            print(f"sm_{arch} {r['kernel']}: K loop not pipelined (no async copies) {r['constexprs']}")
        print(f"sm_{arch}: {len(rows)} kernels compiled, {len(RECORDER.failures)} failures, "
              f"{sum(not r['fits'] for r in rows)} configs over the shared-memory limit (the autotuner skips them), "
              f"{sum(bool(r['spill_bytes']) for r in rows)} with spills, {len(unpipelined)} GEMMs not pipelined")
        if RECORDER.failures or unusable or unpipelined or not rows:
            status = 1
        report[f"sm_{arch}"] = dict(kernels=rows, failures=list(RECORDER.failures))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
