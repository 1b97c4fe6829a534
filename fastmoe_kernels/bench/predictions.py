"""The kernel model's predictions for the open changes, written before a GPU measures them.

Each change is a ``launch_plans.Variant`` (or a launch list of its own) predicted against today's
kernels at the headline shapes, on the device model with the ceilings of the last GPU run (the H100's;
the fill rate as ``explain`` read it off that run). The GPU session's A/B measures the same variants,
so each run tests the model as well as the kernels.

    python -m fastmoe_kernels.bench.predictions [--device "NVIDIA H200"] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

from .grids import model_cases
from .kernel_model import H100_SXM, Device, Launch, Tile, device_named, predict, shared_memory_estimate
from .launch_plans import ACT_BWD_SPLIT, ACT_BWD_SPLIT_GATHERED, StepShape, Variant, forward_launches, step_launches, torch_activation_bytes

# The ceilings the first H100 run implies (``python -m fastmoe_kernels.bench.explain``, each read off
# one launch: benchmarks/results/h100-2026-11-24/model/): not measured there; the next session's
# ceilings phase measures the fill rate and the latency. They matter only where a launch needs them:
# the latency for unpipelined K loops, the register path's rate for the fused recompute's down wgrad.
H100_FILL_GBPS = 8379.0
H100_LATENCY_US = 0.657
H100_PROLOGUE_GELEMS = 1296.0
HEADLINE = ("Qwen3-30B-A3B", "Mixtral-8x7B", "gpt-oss-20b", "OLMoE", "DeepSeek-V3")

# The Hopper-sized weight-gradient tiles the training issue offers the autotuner (BM rows per step,
# an output tile of BK × BN): 128×256 outputs, 3 stages (the pipelined loop's 144 KiB) — one program
# per SM, half the L2 → shared-memory traffic per FLOP of today's 128×128.
WGRAD_HOPPER = Tile(64, 256, 128, 8, 3)


@dataclass
class Change:
    name: str
    what: str
    mode: str
    variant: Variant = Variant()
    path: str = "composition"
    # What it is measured against (None: the kernels the first H100 run measured, i.e. the composition
    # with a separate activation, or the same path with today's tiles).
    baseline_path: Optional[str] = None
    baseline_variant: Optional[Variant] = None


PART_A = Variant(group_m=8, wgrad_out_bytes=2, wgrad_group_k=8, wgrad_tile=WGRAD_HOPPER)

CHANGES = [
    Change("grouped tile order", "GROUP_M = 8 row blocks per column sweep in the persistent GEMMs", "fwd",
           Variant(group_m=8), path="fused"),
    Change("grouped tile order (training)", "GROUP_M = 8 in the composition's grouped matmuls", "fwd+bwd",
           Variant(group_m=8), path="composition-separate"),
    Change("wgrad in the parameters' dtype", "bf16 weight gradients stored from the fp32 sums (no fp32 copy)",
           "fwd+bwd", Variant(wgrad_out_bytes=2), path="composition-separate"),
    Change("wgrad rework", "bf16 stores, GROUP_K = 8 K blocks per column sweep, 128×256 output tiles",
           "fwd+bwd", Variant(wgrad_out_bytes=2, wgrad_group_k=8, wgrad_tile=WGRAD_HOPPER), path="composition-separate"),
    Change("training issue A", "the above, with the activation in the up projection's epilogue (its GEMMs: "
           "the fused up projection, dx with two A/B pairs, two half wgrads)", "fwd+bwd",
           Variant(group_m=8, wgrad_out_bytes=2, wgrad_group_k=8, wgrad_tile=WGRAD_HOPPER), path="composition"),
    # Part B, each against today's default of its path (part A's kernels): the A/B the GPU session runs.
    Change("node backward", "FASTMOE_MLP_BACKWARD=epilogue: the activation's backward in the dH epilogue of "
           "G @ W_down (split epilogue, 128×128), no torch elementwise pass", "fwd+bwd",
           replace(PART_A, act_bwd_tile=ACT_BWD_SPLIT), path="node", baseline_path="composition",
           baseline_variant=PART_A),
    Change("node backward, whole epilogue", "the same with FASTMOE_DH_EPILOGUE=whole (the 64×64 tiles of "
           "three live fp32 tiles)", "fwd+bwd", PART_A, path="node", baseline_path="composition",
           baseline_variant=PART_A),
    Change("activation backward kernel", "FASTMOE_ACTIVATION_BACKWARD=kernel (and kernel-in-place, the same "
           "bytes): the composition's dh in one elementwise pass instead of torch.func.vjp's ops", "fwd+bwd",
           replace(PART_A, activation_backward="kernel"), path="composition", baseline_path="composition",
           baseline_variant=PART_A),
    Change("fused stored backward", "FASTMOE_FUSED_BACKWARD=stored, FASTMOE_DOWN_OUTPUT=rows: A_s written by "
           "the dH kernel, plain dW_down, one dW_up over 2f, one plain dx", "fwd+bwd",
           replace(PART_A, act_bwd_tile=ACT_BWD_SPLIT_GATHERED), path="fused-stored", baseline_path="fused",
           baseline_variant=PART_A),
    Change("TMA stores", "FASTMOE_C_STORES=tma: the up projection's act(h) and the composition's down "
           "projection and input gradients store their contiguous tiles by asynchronous TMA copies (the next "
           "tile's K loop overlaps them; the staged tiles cost shared memory, so 128×128 tiles run one "
           "program per SM)", "fwd",
           replace(PART_A, tma_stores=True), path="composition", baseline_path="composition",
           baseline_variant=PART_A),
    Change("TMA stores (training)", "the same in the composition's training step (the up projection's act(h), "
           "down projection, its input gradient, dx)", "fwd+bwd",
           replace(PART_A, tma_stores=True), path="composition",
           baseline_path="composition", baseline_variant=PART_A),
    Change("deep pipelines", "FASTMOE_DEEP_PIPELINES=on, the 4-stage Hopper tiles forced (the autotuner "
           "offered both keeps whichever measures faster: by the model, the 3-stage ones)", "fwd",
           replace(PART_A, pipeline_stages=4), path="composition", baseline_path="composition",
           baseline_variant=PART_A),
    Change("TMA stores with h", "FASTMOE_C_STORES=tma+h against tma: the up projection's h halves by TMA boxes "
           "through act(h)'s staging tile (each waiting for the previous box's completion on Triton 3.6)",
           "fwd+bwd", replace(PART_A, tma_stores=True, tma_h_stores=True), path="composition",
           baseline_path="composition", baseline_variant=replace(PART_A, tma_stores=True)),
]


def _step_ms(device: Device, shape: StepShape, mode: str, path: str, variant: Variant,
             ) -> Tuple[float, Dict[str, float]]:
    """The step's GEMM time; a variant that offers the autotuner another tile keeps, per launch, the
    faster of it and today's (the autotuner measures both)."""
    options = [variant] + ([replace(variant, wgrad_tile=None)] if variant.wgrad_tile is not None else [])
    per_option = [[predict(device, l) for l in step_launches(shape, path, mode, variant=v)] for v in options]
    best = [min(preds, key=lambda p: p.ms) for preds in zip(*per_option)]
    return sum(p.ms for p in best), {p.launch.label: p.ms for p in best}


def _fastest_tile(device: Device, launch: Launch, rows_per_expert: Optional[int] = None) -> float:
    """The launch at the autotuner's choice: the fastest of its kernel's tiles that fit the SM (with
    ``rows_per_expert``, of those offered at that M_BUCKET, the decode tiles among them)."""
    from .explain import candidate_tiles

    times = []
    for tile in candidate_tiles(launch.kernel, rows_per_expert):
        trial = replace(launch, tile=tile)
        if shared_memory_estimate(trial) <= device.smem_per_sm - 1024:
            times.append(predict(device, trial).ms)
    return min(times) if times else predict(device, launch).ms


def change_rows(device: Device) -> List[dict]:
    """Per change and headline case: today's GEMM time, the variant's, and the launches that move."""
    rows = []
    cases = {c.label: c for c in model_cases()}
    for change in CHANGES:
        for label in HEADLINE:
            shape = StepShape.of_case(cases[label])
            # Today: the kernels the first H100 run measured (the composition with a separate activation).
            today_path = change.baseline_path or (
                "composition-separate" if change.path.startswith("composition") else change.path)
            base, base_parts = _step_ms(device, shape, change.mode, today_path, change.baseline_variant or Variant())
            new, new_parts = _step_ms(device, shape, change.mode, change.path, change.variant)
            moved = {k: (base_parts.get(k, 0.0), new_parts.get(k, 0.0)) for k in {**base_parts, **new_parts}
                     if abs(base_parts.get(k, 0.0) - new_parts.get(k, 0.0)) > 0.005}
            # The elementwise activation passes (not GEMMs) at the copy rate: torch's with the first run's
            # measured excess traffic, the activation-gradient kernel's without.
            per_ms = 1e3 / (device.copy_gbps * 1e9)
            elem_base = torch_activation_bytes(shape, today_path, change.mode,
                                               change.baseline_variant or Variant()) * per_ms
            elem_new = torch_activation_bytes(shape, change.path, change.mode, change.variant) * per_ms
            if elem_base or elem_new:
                moved["activation passes"] = (elem_base, elem_new)
            total_base, total_new = base + elem_base, new + elem_new
            rows.append(dict(change=change.name, what=change.what, case=label, mode=change.mode, path=change.path,
                             baseline_path=today_path, today_ms=base, predicted_ms=new,
                             speedup=base / new if new else 0.0, elementwise_today_ms=elem_base,
                             elementwise_predicted_ms=elem_new, step_today_ms=total_base,
                             step_predicted_ms=total_new,
                             step_speedup=total_base / total_new if total_new else 0.0, moved=moved))
    return rows


def decode_rows(device: Device, tokens=(1, 4, 16, 64, 256, 512)) -> List[dict]:
    """Decode: the forward's bytes are the hit experts' weights. Today's tiles (the autotuner's fastest
    of the list without the decode tiles) put one program on an (expert rows, N tile), so few tokens
    leave most SMs idle; the decode tiles (16 rows, 32-128 columns, offered at M_BUCKET ≤ 16) split every
    hit expert's weights over more programs; the floor is one read of those weights at the copy rate."""
    from ..triton_backend._common import rows_per_expert_bucket  # (imports triton: only here)

    rows = []
    cases = {c.label: c for c in model_cases()}
    for label in ("Qwen3-30B-A3B", "Mixtral-8x7B", "gpt-oss-20b"):
        case = cases[label]
        for t in tokens:
            shape = StepShape(t, case.d_model, case.d_ff, case.num_experts, case.top_k, case.gated)
            rows_e = shape.rows()
            hit = sum(1 for r in rows_e if r)
            weight_bytes = hit * case.expert_params * case.elem_bytes()
            launches = forward_launches(shape, "fused", training=False)
            today = sum(_fastest_tile(device, l) for l in launches)
            m_bucket = rows_per_expert_bucket(sum(rows_e), case.num_experts)
            decode = sum(_fastest_tile(device, l, m_bucket) for l in launches)
            floor = weight_bytes / (device.copy_gbps * 1e9) * 1e3
            rows.append(dict(case=label, tokens=t, experts_hit=hit, weight_MB=weight_bytes / 1e6, today_ms=today,
                             decode_tiles_ms=decode, floor_ms=floor, today_GBps=weight_bytes / today / 1e6,
                             decode_tiles_GBps=weight_bytes / decode / 1e6, copy_GBps=device.copy_gbps,
                             m_bucket=m_bucket))
    return rows


# The first H100 run's fp8 (blockwise) times, bf16 layers at 16,384 tokens (benchmarks/results/h100-2026-11-24/):
# experts forward and forward+backward, ms.
H100_FP8_MS = {"Qwen3-30B-A3B": {"fwd": 5.21, "fwd+bwd": 18.4}, "Mixtral-8x7B": {"fwd": 21.3, "fwd+bwd": 82.7}}


def fp8_quantiser_bytes(shape: StepShape, elem_bytes: int = 2) -> Dict[str, float]:
    """Bytes the fused fp8 quantisers (FASTMOE_FP8_QUANTISERS=fused) remove, by mode, counted from the two
    paths' code: the forward's row quantiser no longer reads h (R·H); the backward no longer gathers w·g
    (its read and write, R·d each: its quantisers read g instead of it, the same bytes) nor writes dh and
    reads it back for rows and for columns (3·R·H). The e4m3 outputs are written on both paths."""
    rows = shape.tokens * shape.top_k
    h_cols = (2 if shape.gated else 1) * shape.d_ff
    forward = rows * h_cols * elem_bytes
    backward = 2 * rows * shape.d_model * elem_bytes + 3 * rows * h_cols * elem_bytes
    # fused-folded: the dgrad's row quantiser reads and writes T rows of the gradient instead of R
    folded = (rows - shape.tokens) * shape.d_model * (elem_bytes + 1)
    return {"fwd": forward, "fwd+bwd": forward + backward, "fwd+bwd folded": forward + backward + folded}


def fp8_quantiser_rows(device: Device) -> List[dict]:
    """The fused quantisers' predicted saving: the bytes they remove at the copy rate (a bound for passes that
    ran at it), against the first run's fp8 times where it measured them. Not modelled: the fused kernels'
    fixed tiles (the dgrad's 128×128, the gated up projection's 64×256) against the autotuner's choice, and
    the dgrad epilogue computed twice — the A/B ("fp8 fused quantisers") measures them."""
    rows = []
    cases = {c.label: c for c in model_cases()}
    for label in HEADLINE:
        shape = StepShape.of_case(cases[label])
        for mode, removed in fp8_quantiser_bytes(shape, cases[label].elem_bytes()).items():
            saved = removed / (device.copy_gbps * 1e9) * 1e3
            measured = H100_FP8_MS.get(label, {}).get(mode.split()[0])
            rows.append(dict(case=label, mode=mode, removed_GB=removed / 1e9, saved_ms=saved, launches_removed=1 if
                             mode == "fwd" else 4, fp8_today_ms=measured,
                             fp8_predicted_ms=measured - saved if measured else None,
                             speedup=measured / (measured - saved) if measured else None))
    return rows


def markdown(device: Device, changes: List[dict], decode: List[dict], fp8: Optional[List[dict]] = None) -> str:
    lines = [f"# Kernel-model predictions on {device.name}", "",
             f"Ceilings: dense {device.dense_tflops:.0f} TFLOP/s, copy {device.copy_gbps:.0f} GB/s, fill "
             f"{device.fill_gbps or 0:.0f} GB/s, latency {device.latency_us or 0:.3f} µs, register path "
             f"{device.prologue_gelems or 0:.0f} G elements/s, L2 {device.l2_bytes / 2**20:.0f} MiB, {device.sms} SMs. GEMM "
             "launches, and the composition's elementwise activation passes at the copy rate with the first run's "
             "measured excess (no router or combine time); bf16, 16,384 tokens. Part B rows are against their "
             "path's default after part A (the GPU session's A/B).", "",
             "## The open changes", "",
             "| change | case | mode | GEMMs today (ms) | predicted (ms) | × | with torch's activation passes: "
             "today → predicted (ms) | × | launches that move (ms today → predicted) |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in changes:
        moved = "; ".join(f"`{k}` {a:.2f}→{b:.2f}" for k, (a, b) in r["moved"].items()) or "none"
        lines.append(f"| {r['change']} | {r['case']} | {r['mode']} | {r['today_ms']:.2f} | {r['predicted_ms']:.2f} | "
                     f"{r['speedup']:.2f} | {r['step_today_ms']:.2f} → {r['step_predicted_ms']:.2f} | "
                     f"{r['step_speedup']:.2f} | {moved} |")
    lines += ["", "## Decode (forward, inference): the hit experts' weights over the copy bandwidth", "",
              "GEMMs only (the router, plan and combine not included). `M_BUCKET`: the mean rows per expert, "
              "the autotune key that offers the decode tiles (≤ 16).", "",
              "| case | tokens | experts hit | weights (MB) | M_BUCKET | today's tiles (ms) | GB/s | decode tiles (ms) "
              "| GB/s | % of copy | one read at the copy rate (ms) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in decode:
        lines.append(f"| {r['case']} | {r['tokens']} | {r['experts_hit']} | {r['weight_MB']:.0f} | {r['m_bucket']} | "
                     f"{r['today_ms']:.3f} | {r['today_GBps']:.0f} | {r['decode_tiles_ms']:.3f} | "
                     f"{r['decode_tiles_GBps']:.0f} | {100 * r['decode_tiles_GBps'] / r['copy_GBps']:.0f} | "
                     f"{r['floor_ms']:.3f} |")
    if fp8:
        lines += ["", "## FP8: the quantisers fused into their producers (FASTMOE_FP8_QUANTISERS=fused, fused-folded)", "",
                  "The bytes the fused node removes (h read by the forward's row quantiser; the backward's gather of "
                  "w·g, its write and read; dh written and read back twice) at the copy rate, against the first H100 "
                  "run's fp8 times where measured; `fwd+bwd folded`: with the routing weight folded into the dgrad's row "
                  "scales (its row quantiser over T tokens instead of R rows). The fused kernels' fixed tiles and the "
                  "dgrad's twice-computed epilogue are not modelled (the A/B measures them).", "",
                  "| case | mode | bytes removed (GB) | launches removed | at the copy rate (ms) "
                  "| fp8 today, H100 (ms) | predicted (ms) | × |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in fp8:
            today = f"{r['fp8_today_ms']:.2f}" if r["fp8_today_ms"] else "–"
            pred = f"{r['fp8_predicted_ms']:.2f}" if r["fp8_predicted_ms"] else "–"
            speedup = f"{r['speedup']:.3f}" if r["speedup"] else "–"
            lines.append(f"| {r['case']} | {r['mode']} | {r['removed_GB']:.2f} | {r['launches_removed']} | "
                         f"{r['saved_ms']:.2f} | {today} | {pred} | {speedup} |")
    lines += ["", "The contiguous down projection (rows written in expert order, the combine reading them by row) moves "
              "the same bytes as the scattered store (each row's d elements are contiguous either way): the model "
              "predicts no change in the GEMM, and none in the combine's bytes; what it can change (fewer partial "
              "store sectors) is below the model's resolution."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--fill-gbps", type=float, default=None)
    p.add_argument("--latency-us", type=float, default=None)
    p.add_argument("--prologue-gelems", type=float, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = device_named(args.device) if args.device else H100_SXM
    device = device.with_ceilings(fill_gbps=args.fill_gbps or device.fill_gbps or H100_FILL_GBPS,
                                  latency_us=args.latency_us or device.latency_us or H100_LATENCY_US,
                                  prologue_gelems=args.prologue_gelems or device.prologue_gelems or H100_PROLOGUE_GELEMS)
    changes, decode, fp8 = change_rows(device), decode_rows(device), fp8_quantiser_rows(device)
    text = markdown(device, changes, decode, fp8)
    print(text)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "predictions.md").write_text(text + "\n")
        (out / "predictions.json").write_text(json.dumps(dict(changes=changes, decode=decode, fp8_quantisers=fp8),
                                                          indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
