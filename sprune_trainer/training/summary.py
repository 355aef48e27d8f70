"""What was selected, in numbers: neurons per layer type, trainable parameters, optimizer-state bytes."""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from ..config import DATA_IMPORTANCE_NAMES
from ..layers.surgery import sliced_modules
from ..optim.slice_adamw import adam_state_bytes_per_param

logger = logging.get_logger(__name__)


def logical_numel(p: nn.Parameter) -> int:
    """Parameters `p` stands for, not the elements it stores: bnb `Params4bit` packs two 4-bit codes per byte of
    its storage dtype, and ZeRO-3 partitions keep the full size in `ds_numel`."""
    state = getattr(p, "quant_state", None)
    if getattr(state, "shape", None) is not None:  # bnb 4-bit: the unpacked (d_out, d_in)
        return math.prod(state.shape)
    n = getattr(p, "ds_numel", p.numel())
    if type(p).__name__ == "Params4bit":  # packed, no quant_state to read the shape from
        return 2 * n * p.element_size()
    return n


def selection_summary(model: nn.Module, optimizer_state: str = "float32", compensated: bool = False) -> dict:
    """What the run trains: neurons per projection kind, trainable numbers, optimizer state bytes (moments, and with
    `compensated` the low-precision slices' compensation buffers) against AdamW on the whole model, coverage."""
    layers = sliced_modules(model)
    by_kind: dict[str, list] = defaultdict(list)  # "q_proj" -> [(k, n_units), ...]
    for name, layer in layers.items():
        n_units = layer.out_features if layer.axis == "rows" else layer.in_features
        by_kind[name.split(".")[-1]].append((layer.index.numel(), n_units))
    trainable = sum(logical_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(logical_numel(p) for p in model.parameters())
    frozen = total - trainable
    return {
        "sliced_layers": len(layers),
        "neurons": {kind: {"layers": len(v), "selected": sum(k for k, _ in v), "of": sum(n for _, n in v),
                           "min": min(k for k, _ in v), "max": max(k for k, _ in v)} for kind, v in by_kind.items()},
        "trainable_params": trainable,
        "model_params": frozen,
        "trainable_percent": 100.0 * trainable / max(frozen, 1),
        "optimizer_state_bytes": int(trainable * adam_state_bytes_per_param(optimizer_state))
        + (_compensation_bytes(model) if compensated else 0),
        "full_ft_adamw_state_bytes": int(frozen * adam_state_bytes_per_param("float32")),
        "coverage": _coverage(model),
    }


def _coverage(model: nn.Module) -> dict:
    from .coverage import coverage_by_type  # (coverage.py counts with logical_numel, from here)
    return coverage_by_type(model)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def format_summary(s: dict) -> str:
    lines = [f"sparse-neuron fine-tuning: {s['sliced_layers']} sliced layers"]
    for kind, v in s["neurons"].items():
        per = f"{v['min']}" if v["min"] == v["max"] else f"{v['min']}-{v['max']}"
        lines.append(f"  {kind:>12}: {per} neurons/layer x {v['layers']} layers "
                     f"({v['selected']:,} of {v['of']:,})")
    lines.append(f"  trainable params: {s['trainable_params']:,} of {s['model_params']:,} "
                 f"({s['trainable_percent']:.3f}%)")
    total = sum(v["params"] for v in s.get("coverage", {}).values())
    big = sorted(((k, v) for k, v in s.get("coverage", {}).items() if v["params"] >= 0.01 * total),
                 key=lambda kv: -kv[1]["params"])
    if big:
        reached = ", ".join(f"{k} {100 * v['sliced'] / v['params']:.0f}% / {100 * v['trained'] / v['params']:.0f}%"
                            for k, v in big)
        lines.append(f"  weights reached, by module type (sliced / trained in full): {reached}")
    ratio = s["optimizer_state_bytes"] / max(s["full_ft_adamw_state_bytes"], 1)
    lines.append(f"  optimizer state: {_mib(s['optimizer_state_bytes'])} vs {_mib(s['full_ft_adamw_state_bytes'])} "
                 f"for AdamW on the full model ({ratio:.4f}x)")
    return "\n".join(lines)


def summary_metrics(s: dict) -> dict[str, float]:
    """The summary's numbers under `sparse_` names, as Trainer.log() hands them to report_to trackers."""
    return {"sparse_sliced_layers": s["sliced_layers"], "sparse_trainable_params": s["trainable_params"],
            "sparse_trainable_percent": s["trainable_percent"],
            "sparse_optimizer_state_bytes": s["optimizer_state_bytes"]}


class SelectionLogCallback(TrainerCallback):
    """Logs `pending` (the selection's numbers) through `log` (the Trainer's) at on_train_begin: the selection is made
    before the Trainer builds the TrainerState it trains with and before report_to trackers start, so logging it
    then would reach neither the trainer_state.json log_history nor the trackers."""

    def __init__(self, log):
        self.log, self.pending = log, None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.pending is not None:
            self.log(dict(self.pending))
            self.pending = None


def _compensation_bytes(model: nn.Module) -> int:
    """Bytes of SliceAdamW's compensation buffers: one per low-precision trainable number, in its dtype."""
    return sum(p.numel() * p.element_size() for p in model.parameters()
               if p.requires_grad and p.dtype != torch.float32)


def warn_unscored_layers(scores: dict[str, torch.Tensor], importance: str, limit: int = 6) -> list[str]:
    """Warn about layers whose scores are all zero: their neurons are then picked by index (0..k-1), not importance.
    For data-driven criteria that means the loss never reached them. Returns their names."""
    if importance == "random":
        return []
    zero = [name for name, s in scores.items() if not s.any()]
    if zero:
        why = ("the calibration loss never reached them (their outputs do not feed the loss, or it ignores them; "
               "an MoE expert no calibration token was routed to)"
               if importance in DATA_IMPORTANCE_NAMES else "their weights are zero")
        shown = ", ".join(zero[:limit]) + (f" and {len(zero) - limit} more" if len(zero) > limit else "")
        logger.warning(f"{len(zero)} of {len(scores)} layers got all-zero {importance} scores, so their neurons are "
                       f"picked by index, not by importance: {shown}. Likely {why}; leave them out with "
                       "target_modules, or check the loss and the calibration data.")
    return zero
