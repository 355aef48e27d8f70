"""Does an optimizer hold the model's trainable slices? They exist only once train() (or prepare_sparse_model)
has put them in, so an optimizer built earlier holds none of them and would train nothing, silently."""
from __future__ import annotations

import torch
from torch import nn


def unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (and similar wrappers with `.optimizer`)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def slices_missing_from(optimizer, model: nn.Module) -> list[str]:
    held = {id(p) for group in unwrap_optimizer(optimizer).param_groups for p in group["params"]}
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]


def holds_every_slice(optimizer, model: nn.Module) -> bool:
    return not slices_missing_from(optimizer, model)


def require_every_slice(optimizer, model: nn.Module) -> None:
    missing = slices_missing_from(optimizer, model)
    if not missing:
        return
    total = sum(p.requires_grad for p in model.parameters())
    raise ValueError(
        f"the optimizer given to SparseNeuronTrainer lacks {len(missing)} of the model's {total} trainable slices "
        f"(e.g. {missing[:3]}): it was built before train() put the slices in, so training would change nothing. "
        "Leave optimizers=(None, None) (SliceAdamW; SparseNeuronConfig.optimizer_state sets its moments), pass "
        "optimizer_cls_and_kwargs=(cls, kwargs) to have yours built over the slices, or build it after "
        "trainer.prepare_sparse_model() over [p for p in trainer.model.parameters() if p.requires_grad] and assign "
        "it to trainer.optimizer.")
