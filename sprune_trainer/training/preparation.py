"""`SlicePreparationMixin`: the trainer's side of choosing and putting in the slices, at the start of `train()`:
check the budgets, score the neurons on calibration batches the Trainer's own way (collator, columns, device),
select them the same on every rank, inject the slices (or take them from the checkpoint being resumed) and report
the selection."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.distributed import DistributedSampler
from transformers.utils import logging

from .. import _hf_internals as _hf
from ..config import DATA_IMPORTANCE_NAMES
from ..integrations.zero3 import gathered, model_is_partitioned
from ..io.adapter import check_adapter_fits, copy_adapter_into, read_sparse_adapter
from ..layers.full_modules import modules_to_save
from ..layers.linear_like import linear_shape
from ..layers.quantization import check_zero3_quant_storage, loaded_with_bitsandbytes
from ..layers.surgery import inject_slices, layers_to_quantize, sliced_modules
from ..layers.targets import find_target_layers
from ..scoring.heads import head_groups
from ..scoring.importance import score_neurons
from ..scoring.selection import coupled_groups, layer_budget, select_neurons
from .coverage import warn_uncovered
from .summary import format_summary, selection_summary, summary_metrics, warn_unscored_layers

logger = logging.get_logger(__name__)


class SlicePreparationMixin:
    """Scoring, selection and surgery for `SparseNeuronMixin` (which sets `sparse_config` and `_selection_log`)."""

    def _check_budgets(self) -> None:
        cfg = self.sparse_config
        layers = find_target_layers(self.model, cfg.target_modules)
        for name, layer in layers.items():
            layer_budget(linear_shape(layer)[1 if cfg.axis == "columns" else 0], cfg, name)  # coupled: rows' budget
        head_groups(self.model, layers, cfg)  # head_balanced without heads to balance: fail before scoring
        if cfg.importance in DATA_IMPORTANCE_NAMES and self.train_dataset is None:
            raise ValueError(f"importance={cfg.importance!r} scores neurons on training batches: pass train_dataset")
        layers_to_quantize(self.model, cfg)  # quantize_base / low-error init on an already quantized model
        if cfg.quantize_base and model_is_partitioned(self.model):
            raise ValueError("quantize_base needs whole full-precision weights, but this model is ZeRO-3 partitioned "
                             "(created after TrainingArguments(deepspeed=<ZeRO-3 config>)): create the model before "
                             "the TrainingArguments, or load it with a BitsAndBytesConfig and leave quantize_base "
                             "unset")

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
        if self.is_world_process_zero():
            warn_uncovered(self.model)
        if cfg.quantize_base:
            self._check_zero3_quantized_base()  # the 4-bit layers quantize_base just made
        if _hf.trainer_checkpoints(self.args):
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
        self.sparse_summary = selection_summary(self.model, self.sparse_config.optimizer_state,
                                                self.sparse_config.compensated_update)
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
        # a run that needs checkpointing to fit in training needs it in scoring too
        checkpointing = _hf.checkpointing_as_in_training(self.model, self.args) if needs_data else \
            contextlib.nullcontext()
        with gather, checkpointing:
            scores = score_neurons(self.model, layers, cfg, batches=batches, loss_fn=self._calibration_loss,
                                   progress=self.is_local_process_zero() and not self.args.disable_tqdm)
        scores = _sum_over_ranks(scores, self.args.device)
        if self.is_world_process_zero():
            warn_unscored_layers(scores, cfg.importance)
        return _same_on_every_rank(select_neurons(scores, cfg, head_groups(self.model, layers, cfg),
                                                  coupled_groups(self.model, layers, cfg)))

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
                ds = _hf.dataset_without_unused_columns(self, ds, "calibration")
            else:
                collator = _hf.collator_without_unused_columns(self, collator, "calibration")
        except ImportError:
            collator = _hf.collator_without_unused_columns(self, collator, "calibration")
        world, rank = self.args.world_size, self.args.process_index
        sampler = None if isinstance(ds, IterableDataset) else DistributedSampler(
            ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
        loader = DataLoader(ds, batch_size=_hf.train_batch_size(self), sampler=sampler, collate_fn=collator)
        per_rank = math.ceil(cfg.calibration_batches / world)
        used = 0
        for batch in loader:
            if used >= per_rank:
                break
            yield _hf.prepare_inputs(self, batch)
            used += 1
        if used < per_rank:  # reached only when the data ran out: the scorer stops pulling at its budget
            ranks = f" on rank {rank} of {world}" if world > 1 else ""
            logger.warning(f"importance={cfg.importance!r} scored {used} calibration batches{ranks}, not the "
                           f"{per_rank} asked for (calibration_batches={cfg.calibration_batches}): the train "
                           f"dataloader{ranks} yields only {used} batches of {_hf.train_batch_size(self)}")


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
