"""The optional peer baselines (bench/peers.py): their import and call contracts on the CPU, where
their kernels cannot run (Liger's Triton kernels ask for a GPU driver; torch's scaled grouped matmul
is CUDA-only): our weights reach them in the layouts they document, torchao's groups padded to 16 rows."""
import sys

import pytest
import torch

from fastmoe_kernels.bench import peers
from fastmoe_kernels.experts import GroupedExperts


def _experts(activation="swiglu", **kw):
    return GroupedExperts(32, (16,) * 4, activation, **kw)


def test_padded_grouping_puts_each_expert_on_16_row_boundaries_in_token_order():
    idx = torch.tensor([[0, 2], [2, 1], [0, 3], [2, 0]])
    row, ends, src = peers.padded_grouping(idx, 4, 16)
    assert ends.tolist() == [16, 32, 48, 64] and ends.dtype == torch.int32
    assert src.shape[0] == 8 + 16 * 4
    # expert 0: tokens 0, 2, 3 at rows 0-2; expert 2: tokens 0, 1, 3 at rows 32-34
    assert src[:4].tolist() == [0, 2, 3, -1] and src[32:35].tolist() == [0, 1, 3]
    assert all(int(src[r]) == t for (t, j), r in zip([(t, j) for t in range(4) for j in range(2)], row.tolist()))


def test_torchao_gets_column_major_weights_and_16_row_groups(monkeypatch):
    experts = _experts()
    peer = peers.TorchaoFp8Rowwise(experts)
    seen = []

    def stand_in(A, B_t, offs, out_dtype, pad_token_groups_for_grouped_mm):
        # torchao's documented contract: B_t [E, K, N] per-expert column-major, offs the group ends.
        E, K, N = B_t.shape
        assert B_t.stride() == (K * N, 1, K) and A.shape[1] == K and not pad_token_groups_for_grouped_mm
        assert offs.dtype == torch.int32 and bool((offs % 16 == 0).all())
        seen.append((K, N))
        starts = [0, *offs.tolist()[:-1]]
        out = torch.zeros(A.shape[0], N)
        for e, (lo, hi) in enumerate(zip(starts, offs.tolist())):
            out[lo:hi] = A[lo:hi] @ B_t[e]
        return out.to(out_dtype)

    peer.fn = stand_in
    x = torch.randn(10, 32)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(10)])
    w = torch.rand(10, 2)
    got = peer(x, idx, w)
    want = torch.zeros(10, 32)
    for t in range(10):
        for j in range(2):
            w_up, w_down, _, _ = experts.expert_weights(int(idx[t, j]))
            h = w_up @ x[t]
            want[t] += w[t, j] * (w_down @ (torch.nn.functional.silu(h[:16]) * h[16:]))
    assert seen == [(32, 32), (16, 32)]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_liger_takes_plain_swiglu_experts_only():
    pytest.importorskip("liger_kernel")
    peers.LigerFusedMoE(_experts())
    with pytest.raises(ValueError, match="SwiGLU"):
        peers.LigerFusedMoE(_experts("swiglu_oai"))
    with pytest.raises(ValueError, match="bias-free"):
        peers.LigerFusedMoE(_experts(bias=True))


def test_a_missing_peer_is_skipped_with_its_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel.ops.fused_moe", None)
    found = peers.build_peers(_experts(), fp8=False)
    assert "not installed" in found["liger-fused_moe"]
    assert set(peers.build_peers(_experts(), fp8=True)) == {"torchao-fp8_rowwise"}
