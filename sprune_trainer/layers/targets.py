"""Which linear layers of a model get trainable neuron slices (linear_like: nn.Linear, Conv1D, MoE experts)."""
from __future__ import annotations

import re

from torch import nn

from .experts import expose_experts
from .linear_like import is_sliceable

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


def routers(model: nn.Module) -> dict[str, nn.Module]:
    """The linears an MoE block routes with (Mixtral's `gate`, Qwen2-MoE's `shared_expert_gate`): the direct linear
    children of a module that holds `experts`. Their rows are the experts (or one gate): trained whole through
    modules_to_save or not at all, never sliced."""
    found = {}
    for name, module in model.named_modules():
        if "experts" in module._modules:
            for child_name, child in module.named_children():
                if child_name != "experts" and is_sliceable(child):
                    found[f"{name}.{child_name}" if name else child_name] = child
    return found


def _matching(name: str, targets) -> list:
    """The entries of `targets` that select module `name` (for a regex string: the string itself)."""
    if isinstance(targets, str):  # a regex over the full module name, as in PEFT
        return [targets] if re.fullmatch(targets, name) is not None else []
    return [t for t in targets if name == t or name.endswith("." + t)]


def find_target_layers(model: nn.Module, target_modules=None) -> dict[str, nn.Module]:
    """Map module name -> linear layer to slice, in `named_modules` order.

    `target_modules=None` takes every linear (nn.Linear, which bitsandbytes' Linear4bit/Linear8bitLt subclass,
    transformers' Conv1D, and each expert's projections of a fused MoE experts module, exposed here as
    `experts.<e>.<projection>`) except the output head and MoE routers; explicit targets must all be such linears,
    every entry of a list must match a module (a typo would otherwise train fewer layers than asked, silently), and
    embeddings/heads/routers are refused with a clear error."""
    from .sliced_linear import SlicedLinear  # local import: sliced_linear imports nothing from here

    expose_experts(model)
    excluded = _never_sliced(model)
    router_ids = {id(m) for m in routers(model).values()}
    found: dict[str, nn.Module] = {}
    matched: set = set()
    for name, module in model.named_modules():
        if ".base_layer" in name or not name:
            continue
        if target_modules is None:
            if is_sliceable(module) and id(module) not in excluded and id(module) not in router_ids:
                found[name] = module
            continue
        hits = _matching(name, target_modules)
        matched.update(hits)
        if not hits or isinstance(module, SlicedLinear):  # a sliced layer is matched, but sliced already
            continue
        if id(module) in excluded:
            raise ValueError(f"target_modules matched {name!r} ({type(module).__name__}): embeddings and output "
                             "heads are never sliced (tied weights, vocabulary rows); remove it from target_modules.")
        if id(module) in router_ids:
            raise ValueError(f"target_modules matched {name!r}, an MoE router: its rows are the experts, so it is "
                             "never sliced; train it in full through modules_to_save, or drop it from target_modules.")
        if not is_sliceable(module):
            raise ValueError(f"target_modules matched {name!r}, a {type(module).__name__}, not a linear layer; "
                             "only nn.Linear (and bitsandbytes 4/8-bit linears), transformers' Conv1D and MoE "
                             "expert projections can be sliced: train it in full through modules_to_save, or drop "
                             "it from target_modules.")
        found[name] = module
    unmatched = [t for t in ([target_modules] if isinstance(target_modules, str) else target_modules or [])
                 if t not in matched]
    if not found or unmatched:
        what = ("no linear layers" if target_modules is None else
                f"target_modules={target_modules!r} matched nothing" if not matched else
                f"target_modules entries {unmatched} matched no module" if unmatched else
                f"target_modules={target_modules!r} matched only layers that are sliced already")
        raise ValueError(f"Cannot apply sparse-neuron fine-tuning: {what} in {type(model).__name__}. "
                         "Linear names here include: " + ", ".join(_linear_name_examples(model)))
    return found


def _linear_name_examples(model: nn.Module, limit: int = 8) -> list[str]:
    suffixes = []
    for name, module in model.named_modules():
        short = name.split(".")[-1]
        if is_sliceable(module) and short not in suffixes:
            suffixes.append(short)
    return suffixes[:limit] or ["(none)"]
