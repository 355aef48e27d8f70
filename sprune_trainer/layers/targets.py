"""Which linear layers of a model get trainable neuron slices."""
from __future__ import annotations

import re

from torch import nn

# Output heads whose rows are a task's classes or the vocabulary: trained whole or not at all, never sliced.
_HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs")


def _never_sliced(model: nn.Module) -> set[int]:
    """ids of the embeddings and output head (tied to the embedding in many LMs)."""
    ids = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        module = fn() if callable(fn) else None
        if module is not None:
            ids.add(id(module))
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or name.split(".")[-1] in _HEAD_NAMES:
            ids.add(id(module))
    return ids


def _matching(name: str, targets) -> list:
    """The entries of `targets` that select module `name` (for a regex string: the string itself)."""
    if isinstance(targets, str):  # a regex over the full module name, as in PEFT
        return [targets] if re.fullmatch(targets, name) is not None else []
    return [t for t in targets if name == t or name.endswith("." + t)]


def find_target_layers(model: nn.Module, target_modules=None) -> dict[str, nn.Linear]:
    """Map module name -> linear layer to slice, in `named_modules` order.

    `target_modules=None` takes every nn.Linear (bitsandbytes' Linear4bit/Linear8bitLt subclass it) except the
    output head; explicit targets must all be linears, every entry of a list must match a module (a typo would
    otherwise train fewer layers than asked, silently), and embeddings/heads are refused with a clear error."""
    from .sliced_linear import SlicedLinear  # local import: sliced_linear imports nothing from here

    excluded = _never_sliced(model)
    found: dict[str, nn.Linear] = {}
    matched: set = set()
    for name, module in model.named_modules():
        if ".base_layer" in name or not name:
            continue
        if target_modules is None:
            if isinstance(module, nn.Linear) and id(module) not in excluded and not isinstance(module, SlicedLinear):
                found[name] = module
            continue
        hits = _matching(name, target_modules)
        matched.update(hits)
        if not hits or isinstance(module, SlicedLinear):  # a sliced layer is matched, but sliced already
            continue
        if id(module) in excluded:
            raise ValueError(f"target_modules matched {name!r} ({type(module).__name__}): embeddings and output "
                             "heads are never sliced (tied weights, vocabulary rows); remove it from target_modules.")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"target_modules matched {name!r}, a {type(module).__name__}, not a linear layer; "
                             "only nn.Linear (and bitsandbytes 4/8-bit linears) can be sliced: train it in full "
                             "through modules_to_save, or drop it from target_modules.")
        found[name] = module
    unmatched = [t for t in ([target_modules] if isinstance(target_modules, str) else target_modules or [])
                 if t not in matched]
    if not found or unmatched:
        what = ("no nn.Linear layers" if target_modules is None else
                f"target_modules={target_modules!r} matched nothing" if not matched else
                f"target_modules entries {unmatched} matched no module" if unmatched else
                f"target_modules={target_modules!r} matched only layers that are sliced already")
        conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
        why = (f" Its {len(conv1d)} projections (e.g. {conv1d[0]}) are transformers' Conv1D (GPT-2's transposed "
               "linear), which cannot be sliced yet." if conv1d else "")
        raise ValueError(f"Cannot apply sparse-neuron fine-tuning: {what} in {type(model).__name__}.{why} "
                         "Linear names here include: " + ", ".join(_linear_name_examples(model)))
    return found


def _linear_name_examples(model: nn.Module, limit: int = 8) -> list[str]:
    suffixes = []
    for name, module in model.named_modules():
        short = name.split(".")[-1]
        if isinstance(module, nn.Linear) and short not in suffixes:
            suffixes.append(short)
    return suffixes[:limit] or ["(none)"]
