"""Figures: memory and tokens/s bars per method (ratio to the frozen floor on each bar), sweep curves, and the
user-stack bars (ours / LoRA / floor per switch)."""
from __future__ import annotations


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return None


def plot_main(runs: list[dict], path: str) -> bool:
    plt = _plt()
    if plt is None:
        return False
    groups = list(dict.fromkeys((r["model"], r["batch"], r["seq"]) for r in runs))
    methods = list(dict.fromkeys(r["method"] for r in runs))
    labels = {r["method"]: r["label"] for r in runs}
    fig, axes = plt.subplots(len(groups), 2, figsize=(16, 4.2 * len(groups)), squeeze=False)
    width = 0.4
    for gi, (model, b, t) in enumerate(groups):
        for ci, (field, ratio, title, scale) in enumerate([("peak_bytes", "mem_x_floor", "peak memory (GiB)", 2**30),
                                                           ("tokens_per_s", "tps_x_floor", "tokens/s", 1)]):
            ax = axes[gi][ci]
            for oi, ckpt in enumerate((False, True)):
                for mi, m in enumerate(methods):
                    row = next((r for r in runs if (r["model"], r["batch"], r["seq"], r["method"], r["checkpointing"])
                                == (model, b, t, m, ckpt)), None)
                    if row is None:
                        continue
                    x = mi + (oi - 0.5) * width
                    value = row.get(field)
                    if row["status"] != "ok" or value is None:
                        ax.text(x, 0, row["status"].upper() if row["status"] != "ok" else "n/a", rotation=90,
                                ha="center", va="bottom", fontsize=7)
                        continue
                    ax.bar(x, value / scale, width, color=f"C{mi}", hatch="//" if ckpt else None,
                           edgecolor="black", linewidth=0.4)
                    if row.get(ratio) is not None:
                        ax.text(x, value / scale, f"{row[ratio]:.2f}x", rotation=90, ha="center", va="bottom",
                                fontsize=7)
            ax.set_xticks(range(len(methods)))
            ax.set_xticklabels([labels[m] for m in methods], rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{model}, batch {b} x seq {t}: {title} (plain: no checkpointing, hatched: "
                         "checkpointing; label: x frozen floor)", fontsize=9)
            ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_sweeps(runs: list[dict], path: str) -> bool:
    """One row per sweep: memory and tokens/s against the swept variable, one line per method."""
    plt = _plt()
    if plt is None:
        return False
    sweeps = list(dict.fromkeys(r["sweep"] for r in runs))
    fig, axes = plt.subplots(len(sweeps), 2, figsize=(13, 4 * len(sweeps)), squeeze=False)
    for si, sweep in enumerate(sweeps):
        rows = [r for r in runs if r["sweep"] == sweep and r["status"] == "ok"]
        xkey = {"r": "r", "seq": "seq", "size": "model_params"}[sweep]
        series = list(dict.fromkeys(r["series"] for r in rows))
        for ci, (field, scale, title) in enumerate([("peak_bytes", 2**30, "peak memory (GiB)"),
                                                    ("tokens_per_s", 1, "tokens/s")]):
            ax = axes[si][ci]
            for s in series:
                pts = sorted((r[xkey], r[field] / scale) for r in rows if r["series"] == s and r.get(field) is not None)
                if len(pts) == 1 and sweep == "r":  # floor / LoRA: one value, drawn as a reference line
                    ax.axhline(pts[0][1], linestyle="--", color="gray" if s == "frozen floor" else "C3", label=s)
                elif pts:
                    ax.plot(*zip(*pts), marker="o", label=s)
            ax.set_xscale("log", base=2)
            ax.set_xlabel({"r": "rows (columns) per layer", "seq": "sequence length (tokens per step fixed)",
                           "size": "model parameters"}[sweep])
            ax.set_title(f"{sweep} sweep: {title}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_user_stack(rows: list[dict], path: str) -> bool:
    """The user-stack table: per (model, shape) peak memory and tokens/s of ours / LoRA / floor for each switch;
    ours' bars carry their ratio to LoRA (label: x LoRA)."""
    plt = _plt()
    if plt is None:
        return False
    groups = list(dict.fromkeys((r["model"], r.get("layers"), r["batch"], r["seq"]) for r in rows))
    methods = [("ours", "ours (rows r64)"), ("lora", "LoRA r16 / QLoRA"), ("floor", "frozen floor")]
    fig, axes = plt.subplots(len(groups) or 1, 2, figsize=(14, 4.2 * max(1, len(groups))), squeeze=False)
    width = 0.27
    for gi, (model, layers, b, t) in enumerate(groups):
        here = [r for r in rows if (r["model"], r.get("layers"), r["batch"], r["seq"]) == (model, layers, b, t)]
        switches = list(dict.fromkeys(r["switch"] for r in here))
        for ci, (field, ratio, title, scale) in enumerate([("peak_bytes", "peak_x_lora", "peak memory (GiB)", 2**30),
                                                           ("tokens_per_s", "tps_x_lora", "tokens/s", 1)]):
            ax = axes[gi][ci]
            for mi, (method, label) in enumerate(methods):
                for si, switch in enumerate(switches):
                    row = next((r for r in here if (r["switch"], r["method"]) == (switch, method)), None)
                    if row is None:
                        continue
                    x = si + (mi - 1) * width
                    value = row.get(field)
                    if row.get("status") != "ok" or value is None:
                        ax.text(x, 0, str(row.get("status", "n/a")).split(":")[0].upper() if row.get("status") != "ok"
                                else "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
                        continue
                    ax.bar(x, value / scale, width, color=f"C{mi}", edgecolor="black", linewidth=0.4,
                           label=label if si == 0 else None)
                    if row.get(ratio) is not None:
                        ax.text(x, value / scale, f"{row[ratio]:.2f}x", rotation=90, ha="center", va="bottom",
                                fontsize=7)
            ax.set_xticks(range(len(switches)))
            ax.set_xlim(-0.6, len(switches) - 0.4)
            ax.set_xticklabels(switches, rotation=20, ha="right", fontsize=8)
            name = f"{model} ({layers} layers)" if layers else model
            ax.set_title(f"{name}, batch {b} x seq {t}: {title} (ours' label: x LoRA)", fontsize=9)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
