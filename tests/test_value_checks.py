"""Value checks (ids in range, finite logits, monotone offsets) in their three modes: synchronous
(the bad call raises), asynchronous (a later call, or flush_value_checks, raises — the GPU default,
which never waits for the device), and off."""
import pytest
import torch

from fastmoe_kernels import _checks, flush_value_checks, set_value_checks
from fastmoe_kernels.ops import grouped_gemm, make_plan, route_topk

BAD_IDS = torch.tensor([[0, 7], [1, 2]], dtype=torch.int32)
GOOD_IDS = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)


@pytest.fixture
def mode():
    def use(name):
        set_value_checks(name)

    yield use
    _checks._PENDING.queue.clear()
    set_value_checks(None)


def test_cpu_default_is_synchronous(mode):
    mode(None)
    assert _checks.value_check_mode(torch.device("cpu")) == "sync"
    assert _checks.value_check_mode(torch.device("cuda")) == "async"
    with pytest.raises(ValueError, match=r"make_plan: `expert_idx` must hold ids in \[0, 4\)"):
        make_plan(BAD_IDS, 4)


def test_asynchronous_check_raises_at_a_later_call_and_names_the_argument(mode):
    mode("async")
    make_plan(BAD_IDS, 4)  # returns: the result is on its way to the host
    with pytest.raises(ValueError, match=r"make_plan: `expert_idx` .* found values in \[0, 7\].*asynchronous"):
        make_plan(GOOD_IDS, 4)
    make_plan(GOOD_IDS, 4)  # reported once, then forgotten
    flush_value_checks()


def test_flush_raises_the_pending_failure(mode):
    mode("async")
    route_topk(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), 1)
    with pytest.raises(ValueError, match="route_topk: `logits` contains 1 NaN/Inf"):
        flush_value_checks()
    flush_value_checks()


def test_offsets_check_in_every_mode(mode):
    a, b = torch.randn(6, 4), torch.randn(2, 4, 3)
    bad = torch.tensor([0, 5, 3], dtype=torch.int32)
    mode("sync")
    with pytest.raises(ValueError, match="non-decreasing"):
        grouped_gemm(a, b, bad, backend="torch")
    mode("async")
    grouped_gemm(a, b, bad, backend="torch")  # returns; the next check raises
    with pytest.raises(ValueError, match="non-decreasing"):
        grouped_gemm(a, b, torch.tensor([0, 3, 6], dtype=torch.int32), backend="torch")
    mode("off")
    make_plan(BAD_IDS, 4)
    flush_value_checks()  # nothing was checked, nothing pending


@pytest.mark.parametrize("value,expected", [("1", "sync"), ("sync", "sync"), ("async", "async"), ("0", "off"),
                                            ("off", "off"), ("", "sync")])
def test_environment_variable(monkeypatch, value, expected, mode):
    mode(None)
    monkeypatch.setenv("FASTMOE_CHECKS", value)
    assert _checks.value_check_mode(torch.device("cpu")) == expected


def test_bad_mode_is_named(monkeypatch, mode):
    with pytest.raises(ValueError, match="set_value_checks"):
        set_value_checks("sometimes")
    mode(None)
    monkeypatch.setenv("FASTMOE_CHECKS", "sometimes")
    with pytest.raises(ValueError, match="FASTMOE_CHECKS"):
        make_plan(GOOD_IDS, 4)


def test_bad_offsets_under_asynchronous_checks_stay_in_bounds(mode):
    """The kernels run before an asynchronous check reports: they clamp the groups to the rows."""
    mode("async")
    a, b = torch.randn(6, 16), torch.randn(2, 16, 8)
    for offsets in ([0, 3, 4000], [-50, 2, 6], [0, 5, 3]):
        for backend in ("torch", "cpp", "triton"):
            from fastmoe_kernels import backends

            if not backends.availability(backend, a.device)[0]:
                continue
            out = grouped_gemm(a, b, torch.tensor(offsets, dtype=torch.int32), backend=backend)
            assert out.shape == (6, 8) and torch.isfinite(out).all(), (backend, offsets)
            with pytest.raises(ValueError, match="non-decreasing"):
                flush_value_checks()


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_nan_logits_in_training_are_reported_not_a_crash(mode, backend):
    """A diverging run: NaN router logits must give the value check's error, not an index error in
    the loss-free balancing counts (a router kernel may emit any id for a NaN row)."""
    from fastmoe_kernels import MoELayer, backends

    if not backends.availability(backend, torch.device("cpu"))[0]:
        pytest.skip(f"{backend} unavailable here")
    mode("async")
    layer = MoELayer(d_model=8, d_ff=8, num_experts=6, top_k=2, score_func="sigmoid", expert_bias=True,
                     backend=backend).train()
    x = torch.randn(5, 8)
    x[2] = float("nan")
    with pytest.raises(ValueError, match="`logits` contains"):
        layer(x)  # a later check of the same forward may already report it (on a CPU it has arrived)
        flush_value_checks()
    assert int(layer.router.tokens_since_update.sum()) <= 5 * 2
