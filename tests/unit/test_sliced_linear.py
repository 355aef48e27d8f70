"""SlicedLinear against dense PyTorch references."""
import pytest
import torch
from torch import nn

from sprune_trainer.layers.sliced_linear import SlicedLinear


def _layer(bias=False, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(16, 12, bias=bias)


def _dense_delta(layer: SlicedLinear) -> torch.Tensor:
    """The d_out x d_in update the slice stands for (reference only: the layer never builds it)."""
    full = torch.zeros_like(layer.base_layer.weight)
    if layer.axis == "rows":
        full[layer.index] = layer.delta.detach()
    else:
        full[:, layer.index] = layer.delta.detach()
    return full


@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_zero_delta_is_identity_and_forward_matches_dense(axis):
    base = _layer(bias=True)
    x = torch.randn(3, 5, 16)
    expected = base(x)
    layer = SlicedLinear(base, torch.tensor([7, 1, 4]), axis=axis)
    assert torch.equal(layer(x), expected)  # zero delta: bit-identical
    with torch.no_grad():
        layer.delta.normal_()
    dense = x @ (base.weight + _dense_delta(layer)).T + base.bias
    torch.testing.assert_close(layer(x), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_slice_gradient_equals_dense_gradient_rows(axis):
    base = _layer(bias=True).requires_grad_(False)
    index = torch.tensor([0, 5, 11] if axis == "rows" else [2, 3, 15])
    layer = SlicedLinear(base, index, axis=axis)
    with torch.no_grad():
        layer.delta.normal_(std=0.1)
    x, target = torch.randn(4, 6, 16), torch.randn(4, 6, 12)
    ((layer(x) - target) ** 2).mean().backward()

    w = (base.weight.detach() + _dense_delta(layer)).requires_grad_(True)
    ((x @ w.T + base.bias.detach() - target) ** 2).mean().backward()
    expected = w.grad[index] if axis == "rows" else w.grad[:, index]
    torch.testing.assert_close(layer.delta.grad, expected, rtol=1e-5, atol=1e-6)
    assert base.weight.grad is None and base.bias.grad is None  # no dense gradient is ever formed


@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_merge_and_unmerge_are_exact(axis):
    base = _layer(bias=True)
    original = base.weight.detach().clone()
    layer = SlicedLinear(base, torch.tensor([2, 9]), axis=axis, train_bias=axis == "rows")
    with torch.no_grad():
        layer.delta.normal_()
        if layer.bias_delta is not None:
            layer.bias_delta.normal_()
    x = torch.randn(2, 16)
    unmerged_out = layer(x)
    layer.merge()
    assert torch.equal(base.weight, original + _dense_delta(layer))  # W[I] += delta, in fp32 exactly
    torch.testing.assert_close(layer(x), unmerged_out, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    assert torch.equal(base.weight, original)


def test_trainable_bias_slice():
    base = _layer(bias=True)
    layer = SlicedLinear(base, torch.tensor([3, 4]), train_bias=True)
    with torch.no_grad():
        layer.bias_delta.copy_(torch.tensor([1.0, -2.0]))
    x = torch.randn(1, 16)
    out = layer(x) - base(x)
    assert torch.allclose(out[0, [3, 4]], torch.tensor([1.0, -2.0]))
    assert torch.count_nonzero(out[0, [0, 1, 2, 5, 6, 7, 8, 9, 10, 11]]) == 0


def test_bf16_input_with_fp32_slice():
    base = _layer().to(torch.bfloat16)
    layer = SlicedLinear(base, torch.tensor([0, 1]), dtype=torch.float32)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and layer.delta.dtype == torch.float32
    out.float().sum().backward()
    assert layer.delta.grad.dtype == torch.float32


@pytest.mark.parametrize("index, match", [
    (torch.tensor([1, 1]), "unique"), (torch.tensor([12]), r"\[0, 12\)"), (torch.tensor([], dtype=torch.long), "non-empty"),
])
def test_bad_indices(index, match):
    with pytest.raises(ValueError, match=match):
        SlicedLinear(_layer(), index)


def _run(layer, x, target):
    """Output, input grad and slice grad of one forward/backward (grads cleared first)."""
    layer.delta.grad = None
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    ((out.float() - target) ** 2).mean().backward()
    return out.detach(), x.grad, layer.delta.grad.clone()


def _force_generic_path(layer):
    """A no-op hook on the base: the fused path must step aside for anything hooked (accelerate, users)."""
    return layer.base_layer.register_forward_pre_hook(lambda module, args: None)


@pytest.mark.parametrize("axis", ["rows", "columns"])
@pytest.mark.parametrize("shape", [(4, 6, 16), (5, 16)])
def test_fused_path_equals_generic_path_and_dense_input_grad(axis, shape):
    base = _layer(bias=True).requires_grad_(False)
    layer = SlicedLinear(base, torch.tensor([0, 5, 11] if axis == "rows" else [2, 3, 15]), axis=axis)
    assert layer._fusable()
    with torch.no_grad():
        layer.delta.normal_(std=0.1)
    x, target = torch.randn(*shape), torch.randn(*shape[:-1], 12)
    fused = _run(layer, x, target)
    handle = _force_generic_path(layer)
    assert not layer._fusable()
    generic = _run(layer, x, target)
    handle.remove()
    for a, b in zip(fused, generic):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # input grad against the dense model W + update
    w = base.weight + _dense_delta(layer)
    xd = x.clone().requires_grad_(True)
    ((xd @ w.T + base.bias - target) ** 2).mean().backward()
    torch.testing.assert_close(fused[1], xd.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_fused_path_under_bf16_autocast_matches_generic_path(axis):
    """HF Trainer(bf16=True) runs a bf16 or fp32 model under autocast: the fused path must compute in bf16 as
    autocast would, return bf16, and keep the fp32 slice's grad fp32."""
    base = _layer().requires_grad_(False)  # fp32 weights, as an fp32 model under autocast
    layer = SlicedLinear(base, torch.tensor([1, 6, 7]), axis=axis)
    with torch.no_grad():
        layer.delta.normal_(std=0.1)
    x, target = torch.randn(3, 4, 16), torch.randn(3, 4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _run(layer, x, target)
        handle = _force_generic_path(layer)
        generic = _run(layer, x, target)
        handle.remove()
    assert fused[0].dtype == generic[0].dtype == torch.bfloat16
    assert fused[2].dtype == torch.float32
    for a, b in zip(fused, generic):  # bf16: the fused grad sums in one rounding, the generic one in two
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
