"""The grouped-GEMM launches of one layer step, per path and variant, for the kernel model.

Labels name what a launch computes: ``up`` / ``down`` (the forward's projections), ``<proj>.dgrad``
(input gradient), ``<proj>.wgrad`` (weight gradient); the fused path's own: ``act_bwd`` (dh from
the saved h), ``up.wgrad.gate`` / ``up.wgrad.up`` (its two gathered up-projection wgrads) and ``dx``
(``[dgate | dup] @ [W_gate; W_up]``, two A/B pairs per step). The launch order is the order the
backends issue them (the profiler traces' order within a step).

Shapes follow the kernels: the up projection is ``K = d``, ``N = m·f`` (the fused kernel: N = f with
``b_mats = m``), the down projection ``K = f``, ``N = d``; a weight gradient reduces over the rows
(``rows`` per expert) into a ``K × N`` tile grid of the weight as the op reads it (B_e = W_eᵀ).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Mapping, Optional, Tuple

from .kernel_model import Launch, Tile, expected_rows

MATMUL, UP, ACT_BWD, WGRAD = "_grouped_matmul_kernel", "_up_projection_kernel", "_activation_backward_kernel", \
    "_grouped_wgrad_kernel"

# The configurations the autotuner chose on the first H100 run (3-followup-profile/profile.json, and
# the 2-profile traces' shared memory and threads for the fused path's own kernels), with the
# registers and shared memory the traces recorded: the model's default tiles.
H100_TILES: Dict[str, Tile] = {
    "matmul": Tile(128, 256, 64, 8, 3, regs=237, smem=147456),
    "up_projection": Tile(128, 128, 64, 8, 3, regs=255, smem=147456),
    "act_bwd": Tile(64, 64, 64, 4, 4, regs=255, smem=65536),
    "wgrad": Tile(64, 128, 128, 8, 3, regs=110, smem=98304),          # (BM rows per step, BN, BK)
    "wgrad_act": Tile(64, 64, 128, 4, 3, regs=138, smem=33024),       # the fused down wgrad (ACT_OF_A)
    "wgrad_gathered": Tile(64, 128, 128, 8, 3, regs=108, smem=65792),  # the fused up wgrads (GATHER_A)
    "dual": Tile(128, 128, 64, 8, 3, regs=176, smem=196608),           # dx with two A/B pairs (DUAL_AB)
}
# The dH kernel with its epilogue split by even/odd columns (FASTMOE_DH_EPILOGUE=split): live registers
# acc + ½(h_gate + h_up). The largest tiles the device's Triton (3.6) compiles for it with at most 64 B
# of spills (benchmarks/results/sm90-compile-2026-12-03-part-b/): 128×128 on the node's plain G (24 B),
# 128×64 where G's rows are gathered (the fused stored backward, 8 B); the whole epilogue holds 32×128.
ACT_BWD_SPLIT = Tile(128, 128, 64, 8, 3, regs=255, smem=98304)
ACT_BWD_SPLIT_GATHERED = Tile(128, 64, 64, 4, 4, regs=255, smem=98304)


@dataclass(frozen=True)
class StepShape:
    """What a layer step's launches depend on."""

    tokens: int
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    gated: bool = True

    @classmethod
    def of_case(cls, case) -> "StepShape":
        return cls(case.tokens, case.d_model, case.d_ff, case.num_experts, case.top_k, case.gated)

    @property
    def m(self) -> int:
        return 2 if self.gated else 1

    def rows(self, seed: int = 0) -> Tuple[int, ...]:
        return expected_rows(self.tokens, self.num_experts, self.top_k, seed)


@dataclass(frozen=True)
class Variant:
    """A selectable change, as the model sees it (None/1: today's kernels)."""

    group_m: int = 1                 # GROUP_M row blocks per column sweep in the persistent GEMMs
    wgrad_group_k: int = 1           # GROUP_K K blocks per column sweep in the weight gradient
    wgrad_tile: Optional[Tile] = None  # another weight-gradient tile (the Hopper-sized ones)
    wgrad_out_bytes: int = 4         # 4: fp32 weight gradients; 2: the parameters' bf16
    matmul_tile: Optional[Tile] = None
    act_bwd_tile: Optional[Tile] = None  # the dH kernel's tile (ACT_BWD_SPLIT: the split epilogue's)
    # The composition's activation backward: "torch" (torch.func.vjp's elementwise ops) or "kernel" (one
    # pass, FASTMOE_ACTIVATION_BACKWARD=kernel[-in-place]: the compulsory bytes at the copy rate).
    activation_backward: str = "torch"
    # The contiguous outputs by asynchronous TMA stores (FASTMOE_C_STORES=tma): the up projection's act(h)
    # (every path; h too with tma_h_stores), the composition's down projection and input gradients, the
    # part B paths' dx;
    # never rows written through an index (the fused path's scattered down projection and dx slots).
    tma_stores: bool = False
    # FASTMOE_C_STORES=tma+h: the up projection's h halves by TMA boxes too (through act(h)'s staging tile)
    tma_h_stores: bool = False
    # FASTMOE_DEEP_PIPELINES=on, forced: the forward GEMMs' Hopper tiles (128 rows, 8 warps) at this many stages
    pipeline_stages: Optional[int] = None


def _tile(tiles: Mapping[str, Tile], name: str, variant: Variant, *, wgrad: bool = False) -> Tile:
    tile = tiles[name]
    if wgrad:
        tile = variant.wgrad_tile or tile
        return replace(tile, group=variant.wgrad_group_k)
    if name == "matmul" and variant.matmul_tile is not None:
        tile = variant.matmul_tile
    if variant.pipeline_stages and name in ("matmul", "up_projection") and (tile.BM, tile.warps) == (128, 8):
        # the compile record's shared memory scales with the stages (registers: the same)
        smem = tile.smem // tile.stages * variant.pipeline_stages if tile.smem else None
        tile = replace(tile, stages=variant.pipeline_stages, smem=smem)
    return replace(tile, group=variant.group_m)


# The paths: "fused" (moe_mlp's kernels), "composition" (permute, grouped_up with the activation in its
# epilogue, the down grouped GEMM, unpermute: today's training default on a GPU) and
# "composition-separate" (the up projection as a plain grouped GEMM and the activation as torch ops:
# FASTMOE_UP_ACTIVATION=separate, and what the first H100 run's composition profile measured).
# The training issue's part B paths: "node" (the composition as one autograd node,
# FASTMOE_MLP_BACKWARD=epilogue: the activation's backward in the dH epilogue of G @ W_down, which also
# writes a = act(h); dW_down from (a, G); dx and dW_up over dh's 2f columns) and "fused-stored"
# (FASTMOE_FUSED_BACKWARD=stored, FASTMOE_DOWN_OUTPUT=rows: the dH kernel reads g's rows by index and
# writes dh and A_s = w·act(h); dW_down from (A_s, g[src]); dW_up one wgrad over 2f with x gathered; dx
# one plain GEMM over 2f).
PATHS = ("fused", "composition", "composition-separate", "node", "fused-stored")


def forward_launches(shape: StepShape, path: str, *, training: bool, tiles: Mapping[str, Tile] = H100_TILES,
                     variant: Variant = Variant(), rows: Optional[Tuple[int, ...]] = None) -> List[Launch]:
    """The forward's two GEMM launches on ``path`` (one of ``PATHS``)."""
    if path not in PATHS:
        raise ValueError(f"launch_plans: path must be one of {PATHS}, got {path!r}")
    rows = rows or shape.rows()
    d, f, m = shape.d_model, shape.d_ff, shape.m
    path = {"node": "composition", "fused-stored": "fused"}.get(path, path)  # their forwards' launches
    # the fused path's down projection scatters its rows (FASTMOE_DOWN_OUTPUT=scatter, the default)
    down = Launch(MATMUL, "down", rows, f, d, _tile(tiles, "matmul", variant),
                  async_stores=variant.tma_stores and path != "fused")
    if path == "composition-separate":
        return [Launch(MATMUL, "up", rows, d, m * f, _tile(tiles, "matmul", variant)), down]
    # The fused up projection (moe_mlp's, and grouped_up's on the composition) stores act(h) and, when
    # training, h (gate and up): per B column, half an act(h) element (gated) and one element of h.
    stores = (1.0 if training else 0.0) + (1.0 / m)
    boxes = 1 + (m if training and variant.tma_h_stores else 0)
    return [Launch(UP, "up", rows, d, f, _tile(tiles, "up_projection", variant), b_mats=m, store_elems=stores,
                   async_stores=variant.tma_stores, tma_store_boxes=boxes), down]


def backward_launches(shape: StepShape, path: str, *, tiles: Mapping[str, Tile] = H100_TILES,
                      variant: Variant = Variant(), rows: Optional[Tuple[int, ...]] = None) -> List[Launch]:
    """The backward's GEMM launches on ``path``, in issue order."""
    rows = rows or shape.rows()
    d, f, m = shape.d_model, shape.d_ff, shape.m
    out_bytes = variant.wgrad_out_bytes
    if path in ("node", "fused-stored"):
        return _part_b_backward(shape, path, tiles, variant, rows)
    if path.startswith("composition"):
        wg = _tile(tiles, "wgrad", variant, wgrad=True)
        mm = _tile(tiles, "matmul", variant)
        tma = variant.tma_stores
        down = [Launch(MATMUL, "down.dgrad", rows, d, f, mm, async_stores=tma),
                Launch(WGRAD, "down.wgrad", rows, f, d, wg, kind="wgrad", out_bytes=out_bytes)]
        if path == "composition-separate":
            return down + [Launch(MATMUL, "up.dgrad", rows, m * f, d, mm, async_stores=tma),
                           Launch(WGRAD, "up.wgrad", rows, d, m * f, wg, kind="wgrad", out_bytes=out_bytes)]
        # grouped_up's backward (homogeneous [gate | up] rows): dx one GEMM over 2f, dW_up one wgrad.
        return down + [Launch(MATMUL, "up.dgrad", rows, m * f, d, mm, async_stores=tma),
                       Launch(WGRAD, "up.wgrad", rows, d, m * f, wg, kind="wgrad", out_bytes=out_bytes)]
    launches = [Launch(ACT_BWD, "act_bwd", rows, d, f, _tile(tiles, "act_bwd", variant), store_elems=m,
                       epilogue_load_elems=m),
                # act(h) rebuilt from h's halves and G scaled by the routing weight in registers per step:
                # no pipelined stages (compile record).
                Launch(WGRAD, "down.wgrad", rows, f, d, _tile(tiles, "wgrad_act", variant, wgrad=True), kind="wgrad",
                       a_mats=m, out_bytes=2, pipelined=False, act_of_a=True, scale_g=True)]
    halves = ("gate", "up") if shape.gated else ("gate",)
    launches += [Launch(WGRAD, f"up.wgrad.{h}", rows, d, f, _tile(tiles, "wgrad_gathered", variant, wgrad=True),
                        kind="wgrad", out_bytes=2) for h in halves]
    # [A | A2] @ [B; B2]: two A/B pairs per step of BK over K = m·f in all.
    launches.append(Launch(MATMUL, "dx", rows, m * f, d, _tile(tiles, "dual" if shape.gated else "matmul", variant),
                           ab_pairs=m))
    return launches


def _part_b_backward(shape: StepShape, path: str, tiles: Mapping[str, Tile], variant: Variant,
                     rows: Tuple[int, ...]) -> List[Launch]:
    """The part B backwards: every GEMM after the dH kernel has plain operands (see ``PATHS``)."""
    d, f, m = shape.d_model, shape.d_ff, shape.m
    out_bytes = variant.wgrad_out_bytes
    wg = _tile(tiles, "wgrad", variant, wgrad=True)
    mm = _tile(tiles, "matmul", variant)
    act_tile = replace(variant.act_bwd_tile or tiles["act_bwd"], group=variant.group_m)
    # dh (m values per column of f) and the activation a (one), from h's m halves.
    launches = [Launch(ACT_BWD, "act_bwd", rows, d, f, act_tile, store_elems=m + 1, epilogue_load_elems=m),
                Launch(WGRAD, "down.wgrad", rows, f, d, wg, kind="wgrad", out_bytes=out_bytes)]
    up_wg = wg if path == "node" else _tile(tiles, "wgrad_gathered", variant, wgrad=True)
    launches += [Launch(WGRAD, "up.wgrad", rows, d, m * f, up_wg, kind="wgrad", out_bytes=out_bytes),
                 Launch(MATMUL, "dx" if path == "fused-stored" else "up.dgrad", rows, m * f, d, mm,
                        async_stores=variant.tma_stores)]
    return launches


def step_launches(shape: StepShape, path: str, mode: str, **kw) -> List[Launch]:
    """Every GEMM launch of a forward (``mode="fwd"``) or a training step (``"fwd+bwd"``)."""
    training = mode == "fwd+bwd"
    out = forward_launches(shape, path, training=training, **kw)
    if training:
        out += backward_launches(shape, path, **kw)
    return out


# The composition's activation as torch elementwise kernels moved ~3.15× the bytes it must (read h's
# halves, write act(h); read the gradient and h, write dh): the first H100 run measured 1.68 ms at
# Qwen3 and 8.4 ms at Mixtral for forward+backward where these bytes at its copy rate take 0.55 and
# 2.58 ms (3.04× and 3.25×).
TORCH_ACTIVATION_TRAFFIC = 3.15


def torch_activation_bytes(shape: StepShape, path: str, mode: str, variant: Variant = Variant()) -> float:
    """Bytes the elementwise activation passes of ``path`` move in a step (0 where a GEMM epilogue does
    it): torch's calibrated to the first H100 run (``TORCH_ACTIVATION_TRAFFIC``), the activation-gradient
    kernel's (``variant.activation_backward == "kernel"``) the compulsory bytes once."""
    R, f, m = sum(shape.rows()), shape.d_ff, shape.m
    forward = (m + 1) * f if path == "composition-separate" else 0  # read h, write act(h)
    backward = (1 + 2 * m) * f if path in ("composition", "composition-separate") else 0  # read g, h; write dh
    backward_traffic = 1.0 if variant.activation_backward == "kernel" else TORCH_ACTIVATION_TRAFFIC
    elems = TORCH_ACTIVATION_TRAFFIC * forward + (backward_traffic * backward if mode == "fwd+bwd" else 0)
    return R * elems * 2.0  # bf16
