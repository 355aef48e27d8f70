import re

import pytest
from torch import nn

from helpers import tiny_llama_config, tiny_model
from sprune_trainer.layers.targets import find_target_layers

ATTN_MLP = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_default_targets_are_attention_and_mlp_linears(llama):
    found = find_target_layers(llama)
    assert len(found) == 2 * 7
    assert {n.split(".")[-1] for n in found} == ATTN_MLP
    assert all(isinstance(m, nn.Linear) for m in found.values())


def test_tied_head_is_never_a_default_target():
    model = tiny_model(tiny_llama_config(tie_word_embeddings=True))
    assert "lm_head" not in find_target_layers(model)


def test_suffix_and_regex_targets(llama):
    assert set(find_target_layers(llama, ["q_proj", "v_proj"])) == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert list(find_target_layers(llama, r"model\.layers\.1\.mlp\.(up|down)_proj")) == [
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


@pytest.mark.parametrize("targets, match", [
    (["nothing_here"], "matched nothing"),
    (["lm_head"], "never sliced"),
    (["embed_tokens"], "never sliced"),
    (["mlp"], "not a linear layer"),
    (["input_layernorm"], "not a linear layer"),
])
def test_bad_targets(llama, targets, match):
    with pytest.raises(ValueError, match=match):
        find_target_layers(llama, targets)


def test_model_without_linears():
    with pytest.raises(ValueError, match="no linear layers"):
        find_target_layers(nn.Sequential(nn.Embedding(4, 4), nn.ReLU()))


@pytest.mark.parametrize("targets", [["q_prj", "v_proj"], ["v_proj", "gate_prj", "up_proj"]])
def test_every_target_entry_must_match(llama, targets):
    """One typo among valid names would otherwise train only the valid ones, silently."""
    typo = [t for t in targets if t.endswith("_prj")]
    with pytest.raises(ValueError, match=re.escape(f"entries {typo!r} matched no module")):
        find_target_layers(llama, targets)


def test_a_conv1d_shape_is_its_full_one_while_zero3_holds_a_shard():
    """transformers' Conv1D stores W^T (d_in, d_out); under ZeRO-3 its weight is an empty shard with the full shape in
    ds_shape, which linear_shape reads (zeroth_order draws its perturbation in that shape)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from sprune_trainer.layers.linear_like import linear_shape

    layer = Conv1D(nf=12, nx=5)  # 5 inputs, 12 outputs
    assert linear_shape(layer) == (12, 5)
    layer.weight.data = torch.empty(0)
    layer.weight.ds_shape = torch.Size([5, 12])
    assert linear_shape(layer) == (12, 5)
