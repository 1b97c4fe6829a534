"""Test configuration: markers, fresh seeds, GPU skipping.

Every test draws fresh random inputs: the session seed is random unless FASTMOE_TEST_SEED is set,
and is printed in the header so a failure can be replayed.
"""
import os
import random
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, Triton kernels run in Triton's CPU interpreter (must be set before triton is
# imported). Kernel outputs are poisoned (NaN / sentinel) so unwritten elements cannot pass.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTMOE_POISON", "1")

SESSION_SEED = int(os.environ.get("FASTMOE_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return f"fastmoe test seed: FASTMOE_TEST_SEED={SESSION_SEED}"


@pytest.fixture(autouse=True)
def _seed(request):
    """A per-test seed derived from the session seed and the test id."""
    seed = (SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    yield seed


def pytest_runtest_setup(item):
    if "gpu" in item.keywords and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible: torch.cuda.is_available() is False)")


@pytest.fixture
def triton_launches(monkeypatch):
    """The names of the Triton kernels launched while the test runs, in order (the interpreter's
    launches: skips where kernels are compiled)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts the interpreter's launches (no GPU here)")
    from triton.runtime.interpreter import InterpretedFunction

    names = []
    real = InterpretedFunction.run

    def run(self, *args, **kwargs):
        names.append(self.fn.__name__)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return names
