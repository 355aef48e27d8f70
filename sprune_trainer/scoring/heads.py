"""Attention heads of the targeted projections, for head-balanced selection (`SparseNeuronConfig.head_balanced`).

A projection's neurons along the sliced axis are contiguous equal blocks, one per head, when they are
q_proj / k_proj / v_proj output rows (attention heads for q, key-value heads for k and v) or o_proj input columns
(attention heads). Head counts come from the model config (Llama, Mistral, Qwen2, Gemma, ... naming)."""
from __future__ import annotations

from torch import nn

from ..config import SparseNeuronConfig
from ..layers.linear_like import linear_shape
from ..layers.neuron_groups import head_count

# projection name -> config attribute with its number of heads, per axis
HEAD_ATTRIBUTES = {
    "rows": {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads", "v_proj": "num_key_value_heads"},
    "columns": {"o_proj": "num_attention_heads"},
}


def head_groups(model: nn.Module, layers: dict[str, nn.Module], config: SparseNeuronConfig) -> dict[str, int]:
    """name -> number of heads its neurons split into, for the targeted attention projections; {} unless
    `config.head_balanced`. Raises a clear error when nothing can be balanced or the sizes do not fit the heads."""
    if not config.head_balanced:
        return {}
    by_name = HEAD_ATTRIBUTES[config.axis]
    groups = {}
    for name, layer in layers.items():
        attribute = by_name.get(name.rsplit(".", 1)[-1])
        if attribute is None:
            continue
        heads = head_count(model, attribute)
        if not isinstance(heads, int) or heads <= 0:
            raise ValueError(f"head_balanced=True needs {attribute} in the model config for {name}, found {heads!r}.")
        n_units = linear_shape(layer)[0 if config.axis == "rows" else 1]
        if n_units % heads:
            raise ValueError(f"head_balanced=True: {name} has {n_units} {config.axis}, not a multiple of its "
                             f"{heads} heads ({attribute}).")
        groups[name] = heads
    if not groups:
        wanted = " / ".join(by_name)
        raise ValueError(f"head_balanced=True but no targeted layer is an attention projection split by heads along "
                         f"axis={config.axis!r} ({wanted}); set head_balanced=False or target those layers.")
    return groups
