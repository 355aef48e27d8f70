"""Module surgery: put `SlicedLinear` wrappers in place of the chosen linears, and take them out (merge)."""
from __future__ import annotations

import torch
from torch import nn

from .config import SparseNeuronConfig
from .sliced_linear import SlicedLinear, slice_dtype_for

CONFIG_ATTR = "sparse_neuron_config"  # the model remembers how it was sliced, for save_sparse_adapter


def sliced_modules(model: nn.Module) -> dict[str, SlicedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SlicedLinear)}


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def inject_slices(model: nn.Module, selection: dict[str, torch.Tensor], config: SparseNeuronConfig) -> dict[str, SlicedLinear]:
    """Freeze every parameter of `model`, then wrap each selected linear. Returns name -> SlicedLinear,
    sorted by name so the optimizer's parameter order never depends on dict order."""
    if sliced_modules(model):
        raise ValueError("model already has sparse-neuron slices; merge_sparse() it or load into a fresh model")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = {}
    for name in sorted(selection):
        parent, child = _parent(model, name)
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{name} is a {type(base).__name__}, not a linear layer")
        layer = SlicedLinear(base, selection[name], axis=config.axis,
                             dtype=slice_dtype_for(base, config.slice_dtype), train_bias=config.train_bias)
        setattr(parent, child, layer)
        wrapped[name] = layer
    setattr(model, CONFIG_ATTR, config)
    return wrapped


def trainable_slice_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def merge_sparse(model: nn.Module) -> nn.Module:
    """Fold every slice into its base weight (W[I] += delta) and put the plain base linear back: the result is
    an ordinary dense model (e.g. for `save_pretrained`). Works in place and returns `model`."""
    layers = sliced_modules(model)
    if not layers:
        raise ValueError("model has no sparse-neuron slices to merge")
    for name, layer in layers.items():
        layer.merge()
        parent, child = _parent(model, name)
        setattr(parent, child, layer.base_layer)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model
