"""Take the slices out again: fold each into its base weight (optionally re-quantizing a 4/8-bit base) and put
plain layers back, so the model saves and loads as an ordinary transformers model."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._hf_internals import restore_save_pretrained
from .experts import hide_experts
from .quantization import bnb_kind, dequantize_weight, dequantized_dtype, requantize_like
from .surgery import CONFIG_ATTR, parent_of, sliced_modules


@torch.no_grad()
def merge_sparse(model: nn.Module, requantize: bool = False, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Fold every slice into its base weight (W[I] += delta) and take the wrappers out. Works in place, returns
    `model`. MoE expert slices are folded into their fused expert parameters, Conv1D slices into the stored
    (transposed) weight.

    requantize=False: an ordinary full-precision model for `save_pretrained`. Full-precision bases are merged in
      place; every bitsandbytes layer (sliced or not) is dequantized to a plain nn.Linear in `dtype` (default: the
      dtype a 4-bit weight was quantized from, else the model's own float dtype, e.g. its embeddings') and the
      model's HF quantization markers are removed.
    requantize=True: each sliced 4/8-bit base is dequantized, merged in fp32 and quantized again with its own
      settings; unsliced layers are left as they are. Rows the slices did not touch re-quantize to the same codes
      (NF4/FP4 without double quantization, int8): the error this adds sits in the trained rows only."""
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
        parent, child = parent_of(model, name)
        setattr(parent, child, merged)
    hide_experts(model)  # merged experts run their own forward again, with their parameters as they were named
    if not requantize:
        _dequantize_remaining(model, dtype, model_dtype)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    restore_save_pretrained(model)
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
            parent, child = parent_of(model, name)
            dense_dtype = dtype or dequantized_dtype(module, model_dtype)
            setattr(parent, child, _dense_linear(dequantize_weight(module), module.bias, dense_dtype))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
