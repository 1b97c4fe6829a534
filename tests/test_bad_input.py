"""Valid and invalid input on every backend, property-based (tests/bad_input_properties.py), run in a
process of its own: a crash (a kernel reading out of bounds, say) fails this test with the child's
output instead of taking the whole test run down."""
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("hypothesis")
HERE = pathlib.Path(__file__).resolve().parent


def test_property_suite_in_its_own_process():
    env = dict(os.environ, FASTMOE_POISON="1")
    env.setdefault("TRITON_INTERPRET", "1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(HERE / "bad_input_properties.py"), "-q", "-p", "no:cacheprovider",
         "-x", "--rootdir", str(HERE.parent)],
        cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=1800,
    )
    tail = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, f"exit {result.returncode} (negative: killed by a signal):\n{tail}"
