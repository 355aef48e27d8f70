"""`_hf_internals` names every private transformers member the package relies on: each exists in the installed
transformers (CI runs this on 4.57 and 5.x), and every patch there is undone when its block ends."""
import transformers
import transformers.trainer as hf_trainer
from packaging.version import Version
from transformers import Trainer, TrainerState

from sprune_trainer import _hf_internals as hf

FIVE_ONLY = {"_clip_grad_norm", "_get_grad_norm"}  # 4.57 clips inline; the guard computes the norm itself there


def test_every_private_trainer_method_exists():
    names = set(hf.OVERRIDDEN_TRAINER_METHODS) | set(hf.CALLED_TRAINER_METHODS)
    if Version(transformers.__version__) < Version("5"):
        names -= FIVE_ONLY
    assert [n for n in sorted(names) if not callable(getattr(Trainer, n, None))] == []


def test_deepspeed_resume_patch_is_undone():
    original = hf_trainer.deepspeed_load_checkpoint
    with hf.deepspeed_resume_without_frozen_weights():
        assert hf_trainer.deepspeed_load_checkpoint is not original
    assert hf_trainer.deepspeed_load_checkpoint is original


def test_trainer_state_wrap_calls_back_and_is_undone(tmp_path):
    state, seen = TrainerState(), []
    with hf.after_trainer_state_saved(state, seen.append):
        state.save_to_json(str(tmp_path / "trainer_state.json"))
    assert seen == [str(tmp_path / "trainer_state.json")] and "save_to_json" not in vars(state)


def test_checkpointing_as_in_training_is_undone_and_leaves_the_users_own_alone():
    from types import SimpleNamespace
    from helpers import tiny_model
    args = SimpleNamespace(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    model = tiny_model()
    with hf.checkpointing_as_in_training(model, args):
        assert hf.model_checkpoints(model)
    assert not hf.model_checkpoints(model)
    with hf.checkpointing_as_in_training(model, SimpleNamespace(gradient_checkpointing=False)):
        assert not hf.model_checkpoints(model)
    hf.enable_checkpointing(model, {"use_reentrant": True})  # the user's own: kept, settings and all
    func = model.model.layers[0]._gradient_checkpointing_func
    with hf.checkpointing_as_in_training(model, args):
        assert model.model.layers[0]._gradient_checkpointing_func is func
    assert hf.model_checkpoints(model)
