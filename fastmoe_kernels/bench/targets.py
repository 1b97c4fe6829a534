"""What is timed for one case.

Every target shares one set of weights and one routing (drawn once per case):

- ``layer``: ``MoELayer`` on each available backend with its defaults ("triton", "torch", "cuda"), and
  the fusion choices spelled out ("triton-fused", "triton-unfused", "cuda-unfused": see
  ``sweeps.IMPL_VARIANTS``); ``fwd`` is inference (no autograd), ``fwd+bwd`` a training step; at the
  model shapes on a GPU also "triton-graphed", the triton layer replayed from CUDA graphs (eager and
  graphed side by side: what the host's Python and launches cost);
- ``experts``: dispatch plan + expert MLPs + combine for fixed routing — ours on each backend, and
  the baselines (naive loop, ``torch._grouped_mm``, Hugging Face implementations);
- ops: ``route``, ``plan``, ``permute``, ``grouped_up``, ``grouped_down``, ``unpermute`` (the
  weighted combine), on each backend;
- rooflines: ``dense_gemm`` (one dense GEMM with the experts' FLOPs), ``dense_up`` / ``dense_down``
  (the grouped GEMMs' shapes without grouping), on torch's GEMM; ``copy`` (a device copy, the
  bandwidth the decode cases are compared with).

Every backend's layer shares the reference layer's parameters (a shallow copy with its own backend
and fusion choice), so a case's weights exist once on the device: a DeepSeek-V3 layer's routed
experts alone are 22.5 GB in bf16.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import backends, ops
from ..layer import MoELayer
from .baselines import build_baselines, probe
from .peers import build_peers
from .cases import BenchCase
from .sweeps import GRAPHED_IMPL, IMPL_VARIANTS, impl_backend
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


def _shared_variant(reference: MoELayer, backend: str, fused: Optional[bool]) -> MoELayer:
    """The reference layer on another backend, sharing its parameters and buffers."""
    layer = copy.copy(reference)
    layer.config = reference.config.replace(fused_experts=fused)
    layer.backend = backend
    return layer


def _copy_target(case: BenchCase, device: torch.device) -> Target:
    """A device copy at least as large as the case's weights (and past the caches): the bandwidth roof."""
    n = max(case.num_experts * case.expert_bytes(), (256 if device.type == "cuda" else 64) * 2**20) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    return Target("copy", "dense", "fwd", lambda: dst.copy_(src), bytes=2.0 * n * 4)


def forget_fp8_weights() -> None:
    """A training step is followed by a weight update, which makes the fp8 weight cache quantise the
    weights again; the benchmark's steps do not update them, so they forget the cached fp8 weights
    instead (the cost of one micro-batch per optimizer step: the cache's worst case)."""
    cache = sys.modules.get("fastmoe_kernels.triton_backend.fp8_weight_cache")
    if cache is not None:
        cache.clear()


def _train_step(fn: Callable[[torch.Tensor], torch.Tensor], params: List[torch.Tensor], grad: torch.Tensor,
                rotation: Rotation) -> Callable[[], object]:
    def run():
        x = rotation.next()
        out = fn(x)
        out.backward(grad)
        # Gradients are dropped after each step, so that no target keeps a weight-sized gradient alive
        # while the others run, and a step's peak memory includes its own gradients.
        for p in params:
            p.grad = None
        x.grad = None
        forget_fp8_weights()
    return run


def _infer(fn: Callable[[torch.Tensor], torch.Tensor], rotation: Rotation,
           module: Optional[torch.nn.Module] = None) -> Callable[[], object]:
    """Inference: no autograd, and ``module`` in eval mode (a router with expert bias would otherwise
    update its load counters, as in training)."""
    def run():
        was_training = module.training if module is not None else False
        if module is not None:
            module.train(False)
        try:
            with torch.no_grad():
                return fn(rotation.next())
        finally:
            if was_training:
                module.train(True)
    return run


def _graphed_forward(layer: MoELayer, rotation: Rotation, device: torch.device) -> Callable[[], object]:
    """The layer's forward replayed from a CUDA graph, captured at the first call after three eager
    forwards on a side stream (autotuning and the one-time weight layouts stay outside the graph, as
    ``tests/test_gpu.py`` does). Each call copies the next input into the graph's static input (T·d
    elements: part of the time, as a server's input copy is) and replays."""
    state: Dict[str, object] = {}

    def run():
        x = rotation.next()
        was_training = layer.training
        layer.train(False)
        try:
            if not state:
                static = x.detach().clone()
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side), torch.no_grad():
                    for _ in range(3):
                        layer(static)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.no_grad(), torch.cuda.graph(graph):
                    out = layer(static)
                state.update(graph=graph, x=static, out=out)
            state["x"].copy_(x.detach())
            state["graph"].replay()
            return state["out"]
        finally:
            layer.train(was_training)
    return run


def _graphed_train_step(layer: MoELayer, params: List[torch.Tensor], grad: torch.Tensor,
                        rotation: Rotation) -> Callable[[], object]:
    """A training step of the layer through ``torch.cuda.make_graphed_callables`` (forward and backward
    each one graph, captured at the first call after its own warm-up iterations); gradients dropped
    after each step as in ``_train_step``."""
    state: Dict[str, object] = {}

    def run():
        x = rotation.next()
        if not state:
            sample = x.detach().clone().requires_grad_(x.requires_grad)
            state["step"] = torch.cuda.make_graphed_callables(layer, (sample,))
        out = state["step"](x)
        out.backward(grad)
        for p in params:
            p.grad = None
        x.grad = None
    return run


def _graphed_targets(case: BenchCase, device: torch.device, backend_names: List[str], reference: MoELayer,
                     grad_out: torch.Tensor, xs: Rotation, add, flops: Dict[str, float], skips: Dict[str, str]) -> None:
    """The triton layer replayed from CUDA graphs beside its eager rows (``case.graphed_modes()``)."""
    modes = case.graphed_modes()
    if not modes:
        return
    if device.type != "cuda" or "triton" not in backend_names:
        skips[GRAPHED_IMPL] = "CUDA graphs of the triton layer need a GPU"
        return
    forward = _shared_variant(reference, "triton", None)
    add("layer", GRAPHED_IMPL, "fwd", _graphed_forward(forward, xs, device), flops["fwd"])
    if "fwd+bwd" in modes:
        # make_graphed_callables replaces the module's forward: a copy of its own (the weights shared).
        step = _shared_variant(reference, "triton", None)
        add("layer", GRAPHED_IMPL, "fwd+bwd", _graphed_train_step(step, list(step.parameters()), grad_out, xs),
            flops["fwd+bwd"], track_memory=True)
    elif not case.inference_only:
        skips[f"{GRAPHED_IMPL} fwd+bwd"] = "the step's graphs would hold a second copy of its buffers (weights > 8 GB)"


def build_targets(case: BenchCase, device: torch.device, backend_names: List[str], *, with_ops: bool = True,
                  with_baselines: bool = True, skips: Optional[Dict[str, str]] = None) -> List[Target]:
    skips = {} if skips is None else skips
    dtype = case.torch_dtype
    # Inputs are drawn on the device: drawing GBs on the host and copying them took minutes per GPU grid.
    gen = torch.Generator(device=device).manual_seed(0)
    T, d, E = case.tokens, case.d_model, case.num_experts
    eb = case.elem_bytes()
    reference = MoELayer(case.config(), device=device, dtype=dtype)
    modes = ("fwd",) if case.inference_only else MODES
    n_sets = rotation_count(T * d * eb, device)
    # One rotation of grad-requiring inputs serves inference (under no_grad) and training steps alike.
    xs = Rotation(lambda i: torch.randn(T, d, generator=gen, device=device).to(dtype).requires_grad_(), n_sets)
    grad_out = torch.randn(T, d, generator=gen, device=device).to(dtype)
    with torch.no_grad():
        route = reference.router(xs.items[0])
    idx, weight = route.expert_idx, route.weight.detach()
    plan = reference.dispatcher.plan(idx, weight, backend="torch")
    R = plan.num_rows
    m = 2 if case.gated else 1
    targets: List[Target] = []

    layer_flops = {mode: case.expert_flops(mode == "fwd+bwd") for mode in MODES}
    routed_only = {mode: case.routed_flops(mode == "fwd+bwd") for mode in MODES}
    fwd_bytes = case.forward_bytes(touched_experts=int(torch.unique(idx).numel()))
    # The decode cases are bounded by weight reads: their rate is compared with the copy bandwidth.
    fwd_roof = "copy" if case.inference_only else "dense_gemm"

    def add(op, impl, mode, run, flops, **kw):
        if mode in modes:
            targets.append(Target(op, impl, mode, run, flops, bytes=fwd_bytes if mode == "fwd" else 0.0,
                                  roofline=fwd_roof if mode == "fwd" else "dense_gemm", **kw))

    # ---- the layer and the experts, on every backend ----------------------------------------------
    if with_ops and case.fp8_recipe:
        skips[f"ops of {case.name}"] = "the op breakdown runs the bf16 ops; the fp8 case times the layer and the experts"
    with_ops = with_ops and case.breaks_down_ops and _ops_fit(case, device, R, skips)
    op_inputs = None
    variants = [b for b in backend_names] + [v for v, (b, _) in IMPL_VARIANTS.items() if b in backend_names]
    for impl in variants:
        backend, fused = impl_backend(impl)
        layer = _shared_variant(reference, backend, fused)
        params = list(layer.parameters())
        add("layer", impl, "fwd", _infer(layer, xs, layer), layer_flops["fwd"])
        add("layer", impl, "fwd+bwd", _train_step(layer, params, grad_out, xs), layer_flops["fwd+bwd"],
            track_memory=True)
        experts = layer.experts

        def experts_fn(x, experts=experts, backend=backend, fused=fused, layer=layer):
            p = ops.make_plan(idx, E, plan.capacity, layer.config.drop_policy, weight, layer.config.pad_to_capacity,
                              backend=backend)
            return experts.forward_tokens(x, p, weight, backend=backend, fused=fused)

        add("experts", impl, "fwd", _infer(experts_fn, xs), routed_only["fwd"])
        add("experts", impl, "fwd+bwd", _train_step(experts_fn, list(experts.parameters()), grad_out, xs),
            routed_only["fwd+bwd"], track_memory=True)
        if with_ops and impl not in IMPL_VARIANTS:
            if op_inputs is None:
                op_inputs = _op_inputs(case, device, xs, plan, weight, gen)
            targets += _op_targets(case, device, backend, layer, xs, idx, weight, plan, op_inputs)

    _graphed_targets(case, device, backend_names, reference, grad_out, xs, add, layer_flops, skips)

    # ---- baselines, on the same weights and routing --------------------------------------------------
    if with_baselines:
        if case.capacity_factor is not None:
            skips["baselines"] = "the baselines are dropless; capacity cases compare our backends only"
        else:
            if case.fp8_recipe:
                skips["baselines"] = ("the baselines have no fp8 path; they are timed on this case's bf16 twin "
                                      "(torchao's fp8 grouped GEMM, a rowwise recipe, is timed here)")
                found = probe(build_peers(reference.experts, fp8=True), xs.items[0], idx, weight)
            else:
                found = build_baselines(reference.experts, xs.items[0], idx, weight)
            for name, fn in found.items():
                if isinstance(fn, str):
                    skips[name] = fn
                    continue
                params = list(reference.experts.parameters())
                add("experts", name, "fwd", _infer(lambda x, fn=fn: fn(x, idx, weight), xs), routed_only["fwd"])
                add("experts", name, "fwd+bwd", _train_step(lambda x, fn=fn: fn(x, idx, weight), params, grad_out, xs),
                    routed_only["fwd+bwd"], track_memory=True)

    # ---- rooflines (torch's dense GEMM; a device copy for the decode cases) -------------------------------
    if case.inference_only:
        targets.append(_copy_target(case, device))
        return targets
    f = case.d_ff
    equivalent_n = max(8, int(round(layer_flops["fwd"] / (2.0 * max(R, 1) * d))))
    shapes = {"dense_gemm": (R, d, equivalent_n)}
    if with_ops:  # the grouped GEMMs' own dense twins
        shapes.update(dense_up=(R, d, m * f), dense_down=(R, f, d))
    for name, (rows, inner, outer) in shapes.items():
        # The forward runs under no_grad: one rotation of grad-requiring inputs serves both modes.
        a = Rotation(lambda i, r=rows, c=inner: torch.randn(max(r, 1), c, generator=gen, device=device).to(dtype).requires_grad_(), n_sets)
        w = torch.randn(outer, inner, generator=gen, device=device).to(dtype).requires_grad_()
        g = torch.randn(max(rows, 1), outer, generator=gen, device=device).to(dtype)
        flops = 2.0 * max(rows, 1) * inner * outer
        linear = lambda a, w=w: torch.nn.functional.linear(a, w)
        targets.append(Target(name, "dense", "fwd", _infer(linear, a), flops))
        targets.append(Target(name, "dense", "fwd+bwd", _train_step(linear, [w], g, a), 3 * flops))
    return targets


def _op_input_bytes(case: BenchCase, rows: int) -> int:
    """Bytes the ops' inputs and their dense twins hold (about), to see whether they fit beside the layer."""
    m = 2 if case.gated else 1
    return case.elem_bytes() * (8 * rows * case.d_model + (3 * m + 4) * rows * case.d_ff + case.tokens * case.d_model)


def _ops_fit(case: BenchCase, device: torch.device, rows: int, skips: Dict[str, str]) -> bool:
    """Whether the per-op breakdown fits in half the free device memory; when not, says so in ``skips``."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    need = _op_input_bytes(case, rows)
    if need <= free // 2:
        return True
    skips[f"ops of {case.name}"] = (f"their inputs need ≈{need / 2**30:.1f} GiB, more than half of the "
                                   f"{free / 2**30:.1f} GiB free beside the layer")
    return False


def _op_inputs(case: BenchCase, device, xs: Rotation, plan, weight, gen) -> Dict[str, object]:
    """The ops' inputs, drawn once per case and shared by every backend's op targets."""
    T, d, E = case.tokens, case.d_model, case.num_experts
    R = plan.num_rows
    dt = xs.items[0].dtype
    m = 2 if case.gated else 1
    with torch.no_grad():
        x_perm = ops.permute(xs.items[0], plan, backend="torch")
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=device).to(dt)
    grad_rows = randn(R, d)
    return dict(
        logits=Rotation(lambda i: torch.randn(T, E, generator=gen, device=device).requires_grad_(), 2),
        grad_rows=grad_rows,           # the gradient of permute's and of the down projection's output
        rows=Rotation(lambda i: x_perm.clone().requires_grad_(), 2),
        g_up=randn(R, m * case.d_ff),
        hidden=Rotation(lambda i: randn(R, case.d_ff).requires_grad_(), 2),
        y_rows=Rotation(lambda i: randn(R, d).requires_grad_(), 2),
        g_tok=randn(T, d),
        w_grad=weight.clone().requires_grad_(),
    )


def _op_targets(case: BenchCase, device, backend: str, layer: MoELayer, xs: Rotation, idx, weight, plan,
                inputs: Dict[str, object]) -> List[Target]:
    """The layer's ops one by one, forward and forward+backward, on one backend."""
    T, d, E, k = case.tokens, case.d_model, case.num_experts, case.top_k
    eb = case.elem_bytes()
    cfg = layer.config
    R = plan.num_rows
    out: List[Target] = []
    logits = inputs["logits"]

    def route(l):
        _, w, p = ops.route_topk(l, k, cfg.score_func, cfg.normalize_topk, return_probs=True, backend=backend)
        return w.sum() + p.sum()

    route_bytes = T * E * 4 * 2 + T * k * 8
    out.append(Target("route", backend, "fwd", _infer(route, logits), bytes=route_bytes))
    out.append(Target("route", backend, "fwd+bwd", _train_step(lambda l: route(l), [], torch.ones((), device=device), logits),
                      bytes=route_bytes + T * E * 4))
    cap = plan.capacity
    plan_fn = lambda: ops.make_plan(idx, E, cap, cfg.drop_policy, weight, cfg.pad_to_capacity, backend=backend)
    out.append(Target("plan", backend, "fwd", plan_fn, bytes=T * k * 4 * 2 + R * 4 + T * k * 4))

    permute = lambda x: ops.permute(x, plan, backend=backend)
    move = (T + R) * d * eb
    out.append(Target("permute", backend, "fwd", _infer(permute, xs), bytes=move))
    out.append(Target("permute", backend, "fwd+bwd", _train_step(permute, [], inputs["grad_rows"], xs), bytes=2 * move))
    ex = layer.experts
    rows = inputs["rows"]
    up = lambda a: ops.grouped_gemm(a, ex.w_up, plan.offsets, True, backend=backend)
    out.append(Target("grouped_up", backend, "fwd", _infer(up, rows), case.gemm_flops("up"), roofline="dense_up"))
    out.append(Target("grouped_up", backend, "fwd+bwd", _train_step(up, [ex.w_up], inputs["g_up"], rows),
                      case.gemm_flops("up", True), roofline="dense_up"))
    hidden = inputs["hidden"]
    down = lambda a: ops.grouped_gemm(a, ex.w_down, plan.offsets, True, backend=backend)
    out.append(Target("grouped_down", backend, "fwd", _infer(down, hidden), case.gemm_flops("down"), roofline="dense_down"))
    out.append(Target("grouped_down", backend, "fwd+bwd", _train_step(down, [ex.w_down], inputs["grad_rows"], hidden),
                      case.gemm_flops("down", True), roofline="dense_down"))
    y_rows, w_grad = inputs["y_rows"], inputs["w_grad"]
    unpermute = lambda y: ops.unpermute(y, plan, w_grad, backend=backend)
    out.append(Target("unpermute", backend, "fwd", _infer(unpermute, y_rows), bytes=move + T * k * 8))
    out.append(Target("unpermute", backend, "fwd+bwd", _train_step(unpermute, [w_grad], inputs["g_tok"], y_rows),
                      bytes=3 * move))
    return out
