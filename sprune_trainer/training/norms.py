"""Per-tensor L2 norms of many tensors, in fp32, for the guards' checks over every slice."""
from __future__ import annotations

import torch


@torch.no_grad()  # on parameters too: no graph, and no per-tensor detach()
def norms_fp32(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(n,) fp32: the norm of each tensor (in its own dtype, as torch._foreach_norm gives it). One stack and one
    cast for all of them, not a cast per tensor: with thousands of slices (MoE experts) the per-tensor calls cost
    more than the norms; the values are the same (stack promotes mixed dtypes to fp32 exactly)."""
    return torch.stack(torch._foreach_norm(tensors)).float()
