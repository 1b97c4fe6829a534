"""The compiled kernels of csrc/: the three compilers, the two loading paths (prebuilt and JIT), the
fallback when nothing compiles, and bad input to the C++ ops."""
import json
import os
import pathlib
import re
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


# ---- one thread pool: the kernels run on torch's, the extension links no OpenMP runtime --------------

OPENMP_FLAG = re.compile(r"openmp|^-l(gomp|iomp5|omp)$|omp", re.IGNORECASE)


def test_no_openmp_in_the_build_or_the_kernels():
    """The CPU kernels run on torch's thread pool (csrc/kernels/parallel.h): no OpenMP flag in any
    build (an OpenMP runtime of the extension's own can be a second pool of spinning threads next to
    torch's, ignoring torch.set_num_threads), and no OpenMP construct left in csrc/."""
    from fastmoe_kernels.csrc_backend._loader import csrc_dir, read_build_list

    build = read_build_list(csrc_dir())
    for key in ("cxx_flags", "nvcc_flags", "ld_flags"):
        assert not [flag for flag in build.get(key, []) if OPENMP_FLAG.search(flag)], (key, build[key])
    used = re.compile(r"-f?openmp|-qopenmp|OpenMP::|find_package\s*\(\s*OpenMP|-l(gomp|iomp5|omp)\b", re.IGNORECASE)
    for reader in ("setup.py", "CMakeLists.txt", "fastmoe_kernels/csrc_backend/_loader.py"):
        assert not used.search((REPO / reader).read_text()), reader
    construct = re.compile(r"^\s*#\s*pragma\s+omp\b|#\s*include\s*[<\"]omp\.h|\bomp_[a-z_]+\s*\(", re.MULTILINE)
    for path in sorted((REPO / "csrc").rglob("*")):
        if path.suffix in (".h", ".cpp", ".cu", ".cuh"):
            match = construct.search(path.read_text())
            assert match is None, f"{path.relative_to(REPO)}: {match.group(0)!r}"


# Runs in a subprocess: the cpp kernels on two torch threads, then the OpenMP runtimes mapped in the
# process and the extension's file.
THREADS_PROBE = textwrap.dedent("""
    import json, re, torch
    torch.set_num_threads(2)
    from fastmoe_kernels import backends, ops
    ok, why = backends.availability("cpp", torch.device("cpu"))
    print("AVAILABLE", ok, why)
    if ok:
        import fastmoe_kernels.csrc_backend as cb
        g = torch.Generator().manual_seed(0)
        idx = torch.randint(0, 16, (8192, 4), generator=g).int()
        plan = ops.make_plan(idx, 16, backend="cpp")
        x = torch.randn(8192, 64, generator=g)
        print("CHECKSUM", float(ops.permute(x, plan, backend="cpp").sum()))
        print("EXTENSION", cb.extension.__file__)
        runtimes = set()
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if re.search(r"lib(gomp|iomp5|omp)\\b[^/]*\\.so", path.rsplit("/", 1)[-1]):
                    runtimes.add(path)
        print("OPENMP", json.dumps(sorted(runtimes)))
""")


def needed_libraries(shared_object: str):
    """The NEEDED entries of a shared object (its direct dependencies), or None without a tool to read them."""
    if shutil.which("readelf"):
        out = subprocess.run(["readelf", "-d", shared_object], capture_output=True, text=True, check=True).stdout
        return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    if shutil.which("objdump"):
        out = subprocess.run(["objdump", "-p", shared_object], capture_output=True, text=True, check=True).stdout
        return re.findall(r"^\s*NEEDED\s+(\S+)", out, re.MULTILINE)
    return None


@pytest.mark.skipif(not pathlib.Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
def test_one_openmp_runtime_and_none_linked_by_the_extension():
    probe = subprocess.run([sys.executable, "-c", THREADS_PROBE], cwd=REPO, capture_output=True, text=True,
                           timeout=900)
    assert probe.returncode == 0, probe.stderr[-3000:]
    if "AVAILABLE True" not in probe.stdout:
        pytest.skip(f"cpp backend unavailable: {probe.stdout}")
    lines = dict(line.split(" ", 1) for line in probe.stdout.splitlines() if " " in line)
    runtimes = json.loads(lines["OPENMP"])
    assert len(runtimes) <= 1, f"more than one OpenMP runtime mapped: {runtimes}"
    needed = needed_libraries(lines["EXTENSION"])
    if needed is None:
        pytest.skip("neither readelf nor objdump found: the extension's NEEDED entries were not checked")
    assert needed, "no NEEDED entries read"
    assert not [lib for lib in needed if re.search(r"gomp|iomp|libomp", lib)], needed


@pytest.fixture
def torch_threads():
    """Restores torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_cpp_kernels_run_on_torchs_thread_pool(cuda_ops, torch_threads):
    """The kernels' parallel_for splits over torch's intra-op threads, as many as torch.set_num_threads
    says: (ranges, distinct threads, max_threads). Guards against a silently serial build (torch's
    OpenMP at::parallel_for is a header pragma, serial in code compiled without -fopenmp)."""
    from fastmoe_kernels.csrc_backend import extension

    torch_threads(2)
    assert tuple(extension._parallel_probe(1 << 16, 1)) == (2, 2, 2)
    assert tuple(extension._parallel_probe(100, 1000)) == (1, 1, 2)  # within the grain: inline
    torch_threads(1)
    assert tuple(extension._parallel_probe(1 << 16, 1)) == (1, 1, 1)


def _run_all_cpp_kernels(ops, dtype):
    """Every CPU kernel on inputs above their grains (so two threads split them); all outputs."""
    g = torch.Generator().manual_seed(7)
    T, E, k, D = 4096, 64, 8, 64
    logits = torch.randn(T, E, generator=g).to(dtype)
    logits[3, 5] = float("nan")
    bias = torch.randn(E, generator=g) * 0.1
    out = {}
    for sigmoid in (False, True):
        idx = torch.empty(T, k, dtype=torch.int32)
        weight = torch.empty(T, k)
        probs = torch.empty(T, E)
        ops.route_topk(logits, k, sigmoid, True, bias if sigmoid else None, 8, 4, 2.5, idx, weight, probs)
        grad_logits = torch.empty_like(logits)
        ops.route_topk_backward(torch.randn(T, k, generator=g), torch.randn(T, E, generator=g), logits, idx,
                                sigmoid, True, 2.5, grad_logits)
        out.update({f"idx{sigmoid}": idx, f"weight{sigmoid}": weight, f"probs{sigmoid}": probs,
                    f"grad_logits{sigmoid}": grad_logits})
    expert = torch.randint(-1, E, (T, k), generator=g, dtype=torch.int32)
    plan_weight = torch.randint(0, 16, (T, k), generator=g).float() / 16  # ties
    for capacity, by_weight, pad in ((-1, False, False), (T * k // (2 * E), False, False),
                                     (T * k // (2 * E), True, False), (T * k // (2 * E), True, True)):
        rows = T * k if capacity < 0 else (E * capacity if pad else min(T * k, E * capacity))
        plan = [torch.empty(E, dtype=torch.int32), torch.empty(E, dtype=torch.int32),
                torch.empty(E + 1, dtype=torch.int32), torch.empty(T, k, dtype=torch.int32),
                torch.empty(rows, dtype=torch.int32)]
        ops.make_plan(expert, E, capacity, by_weight, plan_weight, pad, *plan)
        out.update({f"plan{capacity},{by_weight},{pad}/{i}": t for i, t in enumerate(plan)})
    x = torch.randn(T, D, generator=g).to(dtype)
    index = torch.randint(-1, T * k, (T * k,), generator=g, dtype=torch.int32)
    gathered = torch.empty(T * k, D, dtype=dtype)
    ops.gather(x, index, k, torch.rand(T * k, generator=g), gathered)
    row = torch.randint(-1, T * k, (T, k), generator=g, dtype=torch.int32)
    combined = torch.empty(T, D, dtype=dtype)
    ops.combine(gathered, row, torch.rand(T, k, generator=g), False, combined)
    dots = torch.empty(T, k)
    ops.rowdot(x, gathered, row, dots)
    tokens, mean = torch.empty(4, E), torch.empty(4, E)
    ops.routing_stats(torch.rand(T, E, generator=g), expert, 4, tokens, mean)
    out.update(gathered=gathered, combined=combined, dots=dots, tokens=tokens, mean=mean)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_kernels_same_bits_on_one_and_two_threads(cuda_ops, torch_threads, dtype):
    torch_threads(1)
    one = _run_all_cpp_kernels(cuda_ops, dtype)
    torch_threads(2)
    two = _run_all_cpp_kernels(cuda_ops, dtype)
    for name in one:  # bit for bit (NaNs included)
        assert torch.equal(one[name].view(torch.uint8), two[name].view(torch.uint8)), name
