"""Micro-batched calibration (config.calibration_micro_batch_size): same scores as whole batches for the criteria
that sum over tokens; hessian / elementwise taylor score each part, against a dense per-part computation; the
tensors kept for a layer's backward die with it."""
import weakref

import pytest
import torch

from helpers import assert_scores_close, criterion_config as cfg, dense_grads, linears, padded_batches, tiny_causal_lm
from sprune_trainer.scoring import importance as importance_module
from sprune_trainer.scoring.calibration import micro_batches, split_rows
from sprune_trainer.scoring.importance import score_neurons


def test_weighted_parts_add_up_to_the_batch_loss():
    model = tiny_causal_lm().double()
    batch = padded_batches(n=1)[0]
    parts = micro_batches(batch, 1)
    assert len(parts) == 3 and sum(w for _, w in parts) == pytest.approx(1.0)
    counted = (batch["labels"][:, 1:] != -100).sum(1).double()  # what HF's causal-LM loss averages over
    assert [w for _, w in parts] == pytest.approx((counted / counted.sum()).tolist())
    assert parts[1][0]["input_ids"].data_ptr() == batch["input_ids"][1:2].data_ptr()  # views, no copies
    with torch.no_grad():
        whole = model(**batch).loss
        split = sum(w * model(**p).loss for p, w in parts)
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=0)


def test_split_rows_keeps_what_has_no_batch_dimension():
    batch = {"input_ids": torch.zeros(5, 4, dtype=torch.long), "scale": torch.tensor(2.0), "flag": "x",
             "position_ids": torch.arange(4).unsqueeze(0)}
    parts = split_rows(batch, 2)
    assert [p["input_ids"].shape[0] for p in parts] == [2, 2, 1]
    assert all(p["scale"] is batch["scale"] and p["flag"] == "x" and p["position_ids"] is batch["position_ids"]
               for p in parts)
    assert split_rows(batch, 0) == [batch] and split_rows(batch, 5) == [batch]


def test_parts_without_label_tokens_are_left_out():
    batch = padded_batches(n=1)[0]
    batch["labels"][1] = -100
    parts = micro_batches(batch, 1)
    assert len(parts) == 2 and sum(w for _, w in parts) == pytest.approx(1.0)
    batch["labels"][:] = -100  # nothing to weight by: scored whole, as without splitting
    assert micro_batches(batch, 1) == [(batch, 1.0)]


def causal_lm_loss_fp64(model, batch):
    """HF's causal-LM loss (shift, ignore -100, mean over the rest) in float64; HF's own upcasts to float32 only,
    whose rounding zeroth_order would amplify by 1 / (2 eps)."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())


@pytest.mark.parametrize("importance, axis", [("taylor", "rows"), ("taylor", "columns"), ("zeroth_order", "rows"),
                                              ("wanda", "rows"), ("wanda", "columns")])
def test_token_sum_criteria_score_the_same_in_parts(importance, axis):
    model = tiny_causal_lm().double()
    layers, batches = linears(model), padded_batches()
    kw = dict(loss_fn=causal_lm_loss_fp64, progress=False)
    whole = score_neurons(model, layers, cfg(importance, axis=axis, calibration_micro_batch_size=0), batches, **kw)
    for size in (1, 2):
        parts = score_neurons(model, layers, cfg(importance, axis=axis, calibration_micro_batch_size=size), batches,
                              **kw)
        assert_scores_close(parts, whole, rtol=1e-5)  # scores are accumulated in float32
    assert all(s.sum() > 0 for s in whole.values())


def _units(batches, size):
    """(part, weight) of every batch, weights from the label tokens counted independently of calibration.py."""
    units = []
    for b in batches:
        counted = (b["labels"][:, 1:] != -100).sum(1).double()
        rows = b["input_ids"].shape[0]
        for lo in range(0, rows, size):
            part = {k: v[lo:lo + size] for k, v in b.items()}
            units.append((part, float(counted[lo:lo + size].sum() / counted.sum())))
    return units


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("importance", ["hessian", "taylor_elementwise"])
def test_squared_and_absolute_criteria_score_each_part(importance, size):
    """Each part's gradient is the batch loss's share from it (weight x the part's own mean-loss gradient);
    size 3 = the whole batch."""
    model = tiny_causal_lm()
    layers, batches = linears(model), padded_batches()
    kw = dict(taylor_form="elementwise") if importance == "taylor_elementwise" else {}
    name = "taylor" if kw else "hessian"
    got = score_neurons(model, layers, cfg(name, calibration_micro_batch_size=size, **kw), batches, progress=False)
    units = _units(batches, size)
    grads = dense_grads(model, layers, [u for u, _ in units])
    want = {}
    for n, m in layers.items():
        w = m.weight.detach()
        terms = [(w * weight * g[n][0]).abs().sum(1) if kw else (w ** 2 * (weight * g[n][0]) ** 2).sum(1)
                 for (_, weight), g in zip(units, grads)]
        want[n] = sum(terms)
    assert_scores_close(got, want)


def test_kept_tensors_die_with_their_layers_backward(monkeypatch):
    """Without letting go, every layer's kept output would live until the whole backward (and its graph) ends."""
    model = tiny_causal_lm()
    consumed: list[weakref.ref] = []
    alive_after_use = []
    original = importance_module.TaylorImportance.batch_term

    def checking_batch_term(self, layer, x, y, g, axis):
        alive_after_use.append(sum(r() is not None for r in consumed))
        consumed.append(weakref.ref(y))
        return original(self, layer, x, y, g, axis)

    monkeypatch.setattr(importance_module.TaylorImportance, "batch_term", checking_batch_term)
    score_neurons(model, linears(model), cfg("taylor", calibration_micro_batch_size=1), padded_batches(n=1),
                  progress=False)
    assert len(alive_after_use) == 3 * 14  # 3 parts x 14 linears, one grad each
    assert max(alive_after_use) == 0
