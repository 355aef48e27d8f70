import pytest
import torch

from sprune_trainer import SparseNeuronConfig
from sprune_trainer.scoring.selection import layer_budget, select_neurons


def test_per_layer_top_k_sorted_and_ties_to_lower_index():
    scores = {"a": torch.tensor([0.1, 5.0, 3.0, 5.0, 0.2]), "b": torch.tensor([1.0, 1.0, 1.0])}
    sel = select_neurons(scores, SparseNeuronConfig(neurons_per_layer=2))
    assert sel["a"].tolist() == [1, 3]
    assert sel["b"].tolist() == [0, 1]  # all tied: lowest indices, deterministic on every rank
    assert sel["a"].dtype == torch.long


def test_ratio_budget_per_layer():
    cfg = SparseNeuronConfig(ratio=0.25)
    assert layer_budget(64, cfg) == 16 and layer_budget(3, cfg) == 1  # never zero
    sel = select_neurons({"a": torch.rand(64), "b": torch.rand(10)}, cfg)
    assert {k: v.numel() for k, v in sel.items()} == {"a": 16, "b": 2}


def test_global_budget_spends_the_same_total_on_the_strongest_layers():
    g = torch.Generator().manual_seed(0)
    # layer "loud" has 100x larger raw scores but is flat; "peaky" has a few neurons far above its mean
    loud = 100 + torch.rand(8, generator=g)
    peaky = torch.cat([torch.full((3,), 10.0), torch.full((5,), 0.1)])
    cfg = SparseNeuronConfig(neurons_per_layer=2, scope="global")
    sel = select_neurons({"loud": loud, "peaky": peaky}, cfg)
    assert sum(v.numel() for v in sel.values()) == 4  # budget = 2 per layer x 2 layers
    assert sel["peaky"].tolist() == [0, 1, 2]  # per-layer normalisation lets the peaky neurons win
    assert sel["loud"].tolist() == [int(torch.argmax(loud))]


def test_global_may_leave_a_layer_out():
    # normalised: a -> [2, 2, 0, 0], b -> [1, 1, 1, 1]; the budget of 2 goes to a alone
    sel = select_neurons({"a": torch.tensor([9.0, 9.0, 0.0, 0.0]), "b": torch.ones(4)},
                         SparseNeuronConfig(neurons_per_layer=1, scope="global"))
    assert list(sel) == ["a"] and sel["a"].tolist() == [0, 1]


def test_more_neurons_than_rows_is_refused():
    with pytest.raises(ValueError, match="has only 4 rows"):
        select_neurons({"x": torch.rand(4)}, SparseNeuronConfig(neurons_per_layer=5))
