"""Compensated low-precision slices (SliceAdamW(compensated=True), SparseNeuronConfig.compensated_update): a bf16
slice fed the same gradients as an fp32 one follows it far more closely than a plain bf16 slice (whose small updates
round away), in the per-slice and the flat (compressed-moment) steps; the buffer survives a checkpoint; and a trained
number costs 8 bytes with bf16 slices and int8 moments, measured on the tensors themselves."""
import pytest
import torch

from helpers import sparse_trainer
from sprune_trainer import SliceAdamW, SparseNeuronConfig


def _trajectory(dtype, state_dtype, compensated, steps=300, lr=1e-4, seed=0):
    """One (64, 64) parameter stepped with a fixed seeded gradient sequence; returns its value as fp32 (with the
    compensation added, when kept: the value the optimizer works from)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(64, 64, generator=g).bfloat16().float()  # the same start in every dtype
    direction = torch.randn(64, 64, generator=g)  # a steady pull, so the weights drift ~lr per step
    p = torch.nn.Parameter(start.clone().to(dtype))
    opt = SliceAdamW([p], lr=lr, weight_decay=0.01, state_dtype=state_dtype, compensated=compensated)
    for _ in range(steps):
        p.grad = (direction + 0.3 * torch.randn(64, 64, generator=g)).to(dtype)
        opt.step()
    value = p.detach().float()
    if "compensation" in opt.state[p]:
        value = value + opt.state[p]["compensation"].float()
    return value, start, opt


@pytest.mark.parametrize("state_dtype", ["float32", "int8"])  # the per-slice step; the flat chunk step
def test_a_compensated_bf16_slice_follows_the_fp32_one(state_dtype):
    fp32, start, _ = _trajectory(torch.float32, state_dtype, False)
    plain, _, _ = _trajectory(torch.bfloat16, state_dtype, False)
    compensated, _, opt = _trajectory(torch.bfloat16, state_dtype, True)
    moved = (fp32 - start).abs().mean()
    plain_err = (plain - fp32).abs().mean()
    comp_err = (compensated - fp32).abs().mean()
    assert moved > 1e-2  # 300 steps of lr 1e-4 moved the weights, by updates each far below bf16's step at ~1
    assert plain_err > 0.3 * moved  # plain bf16 loses a large part of the trajectory to rounding
    assert comp_err < 0.01 * moved and comp_err < plain_err / 100  # (the rest: the bf16-rounded gradients)
    p = opt.param_groups[0]["params"][0]
    assert opt.state[p]["compensation"].dtype == torch.bfloat16


def test_fp32_slices_are_untouched_by_compensation():
    a, _, opt = _trajectory(torch.float32, "float32", True, steps=20)
    b, _, _ = _trajectory(torch.float32, "float32", False, steps=20)
    assert torch.equal(a, b) and "compensation" not in opt.state[opt.param_groups[0]["params"][0]]


def test_the_compensation_survives_a_checkpoint_and_is_dropped_by_a_run_without_it():
    _, _, opt = _trajectory(torch.bfloat16, "int8", True, steps=10)
    p = opt.param_groups[0]["params"][0]
    saved = opt.state_dict()
    same = SliceAdamW([p], lr=1e-4, state_dtype="int8", compensated=True)
    same.load_state_dict(saved)
    assert torch.equal(same.state[p]["compensation"], opt.state[p]["compensation"])
    other = SliceAdamW([p], lr=1e-4, state_dtype="int8", compensated=False)
    other.load_state_dict(saved)
    assert "compensation" not in other.state[p] and other.param_groups[0]["compensated"] is False


def _bytes_per_trained_number(trainer) -> float:
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    held = sum(p.numel() * p.element_size() for p in params)
    held += sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    return (held + trainer._sparse_optimizer.state_bytes()) / numel


def test_bytes_per_trained_number_measured(tmp_path):
    from transformers import TrainerCallback

    measured = {}

    class AtStep(TrainerCallback):
        def __init__(self, key):
            self.key = key

        def on_optimizer_step(self, args, state, control, **kw):  # after the step, before the gradients are zeroed
            measured[self.key] = _bytes_per_trained_number(trainer)

    for key, cfg in {"default": SparseNeuronConfig(neurons_per_layer=4, importance="l2"),
                     "bf16_int8_compensated": SparseNeuronConfig(neurons_per_layer=4, importance="l2",
                                                                 slice_dtype="bfloat16", optimizer_state="int8",
                                                                 compensated_update=True)}.items():
        trainer = sparse_trainer(tmp_path / key, cfg, max_steps=2)
        trainer.add_callback(AtStep(key))
        trainer.train()
        assert all(p.any() for p in trainer.model.parameters() if p.requires_grad)  # it trained
    assert 16.0 <= measured["default"] < 16.1  # fp32 slice, fp32 gradient, two fp32 moments (+ step counters)
    assert 8.0 <= measured["bf16_int8_compensated"] <= 8.1  # bf16 slice, gradient, compensation; int8 moments
