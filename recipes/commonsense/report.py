"""Per-task table, results JSON and the before/after accuracy plot."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional


def format_table(before: Optional[dict], after: Optional[dict]) -> str:
    """Markdown table: task | n | chance | before | after | delta (accuracy in %), average last. `chance` is the
    accuracy of a uniform random pick among each item's options (shown when the results carry it); `ranked`
    columns: the accuracy of ranking each item's answer labels (evaluation.py), when the results carry it."""
    runs = [r for r in (before, after) if r]
    if not runs:
        return "(no evaluation)"
    tasks = list(runs[0]["tasks"])
    has_chance = all("chance" in r for r in runs[0]["tasks"].values()) and "chance_average" in runs[0]
    has_ranked = all("choice_average" in r for r in runs)
    named = [(w, r) for w, r in (("before", before), ("after", after)) if r]
    head = (["task", "n"] + (["chance"] if has_chance else []) + [w for w, _ in named]
            + (["delta"] if before and after else []) + ([f"ranked {w}" for w, _ in named] if has_ranked else []))
    rows = []
    for t in tasks + ["average"]:
        n = sum(runs[0]["tasks"][x]["n"] for x in tasks) if t == "average" else runs[0]["tasks"][t]["n"]
        accs = [r["average"] if t == "average" else r["tasks"][t]["accuracy"] for r in (before, after) if r]
        cells = [t, str(n)]
        if has_chance:
            c = runs[0]["chance_average"] if t == "average" else runs[0]["tasks"][t]["chance"]
            cells.append(f"{100 * c:.1f}")
        cells += [f"{100 * a:.1f}" for a in accs]
        if before and after:
            cells.append(f"{100 * (accs[1] - accs[0]):+.1f}")
        if has_ranked:
            cells += [f"{100 * (r['choice_average'] if t == 'average' else r['tasks'][t]['choice_accuracy']):.1f}"
                      for r in runs]
        rows.append(cells)
    widths = [max(len(c) for c in col) for col in zip(head, *rows)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows])


def save_json(results: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    tmp.replace(path)
    return path


def plot_before_after(before: Optional[dict], after: Optional[dict], path: str | os.PathLike,
                      title: str = "") -> Path:
    """Grouped bar chart of accuracy per task (+ average), before and after fine-tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    series = [(lbl, r) for lbl, r in (("before", before), ("after", after)) if r]
    tasks = list(series[0][1]["tasks"]) + ["average"]
    x = np.arange(len(tasks))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(tasks)), 4))
    for i, (lbl, r) in enumerate(series):
        vals = [100 * (r["average"] if t == "average" else r["tasks"][t]["accuracy"]) for t in tasks]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=lbl)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ref = series[0][1]
    if "chance_average" in ref and all("chance" in v for v in ref["tasks"].values()):
        chance = [100 * (ref["chance_average"] if t == "average" else ref["tasks"][t]["chance"]) for t in tasks]
        ax.scatter(x, chance, marker="_", s=900, color="black", zorder=3, label="chance")
    ax.set_xticks(x, tasks, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
