"""`SparseNeuronMixin` on TRL's trainers: `SparseNeuronSFTTrainer` and `SparseNeuronDPOTrainer` (needs trl:
`pip install "sprune_trainer[trl]"`).

What TRL changes, and how the mixin meets it:
- TRL's `__init__` tokenizes the dataset and builds its collator before `Trainer.__init__`; the mixin scores on
  that tokenized train set, through TRL's collator and TRL's own `compute_loss` (SFT: its fused LM head; DPO: the
  preference loss), so taylor / hessian / zeroth_order see exactly the loss that is trained.
- TRL's `compute_loss` also records metrics (entropy, token accuracy, token count) on every call; a calibration
  forward is no training step, so those records are put back as they were after scoring.
- `peft_config` would wrap the model in a PEFT adapter next to the slices: refused.
Other TRL trainers: `class MyTrainer(SparseNeuronTRLMixin, trl.SomeTrainer)`."""
from __future__ import annotations

import copy
import dataclasses

from trl import DPOTrainer, SFTTrainer

from .._hf_internals import TRL_BOOKKEEPING
from ..training.trainer import SparseNeuronMixin


class SparseNeuronTRLMixin(SparseNeuronMixin):
    """`SparseNeuronMixin` for a TRL trainer (put it first among the bases)."""

    def __init__(self, *args, peft_config=None, **kwargs):
        if peft_config is not None:
            raise ValueError(f"{type(self).__name__} trains sparse-neuron slices; "
                             f"peft_config={type(peft_config).__name__} would add a PEFT adapter next to them: "
                             "pass sparse_config only")
        super().__init__(*args, **kwargs)

    def _select_neurons(self):
        saved = {k: copy.deepcopy(getattr(self, k)) for k in TRL_BOOKKEEPING if hasattr(self, k)}
        try:
            return super()._select_neurons()
        finally:
            for k, v in saved.items():
                setattr(self, k, v)


class SparseNeuronSFTTrainer(SparseNeuronTRLMixin, SFTTrainer):
    """Drop-in `trl.SFTTrainer` replacement; every SFTTrainer argument works as usual (but `peft_config`), plus
    `sparse_config`. Mind SFTConfig's default learning rate (2e-5, meant for full fine-tuning): slices want
    LoRA-like rates (1e-4 .. 1e-3)."""


class SparseNeuronDPOTrainer(SparseNeuronTRLMixin, DPOTrainer):
    """Drop-in `trl.DPOTrainer` replacement, plus `sparse_config`. The reference is the model before surgery:
    pass `ref_model` (a frozen copy of the base) or set `DPOConfig(precompute_ref_log_probs=True)` (trl >= 1.2),
    which scores the reference log-probs in `__init__`, before any slice exists (without either, TRL loads the
    base again from its `name_or_path`). Calibration scores whole batches: TRL stacks a DPO batch as
    [chosen; rejected] along its rows, so row micro-batches (`calibration_micro_batch_size`) would break the pairs."""

    def _select_neurons(self):
        user = self.sparse_config
        self.sparse_config = dataclasses.replace(user, calibration_micro_batch_size=0)
        try:
            return super()._select_neurons()
        finally:
            self.sparse_config = user
