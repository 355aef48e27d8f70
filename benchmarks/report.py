"""Results on disk: ratios to the baselines, the JSON document, and CSV files."""
from __future__ import annotations

import csv
import json
import os
import platform
import time

import torch

# (column, baseline method, measured field, ratio direction): e.g. mem_x_floor = peak / floor's peak
RATIOS = [
    ("mem_x_floor", "floor", "peak_bytes"),
    ("tps_x_floor", "floor", "tokens_per_s"),
    ("mem_x_lora16", "lora_r16", "peak_bytes"),
    ("tps_x_lora16", "lora_r16", "tokens_per_s"),
    ("mem_x_masked", "masked_spft", "peak_bytes"),
    ("mem_x_ours_rows", "ours_rows_fp32", "peak_bytes"),    # the trainer defaults' cost (make_table.defaults_cost)
    ("tps_x_ours_rows", "ours_rows_fp32", "tokens_per_s"),
]
GROUP = ("model", "batch", "seq", "checkpointing")


def add_ratios(runs: list[dict]) -> None:
    """Ratios of every ok run to the baselines measured in the same (model, batch, seq, checkpointing)."""
    base = {}
    for r in runs:
        if r.get("status") == "ok" and r["method"] in {b for _, b, _ in RATIOS}:
            base[tuple(r[k] for k in GROUP) + (r["method"],)] = r
    for r in runs:
        for col, method, field in RATIOS:
            ref = base.get(tuple(r.get(k) for k in GROUP) + (method,))
            ok = r.get("status") == "ok" and ref is not None
            a, b = (r.get(field), ref.get(field)) if ok else (None, None)
            r[col] = a / b if ok and a is not None and b else None


def environment(device: torch.device) -> dict:
    import transformers
    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    return {
        "gpu": gpu,
        "device_total_bytes": torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "peft": peft_version, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }


def write_json(doc: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


RUN_COLUMNS = ["sweep", "model", "batch", "seq", "checkpointing", "method", "label", "r", "status", "peak_gib",
               "tokens_per_s", "step_s_median", "mem_x_floor", "tps_x_floor", "mem_x_lora16", "tps_x_lora16",
               "mem_x_masked", "mem_x_ours_rows", "tps_x_ours_rows", "trainable_params", "effective_params",
               "optimizer_state_mib", "loss_last", "setup_s", "wall_s", "notes", "error"]
SCORING_COLUMNS = ["model", "criterion", "micro_batch_size", "status", "batch", "seq", "batches_measured",
                   "target_batches", "seconds_measured", "per_batch_s", "seconds_extrapolated", "peak_gib",
                   "peak_x_training", "peak_x_training_ckpt", "epoch_s", "fraction_of_epoch", "error"]


def _gib(x):
    return None if x is None else x / 2**30


def write_csv(rows: list[dict], columns: list[str], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            out = dict(r)
            out["peak_gib"] = _gib(r.get("peak_bytes"))
            if r.get("optimizer_state_bytes") is not None:
                out["optimizer_state_mib"] = r["optimizer_state_bytes"] / 2**20
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in out.items()})
