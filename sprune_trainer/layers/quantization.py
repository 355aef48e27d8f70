"""Quantized frozen bases (bitsandbytes linears): recognise them, (de)quantize, build and re-quantize them.

4-bit (`Linear4bit`): packed NF4/FP4 codes + one absmax per block of 64 weights (`weight.quant_state`).
8-bit (`Linear8bitLt`): int8 rows + one scale per row (`weight.SCB`; the first forward moves it to `layer.state`).
Slices never touch these; they need the dense weight only to start from the quantization residual, to score
and to merge. Recognising a layer never imports bitsandbytes, so a quantized model on a machine without it
fails with a clear ImportError (`require_bitsandbytes`) instead of an AttributeError deep inside a forward."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .linear_like import linear_weight

BLOCKSIZE = 64  # QLoRA's and PEFT LoftQ's 4-bit block


def bnb_kind(module: nn.Module) -> Optional[str]:
    """'4bit' or '8bit' for a bitsandbytes linear (or a subclass, e.g. LinearNF4), else None."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("bitsandbytes"):
            if cls.__name__ == "Linear4bit":
                return "4bit"
            if cls.__name__ == "Linear8bitLt":
                return "8bit"
    return None


def import_bitsandbytes(why: str):
    """`bitsandbytes`, or an ImportError that says what needed it and how to install it."""
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{why} needs bitsandbytes, which cannot be imported ({e}). Install it with "
                          "`pip install 'sprune_trainer[bnb]'` (bitsandbytes>=0.45).") from e
    return bitsandbytes


def loaded_with_bitsandbytes(model: nn.Module) -> bool:
    """True for a transformers model loaded with a BitsAndBytesConfig (HF places it itself: no `.to(device)`)."""
    return str(getattr(model, "quantization_method", "")) in ("bitsandbytes", "QuantizationMethod.BITS_AND_BYTES")


def require_bitsandbytes(model: nn.Module) -> None:
    """Fail early, naming a quantized layer, when `model` holds bitsandbytes layers (or says it was loaded with
    a BitsAndBytesConfig) but bitsandbytes cannot be imported."""
    first = next((name for name, m in model.named_modules() if bnb_kind(m)), None)
    if first is None and not loaded_with_bitsandbytes(model):
        return
    where = f"layer {first!r}" if first else "its quantization_config"
    import_bitsandbytes(f"{type(model).__name__} is quantized with bitsandbytes ({where}); training, scoring or "
                        "merging it")


@torch.no_grad()
def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """`layer`'s weight as a dense fp32 (d_out, d_in) tensor on its device; the layer is left as it is."""
    kind = bnb_kind(layer)
    w = layer.weight
    if kind is None or (kind == "8bit" and w.dtype != torch.int8):  # plain, or 8-bit with has_fp16_weights
        return linear_weight(layer).detach().float()
    F = import_bitsandbytes(f"dequantizing {type(layer).__name__}").functional
    if kind == "4bit":
        state = w.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            _undo_cpu_repacking(w, F)
        return F.dequantize_4bit(w.data, w.quant_state).float()
    scb = w.SCB if getattr(w, "SCB", None) is not None else layer.state.SCB
    return F.int8_vectorwise_dequant(w.data, scb).float()


def _undo_cpu_repacking(weight, F) -> None:
    """A CPU inference forward on an AVX512-BF16 machine repacks the 4-bit codes in place (absmax transposed, in
    bf16). Back to the standard layout the way bitsandbytes' own state_dict saving does, plus the absmax layout that
    its inverse (0.50.2) leaves transposed when there is no double quantization. The absmax stays bf16-rounded."""
    weight.data, state = F._convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    if not state.nested and state.absmax.dim() == 2:
        state.absmax = state.absmax.T.reshape(-1).float().contiguous()
    weight.quant_state = state


def dequantized_dtype(layer: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype a 4-bit layer's weight had when it was quantized (HF: the load dtype); `default` for 8-bit
    layers, which do not record it."""
    if bnb_kind(layer) == "4bit":
        state = layer.weight.quant_state
        return getattr(state, "original_dtype", state.dtype)
    return default


@torch.no_grad()
def quantize_4bit(weight: torch.Tensor, bias: Optional[torch.Tensor], quant_type: str = "nf4",
                  double_quant: bool = False, compute_dtype: Optional[torch.dtype] = None,
                  quant_storage: Optional[torch.dtype] = None, blocksize: int = BLOCKSIZE) -> nn.Module:
    """A frozen `bnb.nn.Linear4bit` holding Q(weight), on weight's device; `weight` keeps its dtype as the
    dequantization dtype. compute_dtype and quant_storage default to weight's dtype (a float quant_storage is what
    ZeRO-3 needs to partition the packed codes together with the other bf16/fp16 parameters). In eval mode it computes
    as in training (keep_training_kernel)."""
    bnb = import_bitsandbytes("4-bit quantization")
    compute_dtype = compute_dtype or weight.dtype
    quant_storage = quant_storage or weight.dtype
    d_out, d_in = weight.shape
    layer = bnb.nn.Linear4bit(d_in, d_out, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=quant_type, quant_storage=quant_storage,
                              device="meta")
    packed, state = bnb.functional.quantize_4bit(weight.detach().contiguous(), blocksize=blocksize,
                                                 compress_statistics=double_quant, quant_type=quant_type,
                                                 quant_storage=quant_storage)
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type=quant_type,
                                     quant_storage=quant_storage, module=layer, bnb_quantized=True)
    layer.quant_state = state
    layer.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
    keep_training_kernel(layer)
    return layer


def keep_training_kernel(layer: nn.Module) -> None:
    """Make a 4-bit layer's inference compute what its training computed. On an AVX512-BF16 CPU bitsandbytes' first
    forward in eval mode without grad repacks the codes in place and from then on computes in bf16 (~2e-3 off the
    trained logits of a tiny Llama): a reloaded adapter, whose new 4-bit layers take the fresh base's eval mode, would
    not reproduce the model it was trained as. GPUs have no such path."""
    layer.support_avx512bf16_for_cpu = False


@torch.no_grad()
def quantize_8bit(weight: torch.Tensor, bias: Optional[torch.Tensor], threshold: float = 0.0) -> nn.Module:
    """A frozen inference-mode `bnb.nn.Linear8bitLt` (int8 rows + per-row scales) holding Q(weight)."""
    bnb = import_bitsandbytes("8-bit quantization")
    d_out, d_in = weight.shape
    layer = bnb.nn.Linear8bitLt(d_in, d_out, bias=bias is not None, has_fp16_weights=False, threshold=threshold,
                                device="meta")
    codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.detach().to(torch.float16).contiguous())
    layer.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales)
    layer.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
    return layer


def requantize_like(like: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Module:
    """Quantize a dense `weight` with exactly the settings of the bitsandbytes layer `like` (4-bit: quant type,
    blocksize, double quantization, compute/storage dtype, dequantization dtype; 8-bit: outlier threshold)."""
    if bnb_kind(like) == "8bit":
        return quantize_8bit(weight, bias, threshold=like.state.threshold)
    state = like.weight.quant_state
    nested = getattr(state, "original_nested", state.nested)  # CPU-repacked states keep the original flag
    return quantize_4bit(weight.to(dequantized_dtype(like, weight.dtype)), bias, quant_type=state.quant_type, double_quant=nested,
                         compute_dtype=like.compute_dtype, quant_storage=like.weight.quant_storage,
                         blocksize=state.blocksize)


def check_zero3_quant_storage(model: nn.Module, dtype: Optional[torch.dtype] = None) -> None:
    """DeepSpeed ZeRO-3 flattens, partitions and casts all parameters together, so a 4-bit base must store its
    packed codes in the training dtype (`bnb_4bit_quant_storage` = compute dtype = torch_dtype): uint8 codes
    cannot be partitioned with bf16 parameters, and a cast from another float storage would corrupt the codes.
    `dtype`: the training dtype (default: that of the model's non-quantized floating parameters)."""
    quantized = {id(m.weight) for m in model.modules() if bnb_kind(m)}
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters()
                      if id(p) not in quantized and p.dtype.is_floating_point), torch.float32)
    short = str(dtype).removeprefix("torch.")
    for name, module in model.named_modules():
        kind = bnb_kind(module)
        if kind == "8bit":
            raise ValueError(f"{name} is an 8-bit bitsandbytes layer: DeepSpeed ZeRO-3 cannot partition int8 weights "
                             "with their per-row scales; use a 4-bit base (BitsAndBytesConfig(load_in_4bit=True, "
                             f"bnb_4bit_quant_storage=torch.{short})) or ZeRO-2.")
        if kind == "4bit" and module.weight.dtype != dtype:
            raise ValueError(
                f"DeepSpeed ZeRO-3 with a 4-bit base needs the packed 4-bit weights stored in the training dtype "
                f"({short}), but {name} stores them as {str(module.weight.dtype).removeprefix('torch.')}. Load the "
                f"model with dtype=torch.{short} and BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype="
                f"torch.{short}, bnb_4bit_quant_storage=torch.{short}).")
