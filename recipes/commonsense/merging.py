"""--eval_merged_nf4: the trained model merged back into a 4-bit NF4 base, as it would be served, for a second
evaluation.

    sparse (a 4-bit base: --quantize_base nf4, or --load_in_4bit)   merge_sparse(model, requantize=True): each sliced
        4-bit linear is dequantized, its slice added in fp32 and the sum quantized again with the layer's own
        settings; unsliced layers stay as they are. Rows (NF4 blocks run along a row) the slices did not touch get
        the same codes back; the trained ones get the ordinary quantization error of their new values. So the
        low-quantization-error start does not survive the merge: a trained row becomes Q(W + update), as it would
        from a plain NF4 start.
    lora (QLoRA: --load_in_4bit)   every LoRA layer over a 4-bit linear: its base dequantized, the LoRA update
        (B A * scale) added in fp32, the sum quantized again with the base layer's own settings (the same
        `requantize_like` as the sparse merge), and the PEFT wrappers taken out. Every row changes, so every block
        is re-quantized: updates below a block's NF4 step round away.

`check` names the flag combinations that have a 4-bit base to merge into; the recipe calls it before anything
loads."""
from __future__ import annotations

import time

import torch
from torch import nn

MERGED_KEY = "after_merged_nf4"  # results.json: the evaluation after the merge (+ "_extra" for --extra_eval)


def check(method: str, load_in_4bit: bool, quantize_base) -> None:
    """ValueError unless the run ends on an NF4 base this module can merge into."""
    if method == "sparse" and (quantize_base == "nf4" or load_in_4bit):
        return
    if method == "lora" and load_in_4bit:
        return
    raise ValueError("--eval_merged_nf4 merges the trained update back into an NF4 base: it needs --method sparse "
                     "with --quantize_base nf4 (or --load_in_4bit true), or --method lora --load_in_4bit true "
                     f"(QLoRA); got --method {method}, --load_in_4bit {load_in_4bit}, --quantize_base {quantize_base}.")


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merge_lora_into_nf4(model: nn.Module) -> nn.Module:
    """A PEFT LoRA model over 4-bit linears -> the plain model with each LoRA layer merged and re-quantized
    (dequant(Q(W)) + B A * scale, quantized with the base layer's settings). Returns the base model."""
    from sprune_trainer.layers.quantization import bnb_kind, dequantize_weight, requantize_like
    from sprune_trainer.layers.surgery import parent_of

    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = _lora_layers(base_model)
    if not layers:
        raise ValueError("model has no LoRA layers to merge")
    for name, layer in layers.items():
        base = layer.get_base_layer()
        if bnb_kind(base) != "4bit":
            raise ValueError(f"{name}: the LoRA layer's base is a {type(base).__name__}, not a 4-bit linear")
        weight = dequantize_weight(base)
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                weight += layer.get_delta_weight(adapter).float()
        parent, child = parent_of(base_model, name)
        setattr(parent, child, requantize_like(base, weight, base.bias))
    return base_model


def merge_into_nf4(model: nn.Module, method: str) -> tuple[nn.Module, dict]:
    """(the merged model, what was done: {"how", "layers", "seconds"}) for a model `check` accepted."""
    t0 = time.time()
    if method == "sparse":
        from sprune_trainer import merge_sparse
        from sprune_trainer.layers.surgery import sliced_modules

        layers = len(sliced_modules(model))
        merged, how = merge_sparse(model, requantize=True), "merge_sparse(requantize=True)"
    elif method == "lora":
        layers = len(_lora_layers(model))
        merged, how = merge_lora_into_nf4(model), "dequantize, add the LoRA update, requantize_like"
    else:
        raise ValueError(f"no NF4 merge for --method {method}")
    return merged, {"how": how, "layers": layers, "seconds": time.time() - t0}
