"""One-off cost of importance scoring (`sprune_trainer.scoring.importance.score_neurons`) against one training epoch.

A data-driven criterion runs `n` calibration batches (few, to save device time) and the result is
extrapolated to `target` batches (the paper's 50): the batch iterator stamps the (synchronised) time each
batch is taken, so the run splits into setup, a first batch (warm-up), steady batches, and the finish after
the last. extrapolated = setup + first + (target - 1) x median(steady) + finish. Weight-only criteria (l2)
take no batches and are timed as they run."""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from .measure import peak_bytes, release_memory, sync
from .methods import target_layers

# LLM-Adapters' commonsense_170k: 170,420 examples. Tokens per example is an assumption: its prompts
# (Alpaca template + question + "the correct answer is X") average ~300-550 characters (measured on the
# BoolQ/ARC/OBQA/PIQA/SIQA/WinoGrande files in shared/data), i.e. ~75-140 Llama tokens; 128 rounds that up
# to what a padded batch processes.
COMMONSENSE_EXAMPLES = 170_420
TOKENS_PER_EXAMPLE = 128


def stamped(batches, device, stamps):
    """`batches`, appending the (synchronised) time each one is taken to `stamps`."""
    for b in batches:
        sync(device)
        stamps.append(time.perf_counter())
        yield b


def extrapolated(t0: float, stamps: list[float], end: float, target_batches: int) -> dict:
    """A run from t0 to end that took a batch at each of `stamps`, extrapolated to `target_batches` (module doc)."""
    # intervals[i] = batch i; the last one also holds the finish (a few ms of per-layer reductions)
    intervals = [b2 - b1 for b1, b2 in zip(stamps, stamps[1:])] + [end - stamps[-1]]
    steady = statistics.median(intervals[1:]) if len(intervals) > 1 else intervals[0]
    return dict(batches_measured=len(stamps), setup_s=stamps[0] - t0, first_batch_s=intervals[0],
                per_batch_s=steady, target_batches=target_batches,
                seconds_extrapolated=(stamps[0] - t0) + intervals[0] + (target_batches - 1) * steady)


# benchmark names of criterion variants -> SparseNeuronConfig fields
CRITERION_FIELDS = {"taylor_elementwise": {"importance": "taylor", "taylor_form": "elementwise"}}


def config_fields(criterion: str) -> dict:
    """The SparseNeuronConfig fields a criterion name stands for (e.g. taylor_elementwise)."""
    return CRITERION_FIELDS.get(criterion, {"importance": criterion})


def needs_data(criterion: str) -> bool:
    from sprune_trainer.config import DATA_IMPORTANCE_NAMES
    return config_fields(criterion)["importance"] in DATA_IMPORTANCE_NAMES


def measure_scoring(model: nn.Module, criterion: str, batches: list[dict], target_batches: int,
                    device: torch.device, micro_batch_size: int = 0) -> dict:
    """Time and peak memory of scoring `batches` with `criterion` in parts of `micro_batch_size` sequences
    (0 = whole batches)."""
    from sprune_trainer import SparseNeuronConfig
    from sprune_trainer.scoring.importance import score_neurons

    layers = target_layers(model)
    n = len(batches)
    fields = config_fields(criterion)
    cfg = SparseNeuronConfig(neurons_per_layer=64, calibration_batches=n, calibration_micro_batch_size=micro_batch_size,
                             **fields)
    b, t = batches[0]["input_ids"].shape
    row = {"criterion": criterion, "batch": b, "seq": t, "micro_batch_size": micro_batch_size, "status": "ok"}
    release_memory(device)
    stamps: list[float] = []
    t0 = time.perf_counter()
    try:
        score_neurons(model, layers, cfg, batches=stamped(batches, device, stamps), progress=False)
        sync(device)
    except Exception as exc:  # noqa: BLE001
        from .measure import is_oom
        if not is_oom(exc):
            raise
        row.update(status="oom", error=str(exc).splitlines()[0][:300])
    end = time.perf_counter()
    row["peak_bytes"] = peak_bytes(device)
    release_memory(device)
    if row["status"] != "ok":
        return row
    row["seconds_measured"] = end - t0
    if not stamps:  # weight-only criterion
        row.update(batches_measured=0, seconds_extrapolated=end - t0, target_batches=0)
        return row
    row.update(extrapolated(t0, stamps, end, target_batches))
    return row


def epoch_seconds(tokens_per_s: float, examples: int = COMMONSENSE_EXAMPLES,
                  tokens_per_example: int = TOKENS_PER_EXAMPLE) -> float:
    return examples * tokens_per_example / tokens_per_s
