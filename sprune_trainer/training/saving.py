"""`AdapterSavingMixin`: what the Trainer saves and loads is the sparse adapter (slices + indices), never the frozen
base: `save_model`, checkpoints bracketed by their completeness marker, DeepSpeed's optimizer state without frozen
weights, and resuming / loading the best model from adapter folders."""
from __future__ import annotations

import os
from typing import Optional

import torch
from transformers.utils import logging

from .. import _hf_internals as _hf
from ..io.adapter import (adapter_state, copy_adapter_into, is_sparse_adapter_dir, read_sparse_adapter,
                          save_sparse_adapter)
from ..io.checkpoints import marked_complete_after_trainer_state, unmark_complete

logger = logging.get_logger(__name__)


class AdapterSavingMixin:
    """Saving and loading overrides for `SparseNeuronMixin` (private Trainer methods: see `_hf_internals`)."""

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Write the sparse adapter (not the frozen base). Every rank must call it: under ZeRO-3 the slices
        are gathered first; the main process writes."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        tensors, layer_meta = adapter_state(self.model)
        if self.args.should_save:
            self._write_adapter(output_dir, tensors, layer_meta)

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        self.save_model(output_dir, _internal_call=True)  # whatever state_dict the caller built, adapter only

    def _write_adapter(self, output_dir: str, tensors: dict, layer_meta: dict) -> None:
        save_sparse_adapter(self.model, output_dir, tensors, layer_meta)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        with open(os.path.join(output_dir, "training_args.json"), "w") as f:
            f.write(self.args.to_json_string())

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        """The Trainer's checkpoint, bracketed by its completeness marker: removed before the folder is (re)written,
        written right after trainer_state.json, the last file, before old checkpoints are rotated out."""
        folder = _hf.checkpoint_folder(self, trial)
        if self.args.should_save:
            unmark_complete(folder)
        self.accelerator.wait_for_everyone()  # no rank writes into the folder while it still looks complete
        with marked_complete_after_trainer_state(self.state, folder, enabled=self.args.should_save):
            return super()._save_checkpoint(model, trial, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # DeepSpeed's own checkpoint: the slices' partitioned optimizer state; frozen weights left out
        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        from accelerate.utils import DeepSpeedSchedulerWrapper
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if is_sparse_adapter_dir(resume_from_checkpoint):
            copy_adapter_into(model if model is not None else self.model, read_sparse_adapter(resume_from_checkpoint))
            return
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if best and is_sparse_adapter_dir(best):
            logger.info(f"Loading best sparse adapter from {best} (score: {self.state.best_metric}).")
            copy_adapter_into(self.model, read_sparse_adapter(best))
            return
        return super()._load_best_model()
