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
