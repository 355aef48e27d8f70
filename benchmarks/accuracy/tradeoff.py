"""The trade-off plot of a study with a solo phase (<out>/accuracy_tradeoff.png): test accuracy (mean ± std over
seeds) against trainable parameters (log scale) and against peak memory alone on the GPU (the solo phase), one
colour per method family; top row generation accuracy, bottom row ranked-label accuracy. The zero-shot model is a
dotted line; a config without a solo run is missing from the memory panels (the accuracy runs shared the GPU)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

from benchmarks.accuracy.stats import nan_blank
from benchmarks.accuracy.targets import METRICS


def _short(config: str) -> str:
    return config.replace("sparse_", "").replace("_per_layer", "")


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
                ax.annotate(_short(r["config"]), (x, 100 * y), fontsize=6, xytext=(4, 3), textcoords="offset points")
            ax.set_xscale(scale)
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
