"""The trade-off plot of a study with a solo phase (<out>/accuracy_tradeoff.png): test accuracy (mean ± std over
seeds) against trainable parameters (log scale) and against peak memory alone on the GPU (the solo phase), one
colour per method family; top row generation accuracy, bottom row ranked-label accuracy. The zero-shot model is a
dotted line; a config without a solo run is missing from the memory panels (the accuracy runs shared the GPU)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

from studies.accuracy.stats import nan_blank
from studies.accuracy.targets import METRICS


def _short(config: str) -> str:
    return config.replace("sparse_", "").replace("_per_layer", "")


def _clusters(points: list[tuple[float, float, str]], near) -> list[list[tuple[float, float, str]]]:
    """Points grouped by x: consecutive ones (in x order) for which near(x0, x1) holds share a group."""
    groups: list[list[tuple[float, float, str]]] = []
    for p in sorted(points):
        if groups and near(groups[-1][-1][0], p[0]):
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


def _place_labels(ax, points: list[tuple[float, float, str]], scale: str) -> None:
    """Labels to the right of their points with a thin leader line; the labels of points at about the same x
    (the sparse configs, LoRA and DoRA all train ~18 M parameters; on the memory axis, points closer than a label
    is wide) are stacked ~1/22 of the y range apart."""
    if not points:
        ax.text(0.5, 0.8, "no solo run yet", transform=ax.transAxes, ha="center", fontsize=8, color="#888888")
        return
    lo, hi = ax.get_ylim()
    gap = (hi - lo) / 22
    x_lo, x_hi = ax.get_xlim()
    if scale == "log":
        near, shift = (lambda a, b: b < 1.5 * a), (lambda x: x * 1.6)
    else:
        near, shift = (lambda a, b: b - a < 0.15 * (x_hi - x_lo)), (lambda x: x + 0.04 * (x_hi - x_lo))
    top = hi
    for group in _clusters(points, near):
        placed: list[float] = []
        label_x = shift(max(g[0] for g in group))  # the stack's column, right of the group's rightmost point
        for x, y, text in sorted(group, key=lambda p: p[1]):
            placed.append(y if not placed else max(y, placed[-1] + gap))
            ax.annotate(text, (x, y), xytext=(label_x, placed[-1]), textcoords="data",
                        fontsize=6, va="center", arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "#888888"})
        top = max(top, placed[-1] + gap)
    ax.set_ylim(lo, top)


def plot(test_rows: list[dict], solo_rows: list[dict], path: Path, colours: Mapping[str, str],
         families: tuple[str, ...]) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in test_rows if r["n_seeds"]]
    if not rows:
        return None
    peak = {r["config"]: r["peak_memory_mib"] for r in solo_rows if nan_blank(r["peak_memory_mib"]) is not None}
    xs = (("trainable parameters", lambda r: r["trainable_params"] or None, "log"),
          ("peak memory alone on the GPU (GiB)", lambda r: peak[r["config"]] / 1024 if r["config"] in peak else None,
           "linear"))
    fig, axes = plt.subplots(len(METRICS), len(xs), figsize=(11, 8), squeeze=False)
    for i, (metric, what) in enumerate(METRICS.items()):
        for j, (xlabel, x_of, scale) in enumerate(xs):
            ax = axes[i][j]
            labels = []
            for r in rows:
                y, x = r[metric]["mean"], x_of(r)
                if nan_blank(y) is None:
                    continue
                if r["family"] == "zero_shot" or x is None:
                    if r["family"] == "zero_shot":
                        ax.axhline(100 * y, color="black", lw=0.8, ls=":")
                    continue
                ax.errorbar(x, 100 * y, yerr=100 * r[metric]["std"], fmt="o", capsize=3,
                            color=colours.get(r["family"], "#999999"))
                labels.append((x, 100 * y, _short(r["config"])))
            ax.set_xscale(scale)
            if scale == "log" and labels:  # room on the right for the labels
                ax.set_xlim(min(x for x, _, _ in labels) / 2, max(x for x, _, _ in labels) * 6)
            _place_labels(ax, labels, scale)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(f"{what} accuracy, test average (%)", fontsize=8)
            ax.tick_params(labelsize=7)
    present = [f for f in families if any(r["family"] == f for r in rows)]
    handles = [Line2D([], [], color=colours.get(f, "#999999"), marker="o", ls="", label=f) for f in present
               if f != "zero_shot"]
    if "zero_shot" in present:
        handles.append(Line2D([], [], color="black", lw=0.8, ls=":", label="zero-shot"))
    n = sorted({r["n_seeds"] for r in rows})
    fig.suptitle(f"accuracy vs trainable parameters and peak memory (mean ± std over seeds, n = "
                 f"{'/'.join(map(str, n))})", fontsize=9)
    fig.legend(handles=handles, fontsize=7, loc="upper right")
    fig.tight_layout(rect=(0, 0, 0.9, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
