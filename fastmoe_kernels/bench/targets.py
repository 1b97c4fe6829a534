"""What is timed for one case.

Every target shares one set of weights and one routing (drawn once per case):

- ``layer``: ``MoELayer`` on each available backend ("triton" fused, "triton-unfused", "torch",
  "cuda"); ``fwd`` is inference (no autograd), ``fwd+bwd`` a training step of the layer;
- ``experts``: dispatch plan + expert MLPs + combine for fixed routing — ours on each backend, and
  the baselines (naive loop, ``torch._grouped_mm``, Hugging Face implementations);
- ops: ``route``, ``plan``, ``permute``, ``grouped_up``, ``grouped_down``, ``unpermute`` (the
  weighted combine), on each backend;
- rooflines: ``dense_gemm`` (one dense GEMM with the experts' FLOPs), ``dense_up`` / ``dense_down``
  (the grouped GEMMs' shapes without grouping), on torch's GEMM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import backends, ops
from ..layer import MoELayer
from .baselines import build_baselines
from .cases import BenchCase
from .timing import Rotation, rotation_count

MODES = ("fwd", "fwd+bwd")


@dataclass
class Target:
    op: str
    impl: str
    mode: str
    run: Callable[[], object]
    flops: float = 0.0
    bytes: float = 0.0
    roofline: Optional[str] = None  # the dense op this one's rate is compared with
    track_memory: bool = False


def kernel_backends(device: torch.device, requested: Optional[List[str]] = None) -> Tuple[List[str], Dict[str, str]]:
    """Backends to benchmark on ``device`` and, for the others, why not."""
    chosen, skipped = [], {}
    for name in requested or list(backends.BACKENDS):
        if name == "triton" and device.type != "cuda":
            skipped[name] = "Triton is timed on GPUs only (its CPU interpreter is for tests)"
            continue
        ok, why = backends.availability(name, device)
        if ok:
            chosen.append(name)
        else:
            skipped[name] = why
    return chosen, skipped


def _train_step(fn: Callable[[torch.Tensor], torch.Tensor], params: List[torch.Tensor], grad: torch.Tensor,
                rotation: Rotation) -> Callable[[], object]:
    def run():
        for p in params:
            p.grad = None
        x = rotation.next()
        x.grad = None
        out = fn(x)
        out.backward(grad)
    return run


def _infer(fn: Callable[[torch.Tensor], torch.Tensor], rotation: Rotation) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn(rotation.next())
    return run


def build_targets(case: BenchCase, device: torch.device, backend_names: List[str], *, with_ops: bool = True,
                  with_baselines: bool = True, skips: Optional[Dict[str, str]] = None) -> List[Target]:
    skips = {} if skips is None else skips
    dtype = case.torch_dtype
    gen = torch.Generator(device="cpu").manual_seed(0)
    T, d, E = case.tokens, case.d_model, case.num_experts
    eb = case.elem_bytes()
    reference = MoELayer(case.config(), device=device, dtype=dtype)
    n_sets = rotation_count(T * d * eb, device)
    xs = Rotation(lambda i: torch.randn(T, d, generator=gen).to(device, dtype), n_sets)
    xs_grad = Rotation(lambda i: torch.randn(T, d, generator=gen).to(device, dtype).requires_grad_(), n_sets)
    grad_out = torch.randn(T, d, generator=gen).to(device, dtype)
    with torch.no_grad():
        route = reference.router(xs.items[0])
    idx, weight = route.expert_idx, route.weight.detach()
    plan = reference.dispatcher.plan(idx, weight, backend="torch")
    R = plan.num_rows
    m = 2 if case.gated else 1
    targets: List[Target] = []

    layer_flops = {mode: case.expert_flops(mode == "fwd+bwd") for mode in MODES}
    routed_only = {mode: case.routed_flops(mode == "fwd+bwd") for mode in MODES}

    # ---- the layer and the experts, on every backend ----------------------------------------------
    variants = [(b, None) for b in backend_names] + ([("triton-unfused", False)] if "triton" in backend_names else [])
    for impl, fused in variants:
        backend = "triton" if impl == "triton-unfused" else impl
        layer = MoELayer(case.config(fused_experts=fused), device=device, dtype=dtype, backend=backend)
        layer.load_state_dict(reference.state_dict())
        params = list(layer.parameters())
        targets.append(Target("layer", impl, "fwd", _infer(layer, xs), layer_flops["fwd"], roofline="dense_gemm"))
        targets.append(Target("layer", impl, "fwd+bwd", _train_step(layer, params, grad_out, xs_grad),
                              layer_flops["fwd+bwd"], roofline="dense_gemm", track_memory=True))
        experts = layer.experts

        def experts_fn(x, experts=experts, backend=backend, fused=fused, layer=layer):
            p = ops.make_plan(idx, E, plan.capacity, layer.config.drop_policy, weight, layer.config.pad_to_capacity,
                              backend=backend)
            return experts.forward_tokens(x, p, weight, backend=backend, fused=fused)

        targets.append(Target("experts", impl, "fwd", _infer(experts_fn, xs), routed_only["fwd"], roofline="dense_gemm"))
        targets.append(Target("experts", impl, "fwd+bwd", _train_step(experts_fn, list(experts.parameters()), grad_out, xs_grad),
                              routed_only["fwd+bwd"], roofline="dense_gemm", track_memory=True))
        if with_ops and impl != "triton-unfused":
            targets += _op_targets(case, device, backend, layer, xs, idx, weight, plan, gen)

    # ---- baselines, on the same weights and routing --------------------------------------------------
    if with_baselines:
        if case.capacity_factor is not None:
            skips["baselines"] = "the baselines are dropless; capacity cases compare our backends only"
        else:
            for name, fn in build_baselines(reference.experts, xs.items[0], idx, weight).items():
                if isinstance(fn, str):
                    skips[name] = fn
                    continue
                params = list(reference.experts.parameters())
                targets.append(Target("experts", name, "fwd", _infer(lambda x, fn=fn: fn(x, idx, weight), xs),
                                      routed_only["fwd"], roofline="dense_gemm"))
                targets.append(Target("experts", name, "fwd+bwd",
                                      _train_step(lambda x, fn=fn: fn(x, idx, weight), params, grad_out, xs_grad),
                                      routed_only["fwd+bwd"], roofline="dense_gemm", track_memory=True))

    # ---- dense rooflines (torch's GEMM) ----------------------------------------------------------------
    f = case.d_ff
    equivalent_n = max(8, int(round(layer_flops["fwd"] / (2.0 * max(R, 1) * d))))
    for name, (rows, inner, outer) in {"dense_gemm": (R, d, equivalent_n), "dense_up": (R, d, m * f),
                                       "dense_down": (R, f, d)}.items():
        a_rot = Rotation(lambda i, r=rows, c=inner: torch.randn(max(r, 1), c, generator=gen).to(device, dtype), n_sets)
        a_grad = Rotation(lambda i, r=rows, c=inner: torch.randn(max(r, 1), c, generator=gen).to(device, dtype).requires_grad_(), n_sets)
        w = torch.randn(outer, inner, generator=gen).to(device, dtype).requires_grad_()
        g = torch.randn(max(rows, 1), outer, generator=gen).to(device, dtype)
        flops = 2.0 * max(rows, 1) * inner * outer
        linear = lambda a, w=w: torch.nn.functional.linear(a, w)
        targets.append(Target(name, "dense", "fwd", _infer(linear, a_rot), flops))
        targets.append(Target(name, "dense", "fwd+bwd", _train_step(linear, [w], g, a_grad), 3 * flops))
    return targets


def _op_targets(case: BenchCase, device, backend: str, layer: MoELayer, xs: Rotation, idx, weight, plan, gen) -> List[Target]:
    """The layer's ops one by one, forward and forward+backward, on one backend."""
    T, d, E, k = case.tokens, case.d_model, case.num_experts, case.top_k
    eb = case.elem_bytes()
    cfg = layer.config
    R = plan.num_rows
    out: List[Target] = []
    logits = Rotation(lambda i: torch.randn(T, E, generator=gen).to(device), 2)
    logits_grad = Rotation(lambda i: torch.randn(T, E, generator=gen).to(device).requires_grad_(), 2)

    def route(l):
        _, w, p = ops.route_topk(l, k, cfg.score_func, cfg.normalize_topk, return_probs=True, backend=backend)
        return w.sum() + p.sum()

    route_bytes = T * E * 4 * 2 + T * k * 8
    out.append(Target("route", backend, "fwd", _infer(route, logits), bytes=route_bytes))
    out.append(Target("route", backend, "fwd+bwd", _train_step(lambda l: route(l), [], torch.ones(()).to(device), logits_grad),
                      bytes=route_bytes + T * E * 4))
    cap = plan.capacity
    plan_fn = lambda: ops.make_plan(idx, E, cap, cfg.drop_policy, weight, cfg.pad_to_capacity, backend=backend)
    out.append(Target("plan", backend, "fwd", plan_fn, bytes=T * k * 4 * 2 + R * 4 + T * k * 4))

    x_grad = Rotation(lambda i: xs.items[i % len(xs.items)].detach().clone().requires_grad_(), len(xs.items))
    permute = lambda x: ops.permute(x, plan, backend=backend)
    move = (T + R) * d * eb
    out.append(Target("permute", backend, "fwd", _infer(permute, xs), bytes=move))
    out.append(Target("permute", backend, "fwd+bwd", _train_step(permute, [], torch.randn(R, d, generator=gen).to(device, xs.items[0].dtype), x_grad),
                      bytes=2 * move))
    with torch.no_grad():
        x_perm = ops.permute(xs.items[0], plan, backend="torch")
    ex = layer.experts
    rows = Rotation(lambda i: x_perm.clone().requires_grad_(), 2)
    up = lambda a: ops.grouped_gemm(a, ex.w_up, plan.offsets, True, backend=backend)
    m = 2 if case.gated else 1
    g_up = torch.randn(R, m * case.d_ff, generator=gen).to(device, x_perm.dtype)
    out.append(Target("grouped_up", backend, "fwd", _infer(up, rows), case.gemm_flops("up"), roofline="dense_up"))
    out.append(Target("grouped_up", backend, "fwd+bwd", _train_step(up, [ex.w_up], g_up, rows), case.gemm_flops("up", True),
                      roofline="dense_up"))
    hidden = Rotation(lambda i: torch.randn(R, case.d_ff, generator=gen).to(device, x_perm.dtype).requires_grad_(), 2)
    down = lambda a: ops.grouped_gemm(a, ex.w_down, plan.offsets, True, backend=backend)
    g_down = torch.randn(R, d, generator=gen).to(device, x_perm.dtype)
    out.append(Target("grouped_down", backend, "fwd", _infer(down, hidden), case.gemm_flops("down"), roofline="dense_down"))
    out.append(Target("grouped_down", backend, "fwd+bwd", _train_step(down, [ex.w_down], g_down, hidden),
                      case.gemm_flops("down", True), roofline="dense_down"))
    y_rows = Rotation(lambda i: torch.randn(R, d, generator=gen).to(device, x_perm.dtype).requires_grad_(), 2)
    w_grad = weight.clone().requires_grad_()
    unpermute = lambda y: ops.unpermute(y, plan, w_grad, backend=backend)
    g_tok = torch.randn(T, d, generator=gen).to(device, x_perm.dtype)
    out.append(Target("unpermute", backend, "fwd", _infer(unpermute, y_rows), bytes=move + T * k * 8))
    out.append(Target("unpermute", backend, "fwd+bwd", _train_step(unpermute, [w_grad], g_tok, y_rows), bytes=3 * move))
    return out
