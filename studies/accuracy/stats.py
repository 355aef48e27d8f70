"""Means over a config's runs (its seeds), for aggregate.py and solo.py."""
from __future__ import annotations

import math
from typing import Optional


def nan_blank(x):
    """None for a missing or NaN value, else the value."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def mean_std(values: list[float]) -> dict:
    """{"mean", "std"}: sample std (ddof 1), 0.0 for one value; NaN for none."""
    if not values:
        return {"mean": float("nan"), "std": float("nan")}
    m = sum(values) / len(values)
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {"mean": m, "std": math.sqrt(var)}


def mean(values: list) -> Optional[float]:
    """Mean of the values that are not None; None when none are."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def training_means(trains: list[dict]) -> dict:
    """Peak memory (MiB), training tokens/s and train runtime (s), means over the runs' results["training"]."""
    return {"peak_memory_mib": mean([(t.get("peak_memory") or {}).get("bytes", 0) / 2**20 or None for t in trains]),
            "tokens_per_second": mean([t.get("tokens_per_second") for t in trains]),
            "train_runtime_s": mean([t.get("train_runtime_s") for t in trains])}
