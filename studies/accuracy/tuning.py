"""The learning rate (and, where a family tunes several configs, the config) of each method family from the
validation (tune) runs -> <out>/tuned_lr.json.

Best = highest validation average accuracy; ties go to the smaller lr, then to the candidate listed first. A family
with no finished tune run (a budget cut, or --only) gets the middle of its grid and its first candidate, marked
"default" in the file. In studies that check training (run_checks.py) a refused run is not a candidate."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

from studies.accuracy import run_checks
from studies.accuracy.grid import lr_tag
from studies.accuracy.studies import SMOLLM2, Study

RULE = "highest validation average accuracy of the family's tuned config; ties -> smaller lr"
RULE_PICK = ("highest validation average accuracy over the family's tuned configs and lrs; ties -> smaller lr, then "
             "the config listed first")
REFUSED = "; runs with non-finite steps or logged NaNs left out"


def _scores(runs: Iterable[dict], study: Study) -> dict[str, dict[tuple[str, float], float]]:
    """family -> {(config, lr): validation average} of the finished tune runs."""
    scores: dict[str, dict[tuple[str, float], float]] = {f: {} for f in study.tune_configs}
    for r in runs:
        m, res = r["meta"], r["results"]
        after = res.get("after")
        if m["phase"] != "tune" or not after or m["config"] not in study.tune_configs.get(m["family"], ()):
            continue
        if study.checks_training and run_checks.refusals(res):
            continue
        scores[m["family"]][(m["config"], float(m["learning_rate"]))] = float(after["average"])
    return scores


def best_lrs(runs: Iterable[dict], study: Study = SMOLLM2, smoke: bool = False) -> dict:
    """runs: aggregate.load_runs() records. -> {"rule", "families": {family: {lr, val_average, grid, config,
    source[, candidates]}}}; `grid` is the chosen config's, `candidates` every tuned config's (several only)."""
    scores = _scores(runs, study)
    several = any(len(c) > 1 for c in study.tune_configs.values())
    families = {}
    for fam, names in study.tune_configs.items():
        got, lrs = scores[fam], study.lr_grid(fam, smoke)
        if got:
            # rounded: averages of the same counts differ in the last bit (0.3525 vs 0.35250000000000004)
            config, lr = min(got, key=lambda k: (-round(got[k], 9), k[1], names.index(k[0])))
            entry = {"lr": lr, "val_average": got[(config, lr)], "grid": {lr_tag(x): got.get((config, x)) for x in lrs},
                     "config": config, "source": f"tuned on {len(got)} of {len(lrs) * len(names)} "
                                                 + ("lrs" if len(names) == 1 else "(config, lr) pairs")}
        else:
            config = names[0]
            entry = {"lr": study.default_lr(fam), "val_average": None, "grid": {lr_tag(x): None for x in lrs},
                     "config": config, "source": "default (no validation run finished)"}
        if len(names) > 1:
            entry["candidates"] = {c: {lr_tag(x): got.get((c, x)) for x in lrs} for c in names}
        families[fam] = entry
    rule = (RULE_PICK if several else RULE) + (REFUSED if study.checks_training else "")
    return {"rule": rule, "families": families}


def write_tuned(runs: Iterable[dict], path: str | Path, study: Study = SMOLLM2, smoke: bool = False) -> dict:
    tuned = best_lrs(runs, study, smoke)
    Path(path).write_text(json.dumps(tuned, indent=2))
    return tuned


def read_tuned(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def lrs_of(tuned: dict) -> dict[str, float]:
    """family -> lr, from what write_tuned wrote."""
    return {f: float(t["lr"]) for f, t in tuned["families"].items()}


def picks_of(tuned: dict) -> dict[str, str]:
    """family -> its tuned config, from what write_tuned wrote."""
    return {f: t["config"] for f, t in tuned["families"].items()}


def is_tuned_choice(row: dict, tuned: dict | None) -> bool:
    """A test row ran at its family's tuned lr (and, where the family tuned several configs, is not a candidate
    that lost). False for runs of an earlier tuning's pick, kept in the folder when a later grid point won; they
    are left out of the targets and plots. Rows of families that tune nothing, or without a tuning, are True."""
    t = (tuned or {}).get("families", {}).get(row["family"])
    if t is None or row["learning_rate"] is None:
        return True
    if row["config"] in t.get("candidates", {}) and row["config"] != t["config"]:
        return False
    return math.isclose(float(row["learning_rate"]), float(t["lr"]), rel_tol=1e-9)
