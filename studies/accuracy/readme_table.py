"""The accuracy doc's table of a study's test results, generated from its committed accuracy.json so that the doc
cannot drift from the results (tests/studies/test_accuracy_readme_table.py compares them).

    python studies/accuracy/readme_table.py studies/accuracy/results/qwen15              # print the block
    python studies/accuracy/readme_table.py studies/accuracy/results/qwen15 --write docs/accuracy.md

--write replaces the lines between the doc's `<!-- readme_table: <folder> -->` and `<!-- /readme_table -->`.
Per config: generation and ranked test averages (mean ± std over seeds), the further evaluation (ranked),
trainable params, and peak memory / tokens/s / setup s from the solo phase († where only the accuracy runs, which
shared the GPU, measured them); then the targets, as aggregate.py's accuracy.md has them. Test runs at an earlier
tuning's lr (tuning.is_tuned_choice) are left out, as they are of the targets."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `studies` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from studies.accuracy import studies, targets, tuning  # noqa: E402
from studies.accuracy.aggregate import (config_cells, fmt_cell, md_rows, pm_cell, solo_by_config,  # noqa: E402
                                           speed_cells)

END = "<!-- /readme_table -->"


def block(out: str | Path) -> str:
    """The markdown between the markers, for the results folder `out`."""
    out = Path(out)
    study = studies.of_folder(out)
    table = json.loads((out / "accuracy.json").read_text())
    solo_rows = solo_by_config(table)
    head = ["config", "lr", "seeds", "generation avg", "ranked avg", "further eval, ranked", "trainable params",
            "peak MiB", "tokens/s", "setup s"]
    rows = [r for r in table.get("test") or [] if tuning.is_tuned_choice(r, table.get("tuned_lr"))]
    cells = []
    for r in rows:
        extra = (r.get("extra") or {}).get("choice_average") or {"mean": None, "std": None}
        cells.append([*config_cells(r), pm_cell(r["average"]), pm_cell(r["choice_average"]), pm_cell(extra),
                      fmt_cell(r["trainable_params"], ",.0f"), *speed_cells(r, study, solo_rows)])
    base = table.get("baselines") or {}
    if base.get("average"):
        avg = base["average"]
        cells.append(["uniform guess / best constant answer", "", "",
                      f"{100 * avg['chance']:.1f} / {100 * avg['constant']:.1f}", "", "", "", "", "", ""])
    parts = [md_rows(head, cells)]
    stale = sum(r["n_seeds"] for r in table.get("test") or []) - sum(r["n_seeds"] for r in rows)
    if stale:
        parts.append(f"(left out: {stale} runs at an earlier tuning's lr or config; accuracy.md lists them)")
    if table.get("targets"):
        title, thead, trows = targets.targets_table(table["targets"], study.issue)
        parts.append(f"{title}:\n\n" + md_rows(thead, trows))
    return "\n\n".join(parts) + "\n"


def write(readme: str | Path, out: str | Path) -> bool:
    """Replace the block of `out` in `readme`; True when it changed."""
    readme = Path(readme)
    text = readme.read_text()
    start = f"<!-- readme_table: {out} -->"
    if start not in text or END not in text.split(start, 1)[1]:
        raise SystemExit(f"{readme} has no '{start}' ... '{END}' block")
    before, rest = text.split(start, 1)
    after = rest.split(END, 1)[1]
    new = f"{before}{start}\n{block(out)}{END}{after}"
    readme.write_text(new)
    return new != text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="a study's results folder (accuracy.json)")
    ap.add_argument("--write", metavar="DOC", help="replace the folder's block in this file")
    args = ap.parse_args(argv)
    if args.write:
        print(f"{args.write}: {'updated' if write(args.write, args.out) else 'unchanged'}")
    else:
        print(block(args.out), end="")


if __name__ == "__main__":
    main()
