"""No large weight is left frozen in silence: after the slices are in, every weight holding >= 1 % of the model that
is neither sliced, trained in full, an embedding nor the output head is named in one warning (MoE experts stored as
fused 3-D parameters, a layer type the slicer does not know); the summary gives coverage by module type."""
import logging

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import TokenDataset, sparse_trainer, tiny_model
from sprune_trainer import SparseNeuronConfig
from sprune_trainer.training.coverage import coverage_by_type, uncovered_weights


class Mixer(nn.Module):
    """A projection the slicer does not know (not nn.Linear): its weight is a bare parameter."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) * 0.02)

    def forward(self, x):
        return x @ self.weight


def _llama_with_a_mixer():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    for layer in model.model.layers:
        inner = layer.mlp.down_proj
        layer.mlp.mixer = Mixer(32)
        layer.mlp.down_proj = nn.Sequential(inner, layer.mlp.mixer)  # on the forward path
    return model


def test_a_large_unsliceable_weight_is_named_with_its_share(tmp_path, caplog):
    model = _llama_with_a_mixer()
    trainer = sparse_trainer(tmp_path, model=model, max_steps=1)
    with caplog.at_level(logging.WARNING, logger="sprune_trainer"):
        trainer.prepare_sparse_model()
    found = uncovered_weights(trainer.model)
    total = sum(p.numel() for p in _llama_with_a_mixer().parameters())
    # one tensor, listed once under the first name that reaches it (here the Sequential's)
    assert [(n, kind) for n, kind, _ in found] == [("model.layers.0.mlp.down_proj.1.weight", "Mixer"),
                                                  ("model.layers.1.mlp.down_proj.1.weight", "Mixer")]
    assert abs(found[0][2] - 32 * 32 / total) < 1e-9
    text = " ".join(r.getMessage() for r in caplog.records if "neither sliced nor trained" in r.getMessage())
    assert "2 weights holding" in text and "model.layers.*.mlp.down_proj.*.weight (Mixer, 2 tensors," in text
    cover = coverage_by_type(trainer.model)
    assert cover["Mixer"] == {"params": 2 * 32 * 32, "sliced": 0, "trained": 0}
    assert cover["Linear"]["sliced"] == cover["Linear"]["params"] - 128 * 32  # all but the output head


def test_a_fully_covered_model_and_a_module_to_save_give_no_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sprune_trainer"):
        sparse_trainer(tmp_path / "a", max_steps=1).prepare_sparse_model()
        cfg = SparseNeuronConfig(neurons_per_layer=4, importance="l2",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"],
                                 modules_to_save=["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"])
        sparse_trainer(tmp_path / "b", cfg, dataset=TokenDataset(), model=tiny_model(), max_steps=1) \
            .prepare_sparse_model()
    assert not [r for r in caplog.records if "neither sliced nor trained" in r.getMessage()]


def test_moe_experts_are_covered(tmp_path, caplog):
    """Mixtral's experts (fused 3-D parameters in transformers 5.x, nn.Linear modules in 4.x) are sliced: no warning,
    and the summary's coverage counts them as sliced; the router stays frozen (small, never sliced)."""
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             num_local_experts=4, num_experts_per_tok=2))
    trainer = sparse_trainer(tmp_path, SparseNeuronConfig(neurons_per_layer=4, importance="l2"), model=model,
                             max_steps=1)
    with caplog.at_level(logging.WARNING, logger="sprune_trainer"):
        trainer.prepare_sparse_model()
    assert uncovered_weights(trainer.model) == []
    assert not [r for r in caplog.records if "neither sliced nor trained" in r.getMessage()]
    cover = coverage_by_type(trainer.model)
    if "MixtralExperts" in cover:  # 5.x: fused 3-D experts, all sliced
        assert cover["MixtralExperts"]["sliced"] == cover["MixtralExperts"]["params"] == 2 * 4 * 3 * 32 * 64
    else:  # 4.x: per-expert nn.Linear; the Linears left unsliced are the head and the routers (4 x 32 per layer)
        assert cover["Linear"]["params"] - cover["Linear"]["sliced"] == 128 * 32 + 2 * 4 * 32
