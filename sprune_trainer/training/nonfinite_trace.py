"""Where a forward/backward pass first goes non-finite: one pass with a hook on every module.

A tool for explaining a skipped step (see `nonfinite.py`): run it on the batch of that step. Forward
hooks see module outputs in execution order; backward hooks see each leaf module's output gradient in
reverse order, so the first non-finite gradient names the op nearest the loss that produced it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn


@dataclass
class NonFiniteTrace:
    loss: float
    first_forward: Optional[str] = None   # first module (execution order) whose output holds NaN/inf
    first_backward: Optional[str] = None  # first leaf module (backward order) whose output gradient does
    max_abs_output: float = 0.0           # largest finite |output| of any module, and where
    max_abs_module: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    @property
    def finite(self) -> bool:
        return self.first_forward is None and self.first_backward is None and bool(torch.isfinite(
            torch.tensor(self.loss)))


def _tensors(out):
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for t in out if torch.is_tensor(t)]
    if hasattr(out, "values"):  # ModelOutput
        return [t for t in out.values() if torch.is_tensor(t)]
    return []


def trace_nonfinite(model: nn.Module, batch: dict, loss_fn: Optional[Callable] = None,
                    backward: bool = True) -> NonFiniteTrace:
    """Run `loss_fn(model, batch)` (default: `model(**batch).loss`) and its backward with hooks on every
    module; gradients are left in `.grad` (zero them before a real step)."""
    found: dict = {"max": (0.0, None)}
    handles = []

    def on_forward(name):
        def hook(mod, inputs, out):
            for t in _tensors(out):
                if not t.is_floating_point():
                    continue
                d = t.detach()
                if "fwd" not in found and not torch.isfinite(d).all():
                    found["fwd"] = name
                big = float(d.abs().nan_to_num(0.0, 0.0, 0.0).max()) if d.numel() else 0.0
                if big > found["max"][0]:
                    found["max"] = (big, name)
        return hook

    def on_backward(name):
        def hook(mod, grad_in, grad_out):
            if "bwd" not in found and any(g is not None and not torch.isfinite(g).all() for g in grad_out):
                found["bwd"] = name
        return hook

    for name, mod in model.named_modules():
        name = name or type(mod).__name__
        handles.append(mod.register_forward_hook(on_forward(name)))
        if backward and not any(True for _ in mod.children()):
            handles.append(mod.register_full_backward_hook(on_backward(name)))
    try:
        loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
        if backward and loss.requires_grad:
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    return NonFiniteTrace(loss=float(loss.detach().float()), first_forward=found.get("fwd"),
                          first_backward=found.get("bwd"), max_abs_output=found["max"][0],
                          max_abs_module=found["max"][1])
