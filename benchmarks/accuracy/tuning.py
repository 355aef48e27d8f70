"""The learning rate of each method family from the validation (tune) runs -> <out>/tuned_lr.json.

Best = highest validation average accuracy; ties go to the smaller lr. A family with no finished tune run
(a budget cut, or --only) gets the middle of its grid, marked "default" in the file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from benchmarks.accuracy.grid import FAMILIES, TUNE_CONFIGS, default_lr, lr_grid, lr_tag

RULE = "highest validation average accuracy of the family's tuned config; ties -> smaller lr"


def best_lrs(runs: Iterable[dict], smoke: bool = False) -> dict:
    """runs: aggregate.load_runs() records. -> {"rule", "families": {family: {lr, val_average, grid, source}}}."""
    scores: dict[str, dict[float, float]] = {f: {} for f in FAMILIES}
    for r in runs:
        m = r["meta"]
        after = r["results"].get("after")
        if m["phase"] == "tune" and after and m["config"] == TUNE_CONFIGS.get(m["family"]):
            scores[m["family"]][float(m["learning_rate"])] = float(after["average"])
    families = {}
    for fam in FAMILIES:
        got = scores[fam]
        grid = {lr_tag(lr): got.get(lr) for lr in lr_grid(fam, smoke)}
        if got:
            # rounded: averages of the same counts differ in the last bit (0.3525 vs 0.35250000000000004)
            lr = min(got, key=lambda x: (-round(got[x], 9), x))
            families[fam] = {"lr": lr, "val_average": got[lr], "grid": grid, "config": TUNE_CONFIGS[fam],
                             "source": f"tuned on {len(got)} of {len(grid)} lrs"}
        else:
            families[fam] = {"lr": default_lr(fam), "val_average": None, "grid": grid, "config": TUNE_CONFIGS[fam],
                             "source": "default (no validation run finished)"}
    return {"rule": RULE, "families": families}


def write_tuned(runs: Iterable[dict], path: str | Path, smoke: bool = False) -> dict:
    tuned = best_lrs(runs, smoke)
    Path(path).write_text(json.dumps(tuned, indent=2))
    return tuned


def read_lrs(path: str | Path) -> dict[str, float]:
    """family -> lr from a tuned_lr.json."""
    return {f: float(t["lr"]) for f, t in json.loads(Path(path).read_text())["families"].items()}
