"""A roofline model of the grouped-GEMM launches: what each launch must cost on a device, and why.

For one launch the model counts its FLOPs and bytes, and walks the launch's own tile order to find
the bytes that this order makes it read again from device memory (HBM) because the L2 could not hold
them between two uses. Time is then set by the slowest of three rates:

- ``dense``: the tensor cores' rate (a dense bf16 GEMM, measured);
- ``copy``: device-memory bandwidth (a device copy, bytes read + written, measured);
- ``fill``: the rate at which the L2 delivers operand tiles into shared memory. Our kernels load every
  K step's A and B tiles from L2 with asynchronous copies and no cluster multicast, so a tile costs
  ``(BM·BK + BK·BN)·e`` bytes of L2 traffic per K step, hits or misses alike. Measured by
  ``benchmarks/gpu_ceilings.py`` (the GPU session script's first phase); ``None`` leaves it out;

and by what a program cannot overlap: the pipeline's fill before its first product and the epilogue's
loads and stores after its last stall the tensor cores unless another program on the same SM is in
its main loop. With ``p`` programs per SM (from the shared memory and registers of the compile record)
a program's stall is taken as covered ``(p-1)/p`` of the time. Stores issued as asynchronous TMA copies
(``Launch.async_stores``) take shared memory for their staging tile, and the epilogue's last box leaves
that stall (the next tile starts while it drains); earlier boxes of the same epilogue (the up
projection's h halves) are waited for before the staging tile is refilled.

The tile order is the kernels' own: ``_gemm.expert_tile`` for the persistent launches (experts in
order; GROUP_M row blocks per column sweep), the weight gradient's grid ``(K tiles × N tiles, E)``
(N tiles fastest, or GROUP_K K tiles per column sweep). The programs running at once are consecutive
tiles of that order, ``SMs × programs per SM`` of them (a wave); each operand block a wave touches is
read from HBM once per wave unless the L2 (an LRU of the device's L2 size over whole blocks) still
holds it from an earlier wave. Nothing is fitted: the numbers are the device's properties (SMs, L2
size, shared memory and registers per SM), the measured rates and the launch's configuration (tile,
warps, stages, registers, shared memory, whether the K loop is pipelined).

Two more rates where a launch needs them:

- ``latency``: one load's latency from HBM. A pipelined K loop keeps ``stages - 1`` steps of loads in
  flight; an unpipelined one (loads into registers, no async copies: the compile record says which)
  waits for every step's loads before its products, so its longest program costs
  ``steps · (latency + transfer + products)``. Measured by ``gpu_ceilings.py`` (a dependent chain of
  loads); for a run that did not measure it, read off one unpipelined launch and stated as such;
- ``prologue``: the register path of a K loop that transforms an operand between its load and the
  tensor cores (the fused down projection's weight gradient rebuilding act(h) from h's halves and
  scaling G's rows by the routing weight: ``prologue_elems_per_step``), elements per second over the
  device. It is the kernel's own code path (loads to registers, the activation, the conversion to the
  products' layout through shared memory), not a generic rate, so it is read off one such launch.

Not modelled: CUDA-core work in epilogues (the activation backward's; the Qwen3 ``act_bwd`` of the
first run's fused path, 64×64 tiles with a 32-step K loop, is the model's one miss).
"""
from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple


# ---- the device -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    """What the model needs of a GPU: properties the driver reports, and rates measured on it."""

    name: str
    sms: int
    l2_bytes: int
    smem_per_sm: int                   # shared memory of one SM (the driver's sharedMemPerMultiprocessor)
    dense_tflops: float                # measured bf16 dense GEMM rate
    copy_gbps: float                   # measured device copy, bytes read + written per second
    fill_gbps: Optional[float] = None  # measured L2 → shared-memory operand rate (None: not a limit)
    latency_us: Optional[float] = None  # measured latency of a load from HBM under load (None: not a limit)
    # elements per second through an operand's register path (``prologue_elems_per_step``; None: not a limit)
    prologue_gelems: Optional[float] = None
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048

    def with_ceilings(self, **ceilings) -> "Device":
        return replace(self, **{k: v for k, v in ceilings.items() if v is not None})


# The driver's properties (the first H100 run's trace records them: 132 SMs, 233,472 B of shared
# memory per SM; 50 MiB of L2 by the datasheet) and that run's measured rates
# (benchmarks/results/h100-2026-11-24/3-followup-profile/profile.json). The H200: same chip, 60 MiB of
# L2 by torch's report on the device machine (KINDS.md, 2026-10-28), rates from the device page's
# readings (copy ~4.3 TB/s, dense bf16 769–798 TFLOP/s) until a session measures them.
H100_SXM = Device("NVIDIA H100 80GB HBM3", sms=132, l2_bytes=50 * 2**20, smem_per_sm=233472,
                  dense_tflops=755.1, copy_gbps=2913.8)
H200 = Device("NVIDIA H200", sms=132, l2_bytes=60 * 2**20, smem_per_sm=233472, dense_tflops=788.0, copy_gbps=4300.0)
DEVICES = {d.name: d for d in (H100_SXM, H200)}


def device_named(name: str) -> Device:
    """The known device whose name torch reports as ``name`` (H100 and H200 kept apart)."""
    if name in DEVICES:
        return DEVICES[name]
    for known in DEVICES.values():
        if known.name in name or name in known.name:
            return known
    raise KeyError(f"kernel_model: no properties known for device {name!r}; known: {sorted(DEVICES)}")


# ---- a launch ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tile:
    """A launch's program configuration, with what the compiler made of it where known."""

    BM: int
    BN: int
    BK: int
    warps: int
    stages: int
    group: int = 1              # GROUP_M (persistent GEMMs) or GROUP_K (weight gradient): blocks per sweep
    regs: Optional[int] = None  # registers per thread (compile record, or the profiler's trace)
    smem: Optional[int] = None  # shared memory per program in bytes (likewise)

    @property
    def threads(self) -> int:
        return 32 * self.warps

    def describe(self) -> str:
        order = f" G{self.group}" if self.group > 1 else ""
        return f"{self.BM}×{self.BN}×{self.BK} w{self.warps} s{self.stages}{order}"


@dataclass(frozen=True)
class Launch:
    """One grouped GEMM launch.

    ``kind="persistent"``: ``C_e [rows_e, N] = A_e [rows_e, K] @ B_e [K, N]`` per expert e over the
    ``_gemm.expert_tile`` schedule; ``b_mats`` B matrices share each A tile (2: the gated up
    projection's gate and up, each N wide). ``kind="wgrad"``: ``dB_e [K, N] = A_eᵀ @ G_e`` reduced over
    the expert's rows, one program per output tile (tile BK × BN, BM rows per step); ``a_mats`` A tiles
    per step (2: a gated activation recomputed from h's halves).

    Epilogue traffic per output element: ``store_elems`` elements stored (the up projection stores h's
    gate and up and act(h): 1.5 per gate-or-up column), ``epilogue_load_elems`` read (h's two halves in
    the activation backward); ``out_bytes`` is the stored element size (4 for an fp32 weight gradient).
    """

    kernel: str
    label: str
    rows: Tuple[int, ...]       # rows of each expert group (the GEMM's M, or the wgrad's reduction)
    K: int
    N: int
    tile: Tile
    kind: str = "persistent"
    elem_bytes: int = 2
    out_bytes: int = 2
    b_mats: int = 1
    a_mats: int = 1
    store_elems: float = 1.0
    epilogue_load_elems: float = 0.0
    ab_pairs: int = 1           # A/B pairs per K step (2: ``[A | A2] @ [B; B2]``, each pair BK of the K)
    # The output tiles written by asynchronous TMA stores (FASTMOE_C_STORES=tma): the program's next tile
    # starts while the epilogue's last box drains, so that box leaves the epilogue's stall (earlier boxes
    # and its loads stay in it).
    async_stores: bool = False
    # TMA boxes per tile through the one staging tile (the up projection with FASTMOE_C_STORES=tma+h: act(h)
    # and h's two halves); each but the last waits for its predecessor's completion (Triton 3.6)
    tma_store_boxes: int = 1
    pipelined: bool = True      # the compile record's async copies in the K loop
    # A wgrad's operands transformed in registers per step: A rebuilt as an activation of its loads
    # (ACT_OF_A: a_mats tiles of BM × BK), G's rows scaled (SCALE_G: BM × BN)
    act_of_a: bool = False
    scale_g: bool = False
    programs: Optional[int] = None  # persistent grid (default: 2 per SM, at most the tiles)

    @property
    def flops(self) -> float:
        return 2.0 * sum(self.rows) * self.K * self.N * (self.b_mats if self.kind == "persistent" else 1)

    def with_tile(self, **changes) -> "Launch":
        return replace(self, tile=replace(self.tile, **changes))


@dataclass
class Prediction:
    launch: Launch
    ms: float
    bound: str                  # what set most of the time: "dense", "fill", "hbm", "latency", "prologue" or "stall"
    programs_per_sm: int
    waves: int
    hbm_bytes: float            # modelled HBM traffic: operand misses and the epilogue's traffic
    compulsory_bytes: float     # each input read once, each output written once
    fill_bytes: float           # L2 → shared-memory operand traffic
    parts: Dict[str, float] = field(default_factory=dict)  # ms attributed to each limit

    @property
    def tflops(self) -> float:
        return self.launch.flops / (self.ms * 1e9) if self.ms > 0 else 0.0

    @property
    def rereads(self) -> float:
        """HBM bytes beyond the compulsory ones (the tile order's re-reads), as a multiple of them."""
        return self.hbm_bytes / self.compulsory_bytes if self.compulsory_bytes else 0.0


# ---- the model --------------------------------------------------------------------------------------
def step_operand_elems(launch: Launch) -> int:
    """Elements of the operand tiles one K step loads into shared memory."""
    t = launch.tile
    if launch.kind == "wgrad":  # A [BM, BK] (a_mats of them) and G [BM, BN] per step of BM rows
        return launch.a_mats * t.BM * t.BK + t.BM * t.BN
    return launch.ab_pairs * (t.BM * t.BK + launch.b_mats * t.BK * t.BN)


def prologue_elems_per_step(launch: Launch) -> int:
    """Elements one K step passes through its register path (``Launch.act_of_a``, ``scale_g``)."""
    t = launch.tile
    return (launch.a_mats * t.BM * t.BK if launch.act_of_a else 0) + (t.BM * t.BN if launch.scale_g else 0)


def staged_store_bytes(launch: Launch) -> int:
    """The TMA stores' staging tile in shared memory beside the K loop's buffers: one BM × BN output
    box, which the compiler reuses for every store of the epilogue (the sm_90 compile records: 128×256
    bf16, 147,456 → 212,992 bytes; the up projection's act(h) and h halves through one 128×128 buffer)."""
    return launch.tile.BM * launch.tile.BN * launch.out_bytes if launch.async_stores else 0


def shared_memory_estimate(launch: Launch) -> int:
    """A pipelined K loop's buffers (the pruner's estimate, without its slack), and a staged store tile."""
    return launch.tile.stages * step_operand_elems(launch) * launch.elem_bytes + staged_store_bytes(launch)


def programs_per_sm(device: Device, launch: Launch) -> int:
    """Programs that fit on one SM at once: shared memory, registers and threads (at least 1)."""
    t = launch.tile
    # (a compile record's figure is of the kernel with pointer stores)
    smem = t.smem + staged_store_bytes(launch) if t.smem is not None else shared_memory_estimate(launch)
    fits = [device.smem_per_sm // max(smem, 1), device.max_threads_per_sm // t.threads]
    if t.regs is not None:
        per_warp = math.ceil(t.regs * 32 / 256) * 256  # registers are allocated per warp, 256 at a time
        fits.append(device.regs_per_sm // (per_warp * t.warps))
    return max(1, min(fits))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _persistent_tiles(launch: Launch) -> Iterator[Tuple[int, int, int, int]]:
    """(expert, M tile, N tile, rows in it) in ``_gemm.expert_tile``'s order."""
    t = launch.tile
    n_tiles = _cdiv(launch.N, t.BN)
    for e, rows in enumerate(launch.rows):
        m_tiles = _cdiv(rows, t.BM)
        for first_m in range(0, m_tiles, t.group):
            group_rows = min(m_tiles - first_m, t.group)
            for n in range(n_tiles):
                for m in range(first_m, first_m + group_rows):
                    yield e, m, n, min(t.BM, rows - m * t.BM)


def _wgrad_tiles(launch: Launch) -> Iterator[Tuple[int, int, int, int]]:
    """(expert, K tile, N tile, rows) in the weight gradient's order (GROUP_K K tiles per N sweep)."""
    t = launch.tile
    k_tiles, n_tiles = _cdiv(launch.K, t.BK), _cdiv(launch.N, t.BN)
    for e, rows in enumerate(launch.rows):
        for first_k in range(0, k_tiles, t.group):
            group_k = min(k_tiles - first_k, t.group)
            for n in range(n_tiles):
                for kt in range(first_k, first_k + group_k):
                    yield e, kt, n, rows


class _L2:
    """An LRU over whole operand blocks, of the device's L2 size."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self.blocks: "OrderedDict[tuple, int]" = OrderedDict()

    def touch(self, block: tuple, size: int) -> bool:
        """Use ``block``: True on a hit; on a miss it comes in, evicting the least recently used."""
        if block in self.blocks:
            self.blocks.move_to_end(block)
            return True
        self.blocks[block] = size
        self.used += size
        while self.used > self.capacity and len(self.blocks) > 1:
            self.used -= self.blocks.popitem(last=False)[1]
        return False


@dataclass
class _TileWork:
    flops: float
    steps: int
    blocks: Dict[tuple, int]  # operand block → bytes
    epilogue_bytes: float     # HBM traffic after the K loop (stores, the epilogue's loads)
    # the stores that overlap the next tile: with TMA stores, the epilogue's last box (each earlier one
    # is waited for before the shared staging tile is refilled: the compile record's wait {pendings = 0})
    async_store_bytes: float = 0.0
    # boxes whose completion the epilogue waits for before refilling the staging tile (Triton 3.6's
    # wait {pendings = 0}: a write's round trip, the latency, on top of its transfer)
    completion_waits: int = 0


def _tile_work(launch: Launch, tile: Tuple[int, int, int, int]) -> _TileWork:
    t, e = launch.tile, launch.elem_bytes
    expert, i, j, rows = tile
    if launch.kind == "wgrad":
        return _TileWork(2.0 * rows * t.BK * t.BN, _cdiv(rows, t.BM),
                         {("a", expert, i): rows * t.BK * e * launch.a_mats, ("g", expert, j): rows * t.BN * e},
                         t.BK * t.BN * launch.out_bytes)
    out = rows * t.BN * launch.b_mats
    stores = out * launch.store_elems * launch.out_bytes
    box = rows * t.BN * launch.out_bytes
    last_box = min(stores, box) if launch.async_stores else 0.0
    waits = launch.tma_store_boxes - 1 if launch.async_stores else 0
    return _TileWork(2.0 * t.BM * t.BN * launch.K * launch.b_mats,  # a partial M tile computes BM rows
                     _cdiv(launch.K, t.BK * launch.ab_pairs),
                     {("a", expert, i): rows * launch.K * e, ("b", expert, j): launch.K * t.BN * e * launch.b_mats},
                     stores + out * launch.epilogue_load_elems * e, last_box, waits)


@functools.lru_cache(maxsize=4)
def _tile_works(launch: Launch) -> Tuple[_TileWork, ...]:
    """The launch's tiles' work in the kernel's order. It depends on the launch alone, so it is kept for
    the few last launches: a ceiling's bisection (``infer_ceiling``) predicts one launch 60 times on
    devices that differ only in that ceiling."""
    order = _wgrad_tiles(launch) if launch.kind == "wgrad" else _persistent_tiles(launch)
    return tuple(_tile_work(launch, tile) for tile in order)


def predict(device: Device, launch: Launch) -> Prediction:
    """The modelled time of ``launch`` on ``device`` (see the module docstring)."""
    t = launch.tile
    occ = programs_per_sm(device, launch)
    sms = device.sms
    dense_per_sm = device.dense_tflops * 1e12 / sms   # FLOP/s of one SM
    hbm = device.copy_gbps * 1e9                       # bytes/s, read + written
    fill = device.fill_gbps * 1e9 if device.fill_gbps else None
    tiles = _tile_works(launch)
    resident = sms * occ
    if launch.kind == "persistent":
        resident = min(launch.programs or 2 * sms, resident)
    step_bytes = step_operand_elems(launch) * launch.elem_bytes
    l2 = _L2(device.l2_bytes)
    prologue_elems = prologue_elems_per_step(launch) if device.prologue_gelems else 0
    parts = {"dense": 0.0, "fill": 0.0, "hbm": 0.0, "latency": 0.0, "prologue": 0.0, "stall": 0.0}
    total = hbm_bytes = fill_bytes = 0.0
    waves = 0
    for start in range(0, len(tiles), resident):
        wave = tiles[start:start + resident]
        waves += 1
        blocks: Dict[tuple, int] = {}
        for w in wave:
            blocks.update(w.blocks)  # programs of one wave that share a block stream it through L2 once
        epilogue = sum(w.epilogue_bytes for w in wave)
        # what the epilogue makes a program wait for: all of it, less the last TMA box where stores are async
        waited = epilogue - sum(w.async_store_bytes for w in wave)
        wave_hbm = sum(size for block, size in blocks.items() if not l2.touch(block, size)) + epilogue
        wave_fill = sum(w.steps for w in wave) * step_bytes
        wave_flops = sum(w.flops for w in wave)
        active = min(sms, _cdiv(len(wave), occ)) / sms  # share of the SMs the wave runs on
        # An SM streams at most its share of the bandwidth (a wave on few SMs, the decode case, does not
        # get all of it; the GPU session's decode sweep tests this).
        limits = {"dense": wave_flops / (device.dense_tflops * 1e12 * active), "hbm": wave_hbm / (hbm * active)}
        if fill is not None:
            limits["fill"] = wave_fill / (fill * active)
        if prologue_elems:
            limits["prologue"] = sum(w.steps for w in wave) * prologue_elems / (device.prologue_gelems * 1e9 * active)
        if device.latency_us is not None or not launch.pipelined:
            limits["latency"] = _latency_limit(device, launch, wave, step_bytes, dense_per_sm, fill or hbm)
        main = max(limits.values())
        # The pipeline's fill (stages - 1 steps of loads) and the epilogue's HBM traffic, per program,
        # uncovered 1/occ of the time.
        fill_rate = (fill or hbm) / sms
        round_trips = max(w.completion_waits for w in wave) * (device.latency_us or 0.0) * 1e-6
        stall = ((t.stages - 1) * step_bytes / fill_rate + (waited / len(wave)) / (hbm / sms) + round_trips) / occ
        total += main + stall
        parts[max(limits, key=limits.get)] += main * 1e3
        parts["stall"] += stall * 1e3
        hbm_bytes += wave_hbm
        fill_bytes += wave_fill
    total_ms = total * 1e3
    compulsory = compulsory_bytes(launch)
    floor_ms = compulsory / hbm * 1e3
    if floor_ms > total_ms:  # never faster than reading and writing everything once
        parts["hbm"] += floor_ms - total_ms
        total_ms = floor_ms
    return Prediction(launch, total_ms, max(parts, key=parts.get), occ, waves, hbm_bytes, compulsory, fill_bytes,
                      parts)


def _latency_limit(device: Device, launch: Launch, wave: List[_TileWork], step_bytes: int, dense_per_sm: float,
                   operand_rate: float) -> float:
    """The longest program's K loop when loads wait on memory latency: a pipelined loop keeps
    ``stages - 1`` steps of loads in flight, so each step costs at least latency / (stages - 1); an
    unpipelined one waits for every step's loads before its products (their transfer at the operand
    rate's per-SM share, plus the latency where measured)."""
    steps = max(w.steps for w in wave)
    latency = (device.latency_us or 0.0) * 1e-6
    if launch.pipelined:
        return steps * latency / max(launch.tile.stages - 1, 1)
    per_step_flops = max(w.flops / max(w.steps, 1) for w in wave)
    return steps * (latency + step_bytes / (operand_rate / device.sms) + per_step_flops / dense_per_sm)


def compulsory_bytes(launch: Launch) -> float:
    """Each operand read once, each output written once (the weights of experts with rows only)."""
    e, R, E = launch.elem_bytes, sum(launch.rows), sum(1 for r in launch.rows if r)
    if launch.kind == "wgrad":
        return R * launch.K * e * launch.a_mats + R * launch.N * e + E * launch.K * launch.N * launch.out_bytes
    out = R * launch.N * launch.b_mats
    return (R * launch.K * e + E * launch.K * launch.N * e * launch.b_mats
            + out * (launch.store_elems * launch.out_bytes + launch.epilogue_load_elems * e))


# The ceilings a run may leave unmeasured and that a launch can be read off: (Device field, whether a
# larger value makes launches slower, the bisection's range).
READ_OFF = {"fill_gbps": (False, (100.0, 1e6)), "latency_us": (True, (1e-4, 100.0)),
            "prologue_gelems": (False, (1.0, 1e6))}


def infer_ceiling(device: Device, launch: Launch, measured_ms: float, ceiling: str) -> float:
    """The value of ``ceiling`` (a ``READ_OFF`` field) that makes ``launch`` take ``measured_ms``: for a
    run that did not measure it, read off one launch the model says that ceiling bounds (stated as such
    wherever it is used)."""
    slower_when_larger, (lo, hi) = READ_OFF[ceiling]
    for _ in range(60):  # monotone in the ceiling: bisect on a log scale
        mid = math.sqrt(lo * hi)
        too_slow = predict(device.with_ceilings(**{ceiling: mid}), launch).ms > measured_ms
        if too_slow == slower_when_larger:
            hi = mid
        else:
            lo = mid
    return math.sqrt(lo * hi)


def expected_rows(tokens: int, num_experts: int, top_k: int, seed: int = 0) -> Tuple[int, ...]:
    """Rows per expert of uniformly random routing (each token k distinct experts), drawn once with a
    fixed seed: what the benchmark's random router gives, in distribution."""
    import torch

    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(tokens, num_experts, generator=g).topk(top_k, dim=1).indices
    return tuple(int(c) for c in torch.bincount(idx.flatten(), minlength=num_experts).tolist())


def predict_all(device: Device, launches: Sequence[Launch]) -> List[Prediction]:
    return [predict(device, launch) for launch in launches]
