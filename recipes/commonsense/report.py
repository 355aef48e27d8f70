"""Per-task table, plain-language verdicts, results JSON and the before/after plot, each accuracy with its 95%
interval and each before/after change tested against noise (stats.py), so a small evaluation cannot pass for a
result."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from .stats import changed, mcnemar_p, mean_interval, wilson

# (label, accuracy key of a task result, the sample field it compares with "answer")
METRICS = (("generation", "accuracy", "pred"), ("ranked", "choice_accuracy", "choice"))
NOISE_P = 0.05
LEGEND = ("n: items per task; [lo, hi]: 95% Wilson interval; change: after - before on the same items, '(noise)' "
          f"where an exact McNemar test cannot tell it from no change (p >= {NOISE_P}); no answer: share of "
          "generations without an answer word.")


def _phases(before: Optional[dict], after: Optional[dict]) -> list[tuple[str, dict]]:
    return [(w, r) for w, r in (("before", before), ("after", after)) if r]


def _metrics(phases: list[tuple[str, dict]]) -> list[tuple[str, str, str]]:
    return [m for m in METRICS if all(m[1] in r["tasks"][t] for _, r in phases for t in r["tasks"])]


def _correct(task_result: dict, field: str) -> Optional[list[bool]]:
    samples = task_result.get("samples")
    return None if samples is None else [s.get(field) == s["answer"] for s in samples]


def _accuracy(r: dict, key: str, task: Optional[str] = None) -> float:
    """One task's accuracy, or (task None) the unweighted mean over tasks, as the papers' tables average."""
    if task is not None:
        return r["tasks"][task][key]
    accs = [v[key] for v in r["tasks"].values()]
    return sum(accs) / len(accs)


def _interval(r: dict, key: str, task: Optional[str] = None) -> tuple[float, float]:
    if task is not None:
        n = r["tasks"][task]["n"]
        return wilson(round(r["tasks"][task][key] * n), n)
    return mean_interval([v[key] for v in r["tasks"].values()], [v["n"] for v in r["tasks"].values()])


def change(before: dict, after: dict, key: str, field: str, task: Optional[str] = None) -> tuple[float, float]:
    """(after - before accuracy, McNemar p over the same items; nan without per-item samples). task None: the
    mean over tasks, tested on all items pooled."""
    tasks = [task] if task is not None else list(before["tasks"])
    improved = worsened = 0
    for t in tasks:
        b, a = _correct(before["tasks"][t], field), _correct(after["tasks"][t], field)
        if b is None or a is None:
            return _accuracy(after, key, task) - _accuracy(before, key, task), float("nan")
        i, w = changed(b, a)
        improved, worsened = improved + i, worsened + w
    return _accuracy(after, key, task) - _accuracy(before, key, task), mcnemar_p(improved, worsened)


def _pct_interval(acc: float, lo: float, hi: float) -> str:
    return f"{100 * acc:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _change_cell(d: float, p: float) -> str:
    if p != p:  # nan: no per-item samples, nothing to test
        return f"{100 * d:+.1f}"
    return f"{100 * d:+.1f}" + (" (noise)" if p >= NOISE_P else "")


def _has_no_answer(phases) -> bool:
    """Every task of every (name, result) phase counted its generations without an answer."""
    return all("no_answer" in v for _, r in phases for v in r["tasks"].values())


def _no_answer_share(r: dict, task: Optional[str] = None) -> float:
    shares = [v["no_answer"] / v["n"] for t, v in r["tasks"].items() if task is None or t == task]
    return sum(shares) / len(shares)


def format_table(before: Optional[dict], after: Optional[dict]) -> str:
    """Markdown table: task | n | chance | per metric (generation; ranked, when the results carry it) each phase's
    accuracy with its 95% interval and the change | no answer; the average over tasks last; then the legend."""
    phases = _phases(before, after)
    if not phases:
        return "(no evaluation)"
    ref = phases[0][1]
    tasks = list(ref["tasks"])
    metrics = _metrics(phases)
    both = len(phases) == 2
    has_chance = all("chance" in v for v in ref["tasks"].values()) and "chance_average" in ref
    has_no_answer = _has_no_answer(phases)
    head = ["task", "n"] + (["chance"] if has_chance else [])
    for label, _, _ in metrics:
        head += [f"{label} {w}" for w, _ in phases] + (["change"] if both else [])
    head += [f"no answer % {' -> '.join(w for w, _ in phases)}"] if has_no_answer else []
    rows = []
    for t in tasks + [None]:
        n = sum(v["n"] for v in ref["tasks"].values()) if t is None else ref["tasks"][t]["n"]
        cells = ["average" if t is None else t, str(n)]
        if has_chance:
            cells.append(f"{100 * (ref['chance_average'] if t is None else ref['tasks'][t]['chance']):.1f}")
        for _, key, field in metrics:
            cells += [_pct_interval(_accuracy(r, key, t), *_interval(r, key, t)) for _, r in phases]
            if both:
                cells.append(_change_cell(*change(before, after, key, field, t)))
        if has_no_answer:
            cells.append(" -> ".join(f"{100 * _no_answer_share(r, t):.0f}" for _, r in phases))
        rows.append(cells)
    widths = [max(len(c) for c in col) for col in zip(head, *rows)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    lines = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows]
    return "\n".join(lines + [LEGEND])


def verdicts(before: Optional[dict], after: Optional[dict]) -> list[str]:
    """What the averages say, in words: each metric's change against noise, and the last phase against chance."""
    phases = _phases(before, after)
    if not phases:
        return []
    last_name, last = phases[-1]
    n = sum(v["n"] for v in last["tasks"].values())
    out = []
    for label, key, field in _metrics(phases):
        acc, (lo, hi) = _accuracy(last, key), _interval(last, key)
        line = f"{label} accuracy {last_name}: {_pct_interval(acc, lo, hi)} on {n} items"
        if "chance_average" in last:
            chance = last["chance_average"]
            line += (f"; chance {100 * chance:.1f} is inside the interval: not distinguishable from guessing"
                     if lo <= chance <= hi else f"; chance {100 * chance:.1f} is outside the interval")
        if len(phases) == 2:
            d, p = change(before, after, key, field)
            line += (f"; change {100 * d:+.1f} points" + ("" if p != p else f" (McNemar p = {p:.2g}: "
                     + ("within noise)" if p >= NOISE_P else "beyond noise)")))
        out.append(line + ".")
    return out


def save_json(results: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    tmp.replace(path)
    return path


def plot_before_after(before: Optional[dict], after: Optional[dict], path: str | os.PathLike,
                      title: str = "") -> Path:
    """One panel per metric (generation accuracy; ranked accuracy when evaluated) with before/after bars, their
    95% intervals and the chance level, and a panel of the no-answer share: a format effect (generation moves,
    ranked does not, no-answer share moves with it) is visible at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    phases = _phases(before, after)
    ref = phases[0][1]
    tasks = list(ref["tasks"])
    names = tasks + ["average"]
    metrics = _metrics(phases)
    has_no_answer = _has_no_answer(phases)
    panels = [(f"{label} accuracy (%)", key) for label, key, _ in metrics] + (
        [("no answer (%)", None)] if has_no_answer else [])
    x, width = np.arange(len(names)), 0.8 / len(phases)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 1.1 * len(names)) + 1.2, 2.6 * len(panels) + 0.6),
                             sharex=True, squeeze=False)
    for ax, (ylabel, key) in zip(axes[:, 0], panels):
        for i, (w, r) in enumerate(phases):
            pos = x + (i - (len(phases) - 1) / 2) * width
            if key is None:
                vals = [100 * _no_answer_share(r, None if t == "average" else t) for t in names]
                bars = ax.bar(pos, vals, width, label=w)
            else:
                spans = [_interval(r, key, None if t == "average" else t) for t in names]
                vals = [100 * _accuracy(r, key, None if t == "average" else t) for t in names]
                err = np.array([[v - 100 * lo, 100 * hi - v] for v, (lo, hi) in zip(vals, spans)]).T.clip(0)
                bars = ax.bar(pos, vals, width, yerr=err, capsize=2, label=w, error_kw={"lw": 0.8})
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        if key is not None and "chance_average" in ref and all("chance" in v for v in ref["tasks"].values()):
            chance = [100 * (ref["chance_average"] if t == "average" else ref["tasks"][t]["chance"]) for t in names]
            ax.scatter(x, chance, marker="_", s=900, color="black", zorder=3, label="chance")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_ylim(0, 110)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0))  # beside the bars, not on them
    ns = sorted({v["n"] for v in ref["tasks"].values()})
    n_text = f"n = {ns[0]} items per task" if len(ns) == 1 else f"n = {ns[0]}-{ns[-1]} items per task"
    axes[0, 0].set_title(f"{title}\n{n_text}; bars: 95% Wilson intervals" if title else n_text, fontsize=9)
    axes[-1, 0].set_xticks(x, names, rotation=30, ha="right")
    fig.tight_layout(rect=(0, 0, 0.91, 1))  # the right margin holds the legends
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
