"""An exposed experts module's fast `train` (subtree_train.py) sets the flags nn.Module.train sets, calls a
descendant's own `train`, and leaves with the views."""
import pytest
import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM

from helpers import SHAPE_MOE, random_selection
from sprune_trainer import SparseNeuronConfig, merge_sparse
from sprune_trainer.layers.subtree_train import install_subtree_train
from sprune_trainer.layers.surgery import inject_slices

CFG = SparseNeuronConfig(neurons_per_layer=3, importance="random", slice_dropout=0.1)


def _sliced():
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**SHAPE_MOE))
    inject_slices(model, random_selection(model, CFG), CFG)
    if not any(getattr(m, "_sprune_expert_views", False) for m in model.modules()):
        pytest.skip("transformers 4.x: Mixtral's experts are nn.Linear modules, no fused layout to expose")
    return model


def _flags(model):
    return {name: m.training for name, m in model.named_modules()}


@pytest.mark.parametrize("mode", [False, True])
def test_flags_equal_torchs_train(mode):
    fast, plain = _sliced(), _sliced()
    for m in plain.modules():
        m.__dict__.pop("train", None)  # torch's own everywhere
    for m in list(fast.modules()) + list(plain.modules()):
        m.__dict__["training"] = not mode  # every flag starts the other way
    fast.train(mode)
    plain.train(mode)
    assert _flags(fast) == _flags(plain) and set(_flags(fast).values()) == {mode}
    fast.eval()
    assert not any(_flags(fast).values())


def test_a_descendants_own_train_is_called():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls, self.inner = [], nn.Linear(2, 2)

        def train(self, mode=True):
            self.calls.append(mode)
            return super().train(mode)

    root = nn.Module()
    root.add_module("0", nn.Module())
    root._modules["0"].add_module("odd", Counting())
    install_subtree_train(root)
    root.eval()
    odd = root._modules["0"].odd
    assert odd.calls == [False] and not odd.inner.training and not root.training
    with pytest.raises(ValueError, match="boolean"):
        root.train("yes")


def test_installed_on_exposed_experts_only_and_removed_with_them():
    model = _sliced()
    holders = [n for n, m in model.named_modules() if "train" in m.__dict__]
    assert holders and all(n.endswith("experts") for n in holders)
    merge_sparse(model)
    assert not any("train" in m.__dict__ for m in model.modules())
