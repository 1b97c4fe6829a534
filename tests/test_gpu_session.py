"""The GPU session script's own logic (benchmarks/gpu_session.py), without a GPU: each phase archived
as it ends, a phase skipped when its minimum time is not left, a failed fatal phase stopping the
session. (CI runs the whole script on the CPU too: `gpu_session.py --dry-run`.)"""
import os
import sys
import tarfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import gpu_session  # noqa: E402


def _phase(name, body, min_s=0.0, fatal=False):
    return gpu_session.Phase(name, budget_s=5, min_s=min_s, run=body, fatal=fatal)


def test_phases_archive_as_they_end_and_a_fatal_failure_stops_the_session(tmp_path, monkeypatch):
    ran = []

    def writes(name):
        def body(session, folder, budget):
            ran.append(name)
            (folder / f"{name}.txt").write_text(name)
        return body

    def fails(session, folder, budget):
        ran.append("check")
        raise gpu_session.PhaseFailed("a kernel is wrong")

    monkeypatch.setattr(gpu_session, "PHASES", [
        _phase("env", writes("env")), _phase("huge", writes("huge"), min_s=1e6), _phase("check", fails, fatal=True),
        _phase("headline", writes("headline"))])
    status = gpu_session.run(tmp_path, budget_s=60)
    assert status == 1 and ran == ["env", "check"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["check.tgz", "env.tgz", "summary.txt"]
    with tarfile.open(tmp_path / "env.tgz") as tar:
        assert "env/env.txt" in tar.getnames()
    with tarfile.open(tmp_path / "check.tgz") as tar:
        assert tar.extractfile("check/failure.txt").read().decode().startswith("FAILED: PhaseFailed")
    summary = (tmp_path / "summary.txt").read_text()
    assert "huge: skipped" in summary and "session stopped" in summary and "headline" not in summary


def test_a_session_fits_the_call_and_the_files_that_come_back():
    assert sum(p.budget_s for p in gpu_session.PHASES) <= 480
    assert len(gpu_session.PHASES) + 1 <= 8  # an archive per phase and the summary: the device tool returns 8 files


def test_the_compile_phase_warms_every_fp8_variant_the_ab_measures_on_the_fp8_cases_only():
    import gpu_ab
    import gpu_prewarm

    import fastmoe_kernels.ops.fp8_moe_node  # noqa: F401  (each registers its flags' defaults)
    import fastmoe_kernels.triton_backend.fp8  # noqa: F401
    import fastmoe_kernels.triton_backend.fp8_weight_cache  # noqa: F401
    from fastmoe_kernels._variants import FLAGS

    kernel_neutral = {"FASTMOE_FP8_WEIGHT_CACHE"}  # when the weights are quantised, not which kernels run
    warmed = {tuple(sorted(env.items())) for env in gpu_prewarm.VARIANT_ENV.values()}
    checked = 0
    for variant in gpu_ab.VARIANTS:
        if variant.env_flag and all(case.endswith(" fp8") for case in variant.cases):
            for side in (variant.a, variant.b):
                env = {k: v for k, v in side["env"].items() if v != FLAGS[k][0] and k not in kernel_neutral}
                assert not env or tuple(sorted(env.items())) in warmed, (variant.name, env)
                checked += bool(env)
    assert checked >= 3  # fused, folded, wide
    # The fp8 variants warm the fp8 cases, the bf16 ones the bf16 cases; the defaults warm every case.
    assert gpu_prewarm.applies("Mixtral-8x7B fp8", "fp8-fused") and not gpu_prewarm.applies("Mixtral-8x7B", "fp8-fused")
    assert gpu_prewarm.applies("Qwen3-30B-A3B", "node") and not gpu_prewarm.applies("Qwen3-30B-A3B fp8", "node")
    assert all(gpu_prewarm.applies(label, "default") for label in ("Qwen3-30B-A3B", "Qwen3-30B-A3B fp8"))
    # and the session's compile phase names the fp8 cases the A/B runs on.
    ab_fp8_cases = {c for v in gpu_ab.VARIANTS for c in v.cases if c.endswith(" fp8")}
    assert ab_fp8_cases <= set(gpu_session.FP8_SESSION_CASES.split(","))


def test_the_ceilings_script_measures_every_ceiling_at_tiny_sizes():
    """The env phase's ceilings (benchmarks/gpu_ceilings.py) on this device at its dry-run sizes: each a
    positive number, none reported as unmeasurable."""
    import torch

    import gpu_ceilings

    out = gpu_ceilings.measure_all(torch.device("cuda" if torch.cuda.is_available() else "cpu"), small=True)
    for name in ("copy_GBps", "dense_bf16_TFLOPs", "dense_fp8_TFLOPs", "latency_us"):
        assert out[name] is not None and out[name] > 0, (name, out.get(f"{name}_error"))
