"""Module surgery: put `SlicedLinear` wrappers in place of the chosen linears (quantizing their bases on request),
and take them out again (merge, optionally re-quantizing)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from .config import DATA_IMPORTANCE_NAMES, SparseNeuronConfig
from .full_modules import check_not_sliced, modules_to_save, train_in_full, warn_untrained_head
from .quantization import (bnb_kind, dequantize_weight, dequantized_dtype, import_bitsandbytes, quantize_4bit,
                           requantize_like)
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


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def layers_to_quantize(model: nn.Module, config: SparseNeuronConfig) -> dict[str, nn.Linear]:
    """The full-precision linears `config.quantize_base` turns into 4-bit: every targeted linear (as QLoRA, also
    those that get no neurons). Raises a clear error when one is quantized already: its W is gone."""
    if config.quantize_base is None:
        return {}
    layers = find_target_layers(model, config.target_modules)
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
    selection = _checked_selection(model, selection, config.axis)
    check_not_sliced(modules_to_save(model, config.modules_to_save), sorted(set(selection) | set(to_quantize)))
    if to_quantize:
        import_bitsandbytes(f"quantize_base={config.quantize_base!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    train_in_full(model, config.modules_to_save)
    warn_untrained_head(model, config.modules_to_save, list(selection))
    wrapped = {}
    for name in sorted(set(selection) | set(to_quantize)):
        parent, child = _parent(model, name)
        base = original = getattr(parent, child)
        if name in to_quantize:
            base = quantize_4bit(original.weight, original.bias, quant_type=config.quantize_base,
                                 double_quant=config.double_quant)
        if name in selection:
            dtype = (slice_dtypes or {}).get(name) or slice_dtype_for(base, config.slice_dtype)
            layer = SlicedLinear(base, selection[name], axis=config.axis, dtype=dtype, train_bias=config.train_bias,
                                 dropout=config.slice_dropout)
            layer.recompute_input = config.recomputes_slice_inputs
            if config.init_from_quantization_error:  # delta = (W - dequant(Q(W)))[I]
                with torch.no_grad():
                    layer.delta.copy_(layer.select(original.weight).float() - layer.select(dequantize_weight(base)))
            wrapped[name] = base = layer
        base.train(original.training)  # a model in eval mode stays so: no slice dropout, bnb's inference kernels
        setattr(parent, child, base)
    setattr(model, CONFIG_ATTR, config)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained = _refuse_save_pretrained  # an instance attribute: merge_sparse takes it away
    return wrapped


def _checked_selection(model: nn.Module, selection: dict, axis: str) -> dict[str, torch.Tensor]:
    """name -> sorted indices, once every name is a linear of `model` and every index set fits it."""
    checked = {}
    for name, index in selection.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{name} is not a module of {type(model).__name__}") from None
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name} is a {type(module).__name__}, not a linear layer")
        n_units = module.out_features if axis == "rows" else module.in_features
        try:
            checked[name] = checked_index(index, n_units)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return checked


def _refuse_save_pretrained(*args, **kwargs):
    raise ValueError("this model holds unmerged sparse-neuron slices: save_pretrained would write base_layer / delta "
                     "/ index keys that from_pretrained cannot read (it would re-initialise every sliced layer at "
                     "random). Save the adapter with save_sparse_adapter(model, dir), or a plain dense model with "
                     "merge_sparse(model).save_pretrained(dir).")


def quantize_with_sparse_correction(model: nn.Module, config: SparseNeuronConfig,
                                    selection: Optional[dict[str, torch.Tensor]] = None) -> nn.Module:
    """Full-precision model -> 4-bit base + slices whose selected rows reproduce the original weights exactly.

    The targeted linears become `bnb.nn.Linear4bit` (`config.quantize_base`, default 'nf4'); the neurons come from
    `selection` (name -> indices) or, if None, from a weight-only `config.importance` (l1 / l2 / random). The
    result trains with SparseNeuronTrainer as it is. Works in place and returns `model`."""
    config = dataclasses.replace(config, quantize_base=config.quantize_base or "nf4", init_from_quantization_error=True)
    if selection is None:
        from .heads import head_groups
        from .importance import score_neurons
        from .selection import select_neurons

        if config.importance in DATA_IMPORTANCE_NAMES:
            raise ValueError(f"importance={config.importance!r} scores on data: pass `selection` (e.g. from "
                             "SparseNeuronTrainer) or use a weight-only criterion (l1, l2, random)")
        layers_to_quantize(model, config)  # a clear error before any scoring if the model is quantized already
        layers = find_target_layers(model, config.target_modules)
        selection = select_neurons(score_neurons(model, layers, config), config, head_groups(model, layers, config))
    inject_slices(model, selection, config)
    return model


def trainable_slice_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def merge_sparse(model: nn.Module, requantize: bool = False, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Fold every slice into its base weight (W[I] += delta) and take the wrappers out. Works in place, returns
    `model`.

    requantize=False: an ordinary full-precision model for `save_pretrained`. Full-precision bases are merged in
      place; every bitsandbytes layer (sliced or not) is dequantized to a plain nn.Linear in `dtype` (default: the
      dtype a 4-bit weight was quantized from, else the model's own float dtype, e.g. its embeddings') and the
      model's HF quantization markers are removed.
    requantize=True: each sliced 4/8-bit base is dequantized, merged in fp32 and quantized again with its own
      settings; unsliced layers are left as they are. Rows the slices did not touch re-quantize to the same codes
      (NF4/FP4 without double quantization, int8): the error this adds sits in the trained rows only
      (benchmarks/quantization/merge_requantize.py measures it against a merged QLoRA adapter)."""
    layers = sliced_modules(model)
    if not layers:
        raise ValueError("model has no sparse-neuron slices to merge")
    quantized = {id(p) for m in model.modules() if bnb_kind(m) for p in m.parameters()}
    model_dtype = next((p.dtype for p in model.parameters() if id(p) not in quantized and not p.requires_grad
                        and p.dtype.is_floating_point), torch.float32)
    for name, layer in layers.items():
        base = layer.base_layer
        if bnb_kind(base) is None:
            if requantize:
                raise ValueError(f"requantize=True but {name} has a full-precision base: nothing to re-quantize")
            layer.merge()
            merged = base
        else:
            weight, bias = layer.merged_weight(dequantize_weight(base)), layer.merged_bias()
            merged = (requantize_like(base, weight, bias) if requantize
                      else _dense_linear(weight, bias, dtype or dequantized_dtype(base, model_dtype)))
        parent, child = _parent(model, name)
        setattr(parent, child, merged)
    if not requantize:
        _dequantize_remaining(model, dtype, model_dtype)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    if model.__dict__.get("save_pretrained") is _refuse_save_pretrained:
        del model.__dict__["save_pretrained"]  # the class's save_pretrained again
    return model


def _dense_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> nn.Linear:
    d_out, d_in = weight.shape
    layer = nn.Linear(d_in, d_out, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return layer


def _dequantize_remaining(model: nn.Module, dtype: Optional[torch.dtype], model_dtype: torch.dtype) -> None:
    """Plain nn.Linear in place of every bitsandbytes layer left; drop HF's quantization markers (a model that
    still says it is quantized would be saved and reloaded as one)."""
    for name, module in list(model.named_modules()):
        if bnb_kind(module):
            parent, child = _parent(model, name)
            dense_dtype = dtype or dequantized_dtype(module, model_dtype)
            setattr(parent, child, _dense_linear(dequantize_weight(module), module.bias, dense_dtype))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
