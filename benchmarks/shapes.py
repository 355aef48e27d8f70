"""Model shapes of real Llama checkpoints, built with random weights directly on the target device.

No weights are downloaded: speed and memory depend on the shapes only. The weights are HF's own random
init (normal, std 0.02), drawn on the device, never zeros (zeros can make matrix products run faster)."""
from __future__ import annotations

import time

import torch

# name -> LlamaConfig fields (from each checkpoint's config.json; rope scaling left out: no cost difference)
SHAPES: dict[str, dict] = {
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, rope_theta=10000.0),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False, rope_theta=10000.0),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    # --smoke: CPU-sized, but every projection still has >= 64 rows and columns (r = 64 fits)
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False, rope_theta=10000.0),
}

# name -> Qwen3MoeConfig fields: mixture-of-experts shapes (Qwen3-30B-A3B's config.json; fewer layers with --layers)
MOE_SHAPES: dict[str, dict] = {
    "qwen3-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936, tie_word_embeddings=False,
                          rope_theta=1000000.0),
    # --smoke: CPU-sized
    "tiny-moe": dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
                     norm_topk_prob=True, vocab_size=1024, tie_word_embeddings=False, rope_theta=10000.0),
}
# the fused expert parameters PEFT's LoRA targets on an MoE shape (LoraConfig.target_parameters)
MOE_EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

# the seven projections every adapter method is applied to (never lm_head / embeddings / norms)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(name: str, layers: int | None = None):
    """`name`'s LlamaConfig; `layers` decoder layers instead of the checkpoint's own count (a shorter model)."""
    from transformers import LlamaConfig
    fields = {**SHAPES[name], **({"num_hidden_layers": layers} if layers else {})}
    return LlamaConfig(**fields, max_position_embeddings=8192, use_cache=False,
                       attention_dropout=0.0, mlp_bias=False, attention_bias=False)


def moe_config(name: str, layers: int | None = None):
    """`name`'s Qwen3MoeConfig (no router auxiliary loss); `layers` decoder layers instead of its own count."""
    from transformers import Qwen3MoeConfig
    fields = {**MOE_SHAPES[name], **({"num_hidden_layers": layers} if layers else {})}
    return Qwen3MoeConfig(**fields, max_position_embeddings=8192, use_cache=False, attention_dropout=0.0,
                          output_router_logits=False)


def build_model(name: str, device: torch.device, dtype: torch.dtype = torch.bfloat16, layers: int | None = None):
    """(model, info): a random-init `LlamaForCausalLM` (a `Qwen3MoeForCausalLM` for a MOE_SHAPES name) of shape `name`
    (`layers` decoder layers if given), allocated and initialised on `device`."""
    from transformers import AutoModelForCausalLM
    t0 = time.perf_counter()
    config = moe_config(name, layers) if name in MOE_SHAPES else llama_config(name, layers)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    info = {
        "params": sum(p.numel() for p in model.parameters()),
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "build_s": time.perf_counter() - t0,
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        **(MOE_SHAPES[name] if name in MOE_SHAPES else SHAPES[name]),
        "num_hidden_layers": config.num_hidden_layers,
        "experts_implementation": getattr(config, "_experts_implementation", None),
    }
    return model, info


def quantize_targets(model) -> int:
    """Replace each targeted projection by a frozen bitsandbytes NF4 `Linear4bit` in place (blocksize 64, compute
    bf16, uint8 storage: QLoRA's setup); returns how many were replaced."""
    from sprune_trainer.layers.quantization import quantize_4bit
    from sprune_trainer.layers.targets import find_target_layers
    layers = find_target_layers(model, TARGETS)
    for name, layer in layers.items():
        q = quantize_4bit(layer.weight.data, layer.bias, "nf4", compute_dtype=torch.bfloat16,
                          quant_storage=torch.uint8)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    return len(layers)


def random_batch(vocab: int, batch: int, seq: int, device: torch.device, seed: int = 0) -> dict:
    """Causal-LM batch of uniformly random token ids (labels = inputs)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids}
