"""Injection, merge and the adapter file format, against the model before surgery."""
import os

import pytest
import torch
from torch import nn

from helpers import RANDOM_CFG as CFG, random_selection as _random_selection, sliced_model as _sliced_model
from helpers import tiny_llama_config, tiny_model
from sprune_trainer import SparseNeuronConfig, SlicedLinear, load_sparse_adapter, merge_sparse, save_sparse_adapter
from sprune_trainer.io import adapter as ckpt
from sprune_trainer.layers.surgery import inject_slices, sliced_modules
from sprune_trainer.layers.targets import find_target_layers

@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_injection_with_zero_delta_keeps_logits_and_freezes_base(axis, batches):
    cfg = SparseNeuronConfig(neurons_per_layer=4, axis=axis)
    model = tiny_model()
    before = model(batches[0]["input_ids"]).logits
    inject_slices(model, _random_selection(model, cfg), cfg)
    assert torch.equal(model(batches[0]["input_ids"]).logits, before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.delta" for n in sliced_modules(model)} and len(trainable) == 14


@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_merge_changes_only_selected_neurons_and_matches_sliced_logits(axis, batches):
    cfg = SparseNeuronConfig(neurons_per_layer=4, axis=axis)
    original = {k: v.clone() for k, v in tiny_model().state_dict().items()}
    model = _sliced_model(cfg)
    ids = batches[0]["input_ids"]
    sliced_logits = model(ids).logits
    selection = {n: m.index.clone() for n, m in sliced_modules(model).items()}
    deltas = {n: m.delta.detach().clone() for n, m in sliced_modules(model).items()}

    plain = merge_sparse(model)
    assert not sliced_modules(plain) and not hasattr(plain, "sparse_neuron_config")
    assert all(type(m) is nn.Linear for n, m in plain.named_modules() if n in selection)
    torch.testing.assert_close(plain(ids).logits, sliced_logits, rtol=1e-4, atol=1e-5)
    merged = plain.state_dict()
    assert set(merged) == set(original)  # a plain HF state dict again
    for key, value in merged.items():
        name = key.removesuffix(".weight")
        if name not in selection:
            assert torch.equal(value, original[key]), key  # frozen params byte-identical
            continue
        idx = selection[name]
        changed = (value != original[key]).any(dim=1 if axis == "rows" else 0).nonzero().flatten()
        assert set(changed.tolist()) <= set(idx.tolist())
        expect = original[key].clone()
        if axis == "rows":
            expect[idx] += deltas[name]
        else:
            expect[:, idx] += deltas[name]
        assert torch.equal(value, expect)


def test_save_load_round_trip_gives_identical_logits(tmp_path, batches):
    model = _sliced_model()
    ids = batches[1]["input_ids"]
    save_sparse_adapter(model, tmp_path / "adapter")
    files = sorted(os.listdir(tmp_path / "adapter"))
    assert files == [ckpt.META_NAME, ckpt.WEIGHTS_NAME]
    n_base = sum(p.numel() for p in tiny_model().parameters())
    assert os.path.getsize(tmp_path / "adapter" / ckpt.WEIGHTS_NAME) < 0.2 * 4 * n_base  # no frozen base inside
    loaded = load_sparse_adapter(tiny_model(), str(tmp_path / "adapter"))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.sparse_neuron_config == CFG
    # loading again into an already sliced model on the same neurons just copies the values
    assert torch.equal(load_sparse_adapter(loaded, str(tmp_path / "adapter"))(ids).logits, model(ids).logits)


def test_adapter_for_another_shape_is_refused(tmp_path):
    save_sparse_adapter(_sliced_model(), tmp_path)
    wider = tiny_model(tiny_llama_config(hidden_size=48, intermediate_size=64))
    with pytest.raises(ValueError, match="different model shape"):
        load_sparse_adapter(wider, str(tmp_path))
    shallower = tiny_model(tiny_llama_config(num_hidden_layers=1))
    with pytest.raises(ValueError, match="does not have"):
        load_sparse_adapter(shallower, str(tmp_path))


def test_adapter_on_other_neurons_is_refused(tmp_path):
    save_sparse_adapter(_sliced_model(), tmp_path)
    other = tiny_model()
    inject_slices(other, _random_selection(other, seed=7), CFG)
    with pytest.raises(ValueError, match="other neurons"):
        load_sparse_adapter(other, str(tmp_path))


@pytest.mark.parametrize("damage", ["flip", "truncate", "json", "missing"])
def test_corrupt_or_truncated_adapter_is_refused(tmp_path, damage):
    save_sparse_adapter(_sliced_model(), tmp_path)
    weights, meta = tmp_path / ckpt.WEIGHTS_NAME, tmp_path / ckpt.META_NAME
    data = weights.read_bytes()
    if damage == "flip":
        weights.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    elif damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "json":
        meta.write_text(meta.read_text()[:40])
    else:
        weights.unlink()
    error = FileNotFoundError if damage == "missing" else ValueError
    with pytest.raises(error, match="corrupt|truncated|not found"):
        load_sparse_adapter(tiny_model(), str(tmp_path))


def test_crash_during_save_leaves_previous_adapter_usable(tmp_path, monkeypatch, batches):
    first = _sliced_model()
    save_sparse_adapter(first, tmp_path)
    expected = first(batches[0]["input_ids"]).logits

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_sparse_adapter(_sliced_model(seed=3), tmp_path)
    assert sorted(os.listdir(tmp_path)) == [ckpt.META_NAME, ckpt.WEIGHTS_NAME]  # no temp files left
    loaded = load_sparse_adapter(tiny_model(), str(tmp_path))
    assert torch.equal(loaded(batches[0]["input_ids"]).logits, expected)


def test_save_requires_slices(tmp_path):
    with pytest.raises(ValueError, match="SparseNeuronConfig|slices"):
        save_sparse_adapter(tiny_model(), tmp_path)
    with pytest.raises(ValueError, match="no sparse-neuron slices"):
        merge_sparse(tiny_model())


def test_second_injection_is_refused():
    model = _sliced_model()
    with pytest.raises(ValueError, match="already has"):
        inject_slices(model, _random_selection(tiny_model()), CFG)
    assert all(isinstance(m, SlicedLinear) for m in sliced_modules(model).values())


def test_slices_take_the_mode_of_the_layer_they_replace(tmp_path, batches):
    """A model in eval mode stays in eval mode after load_sparse_adapter: slice dropout off, deterministic logits."""
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="random", slice_dropout=0.5)
    trained = tiny_model()
    inject_slices(trained, {n: torch.arange(4) for n in find_target_layers(trained, None)}, cfg)
    with torch.no_grad():
        for layer in sliced_modules(trained).values():
            layer.delta.normal_()
    save_sparse_adapter(trained, tmp_path / "adapter")
    ids = batches[0]["input_ids"]
    loaded = load_sparse_adapter(tiny_model(), str(tmp_path / "adapter"))  # tiny_model() is in eval mode
    assert not any(m.training for m in loaded.modules())
    assert torch.equal(loaded(ids).logits, loaded(ids).logits)
    assert torch.equal(loaded(ids).logits, trained.eval()(ids).logits)
    training = load_sparse_adapter(tiny_model().train(), str(tmp_path / "adapter"))
    assert all(m.training for m in sliced_modules(training).values())
