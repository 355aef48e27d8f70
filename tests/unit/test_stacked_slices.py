"""The grouped experts path keeps each projection's stacked slices (stacked_slices.py) between forwards: the kept
path computes what finding them afresh computes, the same kept object serves while nothing changes, and every change
(merge / unmerge, an index written or replaced, new surgery, dropout in training, hiding the views) is seen."""
import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from helpers import SHAPE_MOE, TokenDataset, random_selection
from sprune_trainer import SparseNeuronConfig, merge_sparse
from sprune_trainer.layers.experts import hide_experts
from sprune_trainer.layers.grouped_experts import grouped_slices
from sprune_trainer.layers.stacked_slices import _CACHE, StackedSlices, stacked_slices
from sprune_trainer.layers.surgery import inject_slices, sliced_modules

PROJECTIONS = ("gate_up_proj", "down_proj")
IDS = TokenDataset(n=2).ids


def _sliced(seed=0, cfg=SparseNeuronConfig(neurons_per_layer=3, importance="random"), selection_seed=0):
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**SHAPE_MOE)).eval()
    if getattr(model.config, "_experts_implementation", None) != "grouped_mm":
        pytest.skip("no grouped_mm experts in this transformers")
    inject_slices(model, random_selection(model, cfg, selection_seed), cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in sliced_modules(model).values():
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=g) * 0.1)
    return model


def _experts(model):
    return [m for m in model.modules() if getattr(m, "_sprune_expert_views", False)]


def _uncached_logits(model):
    """The forward with nothing kept: every experts module finds its slices afresh."""
    for experts in _experts(model):
        experts.__dict__.pop(_CACHE, None)
    with torch.no_grad():
        out = model(IDS).logits
    for experts in _experts(model):
        experts.__dict__.pop(_CACHE, None)
    return out


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _eager_logits(model):
    """The same slices through transformers' per-expert loop (experts.py), the grouped path's reference."""
    model.set_experts_implementation("eager")
    try:
        return _logits(model)
    finally:
        model.set_experts_implementation("grouped_mm")


def test_the_kept_slices_compute_what_found_afresh_computes_and_are_reused():
    model = _sliced()
    experts = _experts(model)[0]
    want = _uncached_logits(model)
    first = _logits(model)
    kept = dict(experts.__dict__[_CACHE])
    again = _logits(model)
    assert torch.equal(first, want) and torch.equal(again, want)
    assert all(experts.__dict__[_CACHE][n] is kept[n] for n in PROJECTIONS)  # found once, then reused
    torch.testing.assert_close(want, _eager_logits(model), rtol=1e-5, atol=1e-6)


def test_merge_and_unmerge_of_one_expert_are_seen():
    model = _sliced()
    experts = _experts(model)[0]
    before = _logits(model)
    layer = experts._modules["1"].gate_up_proj
    layer.merge()
    assert grouped_slices(experts, PROJECTIONS) is None  # the merged expert: the per-expert loop
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    assert grouped_slices(experts, PROJECTIONS) is not None
    assert torch.equal(_logits(model), before)


@pytest.mark.parametrize("change", ["written", "replaced"])
def test_a_changed_index_is_seen(change):
    model = _sliced()
    experts = _experts(model)[0]
    _logits(model)
    kept = experts.__dict__[_CACHE]["down_proj"]
    layer = experts._modules["2"].down_proj
    other = torch.tensor([i for i in range(layer.base_layer.out_features) if i not in layer.index.tolist()][:3])
    if change == "written":  # in place, as a load into the slices does
        layer.index.copy_(other)
    else:  # a new tensor, as a device move gives
        layer.index = other.clone()
    got = _logits(model)
    assert experts.__dict__[_CACHE]["down_proj"] is not kept
    assert torch.equal(got, _uncached_logits(model))
    torch.testing.assert_close(got, _eager_logits(model), rtol=1e-5, atol=1e-6)


def test_new_surgery_is_seen():
    model = _sliced()
    _logits(model)
    merge_sparse(model)
    cfg = SparseNeuronConfig(neurons_per_layer=2, importance="random")
    inject_slices(model, random_selection(model, cfg, seed=5), cfg)
    for layer in sliced_modules(model).values():
        with torch.no_grad():
            layer.delta.normal_(0, 0.1)
    experts = _experts(model)[0]
    got = _logits(model)
    assert experts.__dict__[_CACHE]["gate_up_proj"].index().shape[1] == 2  # the new slices', not the old ones'
    assert torch.equal(got, _uncached_logits(model))


def test_slice_dropout_in_training_leaves_the_grouped_path():
    model = _sliced(cfg=SparseNeuronConfig(neurons_per_layer=3, importance="random", slice_dropout=0.1))
    experts = _experts(model)[0]
    model.eval()  # (the views are made in training mode)
    assert grouped_slices(experts, PROJECTIONS) is not None  # eval: dropout is the identity
    model.train()
    assert grouped_slices(experts, PROJECTIONS) is None
    model.eval()
    assert grouped_slices(experts, PROJECTIONS) is not None


def test_hiding_the_views_drops_what_was_kept():
    model = _sliced()
    experts = _experts(model)[0]
    _logits(model)
    merge_sparse(model)  # hides every experts module's views
    assert _CACHE not in experts.__dict__
    hide_experts(model)


def test_indices_made_under_inference_mode_are_found_on_every_call():
    with torch.inference_mode():
        model = _sliced()
        experts = _experts(model)[0]
        found = stacked_slices(experts, "gate_up_proj")
        assert not found.kept and not found.current(experts, "gate_up_proj")
        want = model(IDS).logits
    torch.testing.assert_close(want, _eager_logits(model), rtol=1e-5, atol=1e-6)


def test_an_index_stacked_under_inference_mode_serves_training():
    model = _sliced()
    with torch.inference_mode():
        model(IDS)
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(m.delta.grad is not None for m in sliced_modules(model).values())
    assert isinstance(_experts(model)[0].__dict__[_CACHE]["down_proj"], StackedSlices)
