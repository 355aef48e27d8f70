"""`SparseNeuronConfig.modules_to_save`: whole modules (a classification head, a resized embedding) trained in
full next to the slices, saved in the adapter under "modules_to_save.<parameter name>" and kept by merge_sparse."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.utils import logging

from ..config import dtype_name
from .targets import _matching
from ..integrations.zero3 import gathered

logger = logging.get_logger(__name__)
PREFIX = "modules_to_save."
# task heads that a *For<Task> class initialises at random when loaded from a base checkpoint
_TASK_HEADS = {"ForSequenceClassification": ("score", "classifier"), "ForTokenClassification": ("score", "classifier"),
               "ForQuestionAnswering": ("qa_outputs",)}


def modules_to_save(model: nn.Module, names: Optional[list[str]]) -> dict[str, nn.Module]:
    """name -> module for every module `names` selects (exact or dotted suffix); every entry must match one."""
    if not names:
        return {}
    found, matched = {}, set()
    for name, module in model.named_modules():
        hits = _matching(name, names) if name else []
        if hits and not any(name.startswith(f + ".") for f in found):  # a module inside one saved already
            found[name] = module
        matched.update(hits)
    unmatched = [n for n in names if n not in matched]
    if unmatched:
        raise ValueError(f"modules_to_save entries {unmatched} match no module of {type(model).__name__} "
                         f"(its top-level modules: {[n for n, _ in model.named_children()]})")
    return found


def check_not_sliced(saved: dict[str, nn.Module], sliced: list[str]) -> None:
    """A module trained in full cannot also hold slices (its weight would be trained twice)."""
    both = [s for s in sliced for m in saved if s == m or s.startswith(m + ".")]
    if both:
        raise ValueError(f"{both[:3]} are both sliced (target_modules) and trained in full (modules_to_save); "
                         "remove them from one of the two")


def full_parameters(model: nn.Module, names: Optional[list[str]]) -> dict[str, nn.Parameter]:
    """"modules_to_save.<parameter name>" -> parameter, for every parameter of the modules to save."""
    return {f"{PREFIX}{module_name}.{n}" if module_name else f"{PREFIX}{n}": p
            for module_name, module in modules_to_save(model, names).items()
            for n, p in module.named_parameters()}


def train_in_full(model: nn.Module, names: Optional[list[str]]) -> None:
    for p in full_parameters(model, names).values():
        p.requires_grad_(True)


def full_state(model: nn.Module, names: Optional[list[str]]) -> dict[str, torch.Tensor]:
    """The full modules' tensors on CPU (gathered under ZeRO-3: every rank must call it)."""
    params = full_parameters(model, names)
    with gathered(list(params.values())):
        return {key: p.detach().cpu().clone() for key, p in params.items()}


def full_metadata(tensors: dict[str, torch.Tensor]) -> dict:
    return {key.removeprefix(PREFIX): {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
            for key, t in tensors.items() if key.startswith(PREFIX)}


def check_full_tensors(names: Optional[list[str]], meta: Optional[dict], tensors: dict, where: str) -> set[str]:
    """The json's "modules_to_save" section and the tensors agree, and exist exactly when the config names modules.
    Returns the tensor keys it accounts for."""
    if not names:
        if meta:
            raise ValueError(f"{where}: records modules_to_save tensors {sorted(meta)[:4]}, but its config has none")
        return set()
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"{where}: its config says modules_to_save={names!r}, but it records no such tensors")
    for key, entry in meta.items():
        tensor = tensors.get(PREFIX + key)
        if tensor is None:
            raise ValueError(f"{where}: lacks the modules_to_save tensor {key!r}")
        if not isinstance(entry, dict) or full_metadata({PREFIX + key: tensor})[key] != entry:
            raise ValueError(f"{where}: modules_to_save tensor {key!r} is {list(tensor.shape)} {tensor.dtype}, "
                             f"its metadata says {entry!r}")
    return {PREFIX + key for key in meta}


def check_full_fits(model: nn.Module, names: Optional[list[str]], tensors: dict) -> None:
    """Each saved full tensor is a parameter of `model` of that shape, and the model has no other such parameter."""
    params = full_parameters(model, names)
    saved = {k for k in tensors if k.startswith(PREFIX)}
    if set(params) != saved:
        raise ValueError(f"adapter is for a different model: its modules_to_save tensors "
                         f"{sorted(saved ^ set(params))[:4]} differ from this model's")
    for key, p in params.items():
        if tuple(p.shape) != tuple(tensors[key].shape):
            raise ValueError(f"adapter is for a different model shape: {key.removeprefix(PREFIX)!r} is "
                             f"{tuple(p.shape)} here, {tuple(tensors[key].shape)} in the adapter")


@torch.no_grad()
def copy_full_into(model: nn.Module, names: Optional[list[str]], tensors: dict) -> None:
    for key, p in full_parameters(model, names).items():
        with gathered([p], modifier_rank=0):
            p.copy_(tensors[key])
        p.requires_grad_(True)


def warn_untrained_head(model: nn.Module, names: Optional[list[str]], sliced: list[str]) -> None:
    """A task model's head is new (random) when loaded from a base checkpoint: say so when nothing trains it."""
    cls = type(model).__name__
    heads = next((h for suffix, h in _TASK_HEADS.items() if cls.endswith(suffix)), ())
    saved = modules_to_save(model, names)
    for head in heads:
        if hasattr(model, head) and head not in saved and not any(s.startswith(head) for s in sliced):
            logger.warning(f"{cls}.{head} is not trained: it is initialised at random when the model is loaded from "
                           f"a base checkpoint, so its outputs stay random; add modules_to_save=[{head!r}] to the "
                           "SparseNeuronConfig.")
