"""Stop a run whose slices do not train, instead of letting it report success over an untouched model.

A wrapper or compiler that drops the slices' gradient, a hook that detaches the sliced layers' outputs, or a
learning rate of zero all give a run whose loss looks ordinary while every slice stays where it started; the
Trainer then saves an adapter of zeros. The guard looks at optimizer steps that were actually taken (not skipped
as non-finite): the first ones until one with a positive learning rate has been verified, then every logging step.
On such a step it checks that some slice holds a non-zero gradient before the update (non-finite steps never get
here while the non-finite guard is on) and that some slice changed in it, its value or, where the optimizer keeps
one, its compensation buffer (a compensated bf16 step far below the slice's rounding step moves only that), by
per-slice norms summed in fp64, which see one entry of a bf16 slice move by its rounding step. The two flags are
all-reduced (MAX) so every rank decides alike, and either failing raises `SlicesNotTrainingError` out of `train()`,
with one exception: once a step has moved the slices, a later step whose update changed none (the end of a decaying
schedule, where updates of bf16 slices round away) logs a warning instead, since the run did train; a later step
without gradients still raises.

Cost, on checked steps only: three multi-tensor norms over the slices (before the update: gradients and values;
after: values), two more over the compensation buffers where there are any, and one two-element all-reduce with a
host sync; nothing on the other steps."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from transformers.utils import logging

from ..optim.slice_adamw import COMPENSATION
from .nonfinite import flag_device
from .norms import norms_fp32, norms_fp64

logger = logging.get_logger(__name__)

LIKELY_CAUSES = (
    "Likely causes: a compiled or wrapped model whose graph loses the slices' gradient (a compiler "
    "or wrapper bug); forward hooks or a wrapper that replace or detach the sliced layers' outputs; the sliced "
    "layers off the loss's path (run under torch.no_grad, or their output unused); a learning rate of zero; bfloat16 "
    "slices whose updates round away (slice_dtype='float32', or compensated_update=True). Try the same run without "
    "torch_compile or the wrapper, check that loss.backward() reaches a layer's `delta`, or set "
    "SparseNeuronConfig(untrained_guard=False) to train anyway.")


class SlicesNotTrainingError(RuntimeError):
    """Raised when an optimizer step found no slice with a gradient, or changed no slice."""


class UntrainedGuard:
    """Per-step check that the slices receive gradients and move. `step_source()` gives the optimizer steps done
    before this one, `every()` the logging interval; `watched(params)` picks the slices among an optimizer's
    parameters (all of them when it recognises none, as under DeepSpeed's flattened partitions)."""

    def __init__(self, enabled: bool = True, step_source: Optional[Callable[[], int]] = None,
                 every: Optional[Callable[[], int]] = None,
                 watched: Optional[Callable[[list], list]] = None):
        self.enabled = enabled
        self.step_source = step_source or (lambda: 0)
        self.every = every or (lambda: 0)
        self.watched = watched or (lambda params: params)
        self.verified = False  # a step with a positive learning rate moved the slices
        self.warned_unchanged = False

    def due(self, step: int) -> bool:
        every = self.every()
        return self.enabled and (not self.verified or (every > 0 and step % every == 0))

    def before_step(self, optimizer: torch.optim.Optimizer):
        """What the check after the update needs, or None when this step is not checked."""
        step = self.step_source() + 1
        if not self.due(step):
            return None
        params = self.watched([p for g in optimizer.param_groups for p in g["params"]])
        lr = max((float(g.get("lr", 0.0)) for g in optimizer.param_groups), default=0.0)
        lr_positive = lr > 0
        grads = [p.grad for p in params if p.grad is not None]
        device = params[0].device if params else torch.device("cpu")
        if grads:
            norms = norms_fp32(grads)
            # NaN counts as a gradient: a step that reaches here with one was let through on purpose
            # (nonfinite_guard=False); the non-finite guard skips such steps before this check otherwise
            has_grad = (norms != 0).any().to(device)
        else:
            has_grad = torch.zeros((), dtype=torch.bool, device=device)
        values = _value_norms(optimizer, params) if lr_positive else None  # nothing to compare at lr 0
        return step, optimizer, params, has_grad, values, lr

    def after_step(self, pending) -> None:
        if pending is None:
            return
        step, optimizer, params, has_grad, before, lr = pending
        lr_positive = lr > 0
        changed = torch.ones((), dtype=torch.bool, device=has_grad.device)  # not checkable at lr 0
        if lr_positive and before is not None:
            changed = (_value_norms(optimizer, params) != before).any().to(has_grad.device)
        flags = torch.stack([has_grad, changed]).to(torch.int32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flags = flags.to(flag_device(flags.device))
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # any rank's slices training is the run training
        has_grad, changed = (bool(v) for v in flags.tolist())
        n = len(params)
        if not has_grad:
            raise SlicesNotTrainingError(
                f"optimizer step {step}: none of the {n} trainable slice tensors received a non-zero "
                f"gradient, so this run would train nothing. {LIKELY_CAUSES}")
        if not changed:
            if not self.verified:
                raise SlicesNotTrainingError(
                    f"optimizer step {step}: the slices received gradients but the update changed none of the {n} "
                    f"slice tensors, so this run would train nothing. {LIKELY_CAUSES}")
            if not self.warned_unchanged:
                logger.warning(
                    f"optimizer step {step}: the update changed none of the {n} slice tensors at learning rate "
                    f"{lr:.3g}, after earlier steps trained them: the updates round away at this learning rate "
                    f"(bfloat16 slices: compensated_update=True or slice_dtype='float32' keep them). Training goes on; "
                    f"this warning is shown once.")
                self.warned_unchanged = True
            return
        if lr_positive:
            self.verified = True


def _value_norms(optimizer: torch.optim.Optimizer, params: list) -> Optional[torch.Tensor]:
    """(2n,) fp64: each slice's norm, then its compensation buffer's (SliceAdamW with compensated=True; 0 where there
    is none yet, as before the first step makes it at zero)."""
    if not params:
        return None
    norms = norms_fp64(params)
    state = getattr(optimizer, "state", None)
    state = state if isinstance(state, dict) else {}
    buffers = [state.get(p, {}).get(COMPENSATION) for p in params]
    held = [i for i, b in enumerate(buffers) if b is not None]
    extra = torch.zeros_like(norms)
    if held:
        extra[held] = norms_fp64([buffers[i] for i in held]).to(extra)
    return torch.cat([norms, extra])
