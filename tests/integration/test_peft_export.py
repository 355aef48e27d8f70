"""export_peft_lora against plain PEFT: the exported folder loads with `PeftModel.from_pretrained` to the sliced
model's logits (fp32, max |Δ| <= 1e-5) and `merge_and_unload()` gives merge_sparse's weights, for rows and columns,
a trained model (Taylor scores, a global budget: unequal k through rank_pattern), bias deltas, modules_to_save and
bitsandbytes bases; anything else is refused naming the layer."""
import json

import pytest
import torch
from torch import nn

from helpers import (TokenDataset, needs_bnb, random_batches, random_selection, sparse_trainer, tiny_causal_lm,
                     tiny_llama_config, tiny_model, tiny_quantizable_llama_config)
from sprune_trainer import SparseNeuronConfig, SlicedLinear, export_peft_lora, merge_sparse
from sprune_trainer.layers.surgery import CONFIG_ATTR, inject_slices, sliced_modules

peft = pytest.importorskip("peft")


def _randomize(model, seed=5):
    """Seeded non-zero values in every trainable tensor: slices, bias deltas, modules trained in full."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
    return model


def _sliced(model, cfg):
    inject_slices(model, random_selection(model, cfg), cfg)
    return _randomize(model)


def _logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits


def _check_peft_equals(model, make_base, out, merge=True):
    """PEFT on a fresh `make_base()` with the adapter in `out` gives `model`'s logits; its merge gives merge_sparse's
    weights. (A base that ran an eval forward is not reused: on an AVX512-BF16 CPU that repacks its 4-bit codes, and
    bitsandbytes 0.50.2 unpacks them wrongly when PEFT reads its state_dict.)"""
    ids = random_batches(1)[0]["input_ids"]
    want, base = _logits(model.eval(), ids), _logits(make_base(), ids)
    assert (want - base).abs().max() > 1e-3  # the adapter changes the logits: the check below can fail
    peft_model = peft.PeftModel.from_pretrained(make_base(), out).eval()
    assert (_logits(peft_model, ids) - want).abs().max() <= 1e-5
    if merge:
        merged = peft_model.merge_and_unload().state_dict()
        reference = merge_sparse(model).state_dict()
        assert merged.keys() == reference.keys()
        for key, w in reference.items():
            assert torch.equal(merged[key], w), key


def _config(out):
    return json.loads((out / "adapter_config.json").read_text())


@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_rows_and_columns_load_in_peft_exactly(tmp_path, axis):
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="random", axis=axis)
    model = _sliced(tiny_model(), cfg)
    export_peft_lora(model, str(tmp_path))
    config = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert (config.r, config.lora_alpha, config.use_rslora, config.rank_pattern) == (4, 4, False, {})
    assert sorted(config.target_modules) == sorted(sliced_modules(model)) and config.task_type == "CAUSAL_LM"
    assert not config.lora_bias and config.modules_to_save is None
    _check_peft_equals(model, tiny_model, str(tmp_path))


def test_a_bf16_base_merges_to_the_same_weights(tmp_path):
    """fp32 slices over a bf16 base: PEFT's merge rounds W + delta once, as merge_sparse does; the logits agree to
    bf16 rounding only (PEFT computes the LoRA branch in fp32, the slices' update runs in bf16)."""
    def base():
        return tiny_model(dtype=torch.bfloat16)

    model = _sliced(base(), SparseNeuronConfig(neurons_per_layer=4, importance="l2"))
    export_peft_lora(model, str(tmp_path))
    ids = random_batches(1)[0]["input_ids"]
    peft_model = peft.PeftModel.from_pretrained(base(), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(peft_model, ids), _logits(model.eval(), ids), rtol=0, atol=1e-2)
    merged, reference = peft_model.merge_and_unload().state_dict(), merge_sparse(model).state_dict()
    assert all(torch.equal(merged[key], w) for key, w in reference.items())


def test_a_trained_model_with_a_global_budget_exports_unequal_ranks(tmp_path):
    cfg = SparseNeuronConfig(ratio=0.1, scope="global", importance="taylor", calibration_batches=2)
    trainer = sparse_trainer(tmp_path / "run", cfg, max_steps=2)
    trainer.train()
    model = trainer.model
    ks = {name: layer.index.numel() for name, layer in sliced_modules(model).items()}
    assert len(set(ks.values())) > 1  # the global budget gave the layers different k
    export_peft_lora(model, str(tmp_path / "peft"))
    config = _config(tmp_path / "peft")
    r = max(ks.values())
    assert config["r"] == config["lora_alpha"] == r
    assert config["rank_pattern"] == config["alpha_pattern"] == {n: k for n, k in ks.items() if k != r}
    _check_peft_equals(model, tiny_model, str(tmp_path / "peft"))


def test_bias_deltas_go_on_lora_b(tmp_path):
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="l1", train_bias=True,
                             target_modules=["q_proj", "k_proj", "v_proj"])  # Qwen2: the layers with a bias
    model = _sliced(tiny_causal_lm("qwen2"), cfg)
    assert all(layer.bias_delta.abs().sum() > 0 for layer in sliced_modules(model).values())
    export_peft_lora(model, str(tmp_path))
    assert _config(tmp_path)["lora_bias"] is True
    _check_peft_equals(model, lambda: tiny_causal_lm("qwen2"), str(tmp_path))


def test_bias_deltas_next_to_layers_without_a_bias_load_and_say_peft_cannot_merge_them(tmp_path):
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="l1", train_bias=True)  # o/gate/up/down have no bias
    model = _sliced(tiny_causal_lm("qwen2"), cfg)
    with pytest.warns(UserWarning, match="merge_and_unload"):
        export_peft_lora(model, str(tmp_path))
    _check_peft_equals(model, lambda: tiny_causal_lm("qwen2"), str(tmp_path), merge=False)


def test_modules_to_save_and_a_classification_head(tmp_path):
    from transformers import LlamaForSequenceClassification

    def base():
        torch.manual_seed(0)
        return LlamaForSequenceClassification(tiny_llama_config(num_labels=3, pad_token_id=0)).eval()

    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="l2", modules_to_save=["score"])
    model = _sliced(base(), cfg)
    export_peft_lora(model, str(tmp_path))
    config = _config(tmp_path)
    assert config["modules_to_save"] == ["score"] and config["task_type"] == "SEQ_CLS"
    _check_peft_equals(model, base, str(tmp_path))


@pytest.mark.parametrize("kind", [pytest.param("4bit", marks=needs_bnb("4bit")),
                                  pytest.param("8bit", marks=needs_bnb("8bit"))])
def test_bitsandbytes_bases(tmp_path, kind):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    tiny_model(tiny_quantizable_llama_config()).save_pretrained(tmp_path / "base")
    qc = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
          if kind == "4bit" else BitsAndBytesConfig(load_in_8bit=True))

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=qc, device_map={"": "cpu"},
                                                    dtype=torch.float32).eval()

    model = _sliced(load(), SparseNeuronConfig(neurons_per_layer=4, importance="l2"))
    export_peft_lora(model, str(tmp_path / "peft"))
    _check_peft_equals(model, load, str(tmp_path / "peft"), merge=False)  # PEFT merges 4/8-bit by re-quantizing


class _Projection(nn.Module):
    """A weight-holding layer that is no nn.Linear (as fused MoE experts or GPT-2's Conv1D are)."""

    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 8, 6
        self.weight, self.bias = nn.Parameter(torch.randn(6, 8)), None

    def forward(self, x):
        return x @ self.weight.T


def test_other_bases_and_unsliced_models_are_refused_before_anything_is_written(tmp_path):
    model = nn.Sequential(SlicedLinear(nn.Linear(8, 6), torch.tensor([1])), SlicedLinear(_Projection(), torch.tensor([2])))
    setattr(model, CONFIG_ATTR, SparseNeuronConfig(neurons_per_layer=1))
    with pytest.raises(ValueError, match=r"export 1 to PEFT LoRA: its slice sits on a _Projection"):
        export_peft_lora(model, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="no sparse-neuron slices"):
        export_peft_lora(tiny_model(), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0)).eval()


@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_gpt2_conv1d_slices_load_in_peft_exactly(tmp_path, axis):
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="random", axis=axis)
    model = _sliced(_gpt2(), cfg)
    export_peft_lora(model, str(tmp_path))
    assert _config(tmp_path)["fan_in_fan_out"] is True  # PEFT's flag for Conv1D's stored (d_in, d_out) weight
    _check_peft_equals(model, _gpt2, str(tmp_path))


def test_moe_expert_slices_are_refused_naming_the_fused_parameter(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM
    from helpers import SHAPE_MOE
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**SHAPE_MOE))
    if not hasattr(model.model.layers[0], "mlp"):
        pytest.skip("transformers 4.x: Mixtral's experts are nn.Linear modules, exported like any")
    model = _sliced(model, SparseNeuronConfig(neurons_per_layer=2, importance="random"))
    with pytest.raises(ValueError, match=r"experts\.0\.gate_up_proj to PEFT LoRA: it slices one expert of the fused "
                                         r"MoE parameter gate_up_proj"):
        export_peft_lora(model, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
