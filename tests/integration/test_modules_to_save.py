"""modules_to_save: a randomly initialised classification head trained in full next to the slices, saved in the
adapter, kept by merge_sparse; against the model before training and a fresh model built with the same seed."""
import json
import logging

import pytest
import torch
from transformers import AutoModelForSequenceClassification, TrainingArguments

from helpers import tiny_llama_config
from sprune_trainer import SparseNeuronConfig, SparseNeuronTrainer, load_sparse_adapter, merge_sparse
from sprune_trainer.io import adapter as ckpt
from sprune_trainer.layers.surgery import inject_slices, sliced_modules

N_LABELS, SEQ = 3, 10


def _classifier(seed=0):
    torch.manual_seed(seed)
    config = tiny_llama_config(num_labels=N_LABELS, pad_token_id=0)
    return AutoModelForSequenceClassification.from_config(config).eval()


class LabelledDataset(torch.utils.data.Dataset):
    def __init__(self, n=16, seed=3):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 128, (n, SEQ), generator=g)  # no pad token: the last position is scored
        self.labels = torch.randint(0, N_LABELS, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _trainer(out, model, cfg, steps=4, **kw):
    args = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-2,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, report_to="none",
                save_strategy="no", disable_tqdm=True, use_cpu=True, seed=11, dataloader_num_workers=0)
    return SparseNeuronTrainer(model=model, args=TrainingArguments(**{**args, **kw}), train_dataset=LabelledDataset(),
                               sparse_config=cfg)


def _train(out, model, cfg, steps=4, **kw):
    trainer = _trainer(out, model, cfg, steps, **kw)
    trainer.train()
    return trainer


def _resume(out, model, cfg, steps, **kw):
    trainer = _trainer(out, model, cfg, steps, **kw)
    trainer.train(resume_from_checkpoint=True)
    return trainer.model


CFG = SparseNeuronConfig(neurons_per_layer=4, importance="l2", modules_to_save=["score"])
IDS = LabelledDataset(n=4, seed=9).ids


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("mts")
    before = {k: v.clone() for k, v in _classifier().state_dict().items()}
    trainer = _train(out, _classifier(), CFG)
    trainer.save_model(str(out / "adapter"))
    return before, trainer.model, out / "adapter"


def test_head_trains_in_full_base_stays_frozen_and_slices_change(trained):
    before, model, _ = trained
    assert not torch.equal(model.score.weight.detach(), before["score.weight"])
    assert model.score.weight.requires_grad
    sliced = sliced_modules(model)
    assert sliced and all(layer.delta.detach().abs().sum() > 0 for layer in sliced.values())
    for name, p in model.named_parameters():
        if name.startswith("score.") or name.endswith(".delta"):
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(p.detach(), before[key]), name  # byte-identical frozen base


def test_adapter_reloads_head_and_slices_to_identical_logits(trained):
    _, model, adapter = trained
    meta = json.loads((adapter / ckpt.META_NAME).read_text())
    assert meta["modules_to_save"] == {"score.weight": {"shape": [N_LABELS, 32], "dtype": "float32"}}
    want = model.eval()(IDS).logits
    fresh = _classifier()
    assert not torch.allclose(fresh(IDS).logits, want)  # the random head alone gives other logits
    loaded = load_sparse_adapter(fresh, str(adapter))
    assert torch.equal(loaded(IDS).logits, want)
    assert torch.equal(loaded.score.weight, model.score.weight) and loaded.score.weight.requires_grad


def test_merge_keeps_the_trained_head(trained):
    _, _, adapter = trained
    model = load_sparse_adapter(_classifier(), str(adapter))
    want, head = model(IDS).logits, model.score.weight.detach().clone()
    merged = merge_sparse(model)
    assert not sliced_modules(merged) and torch.equal(merged.score.weight, head)
    torch.testing.assert_close(merged(IDS).logits, want, rtol=1e-4, atol=1e-5)


def test_adapter_whose_json_and_config_disagree_on_modules_to_save_is_refused(trained):
    _, _, adapter = trained
    saved = ckpt.read_sparse_adapter(str(adapter))
    tensors = {**saved.tensors, **{f"{n}.index": i for n, i in saved.selection.items()}}
    layers = {n: {"shape": list(saved.shapes[n]), "axis": "rows", "k": 4, "dtype": "float32"} for n in saved.selection}
    with pytest.raises(ValueError, match="records no such tensors"):
        ckpt.check_adapter_consistent(saved.config, layers, tensors, "x", None)
    with pytest.raises(ValueError, match="score.weight"):
        ckpt.check_adapter_consistent(saved.config, layers, tensors, "x",
                                      {"score.weight": {"shape": [N_LABELS, 31], "dtype": "float32"}})
    without = SparseNeuronConfig(neurons_per_layer=4, importance="l2")
    with pytest.raises(ValueError, match="belong to no layer"):
        ckpt.check_adapter_consistent(without, layers, tensors, "x", None)


def test_adapter_loads_only_into_a_model_with_that_head(trained, tmp_path):
    _, _, adapter = trained
    torch.manual_seed(0)
    other = AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=5, pad_token_id=0))
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"'score.weight' is \(5, 32\) here"):
        load_sparse_adapter(other, str(adapter))
    assert not sliced_modules(other) and all(torch.equal(v, state[k]) for k, v in other.state_dict().items())


def test_modules_to_save_typo_is_a_clear_error():
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="l2", modules_to_save=["scor", "score"])
    model = _classifier()
    with pytest.raises(ValueError, match=r"modules_to_save entries \['scor'\] match no module"):
        inject_slices(model, {"model.layers.0.mlp.up_proj": torch.arange(4)}, cfg)
    assert not sliced_modules(model)
    with pytest.raises(ValueError, match="modules_to_save must be None or a non-empty list"):
        SparseNeuronConfig(neurons_per_layer=4, modules_to_save=[])


def test_a_module_both_sliced_and_saved_is_refused():
    cfg = SparseNeuronConfig(neurons_per_layer=4, modules_to_save=["mlp"])
    with pytest.raises(ValueError, match="both sliced"):
        inject_slices(_classifier(), {"model.layers.0.mlp.up_proj": torch.arange(4)}, cfg)


@pytest.mark.parametrize("saved, warned", [(None, True), (["score"], False)])
def test_untrained_new_head_is_warned_about(caplog, saved, warned):
    cfg = SparseNeuronConfig(neurons_per_layer=4, modules_to_save=saved)
    with caplog.at_level(logging.WARNING, logger="sprune_trainer"):
        inject_slices(_classifier(), {"model.layers.0.mlp.up_proj": torch.arange(4)}, cfg)
    messages = [r.getMessage() for r in caplog.records if "is not trained" in r.getMessage()]
    assert (messages == [messages[0]] and "LlamaForSequenceClassification.score" in messages[0]) if warned \
        else messages == []


def test_resume_restores_the_head_and_its_optimizer_state(tmp_path):
    whole = _train(tmp_path / "whole", _classifier(), CFG).model
    args = dict(save_strategy="steps", save_steps=2)
    first = _train(tmp_path / "parts", _classifier(), CFG, steps=2, **args)
    assert (tmp_path / "parts" / "checkpoint-2").is_dir() and first.state.global_step == 2
    resumed = _resume(tmp_path / "parts", _classifier(), CFG, steps=4, **args)
    torch.testing.assert_close(resumed.score.weight, whole.score.weight, rtol=1e-5, atol=1e-6)


class TokensDataset(torch.utils.data.Dataset):  # causal LM: the labels are the inputs
    def __init__(self, n=16, seed=3):
        self.ids = torch.randint(1, 128, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("names", [["embed_tokens"], ["embed_tokens", "lm_head"]])
def test_a_tied_embedding_trained_in_full_stays_tied_and_reloads(tmp_path, names):
    """Tied input/output embeddings (one tensor) named once or twice: training keeps them one tensor, the trained
    values reach the logits, and the adapter restores them into a fresh tied model to identical logits."""
    from transformers import AutoModelForCausalLM

    def tied_lm():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(tiny_llama_config(tie_word_embeddings=True)).eval()

    model = tied_lm()
    before = model.lm_head.weight.detach().clone()
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="l2", modules_to_save=names)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                             report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True, seed=11)
    trainer = SparseNeuronTrainer(model=model, args=args, train_dataset=TokensDataset(), sparse_config=cfg)
    trainer.train()
    model = trainer.model.eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not torch.equal(model.lm_head.weight.detach(), before)
    trainer.save_model(str(tmp_path / "adapter"))
    with torch.no_grad():
        want = model(IDS).logits
        loaded = load_sparse_adapter(tied_lm(), str(tmp_path / "adapter"))
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert torch.equal(loaded.eval()(IDS).logits, want)
