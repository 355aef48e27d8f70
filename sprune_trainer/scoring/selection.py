"""Turn importance scores into the chosen neuron indices: per-layer top-k or one global budget, optionally the same
number in every attention head, or whole coupled neuron groups (axis='coupled', `coupled.py`)."""
from __future__ import annotations

import torch

from ..config import SparseNeuronConfig
from ..layers.experts import expert_group
from ..layers.neuron_groups import NeuronGroups, neuron_groups


def layer_budget(n_units: int, config: SparseNeuronConfig, name: str = "layer") -> int:
    """Neurons to train in a layer with `n_units` rows (or columns)."""
    if config.neurons_per_layer is not None:
        k = int(config.neurons_per_layer)
        if k > n_units:
            raise ValueError(f"neurons_per_layer={k} but {name} has only {n_units} {config.axis}; "
                             "lower it or use ratio=.")
        return k
    return max(1, round(float(config.ratio) * n_units))


def mean_normalized(scores: torch.Tensor) -> torch.Tensor:
    """A layer's scores divided by their mean, so that layers scored on different scales compare."""
    scores = scores.float()
    return scores / scores.mean().clamp_min(torch.finfo(torch.float32).tiny)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    # stable sort: ties go to the lower index, so every rank and every run picks the same neurons
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def _top_per_head(scores: torch.Tensor, k: int, heads: int) -> torch.Tensor:
    """k / heads rounded half up (at least 1) top neurons in each of `heads` equal contiguous blocks."""
    size = scores.numel() // heads
    per_head = min(size, max(1, (2 * k + heads) // (2 * heads)))
    blocks = scores.reshape(heads, size)  # (heads, head_dim)
    order = torch.sort(blocks, dim=1, descending=True, stable=True).indices[:, :per_head]
    return torch.sort((order + torch.arange(heads).unsqueeze(1) * size).flatten()).values


def coupled_groups(model, layers: dict, config: SparseNeuronConfig) -> list[NeuronGroups] | None:
    """The neuron groups select_neurons chooses from with axis='coupled' (None otherwise)."""
    return neuron_groups(model, layers) if config.axis == "coupled" else None


def select_neurons(scores: dict[str, torch.Tensor], config: SparseNeuronConfig,
                   head_groups: dict[str, int] | None = None,
                   neuron_groups: list[NeuronGroups] | None = None) -> dict[str, torch.Tensor]:
    """name -> sorted int64 indices. Global scope spends the sum of the per-layer budgets on the layers whose
    neurons score highest after dividing each layer's scores by their mean (scales differ between layers);
    a layer may then get none and is left out. A layer in `head_groups` (name -> heads, see heads.py) takes its
    count (per-layer budget, or what the global budget gave it) as the same number of top neurons in every head.
    With axis='coupled' whole `neuron_groups` (coupled_groups) are chosen instead (coupled.py)."""
    if config.axis == "coupled":
        if neuron_groups is None:
            raise ValueError("axis='coupled' chooses neuron groups: pass neuron_groups=coupled_groups(model, layers, "
                             "config)")
        from .coupled import select_coupled  # (coupled.py uses layer_budget)

        return select_coupled(scores, neuron_groups, config)
    groups = head_groups or {}
    budgets = {name: layer_budget(s.numel(), config, name) for name, s in scores.items()}
    if config.scope == "per_layer":
        pooled = _pooled_experts(scores, budgets) if config.expert_scope == "across_experts" else {}
        return {name: pooled[name] if name in pooled else
                _top_per_head(s.float(), budgets[name], groups[name]) if name in groups
                else _top(s.float(), budgets[name]) for name, s in scores.items()
                if name not in pooled or pooled[name].numel()}

    names = list(scores)
    normed = [mean_normalized(s) for s in scores.values()]
    chosen = _top(torch.cat(normed), sum(budgets.values()))
    offsets = torch.tensor([0] + [s.numel() for s in normed]).cumsum(0)
    selection = {}
    for i, name in enumerate(names):
        lo, hi = offsets[i], offsets[i + 1]
        idx = chosen[(chosen >= lo) & (chosen < hi)] - lo
        if idx.numel():
            heads = groups.get(name)
            selection[name] = idx if heads is None else _top_per_head(normed[i], idx.numel(), heads)
    return selection


def _pooled_experts(scores: dict[str, torch.Tensor], budgets: dict[str, int]) -> dict[str, torch.Tensor]:
    """expert_scope='across_experts': the experts of one projection share the sum of their budgets, spent on the
    highest raw scores among them (one projection's experts score on one scale). name -> indices, maybe empty."""
    pools: dict[str, list[str]] = {}
    for name in scores:
        group = expert_group(name)
        if group is not None:
            pools.setdefault(group, []).append(name)
    out = {}
    for names in pools.values():
        flat = torch.cat([scores[n].float() for n in names])
        chosen = _top(flat, sum(budgets[n] for n in names))
        lo = 0
        for n in names:
            hi = lo + scores[n].numel()
            out[n] = chosen[(chosen >= lo) & (chosen < hi)] - lo
            lo = hi
    return out
