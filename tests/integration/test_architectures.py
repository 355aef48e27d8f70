"""The trainer on other decoder families: Mistral, Qwen2 (q/k/v biases), Gemma (tied embeddings)."""
import pytest
import torch
from transformers import GemmaConfig, MistralConfig, Qwen2Config, TrainingArguments

from helpers import TokenDataset, tiny_model
from sprune_trainer import SparseNeuronConfig, SparseNeuronTrainer, load_sparse_adapter, save_sparse_adapter
from sprune_trainer.layers.surgery import sliced_modules

SHAPE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "mistral": lambda: MistralConfig(**SHAPE, sliding_window=16, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**SHAPE, tie_word_embeddings=False),
    "gemma": lambda: GemmaConfig(**SHAPE, head_dim=8, tie_word_embeddings=True),
}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_contract_on_other_architectures(tmp_path, arch):
    model = tiny_model(CONFIGS[arch]())
    ids = TokenDataset().ids[:2]
    before_logits = model(ids).logits
    embed = model.get_input_embeddings().weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                             learning_rate=1e-2, report_to="none", save_strategy="no", disable_tqdm=True,
                             use_cpu=True, seed=0)
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="taylor", calibration_batches=2,
                             train_bias=arch == "qwen2")
    trainer = SparseNeuronTrainer(model=model, args=args, train_dataset=TokenDataset(), sparse_config=cfg)
    trainer.prepare_sparse_model()
    assert torch.equal(model(ids).logits, before_logits)  # zero slices: the model before surgery
    assert len(sliced_modules(model)) == 14
    trainer.train()

    assert torch.equal(model.get_input_embeddings().weight, embed)
    if arch == "gemma":  # tied head untouched and still tied
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if arch == "qwen2":  # q/k/v carry biases: selected bias entries train, the base bias stays frozen
        q = model.model.layers[0].self_attn.q_proj
        assert q.base_layer.bias is not None and not q.base_layer.bias.requires_grad
        assert q.bias_delta.abs().sum() > 0
    after = model(ids).logits
    assert not torch.equal(after, before_logits)
    save_sparse_adapter(model, tmp_path / "a")
    fresh = load_sparse_adapter(tiny_model(CONFIGS[arch]()), str(tmp_path / "a"))
    assert torch.equal(fresh(ids).logits, after)
