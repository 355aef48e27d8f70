"""Choose whole coupled neuron groups (axis='coupled'; what a group is: layers/neuron_groups.py).

A unit's score is the sum of its members' scores, each linear's scores first divided by their mean (criteria
score linears on different scales). Units compete on score per trained weight, so an MLP neuron (3 x d weights)
and a value channel (d + rep x d) meet on equal terms. The budget is in weights: what `neurons_per_layer` (or
`ratio`) rows of every targeted linear would train, per decoder layer (scope per_layer) or summed over the model
(global). Units are taken best first while they fit; one that no longer fits is passed over for smaller ones."""
from __future__ import annotations

from collections import defaultdict

import torch

from ..config import SparseNeuronConfig
from ..layers.neuron_groups import NeuronGroups
from .selection import layer_budget, mean_normalized


def _normalized(scores: dict[str, torch.Tensor], groups: list[NeuronGroups]) -> dict[str, torch.Tensor]:
    out = {}
    for g in groups:
        for m in g.members:
            s = scores[m.name]
            want = m.shape[0] if m.axis == "rows" else m.shape[1]
            if s.numel() != want:
                raise ValueError(f"{m.name}: {s.numel()} scores, but its coupled groups need one per {m.axis[:-1]} "
                                 f"({want}): score with the same axis='coupled' config")
            out[m.name] = mean_normalized(s)
    return out


def _budgets(groups: list[NeuronGroups], config: SparseNeuronConfig) -> dict[str, int]:
    """block -> weights it may train: each of its linears' row budget times the weights in a row."""
    budgets: dict[str, int] = defaultdict(int)
    seen = set()
    for g in groups:
        for m in g.members:
            if m.name not in seen:
                seen.add(m.name)
                d_out, d_in = m.shape
                budgets[g.block] += layer_budget(d_out, config, m.name) * d_in
    return budgets


def _fill(densities: torch.Tensor, costs: torch.Tensor, budget: int) -> torch.Tensor:
    """Positions chosen greedily by density (ties: the earlier position) within `budget` weights."""
    order = torch.sort(densities, descending=True, stable=True).indices
    spent = costs[order].cumsum(0)
    n = int(torch.searchsorted(spent, torch.tensor([budget]), right=True))
    chosen, left = order[:n].tolist(), budget - (int(spent[n - 1]) if n else 0)
    for i, c in zip(order[n:].tolist(), costs[order[n:]].tolist()):
        if c <= left:
            chosen.append(i)
            left -= c
    return torch.tensor(sorted(chosen), dtype=torch.long)


def select_coupled(scores: dict[str, torch.Tensor], groups: list[NeuronGroups], config: SparseNeuronConfig
                   ) -> dict[str, torch.Tensor]:
    """name -> sorted int64 indices (along its member axis) of the chosen units' weights; linears with none left
    out."""
    normed = _normalized(scores, groups)
    budgets = _budgets(groups, config)
    pools: dict[str, list[int]] = defaultdict(list)  # pool -> positions in `groups`
    for i, g in enumerate(groups):
        pools[g.block if config.scope == "per_layer" else ""].append(i)
    picked: dict[str, list[torch.Tensor]] = defaultdict(list)
    for pool, members in pools.items():
        unit_scores = [sum(normed[m.name][m.index].sum(1) for m in groups[i].members) for i in members]
        densities = torch.cat([s / groups[i].cost for s, i in zip(unit_scores, members)])
        costs = torch.cat([torch.full((groups[i].units,), groups[i].cost) for i in members])
        budget = budgets[pool] if pool else sum(budgets.values())
        chosen = _fill(densities, costs, budget)
        lo = 0
        for i in members:
            g = groups[i]
            units = chosen[(chosen >= lo) & (chosen < lo + g.units)] - lo
            lo += g.units
            for m in g.members:
                if units.numel():
                    picked[m.name].append(m.index[units].flatten())
    return {name: torch.unique(torch.cat(parts)) for name, parts in picked.items()}
