"""Scoring a model that checkpoints its blocks (as a run with gradient checkpointing trains): the blocks really are
recomputed in backward, the scores equal those without checkpointing for every data criterion and both kinds of
torch checkpointing, and each layer's term is finished as soon as its own gradient arrived (the recompute's calls
are not counted a second time)."""
import pytest
import torch

from helpers import assert_scores_close, criterion_config as cfg, linears, padded_batches, tiny_causal_lm
from sprune_trainer import _hf_internals as hf
from sprune_trainer.scoring import importance as importance_module
from sprune_trainer.scoring.importance import score_neurons

CRITERIA = [("taylor", {}), ("hessian", {}), ("taylor", {"taylor_form": "elementwise"}), ("zeroth_order", {}),
            ("wanda", {})]


def causal_lm_loss_fp64(model, batch):
    """HF's causal-LM loss in float64 (zeroth_order amplifies rounding by 1 / (2 eps))."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())


def _count_calls(layers):
    """A forward hook on every layer counting its calls; returns (counts, handles)."""
    counts = {"calls": 0}

    def hook(module, args, output):
        counts["calls"] += 1
    return counts, [m.register_forward_hook(hook) for m in layers.values()]


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("importance, extra", CRITERIA, ids=["taylor", "hessian", "taylor_elementwise",
                                                              "zeroth_order", "wanda"])
def test_scores_with_checkpointing_equal_scores_without(importance, extra, use_reentrant):
    model = tiny_causal_lm().double()
    layers, batches = linears(model), padded_batches()
    config = cfg(importance, calibration_micro_batch_size=1, **extra)
    kw = dict(loss_fn=causal_lm_loss_fp64, progress=False)
    counts, handles = _count_calls(layers)
    plain = score_neurons(model, layers, config, batches, **kw)
    plain_calls = counts["calls"]

    hf.enable_checkpointing(model, {"use_reentrant": use_reentrant})
    counts["calls"] = 0
    checkpointed = score_neurons(model, layers, config, batches, **kw)
    for h in handles:
        h.remove()

    assert_scores_close(checkpointed, plain, rtol=1e-9)
    assert all(s.sum() > 0 for s in plain.values())
    backward = importance in ("taylor", "hessian")
    # backward criteria recompute every block once in backward; forward-only criteria have nothing to recompute
    assert counts["calls"] == (2 if backward else 1) * plain_calls
    assert hf.model_checkpoints(model) and not any(m.training for m in model.modules())  # as found


@pytest.mark.parametrize("use_reentrant", [None, True, False])
@pytest.mark.parametrize("extra", [{}, {"taylor_form": "elementwise"}], ids=["hessian", "taylor_elementwise"])
def test_each_layer_is_finished_once_its_gradient_arrived(monkeypatch, extra, use_reentrant):
    """hessian / elementwise taylor keep a d_out x d_in gradient per layer until `finish`: it must come right after
    the layer's term, not at the end of the part (as it would if a recompute's call waited for a second gradient)."""
    model = tiny_causal_lm()
    layers = linears(model)
    if use_reentrant is not None:
        hf.enable_checkpointing(model, {"use_reentrant": use_reentrant})
    cls = importance_module.ElementwiseTaylorImportance if extra else importance_module.HessianImportance
    events = []
    term, finish = cls.batch_term, cls.finish

    def recording_term(self, layer, x, y, g, axis):
        events.append(("term", layer))
        return term(self, layer, x, y, g, axis)

    def recording_finish(self, layer, total, axis):
        events.append(("finish", layer))
        return finish(self, layer, total, axis)

    monkeypatch.setattr(cls, "batch_term", recording_term)
    monkeypatch.setattr(cls, "finish", recording_finish)
    score_neurons(model, layers, cfg("taylor" if extra else "hessian", **extra), padded_batches(n=1), progress=False)
    assert len(events) == 2 * 3 * len(layers)  # 3 parts (one sequence each) x every layer, one term and one finish
    assert all(events[i][0] == "term" and events[i + 1] == ("finish", events[i][1]) for i in range(0, len(events), 2))
