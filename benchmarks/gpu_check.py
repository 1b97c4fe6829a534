"""Correctness at the benchmark's own shapes, on a GPU: the experts of each model layer, on every backend.

The unit tests (``pytest -m gpu tests/``) check every kernel at small sizes; the benchmark then times
them at 16,384 tokens on real layer shapes, where the autotuner picks other tiles and the indices are
large. This script checks those shapes: for each model case, the experts (dispatch, expert MLPs,
weighted combine; fixed routing) forward and backward on each backend and fusion choice, against an
fp32 computation done expert by expert on the same bf16 weights and inputs (one expert's fp32 copy
at a time, so DeepSeek-V3's 22.5 GB of experts fit). Outputs are poisoned before the kernels write
them (``FASTMOE_POISON=1``), so an unwritten element is a NaN here.

The bound is flash-attention's rule, as in tests/test_gpu.py: each backend's relative error at most
twice the torch backend's own in the same dtype (fp8 cases: the torch backend's fp8 emulation), with
a floor of 1e-3. Exit status 1 when a check fails.

    python benchmarks/gpu_check.py [--tokens 16384] [--cases Qwen3-30B-A3B,Mixtral-8x7B] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

os.environ.setdefault("FASTMOE_POISON", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastmoe_kernels import backends, ops  # noqa: E402
from fastmoe_kernels.activations import apply_activation  # noqa: E402
from fastmoe_kernels.bench.grids import model_cases, tiny_model_cases  # noqa: E402
from fastmoe_kernels.bench.runner import OUT_OF_MEMORY  # noqa: E402
from fastmoe_kernels.bench.timing import synchronize  # noqa: E402
from fastmoe_kernels.layer import MoELayer  # noqa: E402

QUANTITIES = ("out", "dx", "dweight", "dw_up", "dw_down")
FLOOR = 1e-3


class ErrorSums:
    """‖got − ref‖² and ‖ref‖² per quantity, summed piece by piece (NaN stays NaN)."""

    def __init__(self):
        self.diff = {q: 0.0 for q in QUANTITIES}
        self.ref = {q: 0.0 for q in QUANTITIES}

    def add(self, name: str, got: torch.Tensor, ref: torch.Tensor) -> None:
        got, ref = got.detach().double(), ref.detach().double()
        self.diff[name] += float((got - ref).pow(2).sum())
        self.ref[name] += float(ref.pow(2).sum())

    def relative(self) -> Dict[str, float]:
        return {q: (self.diff[q] / max(self.ref[q], 1e-300)) ** 0.5 for q in QUANTITIES}


def expert_by_expert_errors(experts, x, idx, weight, g, got: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Relative errors of ``got`` against the experts computed in fp32, one expert at a time."""
    T, k = idx.shape
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    dx = torch.zeros_like(out)
    dweight = torch.zeros(T, k, dtype=torch.float32, device=x.device)
    sums = ErrorSums()
    for e in range(experts.num_experts):
        token, slot = torch.where(idx == e)
        w_up = experts.w_up[e].detach().float().requires_grad_()
        w_down = experts.w_down[e].detach().float().requires_grad_()
        b_up = None if experts.b_up is None else experts.b_up[e].detach().float().requires_grad_()
        b_down = None if experts.b_down is None else experts.b_down[e].detach().float().requires_grad_()
        xe = x[token].detach().float().requires_grad_()
        we = weight[token, slot].detach().float().requires_grad_()
        y = F.linear(apply_activation(F.linear(xe, w_up, b_up), experts.activation), w_down, b_down)
        contribution = y * we[:, None]
        out.index_add_(0, token, contribution.detach())
        (contribution * g[token].float()).sum().backward()
        dx.index_add_(0, token, xe.grad)
        dweight[token, slot] = we.grad
        # An expert no token reached has a zero reference gradient: ours must be written as zeros.
        sums.add("dw_up", got["dw_up"][e], w_up.grad if w_up.grad is not None else torch.zeros_like(w_up))
        sums.add("dw_down", got["dw_down"][e], w_down.grad if w_down.grad is not None else torch.zeros_like(w_down))
    sums.add("out", got["out"], out)
    sums.add("dx", got["dx"], dx)
    sums.add("dweight", got["dweight"], dweight)
    return sums.relative()


def run_experts(experts, x, idx, weight, g, backend: str, fused: Optional[bool]) -> Dict[str, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    for p in experts.parameters():
        p.grad = None
    plan = ops.make_plan(idx, experts.num_experts, None, "probs", weight.detach(), False, backend=backend)
    out = experts.forward_tokens(x, plan, weight, backend=backend, fused=fused)
    out.backward(g)
    synchronize(x.device)
    got = dict(out=out.detach(), dx=x.grad, dweight=weight.grad, dw_up=experts.w_up.grad, dw_down=experts.w_down.grad)
    for p in experts.parameters():
        p.grad = None
    return got


def variants(device: torch.device):
    """(label, backend, fused) of every backend this machine has; the torch backend first (the bound)."""
    chosen = [("torch", "torch", None)]
    for name in ("triton", "cuda" if device.type == "cuda" else "cpp"):
        ok, why = backends.availability(name, device)
        if not ok:
            print(f"  backend {name} unavailable: {why}", flush=True)
            continue
        chosen.append((name, name, True))
        chosen.append((f"{name}-unfused", name, False))
    return chosen


def check_case(case, tokens: int, device: torch.device) -> List[dict]:
    torch.manual_seed(int(time.time()) % 2**31)  # fresh inputs every run
    dtype = case.torch_dtype
    layer = MoELayer(case.config(), device=device, dtype=dtype)
    experts = layer.experts
    x = torch.randn(tokens, case.d_model, device=device).to(dtype)
    g = torch.randn(tokens, case.d_model, device=device).to(dtype)
    with torch.no_grad():
        route = layer.router(x)
    idx, weight = route.expert_idx, route.weight.detach()
    rows, bound = [], None
    for label, backend, fused in variants(device):
        start = time.perf_counter()
        try:
            got = run_experts(experts, x, idx, weight, g, backend, fused)
            errors = expert_by_expert_errors(experts, x, idx, weight, g, got)
            error = None
        except Exception as exc:  # a launch failure or a crash is a result to report, not the end of the run
            errors, error = {}, f"{type(exc).__name__}: {str(exc)[:300]}"
            synchronize(device)
        if label == "torch" and not error:
            bound = {q: max(FLOOR, 2 * v) for q, v in errors.items()}
        failed = error or [q for q, v in errors.items() if not (bound and v <= bound[q])]
        rows.append(dict(case=case.label, tokens=tokens, backend=label, errors=errors, error=error,
                         failed=failed or [], seconds=round(time.perf_counter() - start, 2)))
        status = "FAIL " + str(failed) if failed else "ok"
        print(f"  {case.label:22s} {label:15s} " + " ".join(f"{q}={errors.get(q, float('nan')):.2e}" for q in QUANTITIES)
              + f"  {status}", flush=True)
    del layer, experts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--cases", default=None, help="comma-separated model labels (default: all)")
    p.add_argument("--json", default=None)
    p.add_argument("--dry-run", action="store_true",
                   help="the script itself on any device: tiny fp32 stand-ins of the model cases")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    all_cases = tiny_model_cases() if args.dry_run else model_cases()
    cases = [c for c in all_cases if not args.cases or c.label in args.cases.split(",")]
    if args.dry_run:
        args.tokens = cases[0].tokens if cases else 64
    rows = []
    for case in cases:
        try:
            rows += check_case(case, args.tokens, device)
        except OUT_OF_MEMORY as exc:
            rows.append(dict(case=case.label, backend="*", error=f"out of memory: {str(exc)[:200]}", failed=["oom"]))
            print(f"  {case.label}: out of memory", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    failed = [r for r in rows if r["failed"]]
    print(f"gpu_check: {len(rows) - len(failed)} of {len(rows)} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
