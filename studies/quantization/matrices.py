"""Shared by the quantization study's scripts: weight matrices (random real shapes or a real checkpoint), the NF4
quantization they all use, the sparse and low-rank budgets, and the error measures.

Every method quantizes the same way: bitsandbytes NF4, blocksize 64, no double quantization (what PEFT's LoftQ
utilities use), from fp32 weights."""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the checkout

from sprune_trainer import SparseNeuronConfig  # noqa: E402
from sprune_trainer.layers.surgery import quantize_with_sparse_correction  # noqa: E402
from sprune_trainer.layers.quantization import dequantize_weight, quantize_4bit  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (hidden, intermediate, attention heads, key/value heads) of real Llama-architecture checkpoints
SHAPES = {"smollm2-135m": (576, 1536, 9, 3), "llama2-7b": (4096, 11008, 32, 32),
          "tiny": (128, 256, 4, 2)}  # tiny: the tests' smoke run


def projection_shape(proj: str, hidden: int, intermediate: int, heads: int, kv_heads: int) -> tuple[int, int]:
    """(d_out, d_in) of a Llama projection."""
    kv = hidden // heads * kv_heads
    return {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
            "gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden),
            "down_proj": (hidden, intermediate)}[proj]


def random_matrices(shape: str, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """One layer's seven projections of `shape`, HF's random init N(0, 0.02^2), fp32."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return {f"{shape}.{p}": (torch.randn(projection_shape(p, *SHAPES[shape]), generator=gen) * 0.02).to(device)
            for p in PROJECTIONS}


def load_gguf_model(path: str, dtype=torch.float32):
    """(model, tokenizer) of a GGUF checkpoint, dequantized by transformers (needs the `gguf` package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(os.path.abspath(path))
    return (AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype),
            AutoTokenizer.from_pretrained(folder, gguf_file=name))


def checkpoint_matrices(path: str, layers: Optional[list[int]], device) -> dict[str, torch.Tensor]:
    """The seven projections of the chosen decoder layers (all if None) of a real GGUF checkpoint, fp32."""
    model, _ = load_gguf_model(path)
    blocks = model.model.layers
    chosen = range(len(blocks)) if layers is None else layers
    out = {}
    for i in chosen:
        for p in PROJECTIONS:
            module = blocks[i].self_attn if p in ("q_proj", "k_proj", "v_proj", "o_proj") else blocks[i].mlp
            out[f"layer{i}.{p}"] = getattr(module, p).weight.detach().float().to(device)
    return out


def lora_rank(d_out: int, d_in: int, rows: int) -> int:
    """The LoRA rank whose r * (d_in + d_out) parameters come closest to `rows` * d_in trained rows."""
    return max(1, round(rows * d_in / (d_in + d_out)))


def nf4(weight: torch.Tensor) -> torch.Tensor:
    """dequant(Q(W)) in fp32: what QLoRA starts from."""
    return dequantize_weight(quantize_4bit(weight, None, quant_type="nf4"))


def residual_rows(weight: torch.Tensor, k: int) -> torch.Tensor:
    """The k rows with the largest quantization residual: the best k rows to correct."""
    return torch.topk((weight - nf4(weight)).norm(dim=1), k).indices.sort().values


def sparse_corrected(weight: torch.Tensor, k: int, rows: Optional[torch.Tensor] = None):
    """A one-layer module made by sprune_trainer's quantize_with_sparse_correction: NF4 base + k rows
    (importance l2 unless `rows` is given) starting at the residual. Returns (module, its SlicedLinear)."""
    d_out, d_in = weight.shape
    model = nn.ModuleDict({"proj": nn.Linear(d_in, d_out, bias=False, device="meta")})
    model["proj"].weight = nn.Parameter(weight.clone(), requires_grad=False)
    cfg = SparseNeuronConfig(neurons_per_layer=k, importance="l2", quantize_base="nf4", init_from_quantization_error=True)
    quantize_with_sparse_correction(model, cfg, None if rows is None else {"proj": rows})
    return model, model["proj"]


def effective_weight(sliced) -> torch.Tensor:
    """W_hat = dequant(Q(W)) + the slice, fp32."""
    return sliced.merged_weight(dequantize_weight(sliced.base_layer))


def errors(weight: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    diff = (weight - approx).float()
    return {"fro": torch.linalg.matrix_norm(diff).item(), "nuc": torch.linalg.matrix_norm(diff, ord="nuc").item()}


def device_of(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def matrices_from_args(args, device) -> dict[str, torch.Tensor]:
    if args.gguf:
        layers = None if args.layers == "all" else [int(i) for i in args.layers.split(",")]
        return checkpoint_matrices(args.gguf, layers, device)
    return {k: v for shape in args.shapes.split(",") for k, v in random_matrices(shape, device, args.seed).items()}


def add_matrix_args(parser) -> None:
    parser.add_argument("--shapes", default="smollm2-135m", help=f"random-init shapes, comma-separated: {list(SHAPES)}")
    parser.add_argument("--gguf", default=None, help="real weights instead: a GGUF checkpoint (e.g. SmolLM2-135M)")
    parser.add_argument("--layers", default="0", help="with --gguf: decoder layers, comma-separated, or 'all'")
    parser.add_argument("--rows", type=int, default=64, help="trained rows per matrix (paper: 64); LoRA gets "
                                                             "the rank with the same parameter count")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON file for the results")


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


def environment(device) -> dict:
    import bitsandbytes
    import peft
    import transformers
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__}
