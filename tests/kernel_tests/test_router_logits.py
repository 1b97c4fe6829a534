"""ops.router_logits: the router's fp32 GEMMs (logits, dx, dW) against the fp64 product, on every
backend that has them, and the layer's router taking them (FASTMOE_ROUTER_GEMM=tensor-cores) with
the routing decisions of the default fp32 router. The x operand is loaded in its own dtype and
converted before the product, so bf16 is tested in the interpreter too (its bf16 dot is not used)."""
import importlib

import pytest
import torch

from fastmoe_kernels import MoELayer, ops

router_module = importlib.import_module("fastmoe_kernels.router")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _fp32_bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """An fp32 product's error bound per element: K·2⁻²⁴·(|a| @ |b|) (with a margin of 4 for TF32x3)."""
    return 4 * a.shape[1] * 2.0 ** -24 * (a.double().abs() @ b.double().abs()) + 1e-30


@pytest.fixture
def with_kernels():
    from fastmoe_kernels import backends

    ok, why = backends.availability("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if not ok:
        pytest.skip(f"triton unavailable here: {why}")
    return "triton"


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [37, 1, 0])
def test_the_logits_and_their_gradients_are_the_fp64_product_within_fp32_rounding(with_kernels, device, x_dtype,
                                                                                   w_dtype, tokens):
    torch.manual_seed(tokens + 7)
    d, E = 40, 10
    x = torch.randn(tokens, d, device=device).to(x_dtype).requires_grad_()
    w = (torch.randn(E, d, device=device) / d ** 0.5).to(w_dtype).requires_grad_()
    logits = ops.router_logits(x, w, backend=with_kernels)
    assert logits.dtype == torch.float32 and logits.shape == (tokens, E)
    exact = x.double() @ w.double().t()
    assert ((logits.double() - exact).abs() <= _fp32_bound(x, w.t())).all()
    grad = torch.randn(tokens, E, device=device)
    logits.backward(grad)
    assert x.grad.dtype == x_dtype and w.grad.dtype == w_dtype
    exact_dx = grad.double() @ w.double()
    exact_dw = grad.double().t() @ x.double()
    # Stored in the operands' dtypes: the fp32 result's error plus one rounding of that dtype.
    for got, want, bound in ((x.grad, exact_dx, _fp32_bound(grad, w)), (w.grad, exact_dw, _fp32_bound(grad.t(), x))):
        ulp = torch.finfo(got.dtype).eps * want.abs()
        assert ((got.double() - want).abs() <= bound + ulp).all()


def test_the_torch_reference_is_the_default_routers_product(device):
    torch.manual_seed(1)
    x = torch.randn(9, 16, device=device, dtype=torch.bfloat16)
    w = torch.randn(4, 16, device=device)
    assert torch.equal(ops.router_logits(x, w, backend="torch"), torch.nn.functional.linear(x.float(), w))


def test_near_tied_experts_are_ranked_as_the_exact_product_ranks_them(with_kernels, device):
    """Experts 0 and 1 differ by a margin far below bf16's resolution but above fp32's error bound:
    the tensor-core logits rank them as fp64 does, for every token."""
    torch.manual_seed(2)
    T, d, E = 64, 48, 8
    x = torch.randn(T, d, device=device)
    w = torch.randn(E, d, device=device) / d ** 0.5
    w[1] = w[0] * (1 + 2.0 ** -14)  # logit 1 = logit 0 · (1 + 2⁻¹⁴): a relative gap of 6e-5
    exact = x.double() @ w.double().t()
    logits = ops.router_logits(x, w, backend=with_kernels)
    assert torch.equal(logits.topk(2, dim=1).indices.sort(dim=1).values, exact.topk(2, dim=1).indices.sort(dim=1).values)
    assert torch.equal(logits[:, 0] < logits[:, 1], exact[:, 0] < exact[:, 1])
    # A bf16 product would not: the gap is below its rounding.
    bf16 = (x.bfloat16() @ w.bfloat16().t()).float()
    assert not torch.equal(bf16[:, 0] < bf16[:, 1], exact[:, 0] < exact[:, 1])


def test_the_precision_is_one_tf32_pass_only_where_both_operands_are_exact_in_it():
    gemm = pytest.importorskip("fastmoe_kernels.triton_backend.router_gemm")
    if gemm.PRECISION != "auto":
        pytest.skip("FASTMOE_ROUTER_GEMM_PRECISION is set")
    assert gemm.precision_for(torch.bfloat16, torch.bfloat16) == "tf32"
    assert gemm.precision_for(torch.float16, torch.bfloat16) == "tf32"
    assert gemm.precision_for(torch.bfloat16, torch.float32) == "tf32x3"
    assert gemm.precision_for(torch.float32, torch.float32) == "tf32x3"


def test_bad_operands_are_refused_by_name(device):
    x = torch.randn(5, 8, device=device)
    with pytest.raises(ValueError, match="`weight`"):
        ops.router_logits(x, torch.randn(4, 7, device=device))
    with pytest.raises(ValueError, match="`x`"):
        ops.router_logits(x[None], torch.randn(4, 8, device=device))
    with pytest.raises(TypeError, match="`x`"):
        ops.router_logits(x.double(), torch.randn(4, 8, device=device))


@pytest.mark.parametrize("jitter", [0.0, 0.1])
def test_the_layer_routes_alike_with_the_tensor_core_router(with_kernels, device, monkeypatch, jitter):
    torch.manual_seed(3)
    layer = MoELayer(d_model=32, d_ff=16, num_experts=8, top_k=2, router_jitter=jitter, backend=with_kernels,
                     device=device).train()
    x = torch.randn(24, 32, device=device, requires_grad=True)
    runs = []
    for mode in ("torch", "tensor-cores"):
        monkeypatch.setattr(router_module, "ROUTER_GEMM", mode)
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(4)  # the jitter's draws alike
        route = layer.router(x, backend=with_kernels)
        (route.weight.square().sum() + route.logits.sum()).backward()
        runs.append((route, x.grad.clone(), layer.router.weight.grad.clone()))
    (a, ax, aw), (b, bx, bw) = runs
    from fastmoe_kernels import backends

    assert backends.resolve("router_logits", with_kernels, x.device, x.dtype) == "triton"  # the kernels ran
    assert torch.equal(a.expert_idx, b.expert_idx)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bx, ax, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bw, aw, rtol=1e-4, atol=1e-5)
