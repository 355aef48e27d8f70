"""No training silently does nothing, and resume never takes a checkpoint that is not what it looks like."""
import copy
import dataclasses
import logging
import os
import shutil

import pytest
import torch
from transformers import TrainerCallback

from helpers import TokenDataset, tiny_model
from helpers import slice_state as _slice_state, sparse_trainer as _trainer, trainer_args as _args
from sprune_trainer import SparseNeuronConfig, SparseNeuronTrainer, merge_sparse
from sprune_trainer.io.checkpoints import COMPLETE_MARKER
from sprune_trainer.layers.surgery import sliced_modules
from sprune_trainer.optim.slice_adamw import quantize_blockwise

RANDOM = SparseNeuronConfig(neurons_per_layer=4, importance="random")


def _inner(optimizer):
    return optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer


def test_an_optimizer_built_before_train_is_refused(tmp_path):
    """It holds the frozen weights but none of the slices (they exist only once train() starts): it would train
    nothing. One built over the slices is used, and trains exactly like SliceAdamW (fp32 SliceAdamW is torch's
    AdamW bit for bit)."""
    model = tiny_model()
    early = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = SparseNeuronTrainer(model=model, args=_args(tmp_path), train_dataset=TokenDataset(),
                                  sparse_config=RANDOM, optimizers=(early, None))
    with pytest.raises(ValueError, match="lacks 14 of the model's 14 trainable slices.*built before train"):
        trainer.train()

    ours = _trainer(tmp_path / "ours", RANDOM)
    ours.train()
    theirs = _trainer(tmp_path / "theirs", RANDOM)
    theirs.prepare_sparse_model()
    theirs.optimizer = torch.optim.AdamW([p for p in theirs.model.parameters() if p.requires_grad], lr=1e-2,
                                         weight_decay=0.0, foreach=True)
    theirs.train()
    a, b = _slice_state(ours.model), _slice_state(theirs.model)
    assert a.keys() == b.keys() and all(b[n].abs().sum() > 0 for n in b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7)


def test_train_merge_train_trains_the_new_slices(tmp_path):
    """The second train() used to step the first run's optimizer, which holds the merged-away slices."""
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="l2")
    trainer = _trainer(tmp_path / "a", cfg, max_steps=3)
    trainer.train()
    merged = copy.deepcopy(merge_sparse(trainer.model))
    trainer.train()
    layers = sliced_modules(trainer.model)
    assert len(layers) == 14 and all(m.delta.abs().sum() > 0 for m in layers.values())
    held = {id(p) for g in _inner(trainer.optimizer).param_groups for p in g["params"]}
    assert held == {id(m.delta) for m in layers.values()}
    # the same as a fresh trainer on the merged model
    fresh = _trainer(tmp_path / "b", cfg, model=merged, max_steps=3)
    fresh.train()
    expected = _slice_state(fresh.model)
    for name, value in _slice_state(trainer.model).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)


class _Killed(BaseException):
    """kill -9, as far as the code under test can tell: nothing after it runs."""


def test_a_checkpoint_whose_rewrite_died_is_never_resumed(tmp_path, monkeypatch):
    """Resuming from checkpoint-3 rewrites checkpoint-6 in place; its old trainer_state.json made a folder whose
    rewrite died look complete (resume then crashed in the optimizer load, or mixed new slices with old state)."""
    ref = _trainer(tmp_path / "ref", RANDOM, max_steps=6, save_strategy="steps", save_steps=3)
    ref.train()
    final = _slice_state(ref.model)
    run = tmp_path / "run"
    _trainer(run, RANDOM, max_steps=6, save_strategy="steps", save_steps=3).train()
    assert all((run / f"checkpoint-{n}" / COMPLETE_MARKER).is_file() for n in (3, 6))

    def die_writing_optimizer(self, output_dir):
        with open(os.path.join(output_dir, "optimizer.pt"), "wb") as f:
            f.write(b"half an optimizer")
        raise _Killed()
    with monkeypatch.context() as m:
        m.setattr(SparseNeuronTrainer, "_save_optimizer_and_scheduler", die_writing_optimizer)
        with pytest.raises(_Killed):
            _trainer(run, RANDOM, max_steps=6, save_strategy="steps", save_steps=3).train(
                resume_from_checkpoint=str(run / "checkpoint-3"))
    torn = run / "checkpoint-6"
    assert (torn / "trainer_state.json").is_file() and not (torn / COMPLETE_MARKER).exists()

    with pytest.raises(ValueError, match=f"no {COMPLETE_MARKER} marker"):
        _trainer(run, RANDOM, max_steps=6).train(resume_from_checkpoint=str(torn))
    resumed = _trainer(run, RANDOM, max_steps=6, save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=True)  # checkpoint-3, the newest complete one
    assert resumed.state.global_step == 6 and (torn / COMPLETE_MARKER).is_file()
    for name, value in _slice_state(resumed.model).items():
        assert torch.equal(value, final[name]), name


def test_the_marker_is_written_before_older_checkpoints_are_rotated_out(tmp_path, monkeypatch):
    """With save_total_limit=1 a crash between deleting checkpoint-3 and marking checkpoint-6 would leave nothing
    to resume from."""
    seen = []
    rmtree = shutil.rmtree

    def spy(path, *args, **kwargs):
        seen.append((os.path.basename(path), (tmp_path / "checkpoint-6" / COMPLETE_MARKER).is_file()))
        rmtree(path, *args, **kwargs)
    monkeypatch.setattr(shutil, "rmtree", spy)
    _trainer(tmp_path, RANDOM, max_steps=6, save_strategy="steps", save_steps=3, save_total_limit=1).train()
    assert ("checkpoint-3", True) in seen and sorted(os.listdir(tmp_path)) == ["checkpoint-6"]


class _StateAtBegin(TrainerCallback):
    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = _inner(optimizer)
        self.kinds = [g["state_dtype"] for g in opt.param_groups]
        self.states = [{k: v.clone() for k, v in opt.state[p].items()} for g in opt.param_groups for p in g["params"]]


def test_resume_converts_the_optimizer_state_and_refuses_to_round_the_slices(tmp_path):
    _trainer(tmp_path, RANDOM, max_steps=3, save_strategy="steps", save_steps=3).train()
    checkpoint = tmp_path / "checkpoint-3"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]

    probe = _StateAtBegin()
    resumed = _trainer(tmp_path, dataclasses.replace(RANDOM, optimizer_state="int8"), max_steps=5)
    resumed.add_callback(probe)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert probe.kinds == ["int8"] and len(probe.states) == 14  # was: the checkpoint's float32, silently
    for i, state in enumerate(probe.states):
        code, scale = quantize_blockwise(saved[i]["exp_avg"], signed=True)
        assert torch.equal(state["exp_avg_code"], code) and torch.equal(state["exp_avg_scale"], scale)
        sq_code, _ = quantize_blockwise(saved[i]["exp_avg_sq"].sqrt(), signed=False)
        assert torch.equal(state["exp_avg_sq_code"], sq_code) and torch.equal(state["step"], saved[i]["step"])
    assert resumed.state.global_step == 5

    bf16 = _trainer(tmp_path, dataclasses.replace(RANDOM, slice_dtype="bfloat16"), max_steps=5)
    with pytest.raises(ValueError, match="saved in float32 but would be held in bfloat16, which rounds it"):
        bf16.train(resume_from_checkpoint=str(checkpoint))
    assert not sliced_modules(bf16.model)


class _FirstLayerLoss(SparseNeuronTrainer):
    """A loss on the first decoder layer's output: the second layer never reaches it."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        return model(input_ids=inputs["input_ids"], output_hidden_states=True).hidden_states[1].pow(2).mean()


def test_layers_the_loss_never_reaches_are_named_in_a_warning(tmp_path, caplog):
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="taylor", calibration_batches=2)
    trainer = _FirstLayerLoss(model=tiny_model(), args=_args(tmp_path), train_dataset=TokenDataset(),
                              sparse_config=cfg)
    with caplog.at_level(logging.WARNING, logger="sprune_trainer"):
        trainer.prepare_sparse_model()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "all-zero" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("7 of 14 layers got all-zero taylor scores")
    assert "model.layers.1.self_attn.q_proj" in warnings[0] and "model.layers.0." not in warnings[0]
    assert "never reached" in warnings[0]
    layers = sliced_modules(trainer.model)
    assert all(torch.equal(m.index, torch.arange(4)) for n, m in layers.items() if n.startswith("model.layers.1."))


def test_a_sliced_model_keeps_its_slices_config_in_another_trainer(tmp_path):
    first = _trainer(tmp_path / "a", max_steps=2)  # 4 rows per layer
    first.train()
    with pytest.raises(ValueError, match=r"neurons_per_layer \(slices 4, sparse_config 8\)"):
        _trainer(tmp_path / "b", SparseNeuronConfig(neurons_per_layer=8), model=first.model)
    before = _slice_state(first.model)
    second = SparseNeuronTrainer(model=first.model, args=_args(tmp_path / "b", max_steps=2),
                                 train_dataset=TokenDataset(), sparse_config=None)
    assert second.sparse_config == first.sparse_config  # was: the default of 64 neurons, silently not applied
    second.train()
    assert second.sparse_summary["trainable_params"] == first.sparse_summary["trainable_params"]
    after = _slice_state(second.model)
    assert after.keys() == before.keys() and all(not torch.equal(after[n], before[n]) for n in before)


def test_a_trainer_under_fsdp_warns_that_fsdp_is_untested(tmp_path, caplog, monkeypatch):
    """FSDP cannot run on a CPU (the Trainer ignores it there), so the warning is checked with the Trainer's own
    FSDP flag set as accelerate sets it on a GPU launch."""
    from transformers import Trainer

    real = Trainer.create_accelerator_and_postprocess

    def as_under_fsdp(self):
        real(self)
        self.is_fsdp_enabled = True
    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", as_under_fsdp)
    with caplog.at_level(logging.WARNING, logger="sprune_trainer"):
        _trainer(tmp_path)
    assert any("untested under FSDP" in r.getMessage() for r in caplog.records)
