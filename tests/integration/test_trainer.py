"""SparseNeuronTrainer end to end on a tiny seeded Llama, against dense references."""
import json
import logging
import os

import pytest
import torch
from transformers import TrainerCallback

from helpers import TokenDataset, masked_dense_training, tiny_model
from helpers import slice_state as _slice_state, sparse_trainer as _trainer
from helpers import trainer_args as _args
from sprune_trainer import (SparseNeuronConfig, SparseNeuronTrainer, load_sparse_adapter, merge_sparse,
                            save_sparse_adapter)
from sprune_trainer._hf_internals import model_checkpoints
from sprune_trainer.layers.surgery import sliced_modules
from sprune_trainer.optim.slice_adamw import SliceAdamW


@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_n_steps_equal_dense_training_with_a_neuron_mask(tmp_path, axis):
    """Full-batch training (batch = dataset) makes the data order irrelevant, so a plain loop is the reference.
    Tolerance: Adam divides by sqrt(v), so float-order noise in tiny gradients grows to ~1e-5 (vs 1e-2 steps)."""
    data = TokenDataset(n=8)
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="l2", axis=axis)
    trainer = _trainer(tmp_path, cfg, data, per_device_train_batch_size=8, max_steps=5)
    trainer.train()
    selection = {n: m.index.clone() for n, m in sliced_modules(trainer.model).items()}
    ours = merge_sparse(trainer.model).state_dict()

    expected = masked_dense_training(selection, axis, lambda w: torch.optim.AdamW(w, lr=1e-2, weight_decay=0.0,
                                                                                 foreach=False), data, steps=5)
    changed = 0
    for key in expected:
        torch.testing.assert_close(ours[key], expected[key], rtol=1e-3, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
        changed += int(not torch.equal(ours[key], tiny_model().state_dict()[key]))
    assert changed == len(selection)  # every sliced weight moved, nothing else did


def test_training_touches_only_slices_and_saves_a_small_adapter(tmp_path):
    original = tiny_model().state_dict()
    trainer = _trainer(tmp_path, SparseNeuronConfig(neurons_per_layer=4, importance="taylor", calibration_batches=2))
    before = _slice_state(trainer.model) if sliced_modules(trainer.model) else None
    assert before is None  # nothing happens before train()
    trainer.train()
    for name, p in trainer.model.named_parameters():
        if name.endswith(".delta"):
            assert p.abs().sum() > 0, name
        else:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, original[key]), name  # frozen: byte-identical
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      SliceAdamW)
    trainer.save_model(str(tmp_path / "final"))
    saved = sorted(os.listdir(tmp_path / "final"))
    assert "sparse_adapter.safetensors" in saved and "model.safetensors" not in saved
    ids = TokenDataset().ids[:2]
    reloaded = load_sparse_adapter(tiny_model(), str(tmp_path / "final"))
    assert torch.equal(reloaded(ids).logits, trainer.model(ids).logits)


@pytest.mark.parametrize("axis", ["rows", "columns"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_trains_the_same_slices(tmp_path, axis, reentrant):
    """Checkpointed layers re-run their forward in backward; with every base weight frozen, the reentrant variant
    only back-propagates into a layer whose input requires grad (the trainer turns that on). Same slices either way."""
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="l2", axis=axis)
    plain = _trainer(tmp_path / "plain", cfg, max_steps=3)
    plain.train()
    ckpt = _trainer(tmp_path / "ckpt", cfg, max_steps=3, gradient_checkpointing=True,
                    gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ckpt.train()
    a, b = _slice_state(plain.model), _slice_state(ckpt.model)
    assert a.keys() == b.keys() and all(v.abs().sum() > 0 for v in b.values())
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reentrant", [True, False])
def test_scoring_checkpoints_as_training_will(tmp_path, reentrant):
    """A run that will train with gradient checkpointing scores under the same checkpointing (each block runs again
    in backward), picks the neurons it would pick without, and leaves the model's checkpointing off as it found it
    (the Trainer turns it on itself when training starts)."""
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="taylor", calibration_batches=2)
    picks, calls = {}, {}
    for ckpt in (False, True):
        kw = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": reentrant}) \
            if ckpt else {}
        trainer = _trainer(tmp_path / str(ckpt), cfg, **kw)
        counted = [0]
        hook = trainer.model.model.layers[0].mlp.down_proj.register_forward_hook(
            lambda *_: counted.__setitem__(0, counted[0] + 1))
        trainer.prepare_sparse_model()
        hook.remove()
        assert not model_checkpoints(trainer.model)
        picks[ckpt] = {n: m.index for n, m in sliced_modules(trainer.model).items()}
        calls[ckpt] = counted[0]
    assert calls == {False: 2, True: 4}  # two whole calibration batches (auto on the CPU), forward + recompute
    assert picks[True].keys() == picks[False].keys()
    assert all(torch.equal(picks[True][n], picks[False][n]) for n in picks[False])


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="random")
    full = _trainer(tmp_path / "run", cfg, max_steps=6, save_strategy="steps", save_steps=3)
    full.train()
    final = _slice_state(full.model)
    ckpt3 = tmp_path / "run" / "checkpoint-3"
    contents = set(os.listdir(ckpt3))
    assert {"sparse_adapter.safetensors", "sparse_adapter.json", "optimizer.pt", "scheduler.pt",
            "trainer_state.json"} <= contents
    assert not contents & {"model.safetensors", "pytorch_model.bin"}  # the frozen base is never checkpointed

    # a different seed would pick other random neurons: resume must take them from the checkpoint instead
    resumed = _trainer(tmp_path / "run", SparseNeuronConfig(neurons_per_layer=4, importance="random", seed=99),
                       max_steps=6, save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=str(ckpt3))
    after = _slice_state(resumed.model)
    assert after.keys() == final.keys()
    for name in final:
        assert torch.equal(after[name], final[name]), name


def test_resume_skips_a_checkpoint_torn_by_a_crash(tmp_path):
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="random")
    full = _trainer(tmp_path, cfg, max_steps=6, save_strategy="steps", save_steps=3)
    full.train()
    final = _slice_state(full.model)
    os.remove(tmp_path / "checkpoint-6" / "trainer_state.json")  # the crash hit before the save finished

    with pytest.raises(ValueError, match="save did not finish"):
        _trainer(tmp_path, cfg, max_steps=6).train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    resumed = _trainer(tmp_path, cfg, max_steps=6, save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=True)  # falls back to checkpoint-3
    assert resumed.state.global_step == 6
    for name, value in _slice_state(resumed.model).items():
        assert torch.equal(value, final[name]), name


def test_resume_with_a_different_config_is_refused(tmp_path):
    _trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2).train()
    other = _trainer(tmp_path, SparseNeuronConfig(neurons_per_layer=8, importance="l2"))
    with pytest.raises(ValueError, match="neurons_per_layer"):
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


class _Recorder(TrainerCallback):
    def __init__(self):
        self.calls, self.logs = [], []

    def on_neurons_selected(self, args, state, control, model, selection, summary):
        self.calls.append((dict(selection), summary, model.training))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_callback_event_and_summary(tmp_path, capsys, caplog):
    recorder = _Recorder()
    trainer = _trainer(tmp_path, SparseNeuronConfig(neurons_per_layer=4, target_modules=["q_proj", "down_proj"]),
                       max_steps=1)
    trainer.add_callback(recorder)
    with caplog.at_level(logging.INFO, logger="sprune_trainer"):
        trainer.train()
    assert len(recorder.calls) == 1
    selection, summary, _ = recorder.calls[0]
    assert sorted(selection) == sorted(sliced_modules(trainer.model))
    # q_proj: 4 rows x 32 inputs, down_proj: 4 rows x 64 inputs, in 2 layers
    assert summary["trainable_params"] == 2 * (4 * 32 + 4 * 64)
    assert summary["optimizer_state_bytes"] == 8 * summary["trainable_params"]
    n_model = sum(p.numel() for p in tiny_model().parameters())
    assert summary["model_params"] == n_model and summary["full_ft_adamw_state_bytes"] == 8 * n_model
    assert summary["neurons"]["q_proj"] == {"layers": 2, "selected": 8, "of": 64, "min": 4, "max": 4}
    # the summary goes to logging (not print) and its numbers through Trainer.log() to every tracker
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("sprune_trainer"))
    assert "trainable params: 768" in text and "optimizer state" in text
    assert "trainable params: 768" not in capsys.readouterr().out
    logged = [entry for entry in recorder.logs if "sparse_trainable_params" in entry]
    assert len(logged) == 1 and logged[0]["sparse_trainable_params"] == 768
    assert logged[0]["sparse_optimizer_state_bytes"] == 8 * 768 and logged[0]["sparse_sliced_layers"] == 4
    history = [e for e in trainer.state.log_history if "sparse_trainable_params" in e]
    assert len(history) == 1 and history[0]["step"] == 0


@pytest.mark.parametrize("cfg", [
    SparseNeuronConfig(neurons_per_layer=4, importance="hessian", calibration_batches=2),
    SparseNeuronConfig(neurons_per_layer=4, importance="zeroth_order", calibration_batches=2),
    SparseNeuronConfig(ratio=0.1, importance="taylor", calibration_batches=2, scope="global"),
    SparseNeuronConfig(neurons_per_layer=3, importance="l1", axis="columns", optimizer_state="int8"),
    SparseNeuronConfig(neurons_per_layer=3, importance="l2", optimizer_state="bfloat16"),
], ids=lambda c: f"{c.importance}-{c.scope}-{c.axis}-{c.optimizer_state}")
def test_every_criterion_trains(tmp_path, cfg):
    trainer = _trainer(tmp_path, cfg, max_steps=2)
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    layers = sliced_modules(trainer.model)
    total = sum(m.index.numel() for m in layers.values())
    if cfg.scope == "global":  # one budget: the sum of the per-layer ratios (32/64-row layers -> 3 or 6 each)
        assert total == sum(max(1, round(0.1 * (m.out_features))) for m in find_layers(trainer.model))
    else:
        assert all(m.index.numel() == cfg.neurons_per_layer for m in layers.values()) and len(layers) == 14
    assert any(m.delta.abs().sum() > 0 for m in layers.values())


def find_layers(model):
    return [m for m in sliced_modules(model).values()] + [
        m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] != "lm_head"
        and ".base_layer" not in n and not any(n.startswith(s) for s in sliced_modules(model))]


@pytest.mark.parametrize("cfg_kwargs, trainer_kwargs, match", [
    (dict(neurons_per_layer=40), {}, "has only 32 rows"),
    (dict(neurons_per_layer=4, target_modules=["qkv"]), {}, "matched nothing"),
    (dict(neurons_per_layer=4, target_modules=["q_prj", "v_proj"]), {}, r"entries \['q_prj'\] matched no module"),
    (dict(neurons_per_layer=4, target_modules=["embed_tokens"]), {}, "never sliced"),
    (dict(neurons_per_layer=4, importance="taylor"), dict(train_dataset=None), "pass train_dataset"),
])
def test_bad_input_fails_in_init(tmp_path, cfg_kwargs, trainer_kwargs, match):
    kwargs = dict(model=tiny_model(), args=_args(tmp_path), train_dataset=TokenDataset(),
                  sparse_config=SparseNeuronConfig(**cfg_kwargs))
    kwargs.update(trainer_kwargs)
    with pytest.raises(ValueError, match=match):
        SparseNeuronTrainer(**kwargs)


def test_calibration_without_labels_is_a_clear_error(tmp_path):
    class NoLabels(TokenDataset):
        def __getitem__(self, i):
            return {"input_ids": self.ids[i]}
    trainer = _trainer(tmp_path, SparseNeuronConfig(neurons_per_layer=4, importance="taylor"), dataset=NoLabels())
    with pytest.raises(ValueError, match="labels"):
        trainer.train()


def test_adapter_round_trip_after_training_and_merge(tmp_path):
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.train()
    ids = TokenDataset().ids[:3]
    trained_logits = trainer.model(ids).logits
    save_sparse_adapter(trainer.model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "sparse_adapter.json").read_text())
    assert meta["config"]["neurons_per_layer"] == 4 and len(meta["layers"]) == 14
    model = merge_sparse(load_sparse_adapter(tiny_model(), str(tmp_path / "a")))
    torch.testing.assert_close(model(ids).logits, trained_logits, rtol=1e-4, atol=1e-5)
