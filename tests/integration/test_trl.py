"""SparseNeuronSFTTrainer / SparseNeuronDPOTrainer end to end on CPU: TRL's own configs, dataset preparation,
collators and losses, on a tiny seeded Llama with a word-level tokenizer built here (no hub)."""
import math
import sys

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402

from helpers import tiny_llama_config, tiny_model  # noqa: E402
from sprune_trainer import (SparseNeuronConfig, SparseNeuronDPOTrainer, SparseNeuronSFTTrainer,  # noqa: E402
                            load_sparse_adapter)
from sprune_trainer.scoring.importance import score_neurons  # noqa: E402
from sprune_trainer.layers.surgery import sliced_modules  # noqa: E402
from sprune_trainer.scoring.selection import select_neurons  # noqa: E402

WORDS = ("the a cat dog bird sat ran flew on under over mat log tree and then it was red blue green big small "
         "why because yes no").split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


TOK = _tokenizer()


def _model(seed=0):
    return tiny_model(tiny_llama_config(vocab_size=len(TOK)), seed=seed)


def _texts(n=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(4 + j % 5),), generator=g))
            for j in range(n)]


def _sft_config(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                lr_scheduler_type="constant", max_grad_norm=0.0, report_to="none", save_strategy="no",
                logging_steps=1, disable_tqdm=True, use_cpu=True, seed=11, bf16=False, dataloader_num_workers=0)
    base.update(kw)
    return trl.SFTConfig(**base)


def _sft(out, cfg=None, model=None, **kw):
    return SparseNeuronSFTTrainer(model=model if model is not None else _model(), args=_sft_config(out, **kw),
                                  train_dataset=Dataset.from_dict({"text": _texts()}), processing_class=TOK,
                                  sparse_config=cfg or SparseNeuronConfig(neurons_per_layer=4, importance="l2"))


def _frozen_and_slices(model):
    frozen = {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters()
              if not p.requires_grad}
    return frozen, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_sft_taylor_scores_trl_batches_and_trains_only_slices(tmp_path):
    original = _model().state_dict()
    # whole calibration batches (micro-batch 0), so the batches seen are TRL's collated ones as they are
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="taylor", calibration_batches=2,
                             calibration_micro_batch_size=0)
    trainer = _sft(tmp_path, cfg)  # TRL defaults kept: gradient checkpointing on, completion-only loss off
    seen = []
    trl_loss = trainer.compute_loss

    def recording_loss(model, inputs, *a, **kw):
        if not model.training:  # scoring runs in eval mode; training steps do not
            seen.append({k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return trl_loss(model, inputs, *a, **kw)
    trainer.compute_loss = recording_loss
    trainer.train()

    # the calibration batches are TRL's: its tokenization (text + eos) through its collator (pad, labels -100)
    assert len(seen) == 2 and all(b["input_ids"].shape[0] == 4 for b in seen)
    encoded = {tuple(TOK(t)["input_ids"] + [TOK.eos_token_id]) for t in _texts()}
    for b in seen:
        for ids, mask, labels in zip(b["input_ids"], b["attention_mask"], b["labels"]):
            assert tuple(ids[mask.bool()].tolist()) in encoded
            assert torch.equal(labels, torch.where(mask.bool(), ids, -100))
    # and the selection is taylor's on them, recomputed with the plain HF loss on the model before surgery
    ref = _model()
    layers = {n: m for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    scores = score_neurons(ref, layers, cfg, batches=seen, progress=False)
    expected = select_neurons(scores, cfg)
    for name, layer in sliced_modules(trainer.model).items():
        assert torch.equal(torch.sort(layer.index).values, torch.sort(expected[name]).values), name

    frozen, slices = _frozen_and_slices(trainer.model)
    assert set(frozen) == set(original)
    for name, value in frozen.items():
        assert torch.equal(value, original[name]), name  # byte-identical
    assert len(slices) == 14 and all(v.abs().sum() > 0 for v in slices.values())
    # calibration forwards left TRL's metrics alone: no eval records, tokens counted = one epoch's tokens
    assert not any(trainer._metrics["eval"].values())
    assert trainer._total_train_tokens == sum(len(TOK(t)["input_ids"]) + 1 for t in _texts())


def test_sft_adapter_round_trip_gives_identical_logits(tmp_path):
    trainer = _sft(tmp_path, max_steps=3)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    ids = TOK(_texts(2), return_tensors="pt", padding=True)["input_ids"]
    trained = trainer.model(ids).logits
    assert not torch.equal(trained, _model()(ids).logits)
    reloaded = load_sparse_adapter(_model(), str(tmp_path / "adapter"))
    assert torch.equal(reloaded(ids).logits, trained)


def test_sft_resume_from_checkpoint_is_bit_identical(tmp_path):
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="random")
    full = _sft(tmp_path / "run", cfg, max_steps=6, save_strategy="steps", save_steps=3)
    full.train()
    _, final = _frozen_and_slices(full.model)
    # another seed would pick other neurons: the resumed run must take them from the checkpoint
    resumed = _sft(tmp_path / "run", SparseNeuronConfig(neurons_per_layer=4, importance="random", seed=99),
                   max_steps=6, save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    _, after = _frozen_and_slices(resumed.model)
    assert after.keys() == final.keys()
    for name in final:
        assert torch.equal(after[name], final[name]), name


@pytest.mark.parametrize("reference", ["ref_model", "precomputed"])
def test_dpo_trains_only_slices_against_the_base_as_reference(tmp_path, reference):
    """The reference is the base: a frozen copy, or log-probs precomputed in __init__ before surgery (trl >= 1.2;
    1.0 / 1.1 still load a reference then). Zero-initialised slices leave the policy equal to it, so the first step's
    DPO loss is exactly -log sigmoid(0) = log 2; taylor scores on DPO's own batches and loss."""
    original = _model().state_dict()
    texts = _texts(16, seed=5)
    data = Dataset.from_dict({"prompt": texts[:8], "chosen": [" " + t.split()[0] for t in texts[8:]],
                              "rejected": [" " + t.split()[-1] for t in texts[8:]]})
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                         lr_scheduler_type="constant", max_grad_norm=0.0, report_to="none", save_strategy="no",
                         logging_steps=1, disable_tqdm=True, use_cpu=True, seed=11, bf16=False,
                         precompute_ref_log_probs=reference == "precomputed")
    trainer = SparseNeuronDPOTrainer(model=_model(), ref_model=_model() if reference == "ref_model" else None,
                                     args=args, train_dataset=data, processing_class=TOK,
                                     sparse_config=SparseNeuronConfig(neurons_per_layer=4, importance="taylor",
                                                                      calibration_batches=2))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]  # (4.57 logs 4 decimals)
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-4)
    frozen, slices = _frozen_and_slices(trainer.model)
    for name, value in frozen.items():
        assert torch.equal(value, original[name]), name
    assert len(slices) == 14 and all(v.abs().sum() > 0 for v in slices.values())


def test_peft_config_is_refused(tmp_path):
    from peft import LoraConfig
    with pytest.raises(ValueError, match="peft_config=LoraConfig"):
        SparseNeuronSFTTrainer(model=_model(), args=_sft_config(tmp_path), processing_class=TOK,
                               train_dataset=Dataset.from_dict({"text": _texts()}), peft_config=LoraConfig(r=2))


def test_without_trl_the_import_error_names_the_extra(monkeypatch):
    import sprune_trainer
    monkeypatch.delitem(sys.modules, "sprune_trainer.integrations.trl")
    monkeypatch.delattr(sprune_trainer.integrations, "trl")
    monkeypatch.setitem(sys.modules, "trl", None)  # what an environment without trl gives on import
    with pytest.raises(ImportError, match=r"pip install 'sprune_trainer\[trl\]'"):
        from sprune_trainer import SparseNeuronSFTTrainer  # noqa: F401
