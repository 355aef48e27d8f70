"""Asking for more calibration batches than the train data has scores on what there is, and says so."""
import logging

from transformers import TrainingArguments

from helpers import TokenDataset, tiny_model
from sprune_trainer import SparseNeuronConfig, SparseNeuronTrainer


def _warnings_after_preparing(tmp_path, caplog, calibration_batches):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none",
                             disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="wanda", calibration_batches=calibration_batches)
    trainer = SparseNeuronTrainer(model=tiny_model(), args=args, train_dataset=TokenDataset(n=32), sparse_config=cfg)
    with caplog.at_level(logging.WARNING, logger="sprune_trainer"):
        trainer.prepare_sparse_model()
    return [r.getMessage() for r in caplog.records if "calibration batches" in r.getMessage()]


def test_more_calibration_batches_than_the_data_has_are_warned_about(tmp_path, caplog):
    (message,) = _warnings_after_preparing(tmp_path, caplog, 50)  # 32 sequences in batches of 4: 8 batches
    assert "scored 8 calibration batches, not the 50 asked for" in message
    assert "yields only 8 batches of 4" in message


def test_no_warning_when_the_data_has_enough_batches(tmp_path, caplog):
    assert _warnings_after_preparing(tmp_path, caplog, 8) == []
    assert _warnings_after_preparing(tmp_path, caplog, 5) == []
