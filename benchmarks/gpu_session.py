"""The GPU session: one prepared call (≤ 480 s) that checks, measures and tunes, in phases.

Each phase has a priority (the order it runs in) and a time budget; it writes under ``$OUT/<phase>/``
and archives that folder to ``$OUT/<phase>.tgz`` as soon as it ends, so a call cut short still brings
back every phase that finished (the device tool returns at most 8 files: 7 archives and the summary).
A phase that would start with less than its minimum time left is skipped and says so.

1. ``env`` (30 s): versions, ``nvidia-smi``, peers' wheels from ``.whl/`` installed, the device's
   ceilings (``gpu_ceilings.py``: copy, dense, fill, latency).
2. ``compile`` (90 s): the session's cases' kernels compiled in parallel processes
   (``gpu_prewarm.py``); a failure stops the session, loudly (nothing after it could be trusted).
3. ``check`` (80 s): the GPU tests of the kernels changed since the last GPU run (``CHECK_TESTS``; the
   cuda backend's own tests only if ``csrc/`` changed), fp32 and bf16, forward and backward, one
   autotune config per key; ``gpu_check.py`` at the Qwen3 and Mixtral shapes. A failure stops the
   session: nothing is measured on wrong kernels.
4. ``ab`` (80 s): ``gpu_ab.py``, every selectable variant against its alternative, the kernel model's
   predictions beside.
5. ``headline`` (140 s): ``fastmoe-bench --grid gpu --sweeps models``, cases in priority order (Qwen3
   and Mixtral first), our implementations against the baselines and peers, and the tuning table
   (``--tune``) written from it.
6. ``profile`` (50 s): ``gpu_profile.py`` with the host's activity (host gaps attributed) at Qwen3 and
   Mixtral, and the kernel model's explanation of it (``bench.explain``).
7. ``tune`` (10 s): the tuning table, the measured ceilings and the model's comparison, for commit.

Before the call (here, no device time): the peers' wheels into ``.whl/`` (ignored by git, named in the
device tool's ``carry``), by the device README's recipe, e.g. ``python3 -m pip download --no-deps
--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
--platform manylinux_2_24_x86_64 -d .whl liger-kernel==0.8.5 torchao==0.18.0``.

    OUT=/path python benchmarks/gpu_session.py [--budget-s 480] [--phases env,check,...]
    python benchmarks/gpu_session.py --dry-run --out DIR    (the whole script on a CPU: tiny shapes, CI)
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
LAST_GPU_RUN = "6c1f44f"  # the commit the first H100 run measured (benchmarks/results/h100-2026-11-24)
# GPU tests of what changed since that run (the kernel tests of the GEMMs, the layer, the tools).
CHECK_TESTS = ["tests/kernel_tests/test_grouped_gemm.py", "tests/kernel_tests/test_grouped_up.py", "tests/kernel_tests/test_moe_mlp.py",
               "tests/kernel_tests/test_layer.py", "tests/test_gpu.py", "tests/test_tuning.py", "tests/test_trusted_values.py",
               # the part B variants, the router's tensor-core GEMMs and the fp8 weight cache (bf16 runs
               # only here: the interpreters multiply it wrongly)
               "tests/kernel_tests/test_training_variants.py", "tests/kernel_tests/test_router_logits.py",
               "tests/kernel_tests/test_fp8_weight_cache.py", "tests/kernel_tests/test_fp8_fused.py",
               # the activation-gradient kernel and the decode tiles (the forward issue)
               "tests/kernel_tests/test_activation_grad.py", "tests/kernel_tests/test_decode_tiles.py",
               # the weights through TMA descriptors and the outputs by TMA stores, the plan kernels'
               # in-kernel key and row fill
               "tests/kernel_tests/test_tma_b.py", "tests/kernel_tests/test_tma_c.py", *(f"tests/kernel_tests/test_plan.py::{t}" for t in (
                   "test_int64_ids_and_rows_no_assignment_fills", "test_unassigned_ids", "test_chunks_of_many_tiles"))]
CUDA_TESTS = ["tests/kernel_tests/test_permute.py", "tests/kernel_tests/test_plan.py", "tests/kernel_tests/test_route_topk.py"]
SESSION_CASES = "Qwen3-30B-A3B,Mixtral-8x7B"
FP8_SESSION_CASES = "Mixtral-8x7B fp8,Qwen3-30B-A3B fp8"  # warmed too: the A/B's fp8 variants run on them
HEADLINE_ORDER = ["Qwen3-30B-A3B", "Mixtral-8x7B", "gpt-oss-20b", "DeepSeek-V3", "OLMoE", "Mixtral-8x7B fp8",
                  "Qwen3-30B-A3B fp8"]


@dataclass
class Phase:
    name: str
    budget_s: float
    min_s: float           # skipped when less than this is left
    run: Callable[["Session", pathlib.Path, float], None]
    fatal: bool = False    # a failure stops the session


class PhaseFailed(RuntimeError):
    pass


class Session:
    def __init__(self, out: pathlib.Path, budget_s: float, dry_run: bool):
        self.out, self.dry_run = out, dry_run
        self.deadline = time.monotonic() + budget_s
        self.summary: List[str] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        if dry_run:
            self.env["TRITON_INTERPRET"] = "1"
        else:  # the compiled kernels stay in the checkout for a rerun on the warm machine
            self.env.setdefault("TRITON_CACHE_DIR", str(ROOT / ".triton-cache"))
            self.env.setdefault("FASTMOE_CACHE_DIR", str(ROOT / ".fastmoe-cache"))
        # The ceilings the later phases read, outside $OUT (whose files are the phases' archives).
        self.ceilings = pathlib.Path(tempfile.mkdtemp(prefix="fastmoe-session-")) / "ceilings.json"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sh(self, cmd: List[str], log: pathlib.Path, timeout: float, env: Optional[Dict[str, str]] = None,
           check: bool = False) -> int:
        """Run ``cmd`` with its output to ``log`` (and the last lines echoed), within ``timeout`` s."""
        started = time.monotonic()
        with open(log, "w") as f:
            try:
                code = subprocess.run(cmd, cwd=ROOT, env=dict(self.env, **(env or {})), stdout=f,
                                      stderr=subprocess.STDOUT, timeout=max(timeout, 1)).returncode
            except subprocess.TimeoutExpired:
                code = 124
        tail = log.read_text(errors="replace").splitlines()[-3:]
        note = f"  {' '.join(cmd[1:3] if cmd[0] == sys.executable else cmd[:2])}: exit {code} in {time.monotonic() - started:.0f} s"
        print(note + "".join(f"\n    {line[:200]}" for line in tail), flush=True)
        if check and code != 0:
            raise PhaseFailed(f"{cmd} exited {code} (log {log.name})")
        return code

    def py(self, script: str, *args: str) -> List[str]:
        return [sys.executable, str(BENCH / script), *args] if script.endswith(".py") else [sys.executable, "-m", script, *args]


def archive(folder: pathlib.Path) -> pathlib.Path:
    """``folder`` into ``folder.tgz`` beside it, then the folder removed (few files come back)."""
    target = folder.with_suffix(".tgz")
    with tarfile.open(target, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    shutil.rmtree(folder)
    return target


# ---- the phases ---------------------------------------------------------------------------------------
def phase_env(s: Session, d: pathlib.Path, budget: float) -> None:
    (d / "versions.txt").write_text(subprocess.run(
        [sys.executable, "-c", "import torch, triton, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda,"
         " 'triton', triton.__version__, 'python', platform.python_version()); print('device',"
         " torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"],
        capture_output=True, text=True, env=s.env).stdout + subprocess.run(
        ["git", "log", "-1", "--format=commit %H %s"], cwd=ROOT, capture_output=True, text=True).stdout)
    if shutil.which("nvidia-smi"):
        s.sh(["nvidia-smi", "--query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit,driver_version",
              "--format=csv"], d / "nvidia-smi.txt", 20)
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if wheels:  # the peers (Liger-Kernel, torchao), carried as wheels: the device README's recipe
        site = "/tmp/site"
        s.sh([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
              "--upgrade", "--target", site, *map(str, wheels)], d / "wheels.log", 60)
        s.env["PYTHONPATH"] = f"{s.env['PYTHONPATH']}{os.pathsep}{site}"
    s.sh(s.py("gpu_ceilings.py", "--out", str(d / "ceilings.json"), *(["--dry-run"] if s.dry_run else [])),
         d / "ceilings.log", budget, check=True)
    shutil.copy(d / "ceilings.json", s.ceilings)


def phase_compile(s: Session, d: pathlib.Path, budget: float) -> None:
    # (A dry run warms the defaults only: CI's two cores run the interpreter.)
    cases = ["--cases", "Qwen3-30B-A3B", "--dry-run", "--variants", "default"] if s.dry_run else [
        "--cases", f"{SESSION_CASES},{FP8_SESSION_CASES}"]
    s.sh(s.py("gpu_prewarm.py", *cases), d / "prewarm.log", budget, check=True)


def _csrc_changed() -> bool:
    diff = subprocess.run(["git", "diff", "--quiet", LAST_GPU_RUN, "HEAD", "--", "csrc"], cwd=ROOT)
    return diff.returncode != 0


def phase_check(s: Session, d: pathlib.Path, budget: float) -> None:
    tests = CHECK_TESTS + (CUDA_TESTS if _csrc_changed() else [])
    pytest = [sys.executable, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", "--maxfail=20",
              f"--junitxml={d / 'tests.xml'}"]
    if s.dry_run:
        pytest += ["-k", "table or trusted or padded or pinned"]  # a few quick ones: the script is what is checked
    else:
        pytest += ["-m", "gpu", "-n", "8"]
    code = s.sh(pytest, d / "tests.log", budget * 0.6, env={"FASTMOE_AUTOTUNE": "one"})
    check_args = ["--cases", SESSION_CASES, "--json", str(d / "check.json")]
    if s.dry_run:
        check_args.append("--dry-run")
    else:
        check_args += ["--tokens", "8192"]
    code_check = s.sh(s.py("gpu_check.py", *check_args), d / "check.log", max(s.left() - 5, 1) if s.dry_run else budget * 0.4)
    if code or code_check:
        raise PhaseFailed(f"correctness: pytest exit {code}, gpu_check exit {code_check} — nothing is measured")


def phase_ab(s: Session, d: pathlib.Path, budget: float) -> None:
    s.sh(s.py("gpu_ab.py", "--out", str(d), "--budget-s", str(budget - 5), *(["--dry-run"] if s.dry_run else [])),
         d / "ab.log", budget)


def phase_headline(s: Session, d: pathlib.Path, budget: float) -> None:
    args = ["--out", str(d / "bench"), "--quiet", "--no-plots", "--tune", str(d / "tuned.json"),
            "--budget-minutes", f"{max(budget - 20, 10) / 60:.2f}"]
    if s.dry_run:
        args += ["--grid", "smoke", "--sweeps", "base", "--ops", "none"]
    else:
        args += ["--grid", "gpu", "--sweeps", "models", "--ops", "none", "--backends", "triton,cuda",
                 "--case-order", ",".join(HEADLINE_ORDER)]
    s.sh([sys.executable, "-m", "fastmoe_kernels.bench", *args], d / "headline.log", budget)


def phase_profile(s: Session, d: pathlib.Path, budget: float) -> None:
    args = ["--out", str(d), "--cpu-activity", "--ceilings", str(s.ceilings), "--steps", "2"]
    args += ["--cases", "Qwen3-30B-A3B", "--dry-run"] if s.dry_run else ["--cases", SESSION_CASES]
    s.sh(s.py("gpu_profile.py", *args), d / "profile.log", budget)


def phase_tune(s: Session, d: pathlib.Path, budget: float) -> None:
    """What to commit: the tuning table (from the headline archive's run), the ceilings, and the model's
    explanation of this run's profile with the measured fill rate."""
    shutil.copy(s.ceilings, d / "ceilings.json")
    headline = s.out / "headline.tgz"
    if headline.is_file():
        with tarfile.open(headline) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("tuned.json")), None)
            if member is not None:
                (d / "tuned.json").write_bytes(tar.extractfile(member).read())
    profile = s.out / "profile.tgz"
    if profile.is_file() and not s.dry_run:
        with tarfile.open(profile) as tar:
            tar.extractall(d / "run", filter="data")
        (d / "run" / "profile").rename(d / "run" / "session-profile")
        s.sh(s.py("fastmoe_kernels.bench.explain", str(d / "run"), "--folders", "session-profile", "--device",
                  json.loads((d / "ceilings.json").read_text())["device"].get("name", "NVIDIA H200"), "--out", str(d)),
             d / "explain.log", budget)
        shutil.rmtree(d / "run", ignore_errors=True)


PHASES = [
    Phase("env", 30, 10, phase_env, fatal=True),
    # The csrc extension builds in here too (first use, ~50 s on the H100 machine), beside Triton's compiles.
    Phase("compile", 90, 20, phase_compile, fatal=True),
    Phase("check", 80, 40, phase_check, fatal=True),
    Phase("ab", 80, 30, phase_ab),
    Phase("headline", 140, 60, phase_headline),
    Phase("profile", 50, 25, phase_profile),
    Phase("tune", 10, 3, phase_tune),
]


def run(out: pathlib.Path, budget_s: float, names: Optional[List[str]] = None, dry_run: bool = False) -> int:
    out.mkdir(parents=True, exist_ok=True)
    session = Session(out, budget_s, dry_run)
    status = 0
    for phase in PHASES:
        if names and phase.name not in names:
            continue
        left = session.left()
        if left < phase.min_s:
            session.summary.append(f"{phase.name}: skipped ({left:.0f} s left, needs {phase.min_s:.0f})")
            continue
        budget = min(phase.budget_s, left - 2) if not dry_run else left - 2
        folder = out / phase.name
        folder.mkdir(exist_ok=True)
        started = time.monotonic()
        print(f"== {phase.name} (≤ {budget:.0f} s)", flush=True)
        try:
            phase.run(session, folder, budget)
            result = "ok"
        except Exception as exc:  # recorded with the phase; a fatal phase ends the session
            result = f"FAILED: {type(exc).__name__}: {str(exc)[:300]}"
            (folder / "failure.txt").write_text(result + "\n")
            status = 1
        archive(folder)
        session.summary.append(f"{phase.name}: {result} in {time.monotonic() - started:.0f} s")
        if result != "ok" and phase.fatal:
            session.summary.append("session stopped: the phases after a failed check would measure nothing trustworthy")
            break
    text = "\n".join(session.summary)
    (out / "summary.txt").write_text(text + "\n")
    print("== summary\n" + text, flush=True)
    return status


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "gpu-out")))
    p.add_argument("--budget-s", type=float, default=480.0)
    p.add_argument("--phases", default=None, help="comma-separated phases to run (default: all)")
    p.add_argument("--dry-run", action="store_true", help="every phase on this machine at tiny sizes (CI)")
    args = p.parse_args(argv)
    return run(pathlib.Path(args.out), args.budget_s, args.phases.split(",") if args.phases else None, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
