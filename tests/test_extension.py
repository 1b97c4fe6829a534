"""The compiled kernels of csrc/: the three compilers, the two loading paths (prebuilt and JIT), the
fallback when nothing compiles, and bad input to the C++ ops."""
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parent.parent

# Runs in a subprocess: load the csrc kernels (backend cpp), run a plan + gather on the CPU, print a checksum.
PROBE = textwrap.dedent("""
    import logging, sys, torch
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="LOG %(message)s")
    from fastmoe_kernels import backends, ops
    ok, why = backends.availability("cpp", torch.device("cpu"))
    print("AVAILABLE", ok, why)
    if ok:
        import fastmoe_kernels.csrc_backend as cb
        print("MODULE", cb.extension.__name__)
        g = torch.Generator().manual_seed(0)
        idx = torch.randint(0, 8, (64, 2), generator=g).int()
        plan = ops.make_plan(idx, 8, backend="cpp")
        x = torch.randn(64, 16, generator=g)
        print("CHECKSUM", float(ops.permute(x, plan, backend="cpp").sum()))
""")


def run_probe(env_overrides, cwd=REPO, pythonpath=None):
    env = dict(os.environ)
    env.update(env_overrides)
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_kernels_compile_with_nvrtc():
    from fastmoe_kernels.csrc_backend.nvrtc import KERNEL_INSTANCES, compile_to_ptx, find_libnvrtc

    if find_libnvrtc() is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc, or a CUDA toolkit, enables this check)")
    for arch in ("compute_80", "compute_90"):
        result = compile_to_ptx(arch)
        assert ".entry" in result["ptx"]
        assert set(result["names"]) == set(KERNEL_INSTANCES)
        for lowered in result["names"].values():
            assert lowered in result["ptx"]


@pytest.mark.slow
def test_jit_build_is_shared_by_parallel_processes_and_cached(tmp_path):
    cache = tmp_path / "cache"
    env = {"FASTMOE_EXTENSION": "jit", "FASTMOE_CACHE_DIR": str(cache), "FASTMOE_BUILD_CUDA": "0"}
    full_env = dict(os.environ, **env)
    procs = [subprocess.Popen([sys.executable, "-c", PROBE], cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for (out, err), p in zip(outs, procs):
        assert p.returncode == 0, err[-3000:]
        assert "AVAILABLE True" in out, out + err[-3000:]
    checksums = {line for out, _ in outs for line in out.splitlines() if line.startswith("CHECKSUM")}
    assert len(checksums) == 1
    assert len(list(cache.rglob("fastmoe_C_jit_cpu*.so"))) == 1
    again = run_probe(env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "compiling" not in again.stdout  # loaded from the cache, said nothing
    assert checksums == {line for line in again.stdout.splitlines() if line.startswith("CHECKSUM")}


@pytest.mark.slow
def test_prebuilt_extension_from_setup_py(tmp_path):
    tree = tmp_path / "tree"
    for name in ("fastmoe_kernels", "csrc"):
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, capture_output=True,
                           text=True, timeout=900, env=dict(os.environ, FASTMOE_BUILD_CUDA="0"))
    assert build.returncode == 0, build.stderr[-3000:]
    assert list((tree / "fastmoe_kernels").glob("_C*.so"))
    probe = run_probe({"FASTMOE_EXTENSION": "prebuilt"}, cwd=tmp_path, pythonpath=tree)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert "AVAILABLE True" in probe.stdout and "MODULE fastmoe_kernels._C" in probe.stdout, probe.stdout


def test_no_compiler_falls_back_with_one_log_line(tmp_path):
    env = {"FASTMOE_EXTENSION": "jit", "FASTMOE_CACHE_DIR": str(tmp_path / "cache"), "CXX": "/nonexistent/c++",
           "FASTMOE_BUILD_CUDA": "0"}
    probe = run_probe(env)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert "AVAILABLE False" in probe.stdout and "could not compile" in probe.stdout
    log_lines = [line for line in probe.stdout.splitlines() if line.startswith("LOG") and "unavailable" in line]
    assert len(log_lines) == 1, probe.stdout


@pytest.fixture
def cuda_ops():
    from fastmoe_kernels import backends

    ok, why = backends.availability("cpp", torch.device("cpu"))
    if not ok:
        pytest.skip(f"cpp backend unavailable: {why}")
    return torch.ops.fastmoe_C


def test_cpp_ops_reject_bad_input(cuda_ops):
    x = torch.randn(8, 4)
    index = torch.zeros(5, dtype=torch.int32)
    out = torch.empty(5, 4)
    with pytest.raises(RuntimeError, match="`index` must be int32"):
        cuda_ops.gather(x, index.long(), 1, None, out)
    with pytest.raises(RuntimeError, match="`x` must be float32/float16/bfloat16"):
        cuda_ops.gather(x.double(), index, 1, None, out.double())
    with pytest.raises(RuntimeError, match="`x` must have contiguous rows"):
        cuda_ops.gather(torch.randn(4, 8).t(), index, 1, None, out)
    with pytest.raises(RuntimeError, match="`out` must have shape"):
        cuda_ops.gather(x, index, 1, None, torch.empty(4, 4))
    with pytest.raises(RuntimeError, match="`k` must be in"):
        cuda_ops.route_topk(torch.randn(3, 4), 5, False, True, None, 1, 1, 1.0, torch.empty(3, 5, dtype=torch.int32),
                            torch.empty(3, 5), torch.empty(0))
    idx = torch.zeros(3, 2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="`offsets` must have shape"):
        cuda_ops.make_plan(idx, 4, -1, False, None, False, *(torch.empty(4, dtype=torch.int32) for _ in range(3)),
                           torch.empty(3, 2, dtype=torch.int32), torch.empty(6, dtype=torch.int32))


def test_cpp_ops_never_touch_out_of_range_rows(cuda_ops):
    x = torch.randn(8, 4)
    index = torch.tensor([0, 7, 8, 1000, -1], dtype=torch.int32)
    out = torch.full((5, 4), float("nan"))
    cuda_ops.gather(x, index, 1, None, out)
    torch.testing.assert_close(out[:2], x[[0, 7]])
    assert torch.all(out[2:] == 0)
    y = torch.randn(3, 4)
    row = torch.tensor([[0, 99], [-1, 2]], dtype=torch.int32)
    combined = torch.full((2, 4), float("nan"))
    cuda_ops.combine(y, row, None, False, combined)
    torch.testing.assert_close(combined, torch.stack([y[0], y[2]]))


def test_one_list_of_sources_and_strict_floating_point():
    """csrc/build.txt is the one list setup.py, the JIT loader and CMake read; its flags keep the row
    kernels' sums bit-identical on CPU and GPU (no fast-math, no fused multiply-add contraction)."""
    from fastmoe_kernels.csrc_backend._loader import csrc_dir, read_build_list

    build = read_build_list(csrc_dir())
    assert "--use_fast_math" not in build["nvcc_flags"] and "-fmad=false" in build["nvcc_flags"]
    assert "-ffp-contract=off" in build["cxx_flags"]
    sources = build["cpu_source"] + build["cuda_source"]
    assert sources and all((csrc_dir() / s).is_file() for s in sources)
    for reader in ("setup.py", "CMakeLists.txt"):
        text = (REPO / reader).read_text()
        assert "build.txt" in text, reader
        assert not any(s in text for s in sources), f"{reader} lists sources of its own"
