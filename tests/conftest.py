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
