"""Tiny seeded models and data shared by the CPU tests."""
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig
    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


# Widths bitsandbytes' 4-bit CPU inference takes: on an AVX512-BF16 CPU the first eval forward without grad repacks
# the codes in place (absmax as out_features x in_features/64, rows in tiles of 32), so every quantized layer needs
# in_features a multiple of the 64-weight block and out_features a multiple of 32 (head_dim 16: k/v out 32).
QUANTIZABLE_WIDTHS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def tiny_quantizable_llama_config(**overrides):
    return tiny_llama_config(**{**QUANTIZABLE_WIDTHS, **overrides})


def llama_projection_shapes(config) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each decoder layer's q/k/v/o/gate/up/down projection, from the config's widths."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def tiny_model(config=None, seed=0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config or tiny_llama_config(), dtype=dtype)
    return model.eval()


def random_batches(n=3, batch=2, seq=12, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


class TokenDataset(torch.utils.data.Dataset):
    """Seeded random sequences with labels = inputs (causal LM)."""

    def __init__(self, n=32, seq=12, vocab=128, seed=2):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


@pytest.fixture
def llama():
    return tiny_model()


@pytest.fixture
def batches():
    return random_batches()
