"""The committed issue-8 results (studies/accuracy/results/smollm2, smollm2_lr_check) regenerate byte for byte from their
runs with today's aggregate and tuning: adding studies (issue 17) must not change what the 135M study reports."""
from __future__ import annotations

import json
import shutil

import pytest

from helpers import REPO
from studies.accuracy import aggregate, studies, tuning

RESULTS = REPO / "studies" / "accuracy" / "results"


@pytest.mark.parametrize("folder", ["smollm2", "smollm2_lr_check"])
def test_committed_aggregate_regenerates_identically(tmp_path, folder):
    src = RESULTS / folder
    if not (src / "runs").is_dir():
        pytest.skip(f"{src} has no runs")
    dst = tmp_path / folder
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("accuracy.*"))
    assert studies.of_folder(dst) is studies.SMOLLM2
    aggregate.write_all(dst)
    for name in ("accuracy.json", "accuracy.csv", "accuracy.md"):  # the plot depends on matplotlib's version
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    if (src / "tuned_lr.json").is_file():
        tuned = tuning.best_lrs(aggregate.load_runs(dst), studies.SMOLLM2)
        assert json.dumps(tuned, indent=2) == (src / "tuned_lr.json").read_text()
