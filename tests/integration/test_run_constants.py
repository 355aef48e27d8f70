"""What the trainer finds once per run instead of on every step (training/run_constants.py): the parameter count of
the flop estimate and the parameters handed to clipping. Runs with and without it train the same slices bit for bit,
log the same gradient norms and count the same flops; a parent trainer's own estimate or clipping is kept."""
import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Trainer, TrainerCallback

from helpers import SHAPE_MOE, TokenDataset, slice_state, sparse_trainer, trainer_args
from sprune_trainer import SparseNeuronConfig
from sprune_trainer.training.run_constants import RunConstantsMixin
from sprune_trainer.training.trainer import SparseNeuronMixin

CFG = SparseNeuronConfig(neurons_per_layer=3, importance="l2")


def _moe():
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**SHAPE_MOE))


class _SeesConstants(TrainerCallback):
    """What the trainer keeps for the run, as seen at each step's end."""

    def __init__(self):
        self.trainer, self.seen = None, []

    def on_step_end(self, args, state, control, **kw):
        self.seen.append(sorted(k[0] for k in (self.trainer._run_constants or {})))


def _run(tmp_path, name, max_grad_norm):
    trainer = sparse_trainer(tmp_path / name, CFG, TokenDataset(n=12), model=_moe(), max_steps=3,
                             max_grad_norm=max_grad_norm)
    sees = _SeesConstants()
    sees.trainer = trainer
    trainer.add_callback(sees)
    trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    return slice_state(trainer.model), trainer.state.total_flos, norms, sees.seen, trainer


@pytest.mark.parametrize("max_grad_norm", [1e-3, 0.0])  # clipping every step / the norm only
def test_runs_with_and_without_the_kept_constants_are_the_same(tmp_path, monkeypatch, max_grad_norm):
    kept, flos, norms, seen, trainer = _run(tmp_path, "kept", max_grad_norm)
    assert trainer._run_constants is None  # let go when the run ends
    kept_keys = {"num_parameters", "gradient_holders"} if hasattr(Trainer, "_clip_grad_norm") else {"num_parameters"}
    assert seen and all(kept_keys <= set(s) for s in seen)  # (4.57 clips inline, through the Trainer's walk)
    def walking_train(self, *args, **kwargs):  # the Trainer's own train(): nothing kept, every step walks
        return super(RunConstantsMixin, self).train(*args, **kwargs)
    monkeypatch.setattr(RunConstantsMixin, "train", walking_train)
    walked, flos_walked, norms_walked, seen_walked, _ = _run(tmp_path, "walked", max_grad_norm)
    assert seen_walked == [[]] * 3  # the Trainer's own walks on every step
    logged = 3 if max_grad_norm or hasattr(Trainer, "_get_grad_norm") else 0  # 4.57 logs a norm only when clipping
    assert flos == flos_walked > 0 and norms == norms_walked and len(norms) == logged
    assert kept.keys() == walked.keys() and any(".experts." in k for k in kept)
    for key, value in kept.items():
        assert torch.equal(value, walked[key]), key


def test_outside_a_run_the_trainer_finds_afresh(tmp_path):
    trainer = sparse_trainer(tmp_path, CFG, TokenDataset(n=4), model=_moe(), max_steps=1)
    calls = []
    assert trainer.once_per_run("k", lambda: calls.append(1)) is None
    trainer.once_per_run("k", lambda: calls.append(1))
    assert calls == [1, 1]
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long)}
    assert trainer.floating_point_ops(batch) == Trainer.floating_point_ops(trainer, batch) > 0


def test_a_parent_trainers_own_estimate_and_clipping_are_kept(tmp_path):
    class Parent(Trainer):
        clipped = 0

        def floating_point_ops(self, inputs):
            return 1

        def _clip_grad_norm(self, model):
            Parent.clipped += 1
            return super()._clip_grad_norm(model)

    class Mine(SparseNeuronMixin, Parent):
        pass

    trainer = Mine(model=_moe(), args=trainer_args(tmp_path, max_steps=2, max_grad_norm=1.0),
                   train_dataset=TokenDataset(n=8), sparse_config=CFG)
    trainer.train()
    assert trainer.state.total_flos == 2
    assert Parent.clipped == (2 if hasattr(Trainer, "_clip_grad_norm") else 0)
