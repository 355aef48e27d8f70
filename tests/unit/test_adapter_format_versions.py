"""The adapter json across versions: it records what defines the adapter (not the run-time knobs), with the
package version and the base model's name; older adapters (every config field recorded) still load, and keys a
newer version wrote are a warning, not a refusal."""
import dataclasses
import json
import os
import stat
import warnings

import pytest
import torch

from helpers import TokenDataset, tiny_model
from sprune_trainer import (SparseNeuronConfig, SparseNeuronTrainer, __version__, load_sparse_adapter,
                            save_sparse_adapter)
from sprune_trainer.io import adapter as ckpt
from sprune_trainer.layers.surgery import inject_slices, sliced_modules
from sprune_trainer.layers.targets import find_target_layers
from transformers import TrainingArguments

CFG = SparseNeuronConfig(neurons_per_layer=4, importance="random", seed=3)
IDS = torch.arange(24).reshape(2, 12) % 128
RUN_TIME_KEYS = ("calibration_batches", "calibration_micro_batch_size", "zo_eps", "recompute_slice_inputs",
                 "optimizer_state", "compensated_update", "nonfinite_guard", "max_nonfinite_steps", "untrained_guard",
                 "cudnn_attention")
# the config an adapter recorded before the split: every field, run-time knobs included (some not at defaults)
FULL_CONFIG_OF_VERSION_2 = {
    "axis": "rows", "calibration_batches": 7, "calibration_micro_batch_size": 0, "cudnn_attention": True,
    "double_quant": False, "head_balanced": False, "importance": "random", "init_from_quantization_error": False,
    "max_nonfinite_steps": 3, "modules_to_save": None, "neurons_per_layer": 4, "nonfinite_guard": False,
    "optimizer_state": "int8", "quantize_base": None, "ratio": None, "recompute_slice_inputs": False,
    "scope": "per_layer", "seed": 3, "slice_dropout": 0.1, "slice_dtype": "float32", "target_modules": None,
    "taylor_form": "multivariable", "train_bias": False, "untrained_guard": False, "zo_eps": 0.01}


def _sliced_model(name_or_path=None):
    model = tiny_model()
    if name_or_path is not None:
        model.config._name_or_path = name_or_path
    g = torch.Generator().manual_seed(0)
    selection = {n: torch.randperm(layer.out_features, generator=g)[:4]
                 for n, layer in find_target_layers(model).items()}
    inject_slices(model, selection, CFG)
    with torch.no_grad():
        for layer in sliced_modules(model).values():
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=g) * 0.05)
    return model


def _meta(path):
    return json.loads((path / ckpt.META_NAME).read_text())


def _rewrite_meta(path, edit):
    meta = _meta(path)
    edit(meta)
    meta["metadata_sha256"] = ckpt.metadata_digest(meta)
    (path / ckpt.META_NAME).write_text(json.dumps(meta))


def _load_without_warnings(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_sparse_adapter(tiny_model(), str(path))


def test_json_records_the_adapter_keys_the_version_and_the_base_model(tmp_path):
    save_sparse_adapter(_sliced_model("org/tiny-llama"), tmp_path)
    meta = _meta(tmp_path)
    assert sorted(meta["config"]) == sorted(SparseNeuronConfig.ADAPTER_KEYS)
    assert not set(RUN_TIME_KEYS) & set(meta["config"])
    assert meta["sprune_trainer_version"] == __version__
    assert meta["base_model_name_or_path"] == "org/tiny-llama"
    save_sparse_adapter(_sliced_model(), tmp_path / "from_config")
    assert _meta(tmp_path / "from_config")["base_model_name_or_path"] is None  # built from a config: unknown


def test_adapter_keys_and_run_time_keys_split_every_field():
    fields = SparseNeuronConfig.field_names()
    assert set(SparseNeuronConfig.ADAPTER_KEYS) | set(RUN_TIME_KEYS) == fields
    assert not set(SparseNeuronConfig.ADAPTER_KEYS) & set(RUN_TIME_KEYS)
    assert set(SparseNeuronConfig.SELECTION_KEYS) <= set(SparseNeuronConfig.ADAPTER_KEYS)  # resume compares them


def test_adapter_with_the_full_config_of_version_2_loads_and_drops_its_run_time_knobs(tmp_path):
    model = _sliced_model()
    save_sparse_adapter(model, tmp_path)

    def as_version_2(meta):
        meta["config"] = dict(FULL_CONFIG_OF_VERSION_2)
        del meta["sprune_trainer_version"], meta["base_model_name_or_path"]
    _rewrite_meta(tmp_path, as_version_2)
    loaded = _load_without_warnings(tmp_path)  # run-time keys this version knows: ignored without a word
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    # the run-time knobs at their defaults; slice_dropout defines the adapter's layers, so it is read
    assert loaded.sparse_neuron_config == dataclasses.replace(CFG, slice_dropout=0.1)
    assert loaded.sparse_neuron_config.optimizer_state == "float32"


def test_a_run_time_value_this_version_would_refuse_does_not_stop_a_load(tmp_path):
    model = _sliced_model()
    save_sparse_adapter(model, tmp_path)
    _rewrite_meta(tmp_path, lambda m: m["config"].update(optimizer_state="int4", max_nonfinite_steps=0))
    assert torch.equal(_load_without_warnings(tmp_path)(IDS).logits, model(IDS).logits)


def test_keys_of_a_newer_version_warn_once_and_are_ignored(tmp_path):
    model = _sliced_model()
    save_sparse_adapter(model, tmp_path)

    def as_newer(meta):
        meta["config"]["slice_rank"] = 2
        meta["base_revision"] = "abc123"
        meta["sprune_trainer_version"] = "9.0.0"
    _rewrite_meta(tmp_path, as_newer)
    with pytest.warns(UserWarning) as record:
        loaded = load_sparse_adapter(tiny_model(), str(tmp_path))
    messages = [str(w.message) for w in record if "does not know" in str(w.message)]
    assert len(messages) == 1
    assert "['base_revision', 'config.slice_rank']" in messages[0]
    assert "9.0.0" in messages[0] and f"({__version__})" in messages[0]
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_integrity_checks_still_hold_for_adapter_keys(tmp_path):
    save_sparse_adapter(_sliced_model(), tmp_path)
    _rewrite_meta(tmp_path, lambda m: m["config"].update(slice_dtype="bfloat16"))
    with pytest.raises(ValueError, match="slice_dtype='bfloat16'"):
        load_sparse_adapter(tiny_model(), str(tmp_path))
    _rewrite_meta(tmp_path, lambda m: m["config"].update(slice_dtype="float32", axis="columns"))
    with pytest.raises(ValueError, match="axis"):
        load_sparse_adapter(tiny_model(), str(tmp_path))


def test_a_typo_in_a_users_dict_is_still_refused():
    with pytest.raises(ValueError, match="Unknown SparseNeuronConfig fields"):
        SparseNeuronConfig.from_dict({**CFG.to_dict(), "neuron_per_layer": 4})
    config, unknown = SparseNeuronConfig.from_adapter_dict({**CFG.adapter_dict(), "neuron_per_layer": 4})
    assert config == CFG and unknown == ["neuron_per_layer"]


def _args(out, **kw):
    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, report_to="none",
                             logging_steps=1, disable_tqdm=True, use_cpu=True, seed=11, dataloader_num_workers=0,
                             **kw)


def test_resume_and_training_a_loaded_adapter_take_new_run_time_knobs(tmp_path):
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="l2", optimizer_state="float32")
    SparseNeuronTrainer(model=tiny_model(), args=_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
                        train_dataset=TokenDataset(), sparse_config=cfg).train()
    checkpoint = tmp_path / "checkpoint-2"
    changed = SparseNeuronConfig(neurons_per_layer=4, importance="l2", calibration_batches=3, max_nonfinite_steps=2,
                                 untrained_guard=False)
    resumed = SparseNeuronTrainer(model=tiny_model(), args=_args(tmp_path, max_steps=3, save_strategy="no"),
                                  train_dataset=TokenDataset(), sparse_config=changed)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3

    loaded = load_sparse_adapter(tiny_model(), str(checkpoint))
    trainer = SparseNeuronTrainer(model=loaded, args=_args(tmp_path / "more", max_steps=1, save_strategy="no"),
                                  train_dataset=TokenDataset(),
                                  sparse_config=SparseNeuronConfig(neurons_per_layer=4, optimizer_state="bfloat16"))
    trainer.train()
    assert trainer.sparse_config.optimizer_state == "bfloat16"


def test_resuming_from_a_newer_versions_checkpoint_warns_once(tmp_path):
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="l2")
    SparseNeuronTrainer(model=tiny_model(), args=_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
                        train_dataset=TokenDataset(), sparse_config=cfg).train()
    _rewrite_meta(tmp_path / "checkpoint-2", lambda m: m["config"].update(slice_rank=2))
    resumed = SparseNeuronTrainer(model=tiny_model(), args=_args(tmp_path, max_steps=3, save_strategy="no"),
                                  train_dataset=TokenDataset(), sparse_config=cfg)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")  # as outside the tests: a warning repeated from one place is shown once
        resumed.train(resume_from_checkpoint=True)  # reads the checkpoint's adapter three times
    assert resumed.state.global_step == 3
    assert len([w for w in record if "config.slice_rank" in str(w.message)]) == 1


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_both_adapter_files_get_the_mode_of_a_new_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_sparse_adapter(_sliced_model(), tmp_path)
    finally:
        os.umask(old)
    for name in (ckpt.META_NAME, ckpt.WEIGHTS_NAME):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name
