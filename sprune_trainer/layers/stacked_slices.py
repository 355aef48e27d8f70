"""The expert slices one projection of an exposed experts module stacks on the grouped path, found once and found
again only when they change.

Finding them reads every expert's child (E lookups, each slice's buffers and parameters through
nn.Module.__getattr__) and stacking their indices copies E small tensors: at 128 experts, per forward, more host
time than the grouped matmuls themselves. Between two forwards the slices change only when a child is replaced
(surgery, merge_sparse, hiding the views), an index is replaced or written in place (`.to()` moves, loads) or a
slice is merged / unmerged or its dropout turned on; the first two are checked against what was found (identity and
tensor version), the last two read on every call."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .sliced_linear import SlicedLinear

_CACHE = "_sprune_stacked_slices"  # instance attribute of an exposed experts module: projection -> StackedSlices


class StackedSlices:
    """The children `name` of every expert of `module` as found now, and whether their slices can be stacked
    (all SlicedLinear on one axis with one size and no bias delta: what never changes while they stay the same)."""

    def __init__(self, module: nn.Module, name: str, kept: bool = True):  # kept: for later calls too
        self.keys = [str(e) for e in range(module.num_experts)]
        self.children = [_child(module, key, name) for key in self.keys]
        self.indices = [c._buffers["index"] if isinstance(c, SlicedLinear) else None for c in self.children]
        # kept across calls: the versions `current` compares against, and the stacked index (not for indices made
        # under inference mode, which keep no version to compare)
        self.kept = kept and not any(i is not None and i.is_inference() for i in self.indices)
        self.versions = [None if i is None else i._version for i in self.indices] if self.kept else None
        first = self.children[0]
        self.stackable = all(isinstance(s, SlicedLinear) and s.axis == first.axis and s.bias_delta is None
                             and s.index.numel() == first.index.numel() for s in self.children)
        self.dropout = self.stackable and any(s.slice_dropout is not None for s in self.children)
        self._index: Optional[torch.Tensor] = None

    @property
    def axis(self) -> str:
        return self.children[0].axis

    def current(self, module: nn.Module, name: str) -> bool:
        """Whether `module` still holds these children, with these index tensors, unwritten since."""
        if not self.kept:
            return False
        experts = module._modules
        for key, child, index, version in zip(self.keys, self.children, self.indices, self.versions):
            expert = experts.get(key)  # (_child inline: this runs on every forward)
            if expert is None or expert._modules.get(name) is not child:
                return False
            if index is not None and (child._buffers.get("index") is not index or index._version != version):
                return False
        return True

    def usable(self) -> bool:
        """Stackable now: no slice merged, and no slice dropout active (training mode)."""
        return self.stackable and not any(s.merged or (self.dropout and s.slice_dropout is not None and s.training)
                                          for s in self.children)

    def index(self) -> torch.Tensor:
        """(E, k): expert e's neuron indices in row e (kept: stacked on first use; `current` guards its contents)."""
        if not self.kept:
            return torch.stack(self.indices)
        if self._index is None:
            with torch.inference_mode(False):  # a kept tensor made under inference mode could not serve training
                self._index = torch.stack(self.indices)
        return self._index


def _child(module: nn.Module, key: str, name: str) -> Optional[nn.Module]:
    expert = module._modules.get(key)
    return None if expert is None else expert._modules.get(name)


def stacked_slices(module: nn.Module, name: str) -> StackedSlices:
    """`module`'s StackedSlices for projection `name`: the one kept from an earlier call while it is current, else
    found now (and kept, except while torch.compile traces: the compiled graph pays no host time per call)."""
    if torch.compiler.is_compiling():
        return StackedSlices(module, name, kept=False)
    cache = module.__dict__.setdefault(_CACHE, {})
    found = cache.get(name)
    if found is None or not found.current(module, name):
        found = cache[name] = StackedSlices(module, name)
    return found


def forget_stacked_slices(module: nn.Module) -> None:
    """Drop what `module` keeps (its views are going away)."""
    module.__dict__.pop(_CACHE, None)
