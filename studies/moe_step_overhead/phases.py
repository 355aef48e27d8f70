"""Where a Trainer step's time goes: wall time of the calls the Trainer makes once per step, each wrapped in a timer
on the trainer / model / optimizer instance (the classes are untouched). The wrapping costs a few microseconds per
call, so the phases add up to slightly less than the step."""
from __future__ import annotations

import time
from collections import defaultdict

from transformers import TrainerCallback


class PhaseTimer(TrainerCallback):
    """Per-phase seconds, summed over the steps after the first `warmup` (forward = compute_loss; backward =
    accelerator.backward; the model walks train / zero_grad / floating_point_ops / clipping; the optimizer step)."""

    def __init__(self, trainer, warmup: int):
        self.trainer, self.warmup = trainer, warmup
        self.seconds: dict[str, float] = defaultdict(float)
        self.timing = False
        self.steps = 0

    def _wrap(self, owner, attr: str, phase: str) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            if not self.timing:
                return original(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - t0

        setattr(owner, attr, timed)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        t = self.trainer
        for owner, attr, phase in ((t, "compute_loss", "forward (compute_loss)"),
                                   (t.accelerator, "backward", "backward"),
                                   (t.model, "train", "model.train()"),
                                   (t.model, "zero_grad", "model.zero_grad()"),
                                   (t, "floating_point_ops", "floating_point_ops"),
                                   (t, "_clip_grad_norm", "gradient clipping"),
                                   (t.optimizer, "step", "optimizer step")):
            self._wrap(owner, attr, phase)

    def on_step_begin(self, args, state, control, **kw):
        self.timing = state.global_step >= self.warmup
        self.steps += self.timing

    def per_step_ms(self) -> dict[str, float]:
        return {k: 1e3 * v / max(self.steps, 1) for k, v in self.seconds.items()}
