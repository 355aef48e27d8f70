"""Coupled neurons (`axis="coupled"`): the weights structural pruning removes together with one neuron, found by
the projections' names under one parent module.

    mlp          MLP hidden unit j: row j of the gate and up projections (gate_proj/up_proj, w1/w3) or of the one
                 up projection (fc1, c_fc, dense_h_to_4h), or rows j and d_ff + j of a fused gate_up_proj that
                 chunks into [gate; up] (Phi-3, transformers' fused MoE experts with the default gate), and column j
                 of the down projection
    value        value channel (g, c): row g*hd + c of v_proj, and the o_proj columns h*hd + c of every query head
                 h that reads key-value head g (GQA: heads g*rep ... (g+1)*rep - 1, as transformers' repeat_kv)
    query_key    query-key channel (g, c): row g*hd + c of k_proj, and the q_proj rows h*hd + c of those heads
    rows         every other targeted linear: each of its rows alone

A structure is coupled only when all its projections are targeted and their shapes agree with each other (and,
for attention, with the model config's head counts); otherwise its linears fall back to rows. Rotary embeddings
pair channel c with c + hd/2 inside a head; the channels stay separate groups here, as their weights are.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .linear_like import linear_shape

# (producers, consumer) projection names of an MLP, gated first
MLP_NAMES = ((("gate_proj", "up_proj"), "down_proj"), (("w1", "w3"), "w2"), (("gate_up_proj",), "down_proj"),
             (("up_proj",), "down_proj"), (("fc1",), "fc2"), (("c_fc",), "c_proj"),
             (("dense_h_to_4h",), "dense_4h_to_h"))
FUSED_GATE_UP = "gate_up_proj"
ATTENTION_OUTPUTS = ("o_proj", "out_proj", "dense")


@dataclass(frozen=True)
class Member:
    """One projection's share of a group kind: `index[u]` are its rows (or columns) in unit u."""
    name: str
    axis: str             # "rows" | "columns"
    index: torch.Tensor   # (units, m) int64
    shape: tuple[int, int]  # the linear's (d_out, d_in)

    @property
    def span(self) -> int:
        """Weights in one of its rows (d_in) or columns (d_out)."""
        return self.shape[1] if self.axis == "rows" else self.shape[0]


@dataclass(frozen=True)
class NeuronGroups:
    """Units of one kind in one block (decoder layer), each made of the same number of weights."""
    kind: str
    block: str
    members: tuple[Member, ...]

    @property
    def units(self) -> int:
        return self.members[0].index.shape[0]

    @property
    def cost(self) -> int:
        """Weights trained per unit."""
        return sum(m.index.shape[1] * m.span for m in self.members)


def block_of(name: str) -> str:
    """The decoder layer a module belongs to: its name up to the first numeric part (model.layers.3), else its
    parent."""
    match = re.match(r"^(.*?\.\d+)(\.|$)", name)
    return match.group(1) if match else name.rpartition(".")[0]


def _member(name: str, layer: nn.Module, axis: str, index: torch.Tensor) -> Member:
    return Member(name, axis, index.long(), tuple(linear_shape(layer)))


def _column(n: int) -> torch.Tensor:
    return torch.arange(n).unsqueeze(1)


def _mlp(parent: str, children: dict[str, nn.Module]) -> list[NeuronGroups]:
    for producers, consumer in MLP_NAMES:
        if consumer not in children or not all(p in children for p in producers):
            continue
        hidden = linear_shape(children[consumer])[1]
        fused = producers == (FUSED_GATE_UP,)
        if fused and not _gate_up_in_halves(children[FUSED_GATE_UP]):
            return []
        if any(linear_shape(children[p])[0] != hidden * (2 if fused else 1) for p in producers):
            return []
        unit = _column(hidden)
        rows = torch.cat([unit, unit + hidden], dim=1) if fused else unit  # [gate; up] halves
        members = [_member(f"{parent}.{p}", children[p], "rows", rows) for p in producers]
        members.append(_member(f"{parent}.{consumer}", children[consumer], "columns", unit))
        return [NeuronGroups("mlp", block_of(members[0].name), tuple(members))]
    return []


def _gate_up_in_halves(layer: nn.Module) -> bool:
    """A fused gate_up projection's output chunks into [gate; up]: an nn.Linear (Phi-3's MLP does so), or an MoE
    expert view whose experts module uses transformers' default gate (gpt-oss-like layouts interleave them)."""
    owner = getattr(layer, "_owner", None)
    if owner is None:
        return True
    apply_gate = getattr(type(owner), "_apply_gate", None)
    if apply_gate is None:  # transformers before the method: the default chunk, inline
        return True
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return False
    return apply_gate is _default_apply_gate and getattr(owner, "is_concatenated", True)


def _attention(parent: str, children: dict[str, nn.Module], heads: int | None, kv_heads: int | None
               ) -> list[NeuronGroups]:
    out_name = next((o for o in ATTENTION_OUTPUTS if o in children), None)
    if out_name is None or not all(p in children for p in ("q_proj", "k_proj", "v_proj")) or not (heads and kv_heads):
        return []
    q, k, v, o = (children[n] for n in ("q_proj", "k_proj", "v_proj", out_name))
    width = linear_shape(q)[0]
    if width % heads or heads % kv_heads:
        return []
    hd, rep = width // heads, heads // kv_heads
    if linear_shape(k)[0] != kv_heads * hd or linear_shape(v)[0] != kv_heads * hd or linear_shape(o)[1] != width:
        return []
    u = torch.arange(kv_heads * hd)
    g, c = u // hd, u % hd
    query_columns = (g * rep).unsqueeze(1) * hd + torch.arange(rep).unsqueeze(0) * hd + c.unsqueeze(1)  # (units, rep)
    block = block_of(f"{parent}.q_proj")
    return [NeuronGroups("value", block, (_member(f"{parent}.v_proj", v, "rows", u.unsqueeze(1)),
                                          _member(f"{parent}.{out_name}", o, "columns", query_columns))),
            NeuronGroups("query_key", block, (_member(f"{parent}.k_proj", k, "rows", u.unsqueeze(1)),
                                              _member(f"{parent}.q_proj", q, "rows", query_columns)))]


def head_count(model: nn.Module, attribute: str):
    """`attribute` (num_attention_heads / num_key_value_heads) of the model's (text) config, or None; configs
    without GQA fields have one key-value head per head."""
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    config = get_text() if callable(get_text) else config
    n = getattr(config, attribute, None)
    if n is None and attribute == "num_key_value_heads":
        n = getattr(config, "num_attention_heads", None)
    return n


def neuron_groups(model: nn.Module, layers: dict[str, nn.Module]) -> list[NeuronGroups]:
    """The coupled group kinds of the targeted `layers` (name -> linear), then one `rows` kind per targeted linear
    in none of them; in the order of `layers`."""
    by_parent: dict[str, dict[str, nn.Module]] = {}
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        by_parent.setdefault(parent, {})[child] = layer
    heads, kv_heads = head_count(model, "num_attention_heads"), head_count(model, "num_key_value_heads")
    groups: list[NeuronGroups] = []
    for parent, children in by_parent.items():
        groups += _attention(parent, children, heads, kv_heads) + _mlp(parent, children)
    covered = {m.name for g in groups for m in g.members}
    for name, layer in layers.items():
        if name not in covered:
            groups.append(NeuronGroups("rows", block_of(name),
                                       (_member(name, layer, "rows", _column(linear_shape(layer)[0])),)))
    order = {name: i for i, name in enumerate(layers)}
    return sorted(groups, key=lambda g: min(order[m.name] for m in g.members))


def slice_axes(model: nn.Module, layers: dict[str, nn.Module], axis: str) -> dict[str, str]:
    """name -> the axis its slice takes: `axis` for every layer, or with axis='coupled' its members' axis."""
    if axis != "coupled":
        return {name: axis for name in layers}
    return {m.name: m.axis for g in neuron_groups(model, layers) for m in g.members}
