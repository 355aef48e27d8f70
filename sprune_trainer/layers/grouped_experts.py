"""Sliced MoE experts on transformers' `grouped_mm` path: every expert's tokens in one grouped matmul per projection,
as the model's own `grouped_mm` experts implementation runs them, plus the slices' updates as grouped matmuls of the
experts' deltas stacked for the step (E x k rows: the size of the slices, not of a weight).

rows:    y = grouped(x, W) then y[s, I_e(s)] += grouped(x, Δ)[s]          Δ stacked (E, k, d_in)
columns: y = grouped(x, W) + grouped(x[s, J_e(s)], Δ)[s]                     Δ stacked (E, d_out, k)
(s: a routed token-expert pair, e(s) its expert). Autograd splits the stacked gradient back onto each expert's slice;
an expert no token reached gets a zero gradient, as its dense rows would. Used only when every expert of both
projections carries a slice of one size, with no bias or dropout (experts.py's loop otherwise)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .experts import activate
from .stacked_slices import StackedSlices, stacked_slices


def grouped_slices(module: nn.Module, projections: tuple[str, str]) -> Optional[dict[str, StackedSlices]]:
    """{projection: its experts' slices} when the exposed experts `module` runs sliced through grouped matmuls (the
    model asks for transformers' grouped_mm experts and every projection's slices stack); else None."""
    config = getattr(module, "config", None)
    if getattr(config, "_experts_implementation", None) != "grouped_mm" or getattr(module, "_is_expert_parallel", False):
        return None
    found = {name: stacked_slices(module, name) for name in projections}
    return found if all(s.usable() for s in found.values()) else None


def _project(module: nn.Module, name: str, slices: StackedSlices, x: torch.Tensor, expert_ids: torch.Tensor,
             offsets: torch.Tensor) -> torch.Tensor:
    from .._hf_internals import grouped_mm

    weight = getattr(module, name)
    base = grouped_mm(x, weight if module.is_transposed else weight.transpose(-2, -1), offsets)  # (S, d_out)
    bias = getattr(module, f"{name}_bias", None) if module.has_bias else None
    if bias is not None:
        base = base + bias[expert_ids]
    dt = base.dtype
    index = slices.index()[expert_ids]  # (S, k): each pair's expert's neurons
    k = index.shape[1]
    pad = -k % max(1, 16 // dt.itemsize)  # grouped matmul kernels want 16-byte strides: k padded with zeros
    delta = torch.stack([s.delta for s in slices.children]).to(dt)  # (E, k, d_in) rows / (E, d_out, k) columns
    if slices.axis == "rows":
        delta = nn.functional.pad(delta, (0, 0, 0, pad))
        update = grouped_mm(x.to(dt), delta.transpose(-2, -1), offsets)  # (S, k + pad)
        return base.scatter_add(1, index, update[:, :k])
    picked = nn.functional.pad(x.to(dt).gather(1, index), (0, pad))  # (S, k + pad)
    return base + grouped_mm(picked, nn.functional.pad(delta, (0, pad)).transpose(-2, -1), offsets)  # (S, d_out)


def grouped_sliced_experts_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                   top_k_weights: torch.Tensor, slices: dict[str, StackedSlices]) -> torch.Tensor:
    """transformers' grouped_mm experts forward (no expert parallelism), each projection with its slices added."""
    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.shape
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    x = hidden_states[perm // num_top_k]
    weights = top_k_weights.reshape(-1)[perm]
    counts = torch.bincount(expert_ids, minlength=module.num_experts)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    (up, up_slices), (down, down_slices) = slices.items()
    h = _project(module, up, up_slices, x, expert_ids, offsets)
    h = activate(module, h)
    h = _project(module, down, down_slices, h, expert_ids, offsets)
    if getattr(module, "has_post_expert_norm", False):  # (transformers < 5.2x: no such flag)
        h = module.post_expert_norm(h)
    h = h * weights.unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return h[inverse].view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)
