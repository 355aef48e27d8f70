"""Did a run really train? Checks of one finished run's results.json, for the studies that ask for them
(studies.Study.checks_training; issue 17: bf16 runs of the 1.5B model went NaN mid-training, issue 16, and a NaN
run's accuracy is not the method's).

Refusals: the run is left out of its config's means, of the targets and of the lr tuning, and listed with the reason.
    non-finite steps N        training.nonfinite_skipped_steps > 0 (the recipe's guard skipped N optimizer steps)
    <key> nan at step S       a non-finite loss or grad_norm in training.log_history (or a non-finite train_loss)
Flags: the run counts, and the tables say what it did.
    no non-finite count       a trained run whose results lack the guard's count (a recipe from before issue 16)
    constant generation: T    every item of task T got the same generated answer (no answer included)
    constant ranked: T        every item of task T got the same ranked label
    generation <= constant    the test average is not above the best constant answer on the same items
    ranked <= constant        (per task the most frequent gold answer's share, averaged over the tasks)
    extra ...                 the same for the --extra_eval sets
"""
from __future__ import annotations

import math
from typing import Optional

from studies.accuracy.run_results import evaluation
from studies.accuracy.targets import constant_share

LOGGED = ("loss", "grad_norm")  # log_history values that must stay finite


def _nonfinite(x) -> bool:
    return isinstance(x, (int, float)) and not math.isfinite(x)


def refusals(results: dict) -> list[str]:
    """Why the run did not really train ([] when it did, or trained nothing: zero-shot)."""
    tr = results.get("training") or {}
    out = []
    if tr.get("nonfinite_skipped_steps"):
        out.append(f"non-finite steps {tr['nonfinite_skipped_steps']}")
    for key in LOGGED:  # the first non-finite value of each
        bad = next((h for h in tr.get("log_history") or [] if _nonfinite(h.get(key))), None)
        if bad is not None:
            out.append(f"{key} {bad[key]} at step {bad.get('step')}")
    if _nonfinite(tr.get("train_loss")):
        out.append(f"train_loss {tr['train_loss']}")
    return out


def _answer_flags(ev: Optional[dict], prefix: str) -> list[str]:
    if not ev:
        return []
    tasks = ev["tasks"]
    out = []
    for t, v in tasks.items():
        samples = v.get("samples") or []
        for what, key in (("generation", "pred"), ("ranked", "choice")):
            answers = {s[key] for s in samples if key in s}
            if len(samples) > 1 and len(answers) == 1:
                out.append(f"{prefix}constant {what}: {t}")
    if tasks and all(v.get("samples") for v in tasks.values()):
        constant = sum(constant_share(v["samples"]) for v in tasks.values()) / len(tasks)
        for what, key in (("generation", "average"), ("ranked", "choice_average")):
            if key in ev and ev[key] <= constant + 1e-12:
                out.append(f"{prefix}{what} <= constant")
    return out


def flags(results: dict) -> list[str]:
    """What a counted run did that a reader must know (see the module doc)."""
    tr = results.get("training")
    out = ["no non-finite count"] if tr is not None and "nonfinite_skipped_steps" not in tr else []
    return out + _answer_flags(evaluation(results), "") + _answer_flags(evaluation(results, extra=True), "extra ")
