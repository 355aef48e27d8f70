"""`train(mode)` for a module with thousands of descendants (an exposed experts module: ~5 modules per expert): the
flags nn.Module.train sets, set without its per-module cost.

The Trainer calls `model.train()` on every step, and torch's version costs a Python call, a `children()` generator
and an `nn.Module.__setattr__` per module: at 128 experts per layer more host time than the layer's expert matmuls.
Here one loop sets the `training` attribute directly; a descendant whose class or instance defines its own `train`
still gets that called, so nothing it does is skipped."""
from __future__ import annotations

import types

from torch import nn

_INSTALLED = "_sprune_subtree_train"  # instance attribute: `train` below is installed on this module


def _train_subtree(self: nn.Module, mode: bool = True) -> nn.Module:
    if not isinstance(mode, bool):
        raise ValueError("training mode is expected to be boolean")  # as nn.Module.train
    stack = [self]
    while stack:
        module = stack.pop()
        module.__dict__["training"] = mode  # what Module.__setattr__ ends in for a plain attribute
        for child in module._modules.values():
            if child is None:
                continue
            if type(child).train is nn.Module.train and "train" not in child.__dict__:
                stack.append(child)
            else:
                child.train(mode)
    return self


def install_subtree_train(module: nn.Module) -> None:
    """Give `module` the fast `train` (not over a `train` of its class's or instance's own)."""
    if type(module).train is nn.Module.train and "train" not in module.__dict__:
        module.train = types.MethodType(_train_subtree, module)
        module.__dict__[_INSTALLED] = True


def remove_subtree_train(module: nn.Module) -> None:
    if module.__dict__.pop(_INSTALLED, False):
        module.__dict__.pop("train", None)
