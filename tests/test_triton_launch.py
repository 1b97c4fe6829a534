"""What the Triton launchers decide on the host, checked without a GPU: autotune keys and config
pruning against a GPU's shared memory, the partial-sum buffer's size, int64 offsets for large
weights, the launch device, and the TF32 setting."""
import contextlib
import dataclasses

import pytest
import torch

triton = pytest.importorskip("triton")

from fastmoe_kernels import backends  # noqa: E402
from fastmoe_kernels.triton_backend import _common, _gemm, _layout  # noqa: E402
from fastmoe_kernels.triton_backend import activation_backward, grouped_gemm, up_projection, wgrad  # noqa: E402

SM90_SHARED = 232448
KERNELS = {
    "plain": (grouped_gemm._grouped_matmul_kernel, grouped_gemm._footprint, "DUAL_AB", _gemm.MATMUL_TILES),
    "up": (up_projection._up_projection_kernel, up_projection._footprint, "GATED", _gemm.MATMUL_TILES),
    "act_bwd": (activation_backward._activation_backward_kernel, activation_backward._footprint, "GATED",
                _gemm.MATMUL_TILES),
    "wgrad": (wgrad._grouped_wgrad_kernel, wgrad._footprint, "ACT_OF_A", _gemm.WGRAD_TILES),
}


def gpu_configs(tiles, wgrad_order=False):
    if wgrad_order:
        return [triton.Config({"BM": m, "BK": k, "BN": n}, num_warps=w, num_stages=s) for m, k, n, w, s in tiles]
    return [triton.Config({"BM": m, "BN": n, "BK": k}, num_warps=w, num_stages=s) for m, n, k, w, s in tiles]


@pytest.mark.parametrize("name", list(KERNELS))
def test_every_shared_memory_changing_constexpr_is_in_the_autotune_key(name):
    kernel, _, flag, _ = KERNELS[name]
    # Triton keys a tuned config on these values and the dtypes only: a variant flag outside the key
    # would let the forward's config be reused by a variant that needs more shared memory.
    assert flag in kernel.keys
    if name == "wgrad":
        assert "GATED" in kernel.keys
    if name == "up":  # what the staging tile and the epilogue's stores depend on
        assert {"C_TMA", "H_TMA", "STORE_H"} <= set(kernel.keys)
    if name == "plain":
        assert "C_TMA" in kernel.keys


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pruner_keeps_only_configs_that_fit_every_variant_of_a_key(name, dtype, monkeypatch):
    kernel, footprint, flag, tiles = KERNELS[name]
    monkeypatch.setattr(_common, "shared_memory_override", SM90_SHARED)
    configs = gpu_configs(tiles, wgrad_order=name == "wgrad")
    operand = {"plain": "a_ptr", "up": "x_ptr", "act_bwd": "g_ptr", "wgrad": "a_ptr"}[name]
    prune = _gemm.pruner(footprint, operand, ("BK", "BN") if name == "wgrad" else ("BM", "BN"))
    for variant in (False, True):
        # (SPLIT False: the dH epilogue's larger footprint.)
        args = {operand: torch.empty(0, dtype=dtype), flag: variant, "GATED": variant, "ACT_OF_A": variant,
                "DUAL_AB": variant, "SPLIT": False}
        assert prune(configs, {}, **args), f"{name}: nothing fits"
        # (That each kept config really fits is the sm_90 compile check's: it compares the estimate
        # with the compiler's figure, tests/test_triton_compile.py.)
    # The collision: dx (two A/B pairs) in bf16 with (128, 256, 64) and (64, 256, 64), 3 stages.
    if name == "plain" and dtype == torch.bfloat16:
        dual = {"a_ptr": torch.empty(0, dtype=dtype), "DUAL_AB": True}
        big = [c for c in configs if c.kwargs["BN"] == 256]
        assert big and all(c not in prune(configs, {}, **dual) for c in big)
        single = {"a_ptr": torch.empty(0, dtype=dtype), "DUAL_AB": False}
        assert any(c in prune(configs, {}, **single) for c in big)


def test_shared_memory_estimate_bounds_the_compilers_figures():
    # dx of a gated MLP loads two A/B pairs: 294,912 and 249,856 bytes at bf16 on sm_90 (the figures
    # of the review that found the collision); the estimate must not be below them.
    for (bm, bn, bk, stages), compiled in (((128, 256, 64, 3), 294912), ((64, 256, 64, 3), 249856)):
        config = triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=8, num_stages=stages)
        stage, _ = grouped_gemm._footprint(config.kwargs, {"DUAL_AB": True})
        estimate = _gemm.shared_memory_estimate(config, 2, stage, bm * bn)
        assert compiled <= estimate <= compiled + _gemm.SHARED_MEMORY_SLACK


def test_partial_sum_rows_follow_the_narrowest_config(monkeypatch):
    kernel = activation_backward._activation_backward_kernel
    monkeypatch.setattr(kernel, "configs", gpu_configs(_gemm.MATMUL_TILES))
    narrowest = min(c.kwargs["BN"] for c in kernel.configs)
    assert narrowest == 64  # not a fixed 16 (four times the rows a GPU config writes)
    assert activation_backward.partial_rows_needed(768) == 12
    assert activation_backward.partial_rows_needed(14336) == 224


def test_packed_weights_past_int32_use_int64_offsets():
    d, widths = 4096, [8192, 16384] * 32  # the example: (d - 1) · Σf ≈ 3.2e9
    w_down = torch.empty(d, sum(widths), device="meta")
    assert _layout.packed_cols(w_down, widths).offsets_64
    w_up = torch.empty(2 * sum(widths), d, device="meta")
    assert not _layout.packed_rows(w_up, widths).offsets_64  # row offsets are in the int64 base
    assert not _layout.stacked(torch.empty(64, 2 * 2048, 7168, device="meta")).offsets_64


def test_launches_run_on_the_tensors_device(monkeypatch):
    entered = []

    class Recorder:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Recorder)
    with _common.on_device(torch.device("cuda", 1)):
        pass
    with _common.on_device(torch.device("cuda", 0)):
        pass
    assert isinstance(_common.on_device(torch.device("cpu")), contextlib.nullcontext)
    assert entered == [1]
    # Every triton implementation goes through the guard.
    triton_impls = {k: backends.implementations(k).get("triton") for k in backends.kernels()}
    triton_impls = {k: impl for k, impl in triton_impls.items() if impl is not None}
    assert len(triton_impls) >= 10
    for kernel, impl in triton_impls.items():
        assert impl.fn.__code__.co_name == "launch_on_tensor_device", kernel


@pytest.mark.parametrize("setting,expected", [("tf32", "tf32"), ("ieee", "ieee")])
def test_tf32_follows_torchs_new_api(setting, expected):
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = setting
        assert _common.dot_precision(torch.float32) == expected
        assert _common.dot_precision(torch.bfloat16) == "tf32"  # 16-bit dots ignore it
    finally:
        matmul.fp32_precision = before


def test_the_hopper_wgrad_tiles_are_offered_where_their_registers_hold(monkeypatch):
    """The 128×256-output weight-gradient tiles (grouped order) join the plain wgrad's configs; with the
    activation rebuilt from h in registers (ACT_OF_A) the pruner drops them (Triton 3.6's sm_90 record:
    112–216 spilled bytes there, none elsewhere)."""
    monkeypatch.setattr(_common, "shared_memory_override", SM90_SHARED)
    configs = wgrad._grouped_wgrad_kernel.configs if not _common.interpreted() else [
        triton.Config({"BM": m, "BK": k, "BN": n, "GROUP_K": g}, num_warps=w, num_stages=s)
        for tiles, g in ((_gemm.WGRAD_TILES, 1), (_gemm.WGRAD_TILES[:1] + _gemm.WGRAD_HOPPER_TILES, 8))
        for m, k, n, w, s in tiles]
    prune = _gemm.pruner(wgrad._footprint, "a_ptr", ("BK", "BN"))
    hopper = [c for c in configs if c.kwargs["BK"] * c.kwargs["BN"] == 128 * 256]
    plain = prune(configs, {}, a_ptr=torch.empty(0, dtype=torch.bfloat16), ACT_OF_A=False, GATED=False)
    rebuilt = prune(configs, {}, a_ptr=torch.empty(0, dtype=torch.bfloat16), ACT_OF_A=True, GATED=True)
    assert hopper and any(c in plain for c in hopper) and not any(c in rebuilt for c in hopper)
    assert {c.kwargs["GROUP_K"] for c in plain} == {1, 8}


def test_layouts_are_built_once_per_shape_strides_and_device():
    """Host time: a launch's operand layout (per-expert offsets, sizes, alignment hints) is built on the
    first call for its shape and strides and then returned as is — no per-expert Python per call (256
    experts at DeepSeek-V3) — and a different shape, stride, row range or width list gets its own."""
    w = torch.empty(16, 48, 40)
    first = _layout.stacked(w)
    assert _layout.stacked(torch.empty(16, 48, 40)) is first  # same shape and strides: the same layout
    assert _layout.stacked(w, 24, 24) is not first and _layout.stacked(w, 24, 24).offset[1] == 48 * 40 + 24 * 40
    assert _layout.stacked(w, 0, 24, row_step=2).stride_r == 80
    wide = torch.empty(16, 48, 80)[:, :, :40]  # same shape, another row stride
    assert _layout.stacked(wide) is not first and _layout.stacked(wide).stride_r == 80
    assert _layout.stacked(wide).offset[1] == 48 * 80
    packed = torch.empty(30, 40)
    assert _layout.packed_rows(packed, [10, 20]) is _layout.packed_rows(torch.empty(30, 40), [10, 20])
    assert _layout.packed_rows(packed, [20, 10]).offset.tolist() == [0, 20 * 40]
    bias = torch.empty(16, 48)
    assert _layout.stacked_vectors(bias, 1, 2).stride == 2 and _layout.stacked_vectors(bias, 1, 1).stride == 1
    with pytest.raises(dataclasses.FrozenInstanceError):  # shared by every launch: never mutated
        first.max_rows = 1


def test_host_arithmetic_matches_tritons():
    for n in (0, 1, 2, 3, 5, 8, 9, 127, 128, 129, 4097):
        assert _common.next_pow2(n) == max(1, triton.next_power_of_2(n)), n
        for b in (1, 3, 16, 128):
            assert _common.cdiv(n, b) == triton.cdiv(n, b), (n, b)
