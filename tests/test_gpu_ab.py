"""The GPU session's A/B script (benchmarks/gpu_ab.py) without a GPU: its variants are complete and
ordered, each flag it sets is one the package registers and accepts, a bad value is refused by name,
and a setting that spells out a default is measured once with the default."""
import importlib
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
gpu_ab = importlib.import_module("gpu_ab")


def test_every_variant_has_a_priority_and_sets_only_registered_values():
    from fastmoe_kernels._variants import FLAGS

    names = [v.name for v in gpu_ab.VARIANTS]
    assert sorted(names) == sorted(gpu_ab.PRIORITY) and len(set(names)) == len(names)
    gpu_ab.default_env()  # the flag-reading modules imported
    for v in gpu_ab.VARIANTS:
        if v.env_flag:
            for setting in (v.a, v.b):
                for name, value in setting["env"].items():
                    assert name in FLAGS and value in FLAGS[name][1], (v.name, name, value)
        assert v.a != v.b, v.name


def test_a_flag_outside_its_choices_is_refused_by_name(monkeypatch):
    from fastmoe_kernels._variants import flag

    monkeypatch.setenv("FASTMOE_TEST_FLAG", "Sideways")
    with pytest.raises(ValueError, match="FASTMOE_TEST_FLAG must be one of"):
        flag("FASTMOE_TEST_FLAG", "a", ("a", "b"))
    monkeypatch.setenv("FASTMOE_TEST_FLAG", " B ")
    assert flag("FASTMOE_TEST_FLAG", "a", ("a", "b")) == "b"


def test_a_bad_variant_value_stops_the_import():
    """(Every flag is read at import: a typo fails the process, never measures the default.)"""
    done = subprocess.run([sys.executable, "-c", "import fastmoe_kernels.ops"], capture_output=True, text=True,
                          env={"FASTMOE_MLP_BACKWARD": "fused", "PATH": "/usr/bin:/bin"})
    assert done.returncode != 0 and "FASTMOE_MLP_BACKWARD must be one of" in done.stderr


def test_a_setting_that_spells_out_the_default_shares_its_measurement():
    by_name = {v.name: v for v in gpu_ab.VARIANTS}
    key = gpu_ab.setting_key
    # The node's A is the composition's default, which "up activation" and "wgrad dtype" measure as B.
    assert key(by_name["node backward"], "a") == key(by_name["up activation"], "b") == key(by_name["wgrad dtype"], "b")
    # The fused path's default is another setting (another layer path), and a non-default differs.
    assert key(by_name["fused stored backward"], "a") != key(by_name["node backward"], "a")
    assert key(by_name["node backward"], "b") != key(by_name["node backward"], "a")
    assert key(by_name["fused stored backward"], "a") == key(by_name["down output rows"], "a")
    assert key(by_name["node backward"], "b") == key(by_name["node dH epilogue"], "b")


def test_a_variant_at_its_own_tokens_shares_nothing_with_the_headline_tokens():
    """The decode variant measures at 1 token: its default setting is another measurement than the
    16,384-token default the other variants share, and its cases are built at its tokens."""
    by_name = {v.name: v for v in gpu_ab.VARIANTS}
    decode, node = by_name["decode tiles"], by_name["node backward"]
    assert decode.tokens == 1 and node.tokens is None
    assert gpu_ab.setting_key(decode, "b")[:-1] == gpu_ab.setting_key(by_name["fp8 weight cache"], "b")[:-1]
    assert gpu_ab.setting_key(decode, "b") != gpu_ab.setting_key(by_name["fp8 weight cache"], "b")
    assert {c.tokens for c in gpu_ab._cases(16384, False, decode.tokens).values()} == {1}
    assert {c.tokens for c in gpu_ab._cases(16384, True, decode.tokens).values()} == {1}
    assert {c.tokens for c in gpu_ab._cases(16384, False).values()} == {16384}
    # The activation backward's torch setting is the composition's default, shared with the node's A.
    assert gpu_ab.setting_key(by_name["activation backward"], "a") == gpu_ab.setting_key(node, "a")
