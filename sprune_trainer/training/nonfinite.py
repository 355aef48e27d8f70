"""Never let a non-finite step reach the weights: the guard that skips it, and the Trainer hooks that use it.

One bad batch in bf16 (a NaN loss, an inf gradient) is enough to turn every trained weight into NaN; the
Trainer then logs a loss of 0 and saves a destroyed adapter without a word. The guard decides once per
optimizer step, after the gradients of all micro-batches are in:
  * skip when any micro-batch's loss since the last step, or any gradient the optimizer holds, is NaN/inf;
  * a skipped step never calls the optimizer (weights, moments and step counts untouched) and does not
    advance the learning-rate schedule (as the Trainer does for fp16 overflow steps); the Trainer still
    counts it in `global_step`;
  * the decision is all-reduced, so every DDP / DeepSpeed rank skips together (under ZeRO the optimizer
    sees only its rank's partition of the gradients);
  * after `max_consecutive` skips in a row training stops with `NonFiniteTrainingError`, and so does a `train()`
    that ends having skipped every step it took (too few for the limit): its adapter never trained.
Cost: one multi-tensor norm over the trainable gradients (small: slices) and one host sync per step; the
Trainer's own clipping norm is reused when it computed one (`clip_grad_norm_` of accelerate)."""
from __future__ import annotations

import contextlib
import functools
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from transformers.utils import logging

from .._hf_internals import replace_step
from .norms import norms_fp32

logger = logging.get_logger(__name__)

ADVICE = ("Try float32 weights (--dtype float32 --bf16 false), a lower learning rate, or max_grad_norm > 0; "
          "sprune_trainer.training.nonfinite_trace.trace_nonfinite(model, batch) names the module that goes "
          "non-finite.")


class NonFiniteTrainingError(RuntimeError):
    """Raised when too many optimizer steps in a row had a non-finite loss or gradient."""


def nonfinite_count(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0


def require_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """ValueError naming the tensors of `what` (an adapter being saved or loaded) that hold NaN/inf."""
    bad = {name: n for name, t in tensors.items() if (n := nonfinite_count(t))}
    if bad:
        listed = ", ".join(f"{k} ({n} values)" for k, n in list(bad.items())[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"refusing {what}: {len(bad)} tensor(s) hold NaN/inf: {listed}{more}. The training that "
                         f"made it diverged; {ADVICE}")


def flag_device(fallback: torch.device) -> torch.device:
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


class NonFiniteGuard:
    """Per-optimizer-step decision: skip the step when its loss or gradients are non-finite."""

    def __init__(self, max_consecutive: int = 10, enabled: bool = True):
        self.max_consecutive = max_consecutive
        self.enabled = enabled
        self.skipped_total = 0
        self.consecutive = 0
        self.skipped_steps: list[int] = []   # 1-based optimizer steps that were skipped
        self.last_step_skipped = False
        self.step_number = 0                 # optimizer step of the latest decision (1-based, survives a resume)
        self.decided_total = 0               # optimizer steps decided so far (skipped or taken)
        self._loss_bad: Optional[torch.Tensor] = None
        self._grad_norm: Optional[torch.Tensor] = None
        self._decided = False                # decide() ran for the step in progress
        self.step_source = None              # () -> optimizer steps done before this one (Trainer: global_step)
        self.untrained = None                # an untrained.UntrainedGuard checking the steps taken

    # ---- inputs of the decision ---------------------------------------------------------------------
    def note_loss(self, loss: torch.Tensor) -> None:
        """A micro-batch's loss (no host sync: the flag stays on the device until the step)."""
        if not (self.enabled and torch.is_tensor(loss) and torch.is_grad_enabled()):
            return
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad.to(self._loss_bad.device)

    def note_grad_norm(self, norm) -> None:
        """The total gradient norm the Trainer computed for clipping this step (reused, not recomputed)."""
        if torch.is_tensor(norm):
            self._grad_norm = norm.detach()

    def reset_pending(self) -> None:
        self._loss_bad, self._grad_norm = None, None

    def should_skip(self, params: Iterable[torch.Tensor]) -> bool:
        grads = [p.grad for p in params if p.grad is not None]
        device = grads[0].device if grads else (self._loss_bad.device if self._loss_bad is not None
                                                else torch.device("cpu"))
        if self._grad_norm is not None:
            bad = ~torch.isfinite(self._grad_norm).to(device)
        elif grads:
            bad = ~torch.isfinite(norms_fp32(grads).sum())
        else:
            bad = torch.zeros((), dtype=torch.bool, device=device)
        if self._loss_bad is not None:
            bad = bad | self._loss_bad.to(device)
        self.reset_pending()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = bad.to(flag_device(device), torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank's NaN skips the step everywhere
            bad = flag
        return bool(bad.item())

    # ---- the step ---------------------------------------------------------------------------------------
    def decide(self, params: Iterable[torch.Tensor]) -> bool:
        """True when this optimizer step must be skipped; raises after too many in a row."""
        skip = self.enabled and self.should_skip(params)
        self._record(skip)
        self._decided = True
        return skip

    def record_external(self, applied: bool) -> bool:
        """A step that something else decided on (DeepSpeed skips overflowing steps itself, before our
        optimizer is called): counted like ours unless `decide` already ran for it. True if it was skipped."""
        decided, self._decided = self._decided, False
        if decided:
            return False
        self._record(not applied)
        return not applied

    def _record(self, skip: bool) -> None:
        self.reset_pending()  # the next step starts with clean flags, whoever decided this one
        self.step_number = self.step_source() + 1 if self.step_source is not None else self.step_number + 1
        self.decided_total += 1
        self.last_step_skipped = skip
        if not skip:
            self.consecutive = 0
            return
        self.skipped_total += 1
        self.consecutive += 1
        self.skipped_steps.append(self.step_number)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"optimizer step {self.step_number}: {self.consecutive} steps in a row had a non-finite loss or "
                f"gradient (steps {self.skipped_steps[-self.consecutive:]}), so training stops here with the "
                f"weights of step {self.step_number - self.consecutive}. {ADVICE}")

    def warn_skipped(self, where: str = "") -> None:
        logger.warning(f"optimizer step {self.step_number}: non-finite loss or gradients{where}; step skipped (no "
                       f"update, moments and learning rate unchanged; {self.consecutive} in a row, "
                       f"{self.skipped_total} in total, limit {self.max_consecutive} in a row)")

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, describe=None) -> torch.optim.Optimizer:
        """Route `optimizer.step` through the decision (idempotent), and a step taken through `self.untrained`'s
        check when set. `describe(params)` names what was bad.
        Done by a subclass of the optimizer's own class (same name, `_hf_internals.replace_step`)."""
        guard = self

        def step(opt, *args, **kwargs):
            params = [p for g in opt.param_groups for p in g["params"]]
            if guard.decide(params):
                guard.warn_skipped(describe(params) if describe is not None else "")
                return None
            pending = guard.untrained.before_step(opt) if guard.untrained is not None else None
            out = super(guarded, opt).step(*args, **kwargs)
            if pending is not None:
                guard.untrained.after_step(pending)
            return out

        guarded = replace_step(optimizer, step, owner=self)
        return optimizer

    def attach_scheduler(self, scheduler):
        """A skipped optimizer step leaves the learning-rate schedule where it was (idempotent; a subclass again,
        as for the optimizer)."""
        if scheduler is None:
            return scheduler
        guard = self

        def step(sched, *args, **kwargs):
            if guard.last_step_skipped:
                return None
            return super(guarded, sched).step(*args, **kwargs)

        guarded = replace_step(scheduler, step, owner=self)
        return scheduler


def describe_nonfinite_grads(named_params: dict[int, str], params: list[torch.Tensor], limit: int = 4) -> str:
    """' in <names>' of the parameters whose gradient holds NaN/inf (only evaluated on a skipped step)."""
    bad = [named_params.get(id(p), f"param {i}") for i, p in enumerate(params)
           if p.grad is not None and nonfinite_count(p.grad)]
    if not bad:
        return " (loss non-finite; gradients finite)"
    more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
    return f" ({len(bad)} gradient tensors, e.g. {', '.join(bad[:limit])}{more})"


def without_cudnn_attention(device: torch.device):
    """Training runs with PyTorch's cuDNN attention kernel off (flash, memory-efficient and math stay on).

    Why: in bf16, `scaled_dot_product_attention` may pick cuDNN for a right-padded batch, and cuDNN's backward has
    returned NaN query gradients where the memory-efficient, math and eager kernels give finite ones, with a finite
    forward and loss. A no-op off CUDA."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class NonFiniteGuardMixin:
    """Trainer hooks of the guard, for any `transformers.Trainer` subclass: `class T(NonFiniteGuardMixin, Trainer)`.

    Settings: `max_nonfinite_steps` (consecutive skips before `NonFiniteTrainingError`), `nonfinite_guard`
    (False turns skipping off) and `cudnn_attention` (True lets training use the cuDNN attention kernel, see
    `without_cudnn_attention`), as keyword arguments or class attributes. The totals are logged as
    `nonfinite_skipped_steps` and returned in `train()`'s metrics as `train_nonfinite_skipped_steps`."""

    max_nonfinite_steps: int = 10
    nonfinite_guard: bool = True
    cudnn_attention: bool = False

    def __init__(self, *args, max_nonfinite_steps: Optional[int] = None, nonfinite_guard: Optional[bool] = None,
                 cudnn_attention: Optional[bool] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if max_nonfinite_steps is not None:
            self.max_nonfinite_steps = max_nonfinite_steps
        if nonfinite_guard is not None:
            self.nonfinite_guard = nonfinite_guard
        if cudnn_attention is not None:
            self.cudnn_attention = cudnn_attention
        self._make_nonfinite_guard()

    def _make_nonfinite_guard(self) -> NonFiniteGuard:
        if not isinstance(self.max_nonfinite_steps, int) or isinstance(self.max_nonfinite_steps, bool) \
                or self.max_nonfinite_steps < 1:  # the plain-Trainer path (the config checks its own field)
            raise ValueError(f"max_nonfinite_steps must be an int >= 1, got {self.max_nonfinite_steps!r}")
        self.nonfinite = NonFiniteGuard(self.max_nonfinite_steps, enabled=bool(self.nonfinite_guard))
        self.nonfinite.step_source = lambda: self.state.global_step  # step numbers survive a resume
        return self.nonfinite

    def _guard_optimizer(self, optimizer):
        names = {id(p): n for n, p in self.model.named_parameters()}
        return self.nonfinite.attach_optimizer(
            optimizer, describe=functools.partial(describe_nonfinite_grads, names))

    def create_optimizer(self, *args, **kwargs):
        return self._guard_optimizer(super().create_optimizer(*args, **kwargs))

    def create_scheduler(self, *args, **kwargs):
        return self.nonfinite.attach_scheduler(super().create_scheduler(*args, **kwargs))

    def compute_loss(self, model, inputs, *args, **kwargs):
        out = super().compute_loss(model, inputs, *args, **kwargs)
        self.nonfinite.note_loss(out[0] if isinstance(out, tuple) else out)
        return out

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.is_deepspeed_enabled and self.accelerator.sync_gradients:  # the engine stepped inside backward
            if self.nonfinite.enabled and self.nonfinite.record_external(self.model_wrapped.was_step_applied()):
                self.nonfinite.warn_skipped(" (found by DeepSpeed's overflow check)")
        return loss

    def _clip_grad_norm(self, model):  # transformers >= 5.x: reuse the clipping norm in the decision
        norm = super()._clip_grad_norm(model)
        self.nonfinite.note_grad_norm(norm)
        return norm

    def log(self, logs: dict, *args, **kwargs):
        if self.nonfinite.enabled and "loss" in logs:  # training logs only, not eval
            logs = {**logs, "nonfinite_skipped_steps": self.nonfinite.skipped_total}
        return super().log(logs, *args, **kwargs)

    def train(self, *args, **kwargs):
        self.nonfinite.reset_pending()  # calibration or an earlier run left no pending loss flag
        before, decided_before = self.nonfinite.skipped_total, self.nonfinite.decided_total
        kernels = contextlib.nullcontext() if self.cudnn_attention else without_cudnn_attention(self.args.device)
        with kernels:
            out = super().train(*args, **kwargs)
        skipped = self.nonfinite.skipped_total - before
        steps = self.nonfinite.skipped_steps[-skipped:] if skipped else []
        if skipped and skipped == self.nonfinite.decided_total - decided_before:
            raise NonFiniteTrainingError(
                f"every optimizer step of this run ({skipped}: steps {_shortened(steps)}) had a non-finite loss or "
                f"gradient and was skipped, so nothing was trained (fewer steps than max_nonfinite_steps="
                f"{self.nonfinite.max_consecutive}, which would have stopped it earlier). {ADVICE}")
        out.metrics["train_nonfinite_skipped_steps"] = skipped
        if skipped:
            logger.warning(f"{skipped} optimizer step(s) had a non-finite loss or gradients and were skipped: "
                           f"{_shortened(steps)}")
        return out


def _shortened(steps: list[int], limit: int = 20) -> str:
    return str(steps[:limit]) + (f" and {len(steps) - limit} more" if len(steps) > limit else "")
