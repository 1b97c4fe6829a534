"""Kernel-backend tests: every op of the `triton` and `cuda` backends against the `torch` reference.

They run on CUDA when a GPU is visible, otherwise on the CPU (Triton through its interpreter, the
csrc kernels through their C++ twins (backend `cpp`)). fp64 data always runs the reference, so these tests use
fp32 and fp16 (bf16 only on a GPU: Triton's interpreter computes bf16 dots wrongly).
"""
import pytest
import torch

from fastmoe_kernels import backends

def test_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# The csrc kernels are backend "cuda" on a GPU and "cpp" (their C++ twins) on the CPU.
KERNEL_BACKENDS = ["triton", "cuda" if torch.cuda.is_available() else "cpp"]


@pytest.fixture
def device():
    return test_device()


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    ok, why = backends.availability(request.param, test_device())
    if not ok:
        pytest.skip(f"backend {request.param!r} unavailable here: {why}")
    return request.param


def low_precision_dtypes():
    """fp16 everywhere; bf16 only where tl.dot on bf16 is trustworthy (a real GPU)."""
    return [torch.float16, torch.bfloat16] if torch.cuda.is_available() else [torch.float16]


def pytest_collection_modifyitems(config, items):
    # On a GPU machine these tests run on the GPU: mark them so `pytest -m gpu` includes them.
    if torch.cuda.is_available():
        for item in items:
            if "tests/kernel_tests/" in item.nodeid.replace("\\", "/"):
                item.add_marker(pytest.mark.gpu)
