"""Sparse slices as a PEFT LoRA adapter, exactly: plain PEFT (and LoRA servers such as vLLM) load it, nothing
sparse-specific is needed at serving time.

A slice is a LoRA whose one factor is a one-hot selection. Rows I (k of them): ΔW = S·delta with S (d_out, k),
S[I[j], j] = 1, so lora_B = S and lora_A = delta (k, d_in). Columns J: ΔW = delta·Sᵀ with S (d_in, k), so
lora_B = delta (d_out, k) and lora_A = Sᵀ. Each layer's rank is its k and its alpha too (rank_pattern /
alpha_pattern where k differs from r), so PEFT's scaling alpha / r is exactly 1; products with a one-hot factor are
exact, so PEFT reproduces the sliced model's outputs and `merge_and_unload()` gives `merge_sparse`'s weights. Bias
deltas go on lora_B's bias (`lora_bias=True`), modules trained in full under PEFT's `modules_to_save`. The one-hot
factor is stored dense: the folder is about twice the native adapter (docs/serving.md)."""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn

from ..layers.experts import ExpertLinear
from ..layers.full_modules import PREFIX as FULL_PREFIX, modules_to_save
from ..layers.linear_like import is_conv1d
from ..layers.sliced_linear import SlicedLinear
from ..layers.surgery import CONFIG_ATTR, sliced_modules
from .adapter import adapter_state, base_model_name_or_path, replace_atomically

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # PEFT's key prefix: the PeftModel's `base_model` (the LoRA model) and its `model`
# PEFT's task types, from the model class's suffix (PeftModel.from_pretrained then builds the matching PeftModel)
_TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
               "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}


def check_lora_base(name: str, layer: SlicedLinear) -> None:
    """PEFT's LoRA must wrap the slice's base as it is, with the factors above: a plain nn.Linear or a bitsandbytes
    4-/8-bit linear (both are nn.Linear subclasses), or transformers' Conv1D (PEFT's fan_in_fan_out; the factors are
    the same). An MoE expert's projection is one matrix of a fused 3-D parameter, which PEFT adapts only as a whole
    (target_parameters, one rank for every expert): refused here, as any other base type, naming the layer."""
    base = layer.base_layer
    if isinstance(base, ExpertLinear):
        raise ValueError(f"cannot export {name} to PEFT LoRA: it slices one expert of the fused MoE parameter "
                         f"{base.param_name}, and this export does not write PEFT's target_parameters form yet. Merge "
                         "with merge_sparse() and serve the dense model, or leave the experts out of target_modules.")
    if not (isinstance(base, nn.Linear) or is_conv1d(base)):
        raise ValueError(f"cannot export {name} to PEFT LoRA: its slice sits on a {type(base).__name__}; the export "
                         "knows nn.Linear, bitsandbytes Linear4bit / Linear8bitLt and transformers' Conv1D bases. "
                         "Merge with merge_sparse() and serve the dense model instead.")


def one_hot(index: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """S (n, k): S[index[j], j] = 1, zero elsewhere."""
    s = torch.zeros(n, index.numel(), dtype=dtype)
    s[index, torch.arange(index.numel())] = 1
    return s


def lora_factors(index: torch.Tensor, delta: torch.Tensor, axis: str, shape: tuple[int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A (k, d_in), lora_B (d_out, k)) with lora_B @ lora_A equal to the slice's dense update."""
    d_out, d_in = shape
    if axis == "rows":
        return delta, one_hot(index, d_out, delta.dtype)
    return one_hot(index, d_in, delta.dtype).T.contiguous(), delta


def peft_lora_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(the safetensors tensors, the adapter_config.json entries) of `model`'s slices as a PEFT LoRA adapter.
    Under ZeRO-3 every rank must call it (adapter_state gathers the slices)."""
    layers = sliced_modules(model)
    for name, layer in layers.items():
        check_lora_base(name, layer)
    tensors, meta = adapter_state(model)  # raises for a model without slices
    lora_bias = any(f"{name}.bias_delta" in tensors for name in meta)
    out = {}
    for name, m in meta.items():
        key = f"{KEY_PREFIX}{name}"
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = lora_factors(
            tensors[f"{name}.index"], tensors[f"{name}.delta"], m["axis"], tuple(m["shape"]))
        if lora_bias:  # PEFT gives every target a lora_B bias: zero where nothing was trained
            bias = torch.zeros(m["shape"][0], dtype=tensors[f"{name}.delta"].dtype)
            if f"{name}.bias_delta" in tensors:
                bias[tensors[f"{name}.index"]] = tensors[f"{name}.bias_delta"]
            out[f"{key}.lora_B.bias"] = bias
    out.update({KEY_PREFIX + k.removeprefix(FULL_PREFIX): t for k, t in tensors.items() if k.startswith(FULL_PREFIX)})
    if lora_bias:
        _warn_unmergeable_bias(layers)
    conv1d = any(is_conv1d(layer.base_layer) for layer in layers.values())
    return out, _lora_config(model, meta, lora_bias, conv1d)


def _lora_config(model: nn.Module, meta: dict, lora_bias: bool, conv1d: bool) -> dict:
    ranks = {name: m["k"] for name, m in meta.items()}
    r = max(ranks.values())  # what LoRA servers check against their maximum rank (vLLM: max_lora_rank)
    pattern = {name: k for name, k in sorted(ranks.items()) if k != r}
    config = getattr(model, CONFIG_ATTR, None)
    saved = sorted(modules_to_save(model, config.modules_to_save if config is not None else None))
    cls = type(model).__name__
    return {"peft_type": "LORA", "task_type": next((t for s, t in _TASK_TYPES.items() if cls.endswith(s)), None),
            "base_model_name_or_path": base_model_name_or_path(model), "target_modules": sorted(ranks),
            "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),  # scaling 1 everywhere
            "use_rslora": False, "use_dora": False, "fan_in_fan_out": conv1d, "bias": "none", "lora_bias": lora_bias,
            "lora_dropout": config.slice_dropout if config is not None else 0.0,
            "modules_to_save": saved or None, "inference_mode": True}


def _warn_unmergeable_bias(layers: dict[str, SlicedLinear]) -> None:
    no_bias = [name for name, layer in layers.items() if layer.base_layer.bias is None]
    if no_bias:
        warnings.warn(f"the exported adapter has bias deltas (lora_bias=True, one setting for every layer), but "
                      f"{len(no_bias)} sliced layers have no bias ({no_bias[:3]}...): PEFT loads and runs it exactly, "
                      "but its merge_and_unload() refuses such layers; merge_sparse() gives the merged model.",
                      stacklevel=3)


def export_peft_lora(model: nn.Module, out_dir: str, base_model: Optional[str] = None) -> str:
    """Write `model`'s slices (trained, or attached by load_sparse_adapter) to `out_dir` as a PEFT LoRA adapter
    (adapter_config.json + adapter_model.safetensors) that `PeftModel.from_pretrained(base, out_dir)` loads to the
    same outputs. `base_model`: what adapter_config.json names as the base (default: the model's own name or path).
    Every layer is checked before anything is written. Returns `out_dir`."""
    tensors, config = peft_lora_state(model)
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    os.makedirs(out_dir, exist_ok=True)
    replace_atomically(lambda p: save_file(tensors, p, metadata={"format": "pt"}), os.path.join(out_dir, WEIGHTS_NAME))

    def write_json(p):
        with open(p, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    replace_atomically(write_json, os.path.join(out_dir, CONFIG_NAME))  # last: a folder without it is no adapter
    return out_dir
