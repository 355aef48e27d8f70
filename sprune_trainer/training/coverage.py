"""Which of the model's weights the run covers: sliced layers, fully trained modules, or nothing. A weight that is
neither (a layer type the slicer does not know, experts of an unknown layout, a router) stays frozen, so a model whose
bulk is such weights would train only a sliver of itself; `warn_uncovered` names every large one instead of letting
that pass in silence."""
from __future__ import annotations

import re
from collections import defaultdict

from torch import nn
from transformers.utils import logging

from ..layers.linear_like import source_parameters
from ..layers.sliced_linear import SlicedLinear
from .summary import logical_numel

logger = logging.get_logger(__name__)


def _owners(model: nn.Module):
    """(parameter name, parameter, owning module) for every parameter, each tensor once."""
    seen = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield (f"{mod_name}.{p_name}" if mod_name else p_name), p, module


def _in_sliced_layer(model: nn.Module) -> set[int]:
    """ids of the parameters under a slice (a fused MoE expert tensor counts once any of its experts has one)."""
    return {id(p) for m in model.modules() if isinstance(m, SlicedLinear) for p in source_parameters(m.base_layer)}


def coverage_by_type(model: nn.Module) -> dict[str, dict[str, int]]:
    """Module type -> {"params": its parameters, "sliced": those in sliced layers, "trained": those trained in
    full}: what the run reaches, by the kind of module that holds the weights."""
    sliced = _in_sliced_layer(model)
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"params": 0, "sliced": 0, "trained": 0})
    for _, p, module in _owners(model):
        if isinstance(module, SlicedLinear):
            continue  # its own slices; the base weights count under the base layer's type
        n = logical_numel(p)
        row = out[type(module).__name__]
        row["params"] += n
        row["sliced"] += n if id(p) in sliced else 0
        row["trained"] += n if p.requires_grad else 0
    return dict(out)


def uncovered_weights(model: nn.Module, min_share: float = 0.01) -> list[tuple[str, str, float]]:
    """(name, module type, share of the model) of every weight holding >= min_share of the model's parameters that
    is neither in a sliced layer nor trained, nor an embedding or the output head (frozen on purpose)."""
    sliced = _in_sliced_layer(model)
    rows = list(_owners(model))
    total = sum(logical_numel(p) for _, p, m in rows if not isinstance(m, SlicedLinear))  # the model, not its slices
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = []
    for name, p, module in rows:
        if (id(p) in sliced or p.requires_grad or isinstance(module, (nn.Embedding, SlicedLinear))
                or module is head):
            continue
        share = logical_numel(p) / max(total, 1)
        if share >= min_share:
            out.append((name, type(module).__name__, share))
    return out


def warn_uncovered(model: nn.Module, min_share: float = 0.01, limit: int = 6) -> list[tuple[str, str, float]]:
    """One warning naming the large weights the run leaves frozen (grouped over layers), with their shares."""
    found = uncovered_weights(model, min_share)
    if not found:
        return found
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for name, kind, share in found:
        groups[(re.sub(r"\.\d+\.", ".*.", name), kind)].append(share)
    listed = sorted(groups.items(), key=lambda kv: -sum(kv[1]))
    shown = "; ".join(f"{pattern} ({kind}, {len(s)} tensor{'s' if len(s) > 1 else ''}, {100 * sum(s):.1f}%)"
                      for (pattern, kind), s in listed[:limit])
    more = f"; and {len(listed) - limit} more groups" if len(listed) > limit else ""
    total = 100 * sum(s for _, _, s in found)
    logger.warning(f"{len(found)} weights holding {total:.1f}% of the model's parameters are neither sliced nor "
                   f"trained, so they stay frozen: {shown}{more}. Slice linear layers (nn.Linear, Conv1D, MoE experts) "
                   "through target_modules, train a module in full through modules_to_save, or leave them frozen if "
                   "that is what you want.")
    return found
