"""`SparseNeuronMixin`: fine-tune only the most important neurons, in any `transformers.Trainer` subclass;
`SparseNeuronTrainer` is the mixin on `Trainer` itself (TRL's trainers: integrations/trl.py).

Order matters: scoring and module surgery (preparation.py) run at the start of `train()`, before the parent builds
the optimizer, wraps the model (accelerate/DDP) or starts DeepSpeed, so the slices are ordinary registered
parameters that all of them see. `on_train_begin` would be too late. Saving and loading: saving.py."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from transformers import Trainer
from transformers.utils import logging

from .. import _hf_internals as _hf
from ..config import SparseNeuronConfig
from ..io.checkpoints import last_complete_checkpoint, require_complete_checkpoint
from ..layers.quantization import require_bitsandbytes
from ..layers.surgery import config_for_model, sliced_modules
from ..optim.holds_slices import holds_every_slice, require_every_slice, unwrap_optimizer
from ..optim.slice_adamw import SliceAdamW
from .nonfinite import NonFiniteGuardMixin
from .preparation import SlicePreparationMixin
from .run_constants import RunConstantsMixin
from .saving import AdapterSavingMixin
from .summary import SelectionLogCallback
from .untrained import UntrainedGuard

logger = logging.get_logger(__name__)


class SparseNeuronMixin(SlicePreparationMixin, AdapterSavingMixin, NonFiniteGuardMixin, RunConstantsMixin):
    """The whole sparse-neuron behaviour (scoring, surgery, slice optimizer, adapter save / load / resume) for a
    `transformers.Trainer` subclass: put it first, `class MyTrainer(SparseNeuronMixin, SomeTrainer)`, so its
    overrides run before the parent's and reach it through `super()`. Adds one argument, `sparse_config`.

    A step whose loss or slice gradients are non-finite is skipped (`nonfinite.py`; the config's
    `nonfinite_guard` / `max_nonfinite_steps`); a run whose slices get no gradient or do not move stops with
    `SlicesNotTrainingError` (`untrained.py`; the config's `untrained_guard`).

    Callbacks may define `on_neurons_selected(args, state, control, model, selection, summary)`; it is
    called once the slices are in place, before the optimizer exists."""

    def __init__(self, *args, sparse_config: Optional[SparseNeuronConfig] = None, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, torch.nn.Module):  # (TRL also takes a model id and loads it itself)
            require_bitsandbytes(model)  # a quantized model without bitsandbytes: say so before anything runs
        with _hf.quantized_base_accepted(model):
            super().__init__(*args, **kwargs)
        if self.model_init is not None:
            raise ValueError(f"{type(self).__name__} does not support model_init / hyperparameter search: the "
                             "neuron selection is made once, on the model passed in")
        self.sparse_config = config_for_model(self.model, sparse_config)  # a sliced model keeps its slices' config
        self.sparse_config.validate()
        self.nonfinite_guard = self.sparse_config.nonfinite_guard
        self.max_nonfinite_steps = self.sparse_config.max_nonfinite_steps
        self.cudnn_attention = self.sparse_config.cudnn_attention
        self._make_nonfinite_guard()
        self.nonfinite.untrained = UntrainedGuard(self.sparse_config.untrained_guard,
                                                  step_source=lambda: self.state.global_step,
                                                  every=lambda: int(self.state.logging_steps or 0),
                                                  watched=self._slices_among)
        self.sparse_summary: Optional[dict] = None
        self._sparse_optimizer = None  # the optimizer this trainer built, rebuilt when the slices change
        self._selection_log = SelectionLogCallback(self.log)
        self.add_callback(self._selection_log)
        if not sliced_modules(self.model):
            self._check_budgets()  # bad targets / budgets fail here, before any data or training step
        self._check_zero3_quantized_base()
        if getattr(self, "is_fsdp_enabled", False):
            logger.warning(f"{type(self).__name__} is untested under FSDP: its tested multi-GPU paths are DDP and "
                           "DeepSpeed ZeRO-2/3 (ds_configs/, docs/multi_gpu.md). If FSDP keeps the gradients from "
                           "the slices, the untrained guard stops the run at its first optimizer step.")

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete sparse checkpoint found in output directory ({self.args.output_dir})")
        elif resume_from_checkpoint is False:
            resume_from_checkpoint = None
        if resume_from_checkpoint is not None:
            require_complete_checkpoint(resume_from_checkpoint)
        if self.sparse_config.untrained_guard and self.args.learning_rate == 0:
            raise ValueError("learning_rate=0 trains nothing: set a positive learning rate (or "
                             "SparseNeuronConfig(untrained_guard=False) to run anyway)")
        self.nonfinite.untrained.verified = False  # every run proves again that its slices move
        self.prepare_sparse_model(resume_from_checkpoint)
        resume_patch = _hf.deepspeed_resume_without_frozen_weights() if (
            resume_from_checkpoint and self.is_deepspeed_enabled) else contextlib.nullcontext()
        with resume_patch:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _slices_among(self, params: list) -> list:
        """The slice tensors among an optimizer's parameters; all of them when it holds none by identity
        (DeepSpeed steps flattened partitions of the slices)."""
        ids = self.once_per_run(("slice_ids", id(self.model)), lambda: {
            id(p) for m in sliced_modules(self.model).values() for p in (m.delta, m.bias_delta) if p is not None})
        slices = [p for p in params if id(p) in ids]
        return slices if slices else params

    def create_optimizer(self, model=None):
        """SliceAdamW over the slices only (also what DeepSpeed wraps: ship configs without an optimizer block),
        unless `TrainingArguments.optim` names another optimizer than its default, or `optimizer_cls_and_kwargs=` is
        given: the Trainer then builds that one, over the slices; one passed as `optimizers=` is used
        if it holds every slice (one built before train() holds none: refused, it would train nothing). An
        optimizer this trainer built is built again when the slices changed (train(), merge_sparse(), train())."""
        opt_model = model if model is not None else self.model
        if self.optimizer is not None and not self.is_deepspeed_enabled and not holds_every_slice(self.optimizer,
                                                                                                 opt_model):
            if unwrap_optimizer(self.optimizer) is not self._sparse_optimizer:
                require_every_slice(self.optimizer, opt_model)  # the user's: refused with what to do instead
            logger.info("the slices changed since this trainer built its optimizer: building a new one")
            self.optimizer = None
        if self.optimizer is not None:
            return self._guard_optimizer(self.optimizer)
        if getattr(self, "optimizer_cls_and_kwargs", None) is not None or optim_chosen(self.args):
            # the Trainer's own optimizer (fused AdamW, bitsandbytes 8-bit / paged, ...) over the trainable
            # parameters, which are the slices (and modules_to_save) only
            if self.sparse_config.optimizer_state != "float32" or self.sparse_config.compensated_update:
                logger.warning(f"optimizer_state={self.sparse_config.optimizer_state!r} and compensated_update="
                               f"{self.sparse_config.compensated_update} apply to SliceAdamW only; "
                               f"optim={optim_name(self.args)} keeps its own state")
            self._sparse_optimizer = super().create_optimizer()
            return self._sparse_optimizer
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("no trainable slices: call train() (or prepare_sparse_model()) before create_optimizer")
        groups = [{"params": [p for n, p in named if not n.endswith("bias_delta")], "weight_decay": self.args.weight_decay},
                  {"params": [p for n, p in named if n.endswith("bias_delta")], "weight_decay": 0.0}]
        self.optimizer = SliceAdamW([g for g in groups if g["params"]], lr=self.args.learning_rate,
                                    betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon,
                                    state_dtype=self.sparse_config.optimizer_state,
                                    compensated=self.sparse_config.compensated_update)
        self._sparse_optimizer = self.optimizer
        return self._guard_optimizer(self.optimizer)


def optim_name(args) -> str:
    return str(getattr(args.optim, "value", args.optim))


def optim_chosen(args) -> bool:
    """Whether `args.optim` is another optimizer than its arguments class's default (the user picked one)."""
    field = type(args).__dataclass_fields__.get("optim")
    return field is not None and optim_name(args) != str(getattr(field.default, "value", field.default))


class SparseNeuronTrainer(SparseNeuronMixin, Trainer):
    """Drop-in `Trainer` replacement; every Trainer argument works as usual, plus `sparse_config`.

    Callbacks may define `on_neurons_selected(args, state, control, model, selection, summary)`; it is
    called once the slices are in place, before the optimizer exists."""
