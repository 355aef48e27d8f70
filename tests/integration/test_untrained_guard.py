"""The guard against a run that trains nothing: a model whose sliced layers lose their gradient, or whose slices
never move, stops with SlicesNotTrainingError instead of saving an adapter of zeros."""
import pytest
import torch

from helpers import slice_state, sparse_trainer
from sprune_trainer import SlicesNotTrainingError, SparseNeuronConfig
from sprune_trainer.layers.surgery import sliced_modules


def _detach_slice_paths(model):
    """What a compiler or wrapper that drops the slices' gradient does: every sliced layer's output carries no
    gradient to its slice (zero, not None: the slice is still on the graph), while the loss still has one."""
    def hook(module, inputs, output):
        return output.detach() + 0.0 * module.delta.sum()
    for layer in sliced_modules(model).values():
        layer.register_forward_hook(hook)



def test_slices_without_gradient_stop_training(tmp_path):
    trainer = sparse_trainer(tmp_path, max_steps=4)
    trainer.prepare_sparse_model()
    _detach_slice_paths(trainer.model)
    with pytest.raises(SlicesNotTrainingError, match="optimizer step 1: none of the 14 trainable slice tensors "
                                                      "received a non-zero gradient"):
        trainer.train()
    assert trainer.state.global_step == 0  # stopped at the first step, not after the whole run


def test_a_frozen_slice_path_is_found_although_a_full_module_trains(tmp_path):
    """modules_to_save (lm_head) still trains; the check looks at the slices themselves, not the total norm."""
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="l2", modules_to_save=["lm_head"])
    trainer = sparse_trainer(tmp_path, cfg, max_steps=4)
    trainer.prepare_sparse_model()
    _detach_slice_paths(trainer.model)
    with pytest.raises(SlicesNotTrainingError, match="none of the 14 trainable slice tensors"):
        trainer.train()


def test_slices_that_get_gradients_but_never_move_stop_training(tmp_path):
    """A step whose update changes no slice (here an optimizer that does nothing) is caught after the update."""
    class Idle(torch.optim.SGD):
        def step(self, closure=None):
            return None
    trainer = sparse_trainer(tmp_path, max_steps=4)
    trainer.optimizer_cls_and_kwargs = (Idle, {"lr": 0.1})
    with pytest.raises(SlicesNotTrainingError, match="optimizer step 1: the slices received gradients but the "
                                                      "update changed none"):
        trainer.train()


def test_zero_learning_rate_is_refused_before_anything_runs(tmp_path):
    trainer = sparse_trainer(tmp_path, learning_rate=0.0)
    with pytest.raises(ValueError, match="learning_rate=0 trains nothing"):
        trainer.train()
    assert not sliced_modules(trainer.model)  # refused before scoring and surgery


def test_warmup_from_zero_learning_rate_trains_and_passes_the_guard(tmp_path):
    """The first step of a linear warmup runs at lr 0 and moves nothing; the guard waits for a step with lr > 0."""
    trainer = sparse_trainer(tmp_path, max_steps=4, lr_scheduler_type="linear", warmup_steps=2)
    trainer.train()
    assert trainer.nonfinite.untrained.verified
    assert sum(v.abs().sum() for v in slice_state(trainer.model).values()) > 0


@pytest.mark.parametrize("compensated", [True, False])
def test_a_compensated_step_below_the_bf16_rounding_step_counts_as_training(compensated):
    """The 8-byte setting late in a decaying schedule: bf16 slices grown to ~1 take Adam steps of ~lr = 1e-4, below
    half their rounding step (2^-9), so the slices keep their values and only SliceAdamW's compensation buffers
    move; that step trained. Without compensation the update is lost and the guard stops the run."""
    from sprune_trainer.optim.slice_adamw import SliceAdamW
    from sprune_trainer.training.untrained import UntrainedGuard

    slices = [torch.nn.Parameter(torch.ones(4, 8, dtype=torch.bfloat16)) for _ in range(2)]
    opt = SliceAdamW(slices, lr=1e-4, weight_decay=0.0, state_dtype="int8", compensated=compensated)
    guard = UntrainedGuard()

    def checked_step():
        for s in slices:
            s.grad = torch.full_like(s, 0.5)
        pending = guard.before_step(opt)
        opt.step()
        return pending

    if not compensated:
        with pytest.raises(SlicesNotTrainingError, match="changed none of the 2 slice tensors"):
            guard.after_step(checked_step())
        return
    for _ in range(2):  # the first step makes the buffers, the second one starts from them
        guard.after_step(checked_step())
        assert all(torch.equal(s, torch.ones_like(s)) for s in slices)  # rounded away in the slices themselves
        assert all(opt.state[s]["compensation"].abs().min() > 0 for s in slices)
    assert guard.verified


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_bf16_slices_at_the_end_of_a_decaying_schedule_finish_their_run(tmp_path, schedule):
    """The last step of a linear or cosine decay (checked: 40 is a logging step) moves only some of the bf16 slices'
    entries, by their rounding step: 10 of 2,048 entries here at the cosine's end. A norm in bf16 cannot see that
    and stopped a run that had trained; the norms summed in fp64 see it, so the run ends normally."""
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="l2", slice_dtype="bfloat16")
    trainer = sparse_trainer(tmp_path, cfg, max_steps=40, logging_steps=10, lr_scheduler_type=schedule,
                             learning_rate=1e-3)
    trainer.train()
    assert trainer.state.global_step == 40 and trainer.nonfinite.untrained.verified
    assert not trainer.nonfinite.untrained.warned_unchanged  # the last step's change was seen, not excused


def _moving_guard_and_step(slices):
    """An UntrainedGuard checking every step, and a step of `slices` (gradients set first) under `update(slices)`."""
    from sprune_trainer.training.untrained import UntrainedGuard

    guard = UntrainedGuard(every=lambda: 1)
    opt = torch.optim.SGD(slices, lr=1e-3)

    def checked_step(update):
        for s in slices:
            s.grad = torch.ones_like(s)
        pending = guard.before_step(opt)
        with torch.no_grad():
            update(slices)
        guard.after_step(pending)
    return guard, checked_step


def test_one_bf16_entry_moved_by_its_rounding_step_is_a_change():
    """One of 4,096 entries at 1.0 moved to the next bf16 value: the slice's squared norm changes by 4e-6 of itself,
    below what a bf16 norm resolves; the first check passes on that alone."""
    slices = [torch.nn.Parameter(torch.ones(64, 64, dtype=torch.bfloat16))]
    guard, checked_step = _moving_guard_and_step(slices)

    def one_entry(ps):
        ps[0][0, 0] = torch.nextafter(ps[0][0, 0], torch.tensor(2.0, dtype=torch.bfloat16))
    checked_step(one_entry)
    assert guard.verified and slices[0][0, 0].item() == 1.0078125


def test_a_step_that_changes_nothing_after_the_slices_trained_warns_once_and_goes_on(caplog):
    """Updates that round away after earlier steps moved the slices (the end of a schedule): the run trained, so a
    warning rather than a stop; the same step before any step moved them still stops (the tests above)."""
    import logging

    slices = [torch.nn.Parameter(torch.zeros(4, 8, dtype=torch.bfloat16))]
    guard, checked_step = _moving_guard_and_step(slices)
    checked_step(lambda ps: ps[0].add_(0.5))
    assert guard.verified
    with caplog.at_level(logging.WARNING, logger="sprune_trainer"):
        for _ in range(2):
            checked_step(lambda ps: None)
    warned = [r.getMessage() for r in caplog.records if "changed none" in r.getMessage()]
    assert len(warned) == 1 and "optimizer step 1: the update changed none of the 1 slice tensors at learning rate " \
        "0.001, after earlier steps trained them" in warned[0]


def test_the_guard_checks_logging_steps_after_the_first(tmp_path):
    """Past the first verified step the check runs on logging steps only; a run that stops training later is
    caught at the next one."""
    trainer = sparse_trainer(tmp_path, max_steps=6, logging_steps=3)
    checked = []
    guard = trainer.nonfinite.untrained
    before = guard.before_step

    def spy(optimizer):
        pending = before(optimizer)
        if pending is not None:
            checked.append(pending[0])
        return pending
    guard.before_step = spy
    trainer.train()
    assert checked == [1, 3, 6]

    late = sparse_trainer(tmp_path / "late", max_steps=6, logging_steps=3)
    late.prepare_sparse_model()
    real_step = type(late.nonfinite.untrained).before_step

    def detach_after_first(optimizer):
        if late.state.global_step == 1:
            _detach_slice_paths(late.model)  # takes effect from step 3's forward on
        return real_step(late.nonfinite.untrained, optimizer)
    late.nonfinite.untrained.before_step = detach_after_first
    with pytest.raises(SlicesNotTrainingError, match="optimizer step 3"):
        late.train()


def test_the_guard_can_be_turned_off(tmp_path):
    cfg = SparseNeuronConfig(neurons_per_layer=4, importance="l2", untrained_guard=False)
    trainer = sparse_trainer(tmp_path, cfg, max_steps=2)
    trainer.prepare_sparse_model()
    _detach_slice_paths(trainer.model)
    trainer.train()  # runs to the end, as the user asked
    assert all(v.abs().sum() == 0 for v in slice_state(trainer.model).values())
