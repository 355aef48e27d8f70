"""The trainer on other families: decoders Mistral, Qwen2 (q/k/v biases), Gemma (tied embeddings), Phi-3 (fused
qkv / gate_up), OPT, GPT-NeoX, Falcon; an encoder classifier (BERT, head in modules_to_save) and an encoder-decoder (T5).
README's architecture table names these tests."""
import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, FalconConfig, GemmaConfig, GPTNeoXConfig,
                          MistralConfig, OPTConfig, Phi3Config, Qwen2Config, T5Config, T5ForConditionalGeneration,
                          TrainingArguments)

from helpers import TokenDataset, tiny_model
from sprune_trainer import SparseNeuronConfig, SparseNeuronTrainer, load_sparse_adapter, save_sparse_adapter
from sprune_trainer.layers.surgery import sliced_modules

SHAPE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "mistral": lambda: MistralConfig(**SHAPE, sliding_window=16, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**SHAPE, tie_word_embeddings=False),
    "gemma": lambda: GemmaConfig(**SHAPE, head_dim=8, tie_word_embeddings=True),
    "phi3": lambda: Phi3Config(**SHAPE, tie_word_embeddings=False, pad_token_id=0),
    "opt": lambda: OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, pad_token_id=0),
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64, hidden_dropout=0.0,
                                      attention_dropout=0.0),
    "falcon": lambda: FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   new_decoder_architecture=False, multi_query=True, hidden_dropout=0.0,
                                   attention_dropout=0.0),
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
    assert len(sliced_modules(model)) == {"phi3": 8, "opt": 12, "gpt_neox": 8, "falcon": 8}.get(arch, 14)
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


def _seq2seq_and_classifier():
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                             dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)).eval()
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64, num_labels=3,
                                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    return {"t5": t5, "bert": bert}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


@pytest.mark.parametrize("arch", ["t5", "bert"])
def test_encoder_decoder_and_encoder_classifier_train_and_round_trip(tmp_path, arch):
    """T5 (seq2seq, every attention / feed-forward linear) and BERT classification (its head trained in full)."""
    model = _seq2seq_and_classifier()[arch]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (8, 10), generator=g)
    if arch == "t5":
        rows = [{"input_ids": x, "labels": torch.randint(1, 128, (6,), generator=g)} for x in ids]
        cfg = SparseNeuronConfig(neurons_per_layer=4, importance="taylor", calibration_batches=2)
    else:
        rows = [{"input_ids": x, "labels": torch.tensor(int(x[0]) % 3)} for x in ids]
        cfg = SparseNeuronConfig(neurons_per_layer=4, importance="taylor", calibration_batches=2,
                                 modules_to_save=["classifier"])
    batch = {k: torch.stack([r[k] for r in rows[:2]]) for k in rows[0]}
    before = model(**batch).logits.detach()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                             learning_rate=1e-2, report_to="none", save_strategy="no", disable_tqdm=True,
                             use_cpu=True, seed=0)
    trainer = SparseNeuronTrainer(model=model, args=args, train_dataset=_Rows(rows), sparse_config=cfg)
    trainer.train()
    sliced = sliced_modules(model)
    assert len(sliced) >= 12 and all(m.delta.abs().sum() > 0 for m in sliced.values())
    model.eval()
    after = model(**batch).logits.detach()
    assert not torch.equal(after, before)
    save_sparse_adapter(model, tmp_path / "a")
    fresh = load_sparse_adapter(_seq2seq_and_classifier()[arch], str(tmp_path / "a")).eval()
    assert torch.equal(fresh(**batch).logits, after)
