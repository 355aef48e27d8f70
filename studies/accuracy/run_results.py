"""A run's results.json: plain as the recipe writes it, or gzipped as committed.

Each results.json holds every evaluated item's generation (~290 KB); gzipped it is ~7 KB. The committed runs
are gzipped so that the working tree, which every device call copies next to the model parts (64 MiB in
all), stays small. Readers accept either form; a run with either is finished (the sweep skips it).

    python studies/accuracy/run_results.py <out> [<out> ...]    # gzip every <out>/runs/*/results.json

It also removes the folders of runs that were still going when the sweep folder was copied (neither results nor a
failures.txt: stage qwen15-bg copies the folder while its detached sweep runs); the sweep would run them again.
And it removes each finished run's results.png, the recipe's before/after bars (~60 KB each, ~6 MB over the
committed studies): they are drawn from results.json alone (recipes/commonsense/report.py, plot_before_after),
and the folder's own accuracy.png / accuracy_tradeoff.png show every run.
"""
from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

PLAIN, PACKED = "results.json", "results.json.gz"
RUN_PLOT = "results.png"  # the recipe's per-run plot, redrawable from results.json
FAILURES = "failures.txt"  # one line per failed attempt of a run (launcher.py)


def find(run_dir: str | Path) -> Optional[Path]:
    """The run's results file (plain first), or None while the run has not finished."""
    for name in (PLAIN, PACKED):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    return None


def read(run_dir: str | Path) -> Optional[dict]:
    path = find(run_dir)
    if path is None:
        return None
    with (gzip.open(path, "rt") if path.name == PACKED else open(path)) as f:
        return json.load(f)


def evaluation(results: dict, extra: bool = False) -> Optional[dict]:
    """A run's evaluation (the recipe's evaluate_all output) after training, or before it for a run that trained
    nothing (the zero-shot config); extra: that of the --extra_eval sets."""
    suffix = "_extra" if extra else ""
    return results.get("after" + suffix) or (None if results.get("training") else results.get("before" + suffix))


def pack(run_dir: str | Path) -> Optional[Path]:
    """results.json -> results.json.gz (same content; mtime 0 in the header, so packing again gives the same
    bytes); the plain file is removed. Returns the packed file, or None when there was no plain one."""
    plain = Path(run_dir) / PLAIN
    if not plain.is_file():
        return None
    packed = plain.with_name(PACKED)
    data = plain.read_bytes()
    with open(packed, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as dst:
        dst.write(data)
    with gzip.open(packed, "rb") as f:  # the plain file goes only once the packed one reads back the same
        if f.read() != data:
            raise OSError(f"{packed} does not read back as {plain}")
    plain.unlink()
    return packed


def pack_all(out: str | Path) -> list[Path]:
    return [p for d in sorted((Path(out) / "runs").glob("*")) if (p := pack(d)) is not None]


def drop_run_plots(out: str | Path) -> list[Path]:
    """Remove the results.png of every finished run (an unfinished run keeps its folder as it is)."""
    plots = [d / RUN_PLOT for d in sorted((Path(out) / "runs").glob("*"))
             if (d / RUN_PLOT).is_file() and find(d) is not None]
    for path in plots:
        path.unlink()
    return plots


def drop_in_flight(out: str | Path) -> list[Path]:
    """Remove the run folders holding neither results nor a failure record (runs in flight when copied)."""
    dropped = [d for d in sorted((Path(out) / "runs").glob("*"))
               if d.is_dir() and find(d) is None and not (d / FAILURES).is_file()]
    for d in dropped:
        shutil.rmtree(d)
    return dropped


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for out in sys.argv[1:]:
        dropped = drop_in_flight(out)
        packed = pack_all(out)
        plots = drop_run_plots(out)
        print(f"{out}: packed {len(packed)} results.json; removed {len(plots)} per-run plots and {len(dropped)} "
              "unfinished run folders"
              + "".join(f"\n  {d.name}" for d in dropped))
