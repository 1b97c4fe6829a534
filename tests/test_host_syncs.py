"""The forward and backward make no host synchronisation on the paths a GPU runs (Triton kernels,
the csrc kernels' wrappers), with value checks in their GPU default, asynchronous mode.

On a GPU, a call that reads a device value on the host (``.item()``, ``bool(t)``, ``.tolist()``,
``.cpu()``, ``torch.bincount``'s size, a boolean-mask index's ``nonzero``...) waits for the GPU to
drain, and cannot be captured in a CUDA graph. On the CPU nothing waits, but the same calls run: this
counts them, ignoring the Triton interpreter's own (it stands in for a GPU launch).
"""
import contextlib
import os
import sys

import pytest
import torch

from fastmoe_kernels import MoELayer, ops, set_value_checks
from fastmoe_kernels import _checks

TRITON_DIR = os.sep + "triton" + os.sep
TENSOR_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                  "bincount", "unique", "masked_select", "repeat_interleave")
TORCH_FUNCTIONS = ("nonzero", "bincount", "unique", "masked_select", "repeat_interleave", "argwhere")


def _caller_outside_triton() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if TRITON_DIR in frame.f_code.co_filename:
            return False
        if "fastmoe_kernels" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return True


@contextlib.contextmanager
def count_host_syncs():
    """Yields a list that collects ``(api, file:line)`` of every call that would synchronise a GPU."""
    seen = []

    def spy(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if _caller_outside_triton():
                frame = sys._getframe(1)
                seen.append((name, f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"))
            return original(*args, **kwargs)

        return original, wrapper

    patched = []
    for name in TENSOR_METHODS:
        original, wrapper = spy(torch.Tensor, name)
        patched.append((torch.Tensor, name, original))
        setattr(torch.Tensor, name, wrapper)
    for name in TORCH_FUNCTIONS:
        original, wrapper = spy(torch, name)
        patched.append((torch, name, original))
        setattr(torch, name, wrapper)
    original_getitem = torch.Tensor.__getitem__

    def getitem(self, index):
        masks = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in masks) and _caller_outside_triton():
            frame = sys._getframe(1)
            seen.append(("bool-mask index", f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"))
        return original_getitem(self, index)

    patched.append((torch.Tensor, "__getitem__", original_getitem))
    torch.Tensor.__getitem__ = getitem
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        # A copy to the host (to pageable memory it waits for the device).
        targets = [a for a in args if isinstance(a, (str, torch.device))] + [kwargs.get("device")]
        if any(t is not None and torch.device(t).type == "cpu" for t in targets) and _caller_outside_triton():
            frame = sys._getframe(1)
            seen.append(("to(cpu)", f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"))
        return original_to(self, *args, **kwargs)

    patched.append((torch.Tensor, "to", original_to))
    torch.Tensor.to = to
    try:
        yield seen
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


@pytest.fixture
def async_checks(monkeypatch):
    """Value checks as on a GPU: their results are only read once the device is done (never by the
    forward itself), so reading them back is not counted here."""
    set_value_checks("async")
    monkeypatch.setattr(_checks._PENDING, "poll", lambda wait=False: None)
    yield
    _checks._PENDING.queue.clear()
    set_value_checks(None)


def _step(layer, x):
    y = layer(x)
    y.square().sum().backward()


LAYERS = {
    "dropless": dict(),
    "capacity-probs": dict(capacity_factor=1.0),
    "capacity-pad-position": dict(capacity_factor=1.25, drop_policy="position", pad_to_capacity=True),
    "unfused-heterogeneous-bias": dict(d_ff=[8, 16, 24, 8], bias=True, fused_experts=False),
    "deepseek-router-shared": dict(score_func="sigmoid", num_groups=2, topk_groups=1, expert_bias=True,
                                   num_shared_experts=1, z_loss_coeff=1e-3, load_balancing_type="sequence"),
}


@pytest.mark.parametrize("fields", list(LAYERS))
def test_training_step_on_triton_kernels_has_no_host_sync(fields, async_checks):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (no GPU here)")
    pytest.importorskip("triton")
    kw = dict(d_model=16, d_ff=16, num_experts=4, top_k=2, backend="triton")
    kw.update(LAYERS[fields])
    layer = MoELayer(**kw).train()
    x = torch.randn(2, 9, 16, requires_grad=True)
    _step(layer, x)  # warm-up: layouts and autotuning happen once
    with count_host_syncs() as seen:
        _step(layer, x)
    assert not seen, f"host syncs: {seen}"


def test_csrc_kernel_wrappers_have_no_host_sync(async_checks):
    """The wrappers of the csrc kernels are the same Python for CUDA and CPU tensors."""
    from fastmoe_kernels import backends

    if not backends.availability("cpp", torch.device("cpu"))[0]:
        pytest.skip("the csrc kernels are not built here")
    logits = torch.randn(20, 8, requires_grad=True)
    x = torch.randn(20, 16, requires_grad=True)
    with count_host_syncs() as seen:
        for _ in range(2):
            idx, weight, probs = ops.route_topk(logits, 2, return_probs=True, backend="cpp")
            tokens, prob_mean = ops.routing_stats(probs, idx, backend="cpp")
            for capacity, policy, pad in ((None, "probs", False), (5, "probs", False), (5, "position", True)):
                plan = ops.make_plan(idx, 8, capacity, policy, weight.detach(), pad, backend="cpp")
                y = ops.unpermute(ops.permute(x, plan, backend="cpp"), plan, weight, backend="cpp")
                (y.sum() + prob_mean.sum()).backward(retain_graph=True)
    assert not seen, f"host syncs: {seen}"


def test_the_counter_sees_a_sync():
    with count_host_syncs() as seen:
        float(torch.ones(2).sum())
        ops.make_plan(torch.zeros(3, 1, dtype=torch.int64), 2, backend="torch")  # the reference uses bincount
        torch.arange(4)[: torch.tensor(2)]
        torch.ones(2).to("cpu")
    assert {name for name, _ in seen} >= {"__float__", "bincount", "__index__", "to(cpu)"}
