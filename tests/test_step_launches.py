"""What a training step on the Triton backend launches, counted with torch.profiler's CPU activity
(it sees inside the package's custom ops) and the Triton interpreter's launches, at Qwen3's
structure (E = 128, k = 8, SwiGLU) and tiny sizes: the exact list of Triton kernels per step, no
torch elementwise op on an activation-sized tensor in the forward, in the backward only the
activation's derivative, and no cast of a weight gradient. The training issue's part B variants (the
composition as one node, FASTMOE_MLP_BACKWARD=epilogue; the fused path's stored backward with
contiguous rows) are held to the same list of launches and to no torch op at all on an
activation-sized tensor: their activation's derivative is in the dH kernel's epilogue."""
import collections

import pytest
import torch

triton = pytest.importorskip("triton")

from fastmoe_kernels import MoELayer  # noqa: E402

T, D, F, E, K = 32, 16, 8, 128, 8
R = T * K
ALLOCATIONS = {"aten::new_empty", "aten::empty", "aten::empty_strided", "aten::empty_like"}
# The activation's derivative from h (torch.func's vjp of SwiGLU on [gate | up]): views, the SiLU and
# its backward, the products. (No zero_: h's own gradient is not materialised by autograd, which
# filled an [R, 2f] buffer of zeros each step before.)
ACTIVATION_BACKWARD = {"aten::chunk", "aten::split", "aten::slice", "aten::narrow", "aten::as_strided", "aten::silu",
                       "aten::silu_backward", "aten::mul", "aten::to"}
COMPOSITION_STEP = [
    "_route_topk_fwd_kernel", "_chunk_count_kernel", "_chunk_scan_kernel", "_expert_offsets_kernel", "_place_kernel",
    "_gather_kernel", "_up_projection_kernel", "_grouped_matmul_kernel", "_combine_kernel", "_stats_kernel",
    # backward: the combine's (rows of the output gradient, the routing-weight gradient), the down
    # projection's dgrad and wgrad, the up projection's (one dgrad over 2f, one wgrad), the gather's
    "_gather_kernel", "_rowdot_kernel", "_grouped_matmul_kernel", "_grouped_wgrad_kernel", "_grouped_matmul_kernel",
    "_grouped_wgrad_kernel", "_combine_kernel", "_route_topk_bwd_kernel"]


def _activation_sized(event) -> list:
    return [tuple(s) for s in (event.input_shapes or []) if s and len(s) == 2 and s[0] == R and s[0] * s[1] >= R * F]


def _profile(layer, x, backward: bool):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        y = layer(x)
        if backward:
            y.square().sum().backward()
    return [e for e in prof.events() if e.name.startswith("aten::")]


@pytest.fixture
def no_poison():
    """The tests' poisoning of new buffers is a fill per output: not the step's own work."""
    from fastmoe_kernels import _alloc

    _alloc.set_poison(False)
    yield
    _alloc.set_poison(None)


def _warmed_up(fused: bool):
    """A Qwen3-structured layer and its input, after one step (layouts built, autotuned)."""
    torch.manual_seed(0)
    layer = MoELayer(d_model=D, d_ff=F, num_experts=E, top_k=K, backend="triton", fused_experts=fused).train()
    x = torch.randn(T, D, requires_grad=True)
    layer(x).square().sum().backward()
    return layer, x


def test_a_composition_training_step_launches_exactly_its_kernels(triton_launches, no_poison):
    layer, x = _warmed_up(fused=False)
    triton_launches.clear()
    forward = _profile(layer, x, backward=False)
    assert not [e.name for e in forward if _activation_sized(e) and e.name not in ALLOCATIONS]
    triton_launches.clear()
    step = _profile(layer, x, backward=True)
    assert triton_launches == COMPOSITION_STEP
    beyond = collections.Counter(e.name for e in step if _activation_sized(e)
                                 and e.name not in ALLOCATIONS | ACTIVATION_BACKWARD)
    assert not beyond, beyond
    # No weight gradient is cast (the kernels store them in the parameters' dtype).
    weight_shapes = {tuple(p.shape) for p in layer.experts.parameters()}
    casts = [e for e in step if e.name in ("aten::_to_copy", "aten::copy_")
             and any(tuple(s) in weight_shapes for s in (e.input_shapes or []) if s)]
    assert not casts, [(e.name, e.input_shapes) for e in casts]


# The training issue's part B variants, selectable for the GPU's A/B: the same check of what they launch.
NODE_STEP = COMPOSITION_STEP[:10] + [
    # backward: the combine's; the dH kernel (dh and act(h) from G @ W_down), dW_down, the up
    # projection's dgrad over 2f and its wgrad; the gather's; the router's
    "_gather_kernel", "_rowdot_kernel", "_activation_backward_kernel", "_grouped_wgrad_kernel",
    "_grouped_matmul_kernel", "_grouped_wgrad_kernel", "_combine_kernel", "_route_topk_bwd_kernel"]
FUSED_STORED_STEP = [
    "_route_topk_fwd_kernel", "_chunk_count_kernel", "_chunk_scan_kernel", "_expert_offsets_kernel", "_place_kernel",
    "_up_projection_kernel", "_grouped_matmul_kernel", "_combine_kernel", "_stats_kernel",
    # backward: dH (dh, A_s, the routing weights' partial sums), their sum per assignment (the routing-weight
    # gradient), dW_down, dW_up over 2f, dx over 2f, the combine by row, the router's
    "_activation_backward_kernel", "_row_values_kernel", "_grouped_wgrad_kernel", "_grouped_wgrad_kernel",
    "_grouped_matmul_kernel", "_combine_kernel", "_route_topk_bwd_kernel"]


@pytest.mark.parametrize("variant", ["node", "fused-stored"])
def test_the_part_b_training_steps_launch_exactly_their_kernels(triton_launches, no_poison, monkeypatch, variant):
    import importlib

    fused = variant == "fused-stored"
    if fused:
        monkeypatch.setattr(importlib.import_module("fastmoe_kernels.triton_backend.moe_mlp"), "FUSED_BACKWARD", "stored")
        monkeypatch.setattr(importlib.import_module("fastmoe_kernels.triton_backend.moe_mlp"), "DOWN_OUTPUT", "rows")
    else:
        monkeypatch.setattr(importlib.import_module("fastmoe_kernels.ops.grouped_mlp"), "MLP_BACKWARD", "epilogue")
    layer, x = _warmed_up(fused)
    triton_launches.clear()
    step = _profile(layer, x, backward=True)
    assert triton_launches == (FUSED_STORED_STEP if fused else NODE_STEP)
    # No torch op on an activation-sized tensor at all (the activation's derivative is in the epilogue).
    beyond = collections.Counter(e.name for e in step if _activation_sized(e) and e.name not in ALLOCATIONS)
    assert not beyond, [(e.name, e.input_shapes) for e in step if _activation_sized(e) and e.name not in ALLOCATIONS]


# Ops that launch no device kernel: views, allocations, metadata.
NO_KERNEL = ALLOCATIONS | {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::t",
                           "aten::transpose", "aten::detach", "aten::alias", "aten::expand", "aten::unsqueeze",
                           "aten::select", "aten::slice", "aten::resolve_conj", "aten::resolve_neg", "aten::to",
                           "aten::lift_fresh", "aten::_unsafe_view", "aten::contiguous"}


def _kernel_ops(events) -> collections.Counter:
    """The top-level aten ops that launch a device kernel (an op's own sub-ops are not counted again)."""
    def top(e):
        p = e.cpu_parent
        while p is not None and not p.name.startswith("aten::"):
            p = p.cpu_parent
        return p is None
    return collections.Counter(e.name for e in events if e.name.startswith("aten::") and top(e)
                               and e.name not in NO_KERNEL)


def test_the_plan_and_the_fused_routing_weight_gradient_launch_no_torch_op(no_poison):
    """Host time: the plan's kernels read the ids as given (the key's masking and cast, and the
    assignment's -1 fill, are in them), and the fused backward's routing-weight gradient is one kernel
    (it was a dozen small torch ops: sum, masks, gathers, a cast). The kernels are stubbed (the
    interpreter's own tensor work is not the host's) and value checks off (they check user data)."""
    from torch.profiler import ProfilerActivity, profile

    from fastmoe_kernels import ops
    from fastmoe_kernels.bench.memory_accounting import stubbed_triton_kernels

    with stubbed_triton_kernels():
        _plan_and_fused_backward(ops, profile, ProfilerActivity)


def _plan_and_fused_backward(ops, profile, ProfilerActivity):
    idx = torch.randint(-1, E, (T, K)).long()  # int64, with unassigned ids
    weight = torch.rand(T, K)
    for capacity, pad in ((None, False), (3, True), (5, False)):
        ops.make_plan(idx, E, capacity, "position", weight, pad, backend="triton")  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ops.make_plan(idx, E, capacity, "position", weight, pad, backend="triton")
        assert not _kernel_ops(prof.events()), (capacity, pad, _kernel_ops(prof.events()))
    layer, x = _warmed_up(True)
    y = layer.experts.forward_tokens(x, layer.dispatcher.plan(*_route(layer, x)), _route(layer, x)[1].detach(),
                                     backend="triton", fused=True)
    grad = torch.ones_like(y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y.backward(grad)
    # Left: accumulating into x's and the experts' .grad (they hold one from the warm-up step).
    assert _kernel_ops(prof.events()) == collections.Counter({"aten::add_": 3}), _kernel_ops(prof.events())


def _route(layer, x):
    route = layer.router(x.detach(), backend="triton")
    return route.expert_idx, route.weight
