"""Every private member of transformers (and TRL) the package relies on, and every patch it applies to their objects.

Checked against transformers 4.57 and 5.2x (CI runs the Trainer tests on both). When a transformers release breaks
the package, look here first.

Private `Trainer` methods the mixins override (they stay methods of the mixin classes, listed in
`OVERRIDDEN_TRAINER_METHODS`):
  _save(output_dir, state_dict)                training/saving.py: the sparse adapter instead of the full weights
  _save_checkpoint(model, trial, ...)          training/saving.py: brackets the save with the completeness marker
  _save_optimizer_and_scheduler(output_dir)    training/saving.py: DeepSpeed's checkpoint without frozen weights
  _load_from_checkpoint(path, model)           training/saving.py: an adapter folder loads into the slices
  _load_best_model()                           training/saving.py: the best checkpoint is an adapter folder
  _clip_grad_norm(model)                       training/nonfinite.py: reuses the clipping norm (5.x only; 4.57 clips
                                               inline, and the guard then computes the norm itself);
                                               training/run_constants.py: the parameter list found once per run
  _get_grad_norm(model, grad_norm)             training/run_constants.py: the same list when clipping is off (5.x)
  floating_point_ops(inputs) (public)          training/run_constants.py: the parameter count found once per run

Private `Trainer` members called (through the functions below):
  _remove_unused_columns(dataset, description)            calibration batches drop the columns the model ignores
  _get_collator_with_removed_columns(collator, description)  the same for datasets that are not `datasets.Dataset`
  _train_batch_size                                       calibration batches as large as training's
  _prepare_inputs(batch)                                  calibration batches on the device, as training's
  _get_output_dir(trial)                                  where `_save_checkpoint` writes `checkpoint-N/`

What `Trainer.train` does that scoring, which runs before it, repeats the same way:
  activation (gradient) checkpointing         `checkpointing_as_in_training`: 5.2x `args.activation_checkpointing`
                                              (+ `_kwargs`, with `every_n_layers` / `offload` taken out) through
                                              `activation_checkpointing_enable`; 4.57 `args.gradient_checkpointing`
                                              (+ `_kwargs`) through `gradient_checkpointing_enable`. Unset
                                              use_reentrant is each version's default (4.57 True, 5.2x False).

Patches, each undone when its purpose is served:
  quantized_base_accepted                 sets `model._hf_peft_config_loaded` while `Trainer.__init__` runs
  deepspeed_resume_without_frozen_weights replaces `transformers.trainer.deepspeed_load_checkpoint` while resuming
  after_trainer_state_saved               wraps `TrainerState.save_to_json` on the instance while a checkpoint saves
  replace_step                            gives the Trainer's optimizer / LR scheduler a subclass with another `step`
  refuse_save_pretrained                  an instance `save_pretrained` that refuses while the model holds slices
Private `transformers.integrations.moe` member (5.x): `_grouped_mm(input, weight, offs)`, the grouped matmul its
  `grouped_mm` experts implementation runs (torch's kernel, or its own fallback where that cannot run), which
  layers/grouped_experts.py runs too, so sliced experts go through the kernel the model's own experts use.
Private TRL members: `TRL_BOOKKEEPING` (trl 1.2 .. 1.16)."""
from __future__ import annotations

import contextlib
import os

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .layers.quantization import loaded_with_bitsandbytes

OVERRIDDEN_TRAINER_METHODS = ("_save", "_save_checkpoint", "_save_optimizer_and_scheduler", "_load_from_checkpoint",
                              "_load_best_model", "_clip_grad_norm", "_get_grad_norm")
CALLED_TRAINER_METHODS = ("_remove_unused_columns", "_get_collator_with_removed_columns", "_prepare_inputs",
                          "_get_output_dir")

# what TRL's compute_loss appends to / adds up on every call; a calibration forward puts them back afterwards
TRL_BOOKKEEPING = ("_metrics", "_total_train_tokens")


# ---- private Trainer members the package calls ------------------------------------------------------------
def dataset_without_unused_columns(trainer, dataset, description: str):
    return trainer._remove_unused_columns(dataset, description=description)


def collator_without_unused_columns(trainer, collator, description: str):
    return trainer._get_collator_with_removed_columns(collator, description=description)


def train_batch_size(trainer) -> int:
    return trainer._train_batch_size


def prepare_inputs(trainer, batch):
    return trainer._prepare_inputs(batch)


def checkpoint_folder(trainer, trial) -> str:
    """The `checkpoint-N` folder `Trainer._save_checkpoint` is about to write for the current step."""
    return os.path.join(trainer._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")


# ---- what Trainer.train does, done earlier ------------------------------------------------------------------
def trainer_checkpoints(args) -> bool:
    """Whether Trainer.train turns activation checkpointing on (`gradient_checkpointing` is 5.2x's alias)."""
    return bool(getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False))


def model_checkpoints(model) -> bool:
    """Whether some module of `model` checkpoints (the flag transformers' enable/disable set, in 4.57 and 5.x)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def enable_checkpointing(model, kwargs) -> None:
    """Turn checkpointing on as Trainer.train does with these `activation_checkpointing_kwargs` (5.2x) /
    `gradient_checkpointing_kwargs` (4.57), None included."""
    if hasattr(model, "activation_checkpointing_enable"):
        kwargs = dict(kwargs or {})
        every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None,
                                              every_n_layers=every_n_layers, offload=offload)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


@contextlib.contextmanager
def checkpointing_as_in_training(model, args):
    """Inside the block `model` checkpoints as Trainer.train will make it (same kwargs: use_reentrant and the
    rest), and afterwards is as it was. Nothing changes when `args` do not ask for checkpointing or the model
    checkpoints already (with the user's own settings)."""
    if not trainer_checkpoints(args) or model_checkpoints(model):
        yield
        return
    kwargs = getattr(args, "activation_checkpointing_kwargs", None)
    enable_checkpointing(model, kwargs if kwargs is not None else getattr(args, "gradient_checkpointing_kwargs", None))
    try:
        yield
    finally:
        disable_checkpointing(model)


# ---- patches ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quantized_base_accepted(model):
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
def deepspeed_resume_without_frozen_weights():
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


@contextlib.contextmanager
def after_trainer_state_saved(state, callback):
    """Inside the block, `callback(json_path)` runs right after every `state.save_to_json(json_path)`: the Trainer
    has no hook between writing a checkpoint's trainer_state.json (its last file) and rotating old checkpoints out,
    in 4.57 or 5.x."""
    save_to_json = state.save_to_json

    def save_then_call(json_path: str) -> None:
        save_to_json(json_path)
        callback(json_path)
    state.save_to_json = save_then_call
    try:
        yield
    finally:
        del state.save_to_json  # the class's method again


def replace_step(obj, step, owner):
    """Give `obj` (the optimizer or LR scheduler the Trainer steps) a subclass of its own class, same name, whose
    `step` is `step`; `owner` marks it, so a second call for the same owner changes nothing and one for a new owner
    replaces the old subclass. A subclass rather than an instance attribute: nothing lands in the object's __dict__
    (LRScheduler.state_dict() saves it, and it must stay picklable). Returns the class `obj` now has."""
    cls = type(obj)
    if getattr(cls, "_nonfinite_guard", None) is owner:
        return cls
    base = cls.__bases__[0] if hasattr(cls, "_nonfinite_guard") else cls
    replaced = type(base.__name__, (base,), {"step": step, "_nonfinite_guard": owner,
                                             "__module__": base.__module__, "__qualname__": base.__qualname__})
    obj.__class__ = replaced
    return replaced


def refuse_save_pretrained(model) -> None:
    """While the model holds unmerged slices its `save_pretrained` refuses (an instance attribute over the class's)."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained = _refuse_save_pretrained


def restore_save_pretrained(model) -> None:
    if model.__dict__.get("save_pretrained") is _refuse_save_pretrained:
        del model.__dict__["save_pretrained"]  # the class's save_pretrained again


def _refuse_save_pretrained(*args, **kwargs):
    raise ValueError("this model holds unmerged sparse-neuron slices: save_pretrained would write base_layer / delta "
                     "/ index keys that from_pretrained cannot read (it would re-initialise every sliced layer at "
                     "random). Save the adapter with save_sparse_adapter(model, dir), or a plain dense model with "
                     "merge_sparse(model).save_pretrained(dir).")


def grouped_mm(input, weight, offs):
    """transformers' grouped matmul: row block g of `input` (`offs`: cumulative block ends) times weight[g] (E, in,
    out)."""
    from transformers.integrations.moe import _grouped_mm

    return _grouped_mm(input, weight, offs=offs)
