"""Module surgery: put `SlicedLinear` wrappers in place of the chosen linears (quantizing their bases on request).
Taking them out again is merge.py."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from .._hf_internals import refuse_save_pretrained
from ..config import DATA_IMPORTANCE_NAMES, SparseNeuronConfig
from .experts import expose_experts, hide_experts
from .full_modules import check_not_sliced, modules_to_save, train_in_full, warn_untrained_head
from .linear_like import is_sliceable, linear_shape
from .neuron_groups import slice_axes
from .quantization import bnb_kind, dequantize_weight, import_bitsandbytes, quantize_4bit
from .sliced_linear import SlicedLinear, checked_index, slice_dtype_for
from .targets import find_target_layers

CONFIG_ATTR = "sparse_neuron_config"  # the model remembers how it was sliced, for save_sparse_adapter


def sliced_modules(model: nn.Module) -> dict[str, SlicedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SlicedLinear)}


def config_for_model(model: nn.Module, requested: Optional[SparseNeuronConfig]) -> SparseNeuronConfig:
    """The config a trainer of `model` works with: `requested` (default: 64 neurons per layer), or, for a model that
    carries slices already (load_sparse_adapter, quantize_with_sparse_correction, another trainer), the one they
    were made with, taking from `requested` only what the slices leave open (optimizer_state, ...). A requested
    config that describes other slices is refused rather than silently ignored."""
    current = getattr(model, CONFIG_ATTR, None) if sliced_modules(model) else None
    if current is None:
        return requested if requested is not None else SparseNeuronConfig(neurons_per_layer=64)
    if requested is None:
        return current
    diffs = {k: (getattr(requested, k), getattr(current, k)) for k in SparseNeuronConfig.SLICE_KEYS
             if getattr(requested, k) != getattr(current, k)}
    if diffs:
        raise ValueError("the model carries sparse-neuron slices already, made with a config that differs in "
                         + ", ".join(f"{k} (slices {b!r}, sparse_config {a!r})" for k, (a, b) in diffs.items())
                         + ": pass sparse_config=None to train those slices, or merge_sparse() the model first")
    return dataclasses.replace(requested, **{k: getattr(current, k) for k in SparseNeuronConfig.SELECTION_KEYS})


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def layers_to_quantize(model: nn.Module, config: SparseNeuronConfig) -> dict[str, nn.Linear]:
    """The full-precision linears `config.quantize_base` turns into 4-bit: every targeted linear (as QLoRA, also
    those that get no neurons). Raises a clear error when one is quantized already: its W is gone."""
    if config.quantize_base is None:
        return {}
    layers = find_target_layers(model, config.target_modules)
    other = next(((n, m) for n, m in layers.items() if not isinstance(m, nn.Linear)), None)
    if other is not None:
        raise ValueError(f"quantize_base={config.quantize_base!r} makes bitsandbytes 4-bit linears, but {other[0]} is a "
                         f"{type(other[1]).__name__} (Conv1D and MoE expert bases stay in full precision): leave such "
                         "layers out of target_modules, or leave quantize_base unset")
    done = next(((n, bnb_kind(m)) for n, m in layers.items() if bnb_kind(m)), None)
    if done is None:
        return layers
    name, kind = done
    if config.init_from_quantization_error:
        raise ValueError(
            f"init_from_quantization_error needs the full-precision weights, but {name} is already a {kind} "
            "bitsandbytes layer: a model loaded with a BitsAndBytesConfig has lost W, so W - dequant(Q(W)) cannot be "
            "formed. Load the model in full precision (e.g. dtype=torch.bfloat16, no quantization_config) and keep "
            f"quantize_base={config.quantize_base!r}: the slices' rows then start at the residual.")
    raise ValueError(f"quantize_base={config.quantize_base!r} quantizes a full-precision model, but {name} is already "
                     f"a {kind} bitsandbytes layer; leave quantize_base unset to train on this quantized base as it is.")


def inject_slices(model: nn.Module, selection: dict[str, torch.Tensor], config: SparseNeuronConfig,
                  slice_dtypes: Optional[dict[str, torch.dtype]] = None) -> dict[str, SlicedLinear]:
    """Freeze every parameter of `model`, then wrap each selected linear. Returns name -> SlicedLinear,
    sorted by name so the optimizer's parameter order never depends on dict order.

    Everything that can be checked is checked before the model is touched (names, layer types, indices,
    bitsandbytes), so an error leaves the model as it was. `slice_dtypes` (name -> dtype) overrides
    `config.slice_dtype` per layer (an adapter loads in the dtype it was saved in). `config.modules_to_save` stay
    trainable in full. With `config.quantize_base`
    every targeted linear becomes a 4-bit `bnb.nn.Linear4bit` first (one layer at a time, so the full-precision
    weight is freed as it goes); with `config.init_from_quantization_error` the slices start at
    (W - dequant(Q(W)))[I], so the selected rows reproduce W exactly. Until merge_sparse() takes the slices out,
    the model's `save_pretrained` refuses (it would write keys from_pretrained cannot read)."""
    if sliced_modules(model):
        raise ValueError("model already has sparse-neuron slices; merge_sparse() it or load into a fresh model")
    to_quantize = layers_to_quantize(model, config)
    axes = selection_axes(model, selection, config)
    selection = _checked_selection(model, selection, axes)
    check_not_sliced(modules_to_save(model, config.modules_to_save), sorted(set(selection) | set(to_quantize)))
    if to_quantize:
        import_bitsandbytes(f"quantize_base={config.quantize_base!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    train_in_full(model, config.modules_to_save)
    warn_untrained_head(model, config.modules_to_save, list(selection))
    wrapped = {}
    for name in sorted(set(selection) | set(to_quantize)):
        parent, child = parent_of(model, name)
        base = original = getattr(parent, child)
        if name in to_quantize:
            base = quantize_4bit(original.weight, original.bias, quant_type=config.quantize_base,
                                 double_quant=config.double_quant)
        if name in selection:
            dtype = (slice_dtypes or {}).get(name) or slice_dtype_for(base, config.slice_dtype)
            layer = SlicedLinear(base, selection[name], axis=axes[name], dtype=dtype, train_bias=config.train_bias,
                                 dropout=config.slice_dropout)
            layer.recompute_input = config.recomputes_slice_inputs
            if config.init_from_quantization_error:  # delta = (W - dequant(Q(W)))[I]
                with torch.no_grad():
                    layer.delta.copy_(layer.select(original.weight).float() - layer.select(dequantize_weight(base)))
            wrapped[name] = base = layer
        base.train(original.training)  # a model in eval mode stays so: no slice dropout, bnb's inference kernels
        setattr(parent, child, base)
    # experts modules that got no slice run their own forward again
    hide_experts(model, only_unsliced=True)
    setattr(model, CONFIG_ATTR, config)
    refuse_save_pretrained(model)  # merge_sparse takes it away
    return wrapped


def selection_axes(model: nn.Module, selection: dict, config: SparseNeuronConfig) -> dict[str, str]:
    """name -> the axis of its slice: `config.axis`, or with axis='coupled' the one its neuron groups give it
    (found among all the targeted linears, as when the neurons were chosen)."""
    if config.axis != "coupled":
        return {name: config.axis for name in selection}
    axes = slice_axes(model, find_target_layers(model, config.target_modules), config.axis)
    return {name: axes.get(name, "rows") for name in selection}


def _checked_selection(model: nn.Module, selection: dict, axes: dict[str, str]) -> dict[str, torch.Tensor]:
    """name -> sorted indices, once every name is a linear of `model` and every index set fits it."""
    checked = {}
    if any(".experts." in name for name in selection):
        expose_experts(model)  # an adapter's or caller's selection names expert views (experts.<e>.<projection>)
    for name, index in selection.items():
        axis = axes[name]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{name} is not a module of {type(model).__name__}") from None
        if not is_sliceable(module):
            raise ValueError(f"{name} is a {type(module).__name__}, not a linear layer")
        n_units = linear_shape(module)[0 if axis == "rows" else 1]
        try:
            checked[name] = checked_index(index, n_units)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return checked


def quantize_with_sparse_correction(model: nn.Module, config: SparseNeuronConfig,
                                    selection: Optional[dict[str, torch.Tensor]] = None) -> nn.Module:
    """Full-precision model -> 4-bit base + slices whose selected rows reproduce the original weights exactly.

    The targeted linears become `bnb.nn.Linear4bit` (`config.quantize_base`, default 'nf4'); the neurons come from
    `selection` (name -> indices) or, if None, from a weight-only `config.importance` (l1 / l2 / random). The
    result trains with SparseNeuronTrainer as it is. Works in place and returns `model`."""
    config = dataclasses.replace(config, quantize_base=config.quantize_base or "nf4", init_from_quantization_error=True)
    if selection is None:
        from ..scoring.heads import head_groups
        from ..scoring.importance import score_neurons
        from ..scoring.selection import coupled_groups, select_neurons

        if config.importance in DATA_IMPORTANCE_NAMES:
            raise ValueError(f"importance={config.importance!r} scores on data: pass `selection` (e.g. from "
                             "SparseNeuronTrainer) or use a weight-only criterion (l1, l2, random)")
        layers_to_quantize(model, config)  # a clear error before any scoring if the model is quantized already
        layers = find_target_layers(model, config.target_modules)
        selection = select_neurons(score_neurons(model, layers, config), config, head_groups(model, layers, config),
                                   coupled_groups(model, layers, config))
    inject_slices(model, selection, config)
    return model
