"""torch.compile: compiled training moves the slices exactly as eager training does, with the input rebuild on or
off and for columns; a compiled sliced layer traces as one graph (no break at the rebuild)."""
import pytest
import torch

from helpers import slice_state, sparse_trainer
from sprune_trainer import SlicedLinear, SparseNeuronConfig


@pytest.mark.parametrize("axis,recompute", [("rows", None), ("rows", False), ("columns", None)])
def test_compiled_training_equals_eager_training(tmp_path, axis, recompute):
    """aot_eager runs Dynamo and AOTAutograd (where an autograd.Function's outputs and gradients are wired) without
    code generation, so the slices must match eager ones to float rounding."""
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="l2", axis=axis, recompute_slice_inputs=recompute)
    eager = sparse_trainer(tmp_path / "eager", cfg, max_steps=3)
    eager.train()
    compiled = sparse_trainer(tmp_path / "compiled", cfg, max_steps=3, torch_compile=True,
                        torch_compile_backend="aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled.train()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the Trainer did compile the model
    a, b = slice_state(eager.model), slice_state(compiled.model)
    assert a.keys() == b.keys()
    for name in a:
        assert b[name].abs().sum() > 0, name
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_a_compiled_sliced_layer_is_one_graph_with_eager_gradients(axis):
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24)
    layer = SlicedLinear(base, torch.tensor([1, 5, 7]), axis=axis)
    layer.recompute_input = axis == "rows"  # the rebuild is skipped while compiling, not a graph break
    with torch.no_grad():
        layer.delta.normal_()
    norm = torch.nn.RMSNorm(16)
    h = torch.randn(3, 5, 16, requires_grad=True)

    def run(fn):
        layer.delta.grad, h.grad = None, None
        fn(h).square().sum().backward()
        return layer.delta.grad.clone(), h.grad.clone()

    eager = run(lambda x: layer(norm(x)))
    torch._dynamo.reset()
    compiled = run(torch.compile(lambda x: layer(norm(x)), backend="aot_eager", fullgraph=True))
    for e, c in zip(eager, compiled):
        assert c.abs().sum() > 0
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_inductor_compiled_training_equals_eager_training(tmp_path):
    """The code-generating backend the Trainer uses by default (slow: compiles C++ kernels on the CPU)."""
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="l2")
    eager = sparse_trainer(tmp_path / "eager", cfg, max_steps=3)
    eager.train()
    compiled = sparse_trainer(tmp_path / "compiled", cfg, max_steps=3, torch_compile=True)
    compiled.train()
    a, b = slice_state(eager.model), slice_state(compiled.model)
    for name in a:
        assert b[name].abs().sum() > 0, name
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
