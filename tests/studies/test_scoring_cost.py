"""studies/scoring_cost/measure.py: the CPU smoke run measures a training job and scoring jobs in processes of their
own (scoring under the run's checkpointing) and writes results.json / results.csv; the summary's verdicts; jobs the
budget cannot start are skipped."""
import csv
import json

import pytest

from studies.scoring_cost import measure


@pytest.mark.slow
def test_smoke_run_measures_training_and_scoring(tmp_path):
    summary = measure.main(["--smoke", "--out", str(tmp_path), "--criteria", "taylor,hessian"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"] == summary and [s["criterion"] for s in summary] == ["taylor", "hessian"]
    jobs = {j["name"]: j for j in saved["jobs"]}
    assert all(j["status"] == "ok" for j in jobs.values()), jobs
    assert jobs["tiny-train"]["steps"] == 2 and jobs["tiny-train"]["step_s"] > 0
    taylor, hessian = jobs["tiny-taylor"], jobs["tiny-hessian"]
    assert taylor["scored_with_checkpointing"] and hessian["scored_with_checkpointing"]
    assert taylor["part_sizes"] == [2, 2]  # auto on the CPU: whole batches of 2
    assert hessian["part_sizes"] == [1] * 4  # auto for hessian: one sequence per part
    assert taylor["batches_measured"] == 2 and taylor["target_batches"] == 3 and taylor["seconds_extrapolated"] > 0
    assert all((tmp_path / "logs" / f"{name}.log").is_file() for name in jobs)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["criterion"] for r in rows] == ["taylor", "hessian"] and float(rows[0]["scoring_in_train_steps"]) > 0


def test_summary_compares_each_scoring_peak_with_its_shapes_training_peak():
    gib = 2**30
    rows = [{"kind": "train", "shape": "a", "status": "ok", "peak_bytes": 16 * gib, "step_s": 0.5,
             "tokens_per_s": 8192.0},
            {"kind": "score", "shape": "a", "criterion": "taylor", "status": "ok", "peak_bytes": 12 * gib,
             "seconds_extrapolated": 10.0, "largest_part": 4},
            {"kind": "score", "shape": "a", "criterion": "hessian", "status": "ok", "peak_bytes": 18 * gib,
             "seconds_extrapolated": 50.0, "largest_part": 1},
            {"kind": "score", "shape": "a", "criterion": "wanda", "status": "oom", "peak_bytes": 70 * gib},
            {"kind": "score", "shape": "a", "criterion": "zeroth_order", "status": "skipped"}]
    by = {s["criterion"]: s for s in measure.summarize(rows)}
    assert by["taylor"]["peak_ratio"] == 0.75 and by["taylor"]["peak_target"] == "met"
    assert by["taylor"]["scoring_in_train_steps"] == 20.0
    assert by["hessian"]["peak_ratio"] == 1.125 and by["hessian"]["peak_target"] == "missed"
    assert by["wanda"]["peak_target"] == "missed" and "peak_ratio" not in by["wanda"]
    assert "peak_target" not in by["zeroth_order"] and by["zeroth_order"]["status"] == "skipped"


def test_jobs_the_budget_cannot_start_are_skipped(tmp_path):
    summary = measure.main(["--smoke", "--out", str(tmp_path), "--criteria", "wanda", "--budget-s", "0.5"])
    jobs = json.loads((tmp_path / "results.json").read_text())["jobs"]
    assert [j["status"] for j in jobs] == ["skipped", "skipped"] and summary[0]["status"] == "skipped"
