"""torch.compile(layer) traces the custom ops (fullgraph: no graph break) and matches eager."""
import pytest
import torch

from fastmoe_kernels import MoELayer

MODES = {
    "dropless": dict(),
    "capacity-pad-shared-zloss": dict(capacity_factor=1.0, pad_to_capacity=True, num_shared_experts=1, z_loss_coeff=1e-3),
    "heterogeneous-capacity-position": dict(d_ff=[4, 8, 12, 8], capacity_factor=0.9, drop_policy="position"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_compiled_layer_matches_eager(mode):
    torch._dynamo.reset()
    fields = dict(d_model=16, d_ff=8, num_experts=4, top_k=2)
    fields.update(MODES[mode])
    layer = MoELayer(**fields)
    compiled = torch.compile(layer, fullgraph=True)
    for shape in [(2, 8, 16), (3, 5, 16)]:  # the second shape exercises a re-trace / dynamic shapes
        x = torch.randn(*shape, requires_grad=True)
        y_c = compiled(x)
        aux_c = {k: v.clone() for k, v in layer.aux_losses.items()}
        y_c.square().sum().backward()
        grads_c = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
        x.grad = None
        layer.zero_grad()
        y_e = layer(x)
        y_e.square().sum().backward()
        grads_e = [x.grad] + [p.grad for p in layer.parameters()]
        torch.testing.assert_close(y_c, y_e)
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b)
        for k in aux_c:
            torch.testing.assert_close(aux_c[k], layer.aux_losses[k])
        layer.zero_grad()
