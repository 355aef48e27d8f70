"""Per-tensor L2 norms of many tensors for the guards' checks over every slice: in fp32 for the non-finite test, and
accumulated in fp64 for the untrained guard's test of whether a step changed a slice."""
from __future__ import annotations

import torch


@torch.no_grad()  # on parameters too: no graph, and no per-tensor detach()
def norms_fp32(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(n,) fp32: the norm of each tensor (in its own dtype, as torch._foreach_norm gives it). One stack and one
    cast for all of them, not a cast per tensor: with thousands of slices (MoE experts) the per-tensor calls cost
    more than the norms; the values are the same (stack promotes mixed dtypes to fp32 exactly)."""
    return torch.stack(torch._foreach_norm(tensors)).float()


@torch.no_grad()
def norms_fp64(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(n,) fp64: the norm of each tensor with its squares summed in fp64 (fp32 on MPS, which has no fp64). A norm in
    the tensor's own dtype cannot see a step that moves a few entries of a bf16 slice by one rounding step (a bf16
    norm resolves 0.4 % of itself); summed in fp64 any such change shows, and equal tensors give equal norms."""
    dtype = torch.float32 if tensors and tensors[0].device.type == "mps" else torch.float64
    try:
        norms = torch._foreach_norm(tensors, dtype=dtype)
    except (TypeError, RuntimeError):  # a torch or backend without the fused dtype argument
        norms = [torch.linalg.vector_norm(t, dtype=dtype) for t in tensors]
    return torch.stack(norms).to(dtype)
