"""What the accuracy table must be read against: the reference baselines and the study's targets.

- Baselines, per test (or further-evaluation) task, mean over seeds (each seed draws its own item subset):
  `chance` (uniform guess over the item's labels, the recipe's figure) and `constant` (the best single answer
  for the whole subset, e.g. always "true" on BoolQ: a model that learned nothing but a label prior scores this).
- Targets on the test average, for generation accuracy and for ranked-label accuracy: ours (the best sparse
  config) against the study's references (studies.py; issue 8: >= LoRA r16 + 1, >= DoRA r8 - 0.5, >= full FT;
  issue 17: >= LoRA r16, >= DoRA r16 - 0.5, >= full FT - 1); and the best importance criterion beats `random` at
  the same scope and axis by more than the seed std (pooled over the two configs). Configs a study lists in
  not_ours (above LoRA's trainable count, sized to its memory instead; on an NF4 base) are never "ours".
  A study's pair targets compare two named configs (issue 17: random columns at 8 bytes per trained number >= the
  same config at 16 - 0.3). A check with fewer than the protocol's seeds on either side is marked provisional.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Optional

from studies.accuracy.grid import IMPORTANCES, TEST_SEEDS
from studies.accuracy.studies import SMOLLM2, Study

METRICS = {"average": "generation", "choice_average": "ranked labels"}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def constant_share(samples: list[dict]) -> float:
    """Accuracy of the best single answer for all these items (the most frequent gold answer's share)."""
    answers = Counter(s["answer"] for s in samples)
    return answers.most_common(1)[0][1] / sum(answers.values())


def baselines(runs: list[dict], key: str = "after") -> dict:
    """{"tasks": {task: {"chance", "constant"}}, "average": {"chance", "constant"}} (fractions) from the test runs'
    stored samples; one run per seed suffices, as every run of a seed scores the same items."""
    per_seed: dict[int, dict] = {}
    for r in runs:
        evals = r["results"].get(key)
        if r["meta"].get("phase") == "test" and evals:
            per_seed.setdefault(r["meta"]["seed"], evals["tasks"])
    tasks = list(dict.fromkeys(t for ev in per_seed.values() for t in ev if ev[t].get("samples")))
    out = {"seeds": sorted(per_seed), "tasks": {}}
    for t in tasks:
        chance, constant = [], []
        for ev in per_seed.values():
            if not (ev.get(t) or {}).get("samples"):
                continue
            chance.append(ev[t]["chance"])
            constant.append(constant_share(ev[t]["samples"]))
        out["tasks"][t] = {"chance": _mean(chance), "constant": _mean(constant)}
    out["average"] = {b: _mean([v[b] for v in out["tasks"].values()]) for b in ("chance", "constant")}
    return out


def random_twin(config: str) -> str:
    """sparse_<importance>_<scope>_<axis> -> sparse_random_<scope>_<axis>."""
    rest = config[len("sparse_"):]
    importance = next(i for i in IMPORTANCES if rest.startswith(i + "_"))
    return "sparse_random_" + rest[len(importance) + 1:]


def _value(row: dict, metric: str) -> tuple[float, float]:
    s = row[metric]
    return 100 * s["mean"], 100 * s["std"]


def _is_set(row: Optional[dict], metric: str) -> bool:
    return row is not None and not math.isnan(row[metric]["mean"])


def _check(name: str, metric: str, ours: dict, ref: dict, required: Optional[float] = None) -> dict:
    """ours − ref against `required` (margin >= required); None: against the pooled seed std of the two, which
    the margin must exceed."""
    (om, os_), (rm, rs) = _value(ours, metric), _value(ref, metric)
    margin, strict = om - rm, required is None
    need = math.sqrt((os_ ** 2 + rs ** 2) / 2) if strict else required
    check = {"metric": metric, "comparison": name, "ours": ours["config"], "ours_value": om, "ours_std": os_,
             "ours_seeds": ours["n_seeds"], "reference": ref["config"], "reference_value": rm, "reference_std": rs,
             "reference_seeds": ref["n_seeds"], "margin": margin, "required": need, "strict": strict,
             "met": margin > need if strict else margin >= need,
             # fewer seeds than the protocol's on either side: the verdict may still turn with the missing ones
             "provisional": min(ours["n_seeds"], ref["n_seeds"]) < len(TEST_SEEDS)}
    if "flags" in ours:  # a study that checks training (run_checks.py): what either side's runs did
        check.update(ours_flags=_row_flags(ours), reference_flags=_row_flags(ref))
    return check


def _row_flags(row: dict) -> list[str]:
    return [f"refused {len(row['refused'])}"] * bool(row.get("refused")) + sorted(row.get("flags") or {})


def issue_targets(test_rows: list[dict], study: Study = SMOLLM2) -> list[dict]:
    """Each target of the study's issue, for both metrics, from the test rows of `aggregate.summarize`."""
    by_config = {r["config"]: r for r in test_rows}
    checks = []
    for metric in METRICS:
        sparse = [r for r in test_rows if r["family"].startswith("sparse") and _is_set(r, metric)
                  and r["config"] not in study.not_ours]
        if not sparse:
            continue
        best = max(sparse, key=lambda r: r[metric]["mean"])
        for name, ref, need in study.targets:
            if _is_set(by_config.get(ref), metric):
                checks.append(_check(name, metric, best, by_config[ref], need))
        for name, config, ref, need in study.pair_targets:
            if _is_set(by_config.get(config), metric) and _is_set(by_config.get(ref), metric):
                checks.append(_check(name, metric, by_config[config], by_config[ref], need))
        criteria = [r for r in sparse if not r["config"].startswith("sparse_random_")
                    and _is_set(by_config.get(random_twin(r["config"])), metric)]  # those with a random twin
        if criteria:
            top = max(criteria, key=lambda r: r[metric]["mean"])
            random = by_config.get(random_twin(top["config"]))
            if _is_set(random, metric):
                checks.append(_check("best criterion − random (same scope, axis)", metric, top, random))
    return checks


def targets_table(checks: list[dict], issue: int = SMOLLM2.issue) -> tuple[str, list[str], list[list[str]]]:
    """(title, head, rows) of the targets table (a flags column when the checks carry run_checks' flags)."""
    flagged = any("ours_flags" in c for c in checks)
    return (f"Targets of issue {issue} (test average, points; ours = the best sparse config)",
            ["metric", "comparison", "ours", "reference", "margin", "required", "met"] + ["flags"] * flagged,
            [[METRICS[c["metric"]], c["comparison"],
              f"{c['ours']} {c['ours_value']:.1f} ± {c['ours_std']:.1f} (n={c['ours_seeds']})",
              f"{c['reference']} {c['reference_value']:.1f} ± {c['reference_std']:.1f} (n={c['reference_seeds']})",
              f"{c['margin']:+.1f}", ("> " if c["strict"] else "≥ ") + f"{c['required']:+.1f}",
              ("yes" if c["met"] else "**no**") + (f" (provisional: < {len(TEST_SEEDS)} seeds)"
                                                   if c.get("provisional") else "")]
             + [_flags_cell(c)] * flagged for c in checks])


def _flags_cell(check: dict) -> str:
    """'<config>: <flags>' for ours and the reference, those with flags."""
    return "; ".join(f"{check[side]}: {', '.join(check[side + '_flags'])}" for side in ("ours", "reference")
                     if check.get(side + "_flags"))


def baselines_table(base: dict, what: str) -> tuple[str, list[str], list[list[str]]]:
    """(title, head, rows) of the chance / constant-answer table of `baselines`."""
    tasks = list(base["tasks"])
    return (f"Baselines on the same {what} items (accuracy %, mean over seeds {base['seeds']})",
            ["baseline", "average", *tasks],
            [[name, f"{100 * base['average'][b]:.1f}", *(f"{100 * base['tasks'][t][b]:.1f}" for t in tasks)]
             for b, name in (("chance", "uniform guess"), ("constant", "best constant answer"))])
