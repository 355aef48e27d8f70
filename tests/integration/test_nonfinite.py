"""The non-finite guard: a NaN/inf step never reaches the weights, the moments or the schedule."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from helpers import REPO, TokenDataset, checkout_env, free_port, inject_nonfinite, tiny_model, trainer_args
from sprune_trainer import SparseNeuronConfig, SparseNeuronTrainer, load_sparse_adapter, save_sparse_adapter
from sprune_trainer.io.adapter import META_NAME, WEIGHTS_NAME, _sha256, metadata_digest
from sprune_trainer.training.nonfinite import NonFiniteGuardMixin, NonFiniteTrainingError


def _args(out, **kw):
    """trainer_args' CPU arguments, with a decaying schedule and clipping on (the guard must leave both consistent)."""
    return trainer_args(out, **{"max_steps": 6, "lr_scheduler_type": "linear", "max_grad_norm": 1.0, **kw})


def _trainer(out, cfg=None, **kw):
    return SparseNeuronTrainer(model=tiny_model(), args=_args(out, **kw), train_dataset=TokenDataset(),
                               sparse_config=cfg or SparseNeuronConfig(neurons_per_layer=4, importance="l2"))


class _Snapshots(TrainerCallback):
    """After every optimizer step: the slices, the Adam moments and the learning rate."""

    def __init__(self):
        self.slices, self.moments, self.lrs, self.adam_steps = {}, {}, {}, {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
        s = state.global_step
        self.slices[s] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        inner = getattr(optimizer, "optimizer", optimizer)
        self.moments[s] = [st["exp_avg"].clone() for st in inner.state.values() if "exp_avg" in st]
        self.adam_steps[s] = [float(st["step"]) for st in inner.state.values() if "step" in st]
        self.lrs[s] = lr_scheduler.get_last_lr()[0]


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


@pytest.mark.parametrize("mode", ["logits", "loss"])
def test_a_nonfinite_step_is_skipped_and_training_goes_on(tmp_path, mode):
    """mode=logits: NaN loss and gradients; mode=loss: +inf loss with finite gradients (only the loss flag sees it)."""
    trainer = _trainer(tmp_path)
    snaps = _Snapshots()
    trainer.add_callback(snaps)
    inject_nonfinite(trainer.model, trainer, steps={3}, mode=mode)
    metrics = trainer.train().metrics

    assert trainer.nonfinite.skipped_steps == [3] and metrics["train_nonfinite_skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in snaps.slices[6].values())
    assert all(torch.equal(snaps.slices[3][n], snaps.slices[2][n]) for n in snaps.slices[2])  # no update
    assert _equal(snaps.moments[3], snaps.moments[2])          # moments untouched
    assert snaps.adam_steps[3] == snaps.adam_steps[2]          # Adam's step count too
    assert snaps.lrs[3] == snaps.lrs[2] and snaps.lrs[4] < snaps.lrs[3]  # the schedule waits one step, then goes on
    assert not any(torch.equal(snaps.slices[4][n], snaps.slices[3][n]) for n in snaps.slices[3])  # training goes on
    logged = [h["nonfinite_skipped_steps"] for h in trainer.state.log_history if "nonfinite_skipped_steps" in h]
    assert logged == [0, 0, 1, 1, 1, 1]


def test_skipping_equals_a_run_without_the_bad_batch(tmp_path):
    """A skipped step is exactly 'that batch never happened' for the optimizer: with a constant schedule and
    full-batch steps (every step sees the same data, in another order: float sums differ in the last bits),
    5 steps with step 2 skipped == 4 clean steps."""
    kw = dict(per_device_train_batch_size=32, lr_scheduler_type="constant")
    bad = _trainer(tmp_path / "bad", max_steps=5, **kw)
    inject_nonfinite(bad.model, bad, steps={2})
    bad.train()
    clean = _trainer(tmp_path / "clean", max_steps=4, **kw)
    clean.train()
    a = {n: p for n, p in bad.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in clean.model.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_gradient_accumulation_counts_one_skip_per_optimizer_step(tmp_path):
    trainer = _trainer(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4)
    snaps = _Snapshots()
    trainer.add_callback(snaps)
    inject_nonfinite(trainer.model, trainer, steps={2}, micro_batches={1})  # the 2nd micro-batch of step 2
    metrics = trainer.train().metrics
    assert trainer.nonfinite.skipped_steps == [2] and metrics["train_nonfinite_skipped_steps"] == 1
    assert trainer.state.global_step == 4
    assert set(snaps.adam_steps[4]) == {3.0}  # 4 optimizer steps, one skipped
    assert all(torch.equal(snaps.slices[2][n], snaps.slices[1][n]) for n in snaps.slices[1])


def test_nonfinite_every_step_stops_with_a_clear_error(tmp_path):
    trainer = _trainer(tmp_path, cfg=SparseNeuronConfig(neurons_per_layer=4, importance="l2", max_nonfinite_steps=3),
                       max_steps=10)
    inject_nonfinite(trainer.model, trainer, steps=None)
    with pytest.raises(NonFiniteTrainingError, match=r"optimizer step 3: 3 steps in a row.*float32.*learning rate"):
        trainer.train()
    assert trainer.nonfinite.skipped_steps == [1, 2, 3]
    assert all(torch.isfinite(p).all() and not p.any() for n, p in trainer.model.named_parameters() if p.requires_grad)


def test_guard_off_lets_the_nan_through(tmp_path):
    """The reference behaviour the guard exists for: without it one NaN step destroys every slice."""
    trainer = _trainer(tmp_path, cfg=SparseNeuronConfig(neurons_per_layer=4, importance="l2", nonfinite_guard=False),
                       max_steps=3, max_grad_norm=0.0)
    inject_nonfinite(trainer.model, trainer, steps={2})
    trainer.train()
    assert all(torch.isnan(p).all() for n, p in trainer.model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_max_nonfinite_steps_is_validated(value):
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        SparseNeuronConfig(neurons_per_layer=4, max_nonfinite_steps=value)


def test_the_mixin_guards_a_plain_trainer(tmp_path):
    """Baselines (LoRA, full FT) in the recipe get the same protection through the mixin."""
    class GuardedTrainer(NonFiniteGuardMixin, Trainer):
        pass
    model = tiny_model().train()
    trainer = GuardedTrainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=TokenDataset(),
                             max_nonfinite_steps=5)
    inject_nonfinite(model, trainer, steps={2})
    metrics = trainer.train().metrics
    assert trainer.nonfinite.skipped_steps == [2] and metrics["train_nonfinite_skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_adapter_is_refused_on_save_and_on_load(tmp_path):
    trainer = _trainer(tmp_path / "run", max_steps=2)
    trainer.train()
    good = save_sparse_adapter(trainer.model, str(tmp_path / "good"))
    layer = next(m for m in trainer.model.modules() if hasattr(m, "delta"))
    with torch.no_grad():
        layer.delta[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to save.*NaN/inf.*delta \(1 values\)"):
        save_sparse_adapter(trainer.model, str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad" / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="refusing to save"):  # a Trainer checkpoint goes the same way
        trainer.save_model(str(tmp_path / "bad_ckpt"))

    # a NaN written by something else, with a matching checksum: only the finiteness check can refuse it
    weights = os.path.join(good, WEIGHTS_NAME)
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith(".delta"))
    tensors[key][0, 0] = float("inf")
    save_file(tensors, weights, metadata={"format": "pt"})
    meta_path = os.path.join(good, META_NAME)
    meta = json.load(open(meta_path))
    meta["weights_sha256"] = _sha256(weights)
    meta["metadata_sha256"] = metadata_digest(meta)
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ValueError, match=rf"refusing to load.*{key}"):
        load_sparse_adapter(tiny_model(), good)


@pytest.mark.slow
def test_ranks_skip_together_and_agree_with_one_process(tmp_path):
    """Rank 1 alone sees an inf loss at step 2: both DDP ranks skip it, stay identical, and decide as one process
    with the same injection does."""
    worker = str(REPO / "tests" / "integration" / "nonfinite_ddp_worker.py")
    env = checkout_env(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    single = tmp_path / "single"
    single.mkdir()
    proc = subprocess.run([sys.executable, worker, str(single)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), worker, str(ddp)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = json.load(open(single / "rank0.json"))
    r0, r1 = (json.load(open(ddp / f"rank{r}.json")) for r in (0, 1))
    assert one["skipped_steps"] == r0["skipped_steps"] == r1["skipped_steps"] == [2]
    assert one["metric"] == r0["metric"] == r1["metric"] == 1
    assert r0["slices"] == r1["slices"]  # the ranks never diverged


def test_cudnn_attention_is_off_while_training_on_cuda(tmp_path, monkeypatch):
    """The bf16 finding: the trainer trains with cuDNN attention off on CUDA (flash / efficient / math stay on),
    restores the flags afterwards, and `cudnn_attention=True` leaves them alone. Checked through the flags that
    scaled_dot_product_attention reads, with the CPU run treated as a CUDA one."""
    import sprune_trainer.training.nonfinite as nf
    real = nf.without_cudnn_attention
    monkeypatch.setattr(nf, "without_cudnn_attention", lambda device: real(torch.device("cuda")))
    assert torch.backends.cuda.cudnn_sdp_enabled()

    class Flags(TrainerCallback):
        seen = []

        def on_step_begin(self, *a, **k):
            Flags.seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()))

    for allowed in (False, True):
        Flags.seen = []
        cfg = SparseNeuronConfig(neurons_per_layer=4, importance="l2", cudnn_attention=allowed)
        trainer = _trainer(tmp_path / str(allowed), cfg=cfg, max_steps=2)
        trainer.add_callback(Flags())
        trainer.train()
        assert Flags.seen == [(allowed, True)] * 2
        assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after train()


def test_a_resumed_run_names_the_real_step(tmp_path):
    """After resuming from checkpoint-2, the bad step is reported as step 3 of the run, not the 1st of the resume."""
    _trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2).train()
    resumed = _trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    inject_nonfinite(resumed.model, resumed, steps={3})
    metrics = resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2")).metrics
    assert resumed.nonfinite.skipped_steps == [3] and metrics["train_nonfinite_skipped_steps"] == 1
