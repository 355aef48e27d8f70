"""`SparseNeuronMixin`: fine-tune only the most important neurons, in any `transformers.Trainer` subclass;
`SparseNeuronTrainer` is the mixin on `Trainer` itself (TRL's trainers: trl_trainer.py).

Order matters (design.md): scoring and module surgery run at the start of `train()`, before the parent
builds the optimizer, wraps the model (accelerate/DDP) or starts DeepSpeed, so the slices are ordinary
registered parameters that all of them see. `on_train_begin` would be too late."""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.distributed import DistributedSampler
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .checkpoint import (adapter_state, copy_adapter_into, check_adapter_fits, is_sparse_adapter_dir,
                         read_sparse_adapter, save_sparse_adapter)
from .checkpoint_dirs import (last_complete_checkpoint, marked_complete_after_trainer_state,
                              require_complete_checkpoint, unmark_complete)
from .config import DATA_IMPORTANCE_NAMES, SparseNeuronConfig
from .full_modules import modules_to_save
from .heads import head_groups
from .importance import score_neurons
from .inject import config_for_model, inject_slices, layers_to_quantize, sliced_modules
from .nonfinite import NonFiniteGuardMixin
from .optim import SliceAdamW
from .optimizer_check import holds_every_slice, require_every_slice, unwrap_optimizer
from .quantization import check_zero3_quant_storage, loaded_with_bitsandbytes, require_bitsandbytes
from .selection import layer_budget, select_neurons
from .summary import SelectionLogCallback, format_summary, selection_summary, summary_metrics, warn_unscored_layers
from .targets import find_target_layers
from .untrained import UntrainedGuard
from .zero3 import gathered, model_is_partitioned

logger = logging.get_logger(__name__)


class SparseNeuronMixin(NonFiniteGuardMixin):
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
        with _quantized_base_accepted(model):
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

    # ---- selection and surgery -------------------------------------------------------------------------
    def _check_budgets(self) -> None:
        cfg = self.sparse_config
        layers = find_target_layers(self.model, cfg.target_modules)
        for name, layer in layers.items():
            layer_budget(layer.out_features if cfg.axis == "rows" else layer.in_features, cfg, name)
        head_groups(self.model, layers, cfg)  # head_balanced without heads to balance: fail before scoring
        if cfg.importance in DATA_IMPORTANCE_NAMES and self.train_dataset is None:
            raise ValueError(f"importance={cfg.importance!r} scores neurons on training batches: pass train_dataset")
        layers_to_quantize(self.model, cfg)  # quantize_base / low-error init on an already quantized model
        if cfg.quantize_base and model_is_partitioned(self.model):
            raise ValueError("quantize_base needs whole full-precision weights, but this model is ZeRO-3 partitioned "
                             "(created after TrainingArguments(deepspeed=<ZeRO-3 config>)): create the model before "
                             "the TrainingArguments, or load it with a BitsAndBytesConfig and leave quantize_base unset")

    def _check_zero3_quantized_base(self) -> None:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():  # no-op without bitsandbytes layers
            check_zero3_quant_storage(self.model, torch.bfloat16 if self.args.bf16 else
                                      torch.float16 if self.args.fp16 else None)

    def prepare_sparse_model(self, resume_from_checkpoint: Optional[str] = None) -> dict:
        """Score, select and inject slices (or take them from the checkpoint being resumed). Idempotent."""
        cfg = self.sparse_config
        adapter = read_sparse_adapter(resume_from_checkpoint) if resume_from_checkpoint else None
        if adapter is not None:
            diffs = cfg.selection_differences(adapter.config)
            if diffs:
                raise ValueError(f"cannot resume from {resume_from_checkpoint}: its sparse config differs in "
                                 + ", ".join(f"{k} (checkpoint {b!r}, now {a!r})" for k, (a, b) in diffs.items()))
            check_adapter_fits(self.model, adapter, slice_dtype=cfg.slice_dtype)  # no rounding of saved slices
        if sliced_modules(self.model):
            if adapter is not None:
                copy_adapter_into(self.model, adapter)  # raises if the slices sit on other neurons
            if self.sparse_summary is None:  # sliced before this trainer (load_sparse_adapter, another trainer)
                self._report_selection()
            return self.sparse_summary

        modules_to_save(self.model, cfg.modules_to_save)  # a typo fails here, before any scoring
        selection = adapter.selection if adapter is not None else self._select_neurons()
        inject_slices(self.model, selection, cfg)
        if cfg.quantize_base:
            self._check_zero3_quantized_base()  # the 4-bit layers quantize_base just made
        if getattr(self.args, "gradient_checkpointing", False) or getattr(self.args, "activation_checkpointing", False):
            # the frozen embeddings give checkpointed blocks inputs without grad; slices still need a backward
            self.model.enable_input_require_grads()
        self._report_selection()
        for cb in self.callback_handler.callbacks:
            hook = getattr(cb, "on_neurons_selected", None)
            if callable(hook):
                hook(self.args, self.state, self.control, model=self.model, selection=selection,
                     summary=self.sparse_summary)
        return self.sparse_summary

    def _report_selection(self) -> None:
        """The summary to the log now, and its numbers to Trainer.log() (report_to trackers) once training begins."""
        self.sparse_summary = selection_summary(self.model, self.sparse_config.optimizer_state)
        if self.is_world_process_zero():
            logger.info(format_summary(self.sparse_summary))
        self._selection_log.pending = summary_metrics(self.sparse_summary)

    def _select_neurons(self) -> dict[str, torch.Tensor]:
        cfg = self.sparse_config
        layers = find_target_layers(self.model, cfg.target_modules)
        needs_data = cfg.importance in DATA_IMPORTANCE_NAMES
        batches = self._calibration_batches() if needs_data else None
        partitioned = model_is_partitioned(self.model)
        if needs_data and not partitioned and not self.is_model_parallel and not loaded_with_bitsandbytes(self.model):
            # DeepSpeed leaves the model on the CPU until its engine exists; calibration batches go to args.device
            # (a bitsandbytes model sits where its device_map put it; transformers 4.57 refuses to move an 8-bit one)
            self.model.to(self.args.device)
        # ZeRO-3: a calibration forward needs whole weights, gathered once for the scoring (weight-only criteria
        # gather one layer at a time inside importance.py)
        gather = gathered(self.model.parameters()) if needs_data and partitioned else contextlib.nullcontext()
        with gather:
            scores = score_neurons(self.model, layers, cfg, batches=batches, loss_fn=self._calibration_loss,
                                   progress=self.is_local_process_zero() and not self.args.disable_tqdm)
        scores = _sum_over_ranks(scores, self.args.device)
        if self.is_world_process_zero():
            warn_unscored_layers(scores, cfg.importance)
        return _same_on_every_rank(select_neurons(scores, cfg, head_groups(self.model, layers, cfg)))

    def _calibration_loss(self, model, batch) -> torch.Tensor:
        try:
            return self.compute_loss(model, batch)
        except ValueError as e:
            raise ValueError(f"importance={self.sparse_config.importance!r} needs a loss on the calibration batches "
                             f"(do the training examples have labels?): {e}") from e

    def _calibration_batches(self) -> Iterator[dict]:
        """The first `calibration_batches` batches (split over ranks) of a seeded shuffle of the train set, with
        the Trainer's own collator and column handling; the global RNG is left alone."""
        cfg, ds = self.sparse_config, self.train_dataset
        collator = self.data_collator
        try:
            import datasets
            if isinstance(ds, datasets.Dataset):
                ds = self._remove_unused_columns(ds, description="calibration")
            else:
                collator = self._get_collator_with_removed_columns(collator, description="calibration")
        except ImportError:
            collator = self._get_collator_with_removed_columns(collator, description="calibration")
        world, rank = self.args.world_size, self.args.process_index
        sampler = None if isinstance(ds, IterableDataset) else DistributedSampler(
            ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
        loader = DataLoader(ds, batch_size=self._train_batch_size, sampler=sampler, collate_fn=collator)
        per_rank = math.ceil(cfg.calibration_batches / world)
        for i, batch in enumerate(loader):
            if i >= per_rank:
                break
            yield self._prepare_inputs(batch)

    # ---- training ---------------------------------------------------------------------------------------
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
        resume_patch = _deepspeed_resume_without_frozen_weights() if (
            resume_from_checkpoint and self.is_deepspeed_enabled) else contextlib.nullcontext()
        with resume_patch:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _slices_among(self, params: list) -> list:
        """The slice tensors among an optimizer's parameters; all of them when it holds none by identity
        (DeepSpeed steps flattened partitions of the slices)."""
        ids = {id(p) for m in sliced_modules(self.model).values() for p in (m.delta, m.bias_delta) if p is not None}
        slices = [p for p in params if id(p) in ids]
        return slices if slices else params

    def create_optimizer(self, model=None):
        """SliceAdamW over the slices only (also what DeepSpeed wraps: ship configs without an optimizer block).
        `optimizer_cls_and_kwargs=` builds another optimizer over the slices; one passed as `optimizers=` is used
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
        if getattr(self, "optimizer_cls_and_kwargs", None) is not None:
            self._sparse_optimizer = super().create_optimizer()
            return self._sparse_optimizer
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("no trainable slices: call train() (or prepare_sparse_model()) before create_optimizer")
        if "adamw" not in str(self.args.optim).lower():
            logger.warning(f"optim={self.args.optim} is ignored: {type(self).__name__} uses SliceAdamW "
                           "(set SparseNeuronConfig.optimizer_state for compressed moments)")
        groups = [{"params": [p for n, p in named if not n.endswith("bias_delta")], "weight_decay": self.args.weight_decay},
                  {"params": [p for n, p in named if n.endswith("bias_delta")], "weight_decay": 0.0}]
        self.optimizer = SliceAdamW([g for g in groups if g["params"]], lr=self.args.learning_rate,
                                    betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon,
                                    state_dtype=self.sparse_config.optimizer_state)
        self._sparse_optimizer = self.optimizer
        return self._guard_optimizer(self.optimizer)

    # ---- saving and loading: slices + indices only, never the frozen base -------------------------------
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
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
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


class SparseNeuronTrainer(SparseNeuronMixin, Trainer):
    """Drop-in `Trainer` replacement; every Trainer argument works as usual, plus `sparse_config`.

    Callbacks may define `on_neurons_selected(args, state, control, model, selection, summary)`; it is
    called once the slices are in place, before the optimizer exists."""


@contextlib.contextmanager
def _quantized_base_accepted(model):
    """Let `Trainer.__init__` take a bitsandbytes-quantized model whose trainable parameters are our slices.

    transformers refuses a model with `is_quantized` unless it is a PEFT model or carries PEFT adapters: 4.57 checks
    inline in `Trainer.__init__`, 5.x in `trainer_utils.validate_quantization_for_training`; both skip the model when
    `model._hf_peft_config_loaded` is set (PeftAdapterMixin.load_adapter sets it). We set that flag only while
    `Trainer.__init__` runs (nothing else there reads it in 4.57 or 5.x) and restore it right after, so
    save_pretrained, gradient checkpointing and every `_is_peft_model` path (saving, resuming, FSDP, DeepSpeed) see
    the truth afterwards: a plain transformers model. Rejected: leaving the flag set (save_pretrained would then
    try to save a PEFT adapter), patching validate_quantization_for_training (absent in 4.57), wrapping the model in
    a PeftModel (changes every save/load path). A compiled model keeps HF's check; other quantization methods get
    a clear error here."""
    if not getattr(model, "is_quantized", False) or getattr(model, "_hf_peft_config_loaded", False) \
            or hasattr(model, "_orig_mod"):
        yield
        return
    if not loaded_with_bitsandbytes(model):
        method = getattr(model, "quantization_method", None) or "an unknown method"
        raise ValueError(f"SparseNeuronTrainer trains slices over full-precision or bitsandbytes 4/8-bit bases; this "
                         f"model is quantized with {method}, which it cannot dequantize or merge")
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        del model._hf_peft_config_loaded  # back to the class default (False)


@contextlib.contextmanager
def _deepspeed_resume_without_frozen_weights():
    """Our DeepSpeed checkpoints exclude frozen weights, but the Trainer loads them strictly unless the model is
    a PeftModel; the slices themselves come from the sparse adapter, so a non-strict module load is right."""
    import transformers.trainer as hf_trainer
    original = hf_trainer.deepspeed_load_checkpoint

    def load(engine, path, load_module_strict=True):
        return original(engine, path, load_module_strict=False)
    hf_trainer.deepspeed_load_checkpoint = load
    try:
        yield
    finally:
        hf_trainer.deepspeed_load_checkpoint = original


def _sum_over_ranks(scores: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return scores
    names = list(scores)
    flat = torch.cat([scores[n].float().flatten() for n in names]).to(device)
    dist.all_reduce(flat)
    return dict(zip(names, flat.cpu().split([scores[n].numel() for n in names])))


def _same_on_every_rank(selection: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's choice, everywhere: ranks must train the same neurons even if float sums differ in the last bit."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return selection
    box = [{n: idx.tolist() for n, idx in selection.items()}]
    dist.broadcast_object_list(box, src=0)
    return {n: torch.tensor(idx, dtype=torch.long) for n, idx in box[0].items()}
