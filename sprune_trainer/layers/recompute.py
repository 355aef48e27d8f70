"""Slice inputs rebuilt in backward instead of saved (`SparseNeuronConfig.recompute_slice_inputs`, rows axis).

A row slice's weight gradient g[..., I]^T x needs its layer's whole input x, which a frozen layer never keeps (its
own backward needs only W). In Llama / Mistral / Qwen2 decoder layers those inputs are cheap functions of tensors
that autograd keeps anyway for the frozen model's own backward, until after the slice's backward has run:

    q/k/v, gate/up   x = w * (h * r).to(x.dtype)    RMSNorm: h its fp32 input, r = rsqrt(mean(h^2) + eps), w its
                                                    weight: the saved operands of its two multiplications
    down_proj        x = act(gate) * up             the saved operands of the multiplication
    o_proj           x is a view of the attention output SDPA saves (flash / efficient kernels): free already

`input_source(x)` finds them on x's autograd node (`grad_fn._saved_*`, the saved tensors PyTorch's autograd notes
document) and returns how to rebuild x from them, or None when x came from anything else (other model code, no
grad, or saved-tensor hooks such as activation checkpointing or offloading, which own what is saved); the caller
then saves x as before. The rebuild repeats the forward's own operations on the same tensors, so it is bit-exact.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

Source = tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]


def _kind(node) -> str:
    return type(node).__name__


def _saved(node, attribute: str) -> Optional[torch.Tensor]:
    """What autograd saved under `attribute` on `node`, or None (not saved, or not a tensor)."""
    try:
        value = getattr(node, attribute)
    except (AttributeError, RuntimeError):
        return None
    return value if torch.is_tensor(value) else None


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks (checkpointing, offloading) own what is saved; True where torch cannot say."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError, RuntimeError):
        return True


def _product_source(x: torch.Tensor) -> Optional[Source]:
    """x = a * b with both factors saved (the gated MLP's act(gate) * up)."""
    node = x.grad_fn
    if _kind(node) != "MulBackward0":
        return None
    a, b = _saved(node, "_saved_self"), _saved(node, "_saved_other")
    if a is None or b is None or any(t.shape != x.shape or t.dtype != x.dtype for t in (a, b)):
        return None
    return torch.mul, (a, b)


def _rms_norm_source(x: torch.Tensor) -> Optional[Source]:
    """x = w * (h * r).to(x.dtype): Llama's RMSNorm (also Mistral's, Qwen2's), read backwards from its output."""
    outer = x.grad_fn
    if _kind(outer) != "MulBackward0":
        return None
    weight = _saved(outer, "_saved_self")  # the frozen weight, saved because the other factor needs grad
    if weight is None or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        return None
    inner = outer.next_functions[1][0]
    if _kind(inner) == "ToCopyBackward0":  # .to(input_dtype) of a bf16 / fp16 input
        inner = inner.next_functions[0][0]
    if _kind(inner) != "MulBackward0":
        return None
    h, r = _saved(inner, "_saved_self"), _saved(inner, "_saved_other")
    if h is None or r is None or h.shape != x.shape or r.shape != x.shape[:-1] + (1,):
        return None
    dtype = x.dtype

    def rebuild(w, h, r):
        return w * (h * r).to(dtype)
    return rebuild, (weight, h, r)


class SharedRebuild:
    """The rebuild of one input for every slice that reads it (q/k/v share their norm's output, gate/up too): made
    by the first of their backward passes, handed to the others, dropped after the last one (`users`)."""

    def __init__(self, rebuild: Callable[..., torch.Tensor], dtype: torch.dtype):
        self.rebuild, self.dtype, self.users, self.value = rebuild, dtype, 0, None

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        value = self.value if self.value is not None else self.rebuild(*tensors).to(self.dtype)
        self.users -= 1
        self.value = value if self.users > 0 else None
        return value


def shared_rebuild(x: torch.Tensor, source: Source, dtype: torch.dtype) -> Source:
    """`source` as a SharedRebuild (in `dtype`, the dtype the slice computes in) common to every slice called on
    this very x: kept on x, which dies right after their forward calls, so nothing outlives them."""
    shared = getattr(x, "_sprune_rebuild", None)
    if shared is None or shared.dtype != dtype:
        shared = SharedRebuild(source[0], dtype)
        x._sprune_rebuild = shared
    shared.users += 1
    return shared, source[1]


def input_source(x: torch.Tensor) -> Optional[Source]:
    """(rebuild, tensors) with rebuild(*tensors) equal to x, the tensors being ones autograd keeps anyway; or None."""
    if x.grad_fn is None or not torch.is_grad_enabled() or _saved_tensor_hooks_active():
        return None
    return _product_source(x) or _rms_norm_source(x)
