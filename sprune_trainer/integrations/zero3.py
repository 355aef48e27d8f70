"""DeepSpeed ZeRO-3 partitions every parameter across ranks (a `ds_id` attribute marks one): reading real
values needs a collective gather that every rank joins. Without DeepSpeed these helpers do nothing."""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch


def is_partitioned(p: Optional[torch.Tensor]) -> bool:
    return p is not None and hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[Optional[torch.Tensor]], modifier_rank: Optional[int] = None):
    """Full values of any ZeRO-3 partitioned `params` inside the block (changes kept from `modifier_rank`)."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def model_is_partitioned(model: torch.nn.Module) -> bool:
    return any(is_partitioned(p) for p in model.parameters())
