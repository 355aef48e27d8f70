"""calibration_micro_batch_size='auto' (scoring/micro_batch.py): with a stand-in for the device's memory statistics,
the first part is one sequence and later parts are the largest that fit, never more than the batch; on the CPU the
whole batch; one sequence for the criteria whose estimate depends on the part; the sum-exact criteria score the
same at the auto choice as at one sequence per part."""
import pytest
import torch

from helpers import assert_scores_close, criterion_config as cfg, linears, padded_batches, tiny_causal_lm
from sprune_trainer.scoring import micro_batch
from sprune_trainer.scoring.importance import score_neurons
from sprune_trainer.scoring.micro_batch import HEADROOM, DeviceMemory, MicroBatchPlan

HELD = 10_000  # bytes allocated before every part


def fake_memory(monkeypatch, per_token: int, available: int, seq: int) -> list:
    """Replace read_memory: `available` bytes free; a part of one `seq`-token sequence peaks `per_token` bytes a token
    above what is held. Returns the list of reset_peak flags it was called with."""
    calls = []

    def read(device, reset_peak=False):
        calls.append(reset_peak)
        return DeviceMemory(allocated=HELD, peak=HELD + per_token * seq, available=available)
    monkeypatch.setattr(micro_batch, "read_memory", read)
    return calls


def token_batch(rows: int, seq: int, ignored_rows=()) -> dict:
    ids = torch.arange(rows * seq).reshape(rows, seq) % 128
    labels = ids.clone()
    labels[list(ignored_rows)] = -100
    return {"input_ids": ids, "labels": labels}


def run(plan, batch):
    """(sizes of the parts, their weights); checks that the parts are the batch's rows in order."""
    parts = list(plan.parts(batch))
    rows = torch.cat([p["input_ids"] for p, _ in parts])
    counted = [r for r in range(batch["input_ids"].shape[0]) if (batch["labels"][r, 1:] != -100).any()]
    assert torch.equal(rows, batch["input_ids"][counted])  # every row with loss terms, once, in order
    return [p["input_ids"].shape[0] for p, _ in parts], [w for _, w in parts]


def test_parts_are_the_largest_that_fit_and_never_exceed_the_batch(monkeypatch):
    seq, per_token, available = 10, 10, 400
    calls = fake_memory(monkeypatch, per_token, available, seq)
    plan = MicroBatchPlan("auto", exact_in_parts=True)
    sizes, weights = run(plan, token_batch(8, seq))
    budget = HEADROOM * available  # 320 bytes: 3 sequences of 10 tokens at 10 bytes a token (4 would need 400)
    assert 3 * seq * per_token <= budget < 4 * seq * per_token
    assert sizes == [1, 3, 3, 1] and sum(weights) == pytest.approx(1.0)
    assert calls.count(True) == 1  # one probe, the first part of the run
    assert run(plan, token_batch(8, 2 * seq))[0] == [1] * 8  # longer sequences: fewer per part
    assert run(plan, token_batch(8, seq // 4))[0] == [8]  # 12 would fit: the batch itself


def test_ample_memory_scores_the_rest_of_the_batch_at_once(monkeypatch):
    fake_memory(monkeypatch, per_token=1, available=10**12, seq=10)
    plan = MicroBatchPlan("auto", exact_in_parts=True)
    assert run(plan, token_batch(6, 10))[0] == [1, 5]
    assert run(plan, token_batch(6, 10))[0] == [6]


def test_the_probe_is_the_first_sequence_with_loss_terms(monkeypatch):
    fake_memory(monkeypatch, per_token=10, available=400, seq=10)
    sizes, weights = run(MicroBatchPlan("auto", exact_in_parts=True), token_batch(5, 10, ignored_rows=[0]))
    assert sizes == [1, 3] and weights == pytest.approx([0.25, 0.75])


def test_auto_is_the_whole_batch_without_memory_statistics_and_one_sequence_for_part_estimates(monkeypatch):
    batch = token_batch(4, 10)
    assert micro_batch.read_memory(batch["input_ids"].device) is None  # the CPU keeps none
    assert run(MicroBatchPlan("auto", exact_in_parts=True), batch) == ([4], [1.0])
    fake_memory(monkeypatch, per_token=1, available=10**12, seq=10)
    assert run(MicroBatchPlan("auto", exact_in_parts=False), batch)[0] == [1, 1, 1, 1]  # hessian, elementwise
    assert run(MicroBatchPlan(2, exact_in_parts=True), batch)[0] == [2, 2]  # a number is taken as it is
    unweighted = list(MicroBatchPlan("auto", exact_in_parts=True).parts(token_batch(3, 10, [0]), weighted=False))
    assert [(p["input_ids"].shape[0], w) for p, w in unweighted] == [(1, None), (2, None)]  # wanda keeps every row


def causal_lm_loss_fp64(model, batch):
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())


@pytest.mark.parametrize("importance", ["taylor", "zeroth_order", "wanda"])
def test_sum_exact_criteria_score_the_same_at_the_auto_choice(monkeypatch, importance):
    model = tiny_causal_lm().double()
    layers, batches = linears(model), padded_batches()  # 3 sequences of 10 tokens each
    sizes = []

    def loss(model, part):
        sizes.append(part["input_ids"].shape[0])
        return causal_lm_loss_fp64(model, part)

    one = score_neurons(model, layers, cfg(importance, calibration_micro_batch_size=1), batches, loss_fn=loss,
                        progress=False)
    sizes.clear()
    fake_memory(monkeypatch, per_token=10, available=250, seq=10)  # 200 bytes: 2 sequences per part
    auto = score_neurons(model, layers, cfg(importance), batches, loss_fn=loss, progress=False)
    assert_scores_close(auto, one, rtol=1e-5)  # scores are accumulated in float32
    passes = 2 if importance == "zeroth_order" else 1  # the minus pass takes the plus pass's parts
    assert sizes == [1, 2] * passes + [2, 1] * passes
