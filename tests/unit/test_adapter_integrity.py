"""An adapter loads only when it is exactly what was saved and fits the model; a refused load changes nothing.

The forged adapters below re-hash what they edit (as a careful forger or a buggy tool would), so each check is
tested on its own, not only through the checksums."""
import hashlib
import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

from helpers import RANDOM_CFG as CFG, random_selection as _random_selection, sliced_model as _sliced_model
from helpers import tiny_model
from sprune_trainer import SparseNeuronConfig, load_sparse_adapter, merge_sparse, save_sparse_adapter
from sprune_trainer.io import adapter as ckpt
from sprune_trainer.layers.surgery import inject_slices, sliced_modules

IDS = torch.arange(24).reshape(2, 12) % 128


def _rewrite(path, edit_meta=None, edit_tensors=None, rehash=True):
    """Edit an adapter's json and/or tensors; with `rehash`, update both checksums to match the edit."""
    meta_path, weights_path = path / ckpt.META_NAME, path / ckpt.WEIGHTS_NAME
    meta = json.loads(meta_path.read_text())
    if edit_tensors is not None:
        tensors = load_file(weights_path)
        edit_tensors(tensors)
        save_file(tensors, weights_path, metadata={"format": "pt"})
        meta["weights_sha256"] = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    if edit_meta is not None:
        edit_meta(meta)
    if rehash and "metadata_sha256" in meta:
        meta["metadata_sha256"] = ckpt.metadata_digest(meta)
    meta_path.write_text(json.dumps(meta))


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, type(model.get_submodule(LAST)))


LAST = "model.layers.1.self_attn.v_proj"  # last sliced layer by name: a loader that fails there changed all others


def _assert_untouched(model, snapshot):
    state, grads, last_type = snapshot
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert type(model.get_submodule(LAST)) is last_type


def _drop(d, key):
    del d[key]


FORGERIES = {
    "delta_of_one_row_broadcasts": (None, lambda t: t.__setitem__(f"{LAST}.delta", t[f"{LAST}.delta"][:1].clone()),
                                    r"v_proj.delta has shape \(1, 32\), but 4 rows of a 16x32 weight need \(4, 32\)"),
    "layer_left_out_of_the_json": (lambda m: _drop(m["layers"], LAST), None, "belong to no layer listed"),
    "delta_missing": (None, lambda t: _drop(t, f"{LAST}.delta"), "lacks its index or delta"),
    "extra_tensor": (None, lambda t: t.__setitem__("model.norm.delta", torch.zeros(2)), "belong to no layer listed"),
    "slice_dtype_edited": (lambda m: m["config"].__setitem__("slice_dtype", "bfloat16"), None,
                           "config says slice_dtype='bfloat16'"),
    "layer_axis_edited": (lambda m: m["layers"][LAST].__setitem__("axis", "columns"), None, "axis='columns'"),
    "layer_k_edited": (lambda m: m["layers"][LAST].__setitem__("k", 3), None, "must be 3 sorted unique"),
    "layer_dtype_edited": (lambda m: m["layers"][LAST].__setitem__("dtype", "bfloat16"), None,
                           "metadata says 'bfloat16'"),
    "index_out_of_range": (None, lambda t: t[f"{LAST}.index"].__setitem__(-1, 16), r"in \[0, 16\)"),
    "index_unsorted": (None, lambda t: t.__setitem__(f"{LAST}.index", t[f"{LAST}.index"].flip(0).clone()), "sorted"),
    "no_config": (lambda m: _drop(m, "config"), None, r"lacks the entries \['config'\]"),
    "no_layers": (lambda m: _drop(m, "layers"), None, r"lacks the entries \['layers'\]"),
    "bias_delta_without_train_bias": (None, lambda t: t.__setitem__(f"{LAST}.bias_delta", torch.zeros(4)),
                                      "train_bias=False"),
}


@pytest.mark.parametrize("name", FORGERIES)
def test_inconsistent_adapter_is_refused_and_the_model_is_left_as_it_was(tmp_path, name):
    edit_meta, edit_tensors, match = FORGERIES[name]
    source = _sliced_model()
    save_sparse_adapter(source, tmp_path / "good")
    save_sparse_adapter(source, tmp_path / "bad")
    _rewrite(tmp_path / "bad", edit_meta, edit_tensors)
    model = tiny_model()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_sparse_adapter(model, str(tmp_path / "bad"))
    _assert_untouched(model, before)
    # nothing half-done: the valid adapter still loads into the same model
    assert torch.equal(load_sparse_adapter(model, str(tmp_path / "good"))(IDS).logits, source(IDS).logits)


def test_an_edited_json_fails_its_own_checksum(tmp_path):
    save_sparse_adapter(_sliced_model(), tmp_path)
    _rewrite(tmp_path, lambda m: m["config"].__setitem__("slice_dtype", "bfloat16"), rehash=False)
    with pytest.raises(ValueError, match="was edited or is corrupt"):
        load_sparse_adapter(tiny_model(), str(tmp_path))


def test_version_1_adapter_without_json_checksum_still_loads(tmp_path):
    source = _sliced_model()
    save_sparse_adapter(source, tmp_path)

    def as_version_1(meta):
        meta["version"] = 1
        for key in ("metadata_sha256", "model_type"):
            meta.pop(key, None)
    _rewrite(tmp_path, as_version_1, rehash=False)
    assert torch.equal(load_sparse_adapter(tiny_model(), str(tmp_path))(IDS).logits, source(IDS).logits)


def _tiny_qwen2(seed=0):
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return tiny_model(cfg, seed=seed)


def _sliced_qwen2(train_bias):
    cfg = SparseNeuronConfig(neurons_per_layer=4, train_bias=train_bias)
    model = _tiny_qwen2()
    inject_slices(model, _random_selection(model, cfg), cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_bias_deltas_load_exactly_when_the_config_trains_them(tmp_path):
    trained = _sliced_qwen2(train_bias=True)
    save_sparse_adapter(trained, tmp_path / "bias")
    loaded = load_sparse_adapter(_tiny_qwen2(), str(tmp_path / "bias"))
    assert torch.equal(loaded(IDS).logits, trained(IDS).logits)  # q/k/v bias deltas are in
    assert sum(m.bias_delta is not None for m in sliced_modules(loaded).values()) == 6

    # flipped off: the trained bias deltas would be dropped
    _rewrite(tmp_path / "bias", lambda m: m["config"].__setitem__("train_bias", False))
    with pytest.raises(ValueError, match="bias_delta is present, but its config says train_bias=False"):
        load_sparse_adapter(_tiny_qwen2(), str(tmp_path / "bias"))
    # flipped on: q/k/v have biases but the adapter has no bias deltas for them
    save_sparse_adapter(_sliced_qwen2(train_bias=False), tmp_path / "plain")
    _rewrite(tmp_path / "plain", lambda m: m["config"].__setitem__("train_bias", True))
    model = _tiny_qwen2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"k_proj' has bias here, but the adapter \(train_bias=True\) has no bias_d"):
        load_sparse_adapter(model, str(tmp_path / "plain"))
    assert not sliced_modules(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_model_class_is_checked_unless_overridden(tmp_path):
    source = _sliced_model()
    save_sparse_adapter(source, tmp_path)
    mistral = AutoModelForCausalLM.from_config(MistralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))  # same layer names and shapes
    with pytest.raises(ValueError, match="saved from a class 'LlamaForCausalLM', this model's is 'MistralForCausalLM'"):
        load_sparse_adapter(mistral, str(tmp_path))
    assert not sliced_modules(mistral)
    load_sparse_adapter(mistral, str(tmp_path), check_model_class=False)  # the user says the layers are the same
    theirs, ours = sliced_modules(mistral), sliced_modules(source)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[n].delta, ours[n].delta) for n in ours)


def test_slices_load_in_the_dtype_they_were_saved_in(tmp_path):
    """slice_dtype='auto' on an fp32 base gives fp32 slices; a bf16 model must not round them."""
    cfg = SparseNeuronConfig(neurons_per_layer=4, slice_dtype="auto")
    source = tiny_model()
    inject_slices(source, _random_selection(source, cfg), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in sliced_modules(source).values():
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=g) * 0.05)  # not representable in bf16
    save_sparse_adapter(source, tmp_path)
    loaded = load_sparse_adapter(tiny_model(dtype=torch.bfloat16), str(tmp_path))
    for name, layer in sliced_modules(source).items():
        got = sliced_modules(loaded)[name].delta
        assert got.dtype == torch.float32 and torch.equal(got, layer.delta), name

    # into bf16 slices that are there already: refused, not rounded
    bf16 = SparseNeuronConfig(neurons_per_layer=4, slice_dtype="bfloat16")
    target = tiny_model()
    inject_slices(target, {n: m.index for n, m in sliced_modules(source).items()}, bf16)
    with pytest.raises(ValueError, match="saved in float32 but would be held in bfloat16, which rounds it"):
        load_sparse_adapter(target, str(tmp_path))
    assert all(m.delta.abs().sum() == 0 for m in sliced_modules(target).values())


def test_copy_into_slices_on_other_neurons_changes_no_layer(tmp_path):
    source = _sliced_model()
    save_sparse_adapter(source, tmp_path)
    selection = {n: m.index.clone() for n, m in sliced_modules(source).items()}
    selection[LAST] = torch.tensor([0, 1, 2, 3]) if not torch.equal(selection[LAST], torch.arange(4)) else \
        torch.tensor([4, 5, 6, 7])
    target = tiny_model()
    inject_slices(target, selection, CFG)
    with pytest.raises(ValueError, match="other neurons"):
        load_sparse_adapter(target, str(tmp_path))
    assert all(m.delta.abs().sum() == 0 for m in sliced_modules(target).values())  # no layer was copied


def test_save_pretrained_of_an_unmerged_model_is_refused(tmp_path):
    model = _sliced_model()
    with pytest.raises(ValueError, match=r"save_sparse_adapter\(model, dir\).*merge_sparse\(model\).save_pretrained"):
        model.save_pretrained(tmp_path / "unmerged")
    assert not (tmp_path / "unmerged").exists() or not os.listdir(tmp_path / "unmerged")
    expected = model(IDS).logits
    merge_sparse(model).save_pretrained(tmp_path / "merged")  # the dense model saves and reloads exactly
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(reloaded(IDS).logits, expected, rtol=1e-4, atol=1e-5)


def test_atomic_writes_sync_the_directory_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    save_sparse_adapter(_sliced_model(), tmp_path)
    assert synced == ["file", "dir", "file", "dir"]  # weights, then the json: each renamed into a synced directory
