"""A run whose every optimizer step was skipped as non-finite, too few for max_nonfinite_steps to stop it, ends
in NonFiniteTrainingError rather than with an adapter that never trained."""
import pytest
import torch
from transformers import TrainingArguments

from helpers import TokenDataset, tiny_model
from sprune_trainer import NonFiniteTrainingError, SparseNeuronConfig, SparseNeuronTrainer


def _trainer(tmp_path, max_steps=8):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=max_steps,
                             learning_rate=1e-2, report_to="none", save_strategy="no", logging_steps=1,
                             disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    return SparseNeuronTrainer(model=tiny_model(), args=args, train_dataset=TokenDataset(),
                               sparse_config=SparseNeuronConfig(neurons_per_layer=4, max_nonfinite_steps=10))


def _nan_loss_at(trainer, steps):
    """The training loss is NaN at these 1-based optimizer steps (None: at every one)."""
    def hook(module, inputs, out):
        if module.training and torch.is_grad_enabled() and (steps is None or trainer.state.global_step + 1 in steps):
            out.loss = out.loss * float("nan")
        return out
    return trainer.model.register_forward_hook(hook)


def test_a_run_that_skipped_every_step_raises(tmp_path):
    trainer = _trainer(tmp_path)
    _nan_loss_at(trainer, None)
    with pytest.raises(NonFiniteTrainingError, match=r"every optimizer step of this run \(8: steps \[1, 2, 3, 4, "
                                                     r"5, 6, 7, 8\]\).*nothing was trained.*max_nonfinite_steps=10"):
        trainer.train()


def test_a_run_with_one_step_taken_ends_normally(tmp_path):
    trainer = _trainer(tmp_path, max_steps=4)
    _nan_loss_at(trainer, {1, 2, 4})
    out = trainer.train()
    assert out.metrics["train_nonfinite_skipped_steps"] == 3
