"""studies/accuracy/column_energy.py: input-feature energy from hooks equals a dense recomputation of the
layer inputs, shares are right for known selections, and the script runs end to end on a tiny model."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from studies.accuracy import column_energy
from sprune_trainer.layers.targets import find_target_layers


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_input_energy_matches_dense_inputs_and_skips_padding():
    model = _model()
    layers = find_target_layers(model)
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # right padding: its positions must not count
    energy = column_energy.input_energy(model, layers, [{"input_ids": ids, "attention_mask": mask}])
    block = model.model.layers[0]
    with torch.no_grad():  # q_proj's input is the first RMSNorm of the embeddings
        x = block.input_layernorm(model.model.embed_tokens(ids))[mask.bool()]
    assert torch.allclose(energy["model.layers.0.self_attn.q_proj"], (x * x).sum(0), rtol=1e-5, atol=1e-6)
    assert set(energy) == set(layers) and all(e.shape == (layers[n].in_features,) for n, e in energy.items())


def test_energy_shares_and_grouping():
    energy = {"a.q_proj": torch.tensor([1.0, 3.0, 0.0, 4.0]), "b.q_proj": torch.tensor([2.0, 2.0])}
    shares = column_energy.energy_shares({"a.q_proj": torch.tensor([1, 3]), "b.q_proj": torch.tensor([0])}, energy)
    assert shares == {"a.q_proj": pytest.approx(7 / 8), "b.q_proj": pytest.approx(0.5)}
    assert column_energy.by_kind(shares) == {"q_proj": pytest.approx(11 / 16), "all": pytest.approx(11 / 16)}


def test_script_end_to_end_on_a_tiny_model(tiny, tmp_path):  # tiny: conftest's model + LLM-Adapters folder
    out = tmp_path / "energy.json"
    res = column_energy.main(["--data_dir", tiny["data"], "--model_name_or_path", tiny["model"], "--batches", "2",
                              "--batch_size", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert set(res["criteria"]) == set(column_energy.CRITERIA)
    for crit in res["criteria"].values():
        assert 0.0 < crit["energy_share"]["all"] <= 1.0
    k = res["columns_per_layer"]  # 12 projections read the hidden size 64, the 2 down_proj the intermediate 128
    assert res["uniform"]["all"] == pytest.approx((12 * k / 64 + 2 * k / 128) / 14)
    assert res["uniform"]["down_proj"] == pytest.approx(k / 128)
