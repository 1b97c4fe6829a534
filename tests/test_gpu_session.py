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
