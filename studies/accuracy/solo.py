"""The solo phase (sweep.py --phase solo): each trained config alone on the device for a few hundred steps, no
evaluation. Its runs are the study's only valid peak memory, tokens/s and scoring time: the accuracy runs share the
GPU with others (their memory peaks interleave, their speed is the share they got).

Per config (means over its solo runs): steps, trainable params, peak memory (MiB, torch.cuda.max_memory_allocated
over training; on the CPU the process's peak RSS), training tokens/s (non-padding tokens / train runtime), train
runtime, and setup seconds (the wall time of trainer.train() beyond its runtime: importance scoring and slice
surgery for the sparse configs)."""
from __future__ import annotations

from studies.accuracy.stats import mean, training_means


def summarize(runs: list[dict]) -> list[dict]:
    """One row per config of the finished solo runs (aggregate.load_runs records), in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        if r["meta"]["phase"] == "solo" and r["results"].get("training"):
            groups.setdefault(r["meta"]["config"], []).append(r)
    rows = []
    for config, members in groups.items():
        trains = [r["results"]["training"] for r in members]
        rows.append({
            "config": config, "family": members[0]["meta"]["family"], "runs": [r["meta"]["name"] for r in members],
            "steps": mean([t.get("steps") for t in trains]),
            "trainable_params": mean([t.get("trainable_params") for t in trains]),
            **training_means(trains), "memory_kind": (trains[0].get("peak_memory") or {}).get("kind"),
            "setup_s": mean([t.get("setup_s") for t in trains]),
        })
    return rows

