"""Calibration micro-batches: one batch split along its first dimension, each part weighted by its share of the
batch's loss, so that scoring a batch in parts changes its memory peak and nothing else.

A mean-reduced loss over N terms splits into parts of n_m terms as L = sum_m (n_m / N) L_m, hence
dL/dy = sum_m (n_m / N) dL_m/dy token by token: every criterion that sums over tokens (taylor, zeroth_order,
wanda) gets the whole-batch score back from the weighted parts. The terms counted are those Hugging Face's
losses average over: label tokens != -100 after the causal shift (integer labels of shape (B, T, ...)), else
every label element (e.g. one per sequence for classification, or a float regression target)."""
from __future__ import annotations

from typing import Optional

import torch

IGNORE_INDEX = -100


def batch_rows(batch: dict) -> Optional[int]:
    """The batch size: the first dimension of `input_ids` (else of the first tensor with one); None if none has."""
    lead = lead_tensor(batch)
    return None if lead is None else lead.shape[0]


def lead_tensor(batch: dict) -> Optional[torch.Tensor]:
    """The tensor that defines the batch's rows: `input_ids`, else the first tensor with a dimension."""
    lead = batch.get("input_ids")
    if not torch.is_tensor(lead) or lead.dim() == 0:
        lead = next((v for v in batch.values() if torch.is_tensor(v) and v.dim() > 0), None)
    return lead


def loss_terms_per_row(batch: dict, rows: int) -> torch.Tensor:
    """(rows,) float64: how many terms of the batch's mean loss each row contributes (see the module doc)."""
    labels = batch.get("shift_labels", batch.get("labels"))
    if not torch.is_tensor(labels) or labels.dim() == 0 or labels.shape[0] != rows:
        return torch.ones(rows, dtype=torch.float64)
    if labels.dim() >= 2 and not labels.is_floating_point():
        counted = labels if "shift_labels" in batch else labels[:, 1:]
        return (counted != IGNORE_INDEX).reshape(rows, -1).sum(1).double().cpu()
    return torch.full((rows,), float(labels[0].numel()), dtype=torch.float64)


def rows_part(batch: dict, lo: int, hi: int) -> dict:
    """Rows lo:hi of the batch: tensors whose first dimension is the batch size are sliced (views, no copy);
    everything else is passed to every part unchanged."""
    rows = batch_rows(batch)
    return {k: v[lo:hi] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows else v for k, v in batch.items()}


def split_rows(batch: dict, size: int) -> list[dict]:
    """Parts of at most `size` rows (`size` <= 0, or >= the batch: the batch itself)."""
    rows = batch_rows(batch)
    if size <= 0 or rows is None or rows <= size:
        return [batch]
    return [rows_part(batch, lo, lo + size) for lo in range(0, rows, size)]


def micro_batches(batch: dict, size: int) -> list[tuple[dict, float]]:
    """[(part, weight)] from `split_rows`, weight = the part's loss terms / the batch's, so sum_m weight_m *
    loss(part_m) is the batch's loss. Parts without any loss term (all labels ignored) are left out; a batch
    without any keeps its single part (it is scored as it would be unsplit)."""
    rows = batch_rows(batch)
    shares = row_shares(batch)
    if size <= 0 or rows is None or rows <= size or shares is None:
        return [(batch, 1.0)]
    return [(rows_part(batch, lo, lo + size), w) for lo in range(0, rows, size)
            if (w := float(shares[lo:lo + size].sum())) > 0.0]


def row_shares(batch: dict) -> Optional[torch.Tensor]:
    """(rows,) float64: each row's share of the batch's loss terms (a part's weight is the sum over its rows); None
    when the batch has no rows or no loss term (it cannot be weighted: it is scored whole)."""
    rows = batch_rows(batch)
    if rows is None:
        return None
    terms = loss_terms_per_row(batch, rows)
    total = float(terms.sum())
    return None if total == 0.0 else terms / total
