"""studies/accuracy/targets.py: the chance / constant-answer baselines and the issue-8 target checks, on
synthetic results whose answers are known; and sweep.py's --lr diagnostic override."""
from __future__ import annotations

import json
import math

import pytest

from studies.accuracy import sweep, targets


def _run(seed, tasks, phase="test"):
    """A finished run: tasks = {task: (chance, [gold answers])}."""
    return {"meta": {"phase": phase, "seed": seed},
            "results": {"after": {"tasks": {t: {"chance": c, "samples": [{"answer": a} for a in answers]}
                                            for t, (c, answers) in tasks.items()}}}}


def test_baselines_average_over_seeds_and_ignore_tune_runs():
    runs = [_run(1, {"boolq": (0.5, ["true"] * 3 + ["false"]), "arc": (0.25, list("abcd"))}),
            _run(1, {"boolq": (0.5, ["false"] * 4)}),  # same seed again: same items, not counted twice
            _run(2, {"boolq": (0.5, ["false"] * 3 + ["true"] * 7), "arc": (0.25, list("aabc"))}),
            _run(3, {"val_boolq": (0.5, ["true"])}, phase="tune")]
    base = targets.baselines(runs)
    assert base["seeds"] == [1, 2]
    assert base["tasks"]["boolq"] == {"chance": 0.5, "constant": pytest.approx((0.75 + 0.7) / 2)}
    assert base["tasks"]["arc"] == {"chance": 0.25, "constant": pytest.approx((0.25 + 0.5) / 2)}
    assert base["average"]["constant"] == pytest.approx(((0.75 + 0.7) / 2 + 0.375) / 2)
    assert "val_boolq" not in base["tasks"]
    assert targets.baselines(runs, "after_extra") == {"seeds": [], "tasks": {},
                                                      "average": {"chance": pytest.approx(math.nan, nan_ok=True),
                                                                  "constant": pytest.approx(math.nan, nan_ok=True)}}


def _row(config, family, gen, gen_std, ranked=None, ranked_std=0.0, seeds=3):
    nan = {"mean": math.nan, "std": math.nan}
    return {"config": config, "family": family, "n_seeds": seeds, "average": {"mean": gen, "std": gen_std},
            "choice_average": nan if ranked is None else {"mean": ranked, "std": ranked_std}}


def test_random_twin_handles_underscored_names():
    assert targets.random_twin("sparse_zeroth_order_per_layer_columns") == "sparse_random_per_layer_columns"
    assert targets.random_twin("sparse_taylor_global_rows") == "sparse_random_global_rows"


def test_issue_targets_margins_and_verdicts():
    rows = [_row("full", "full", 0.30, 0.05), _row("lora_r16", "lora", 0.40, 0.03),
            _row("dora_r8", "dora", 0.452, 0.01),
            _row("sparse_taylor_global_rows", "sparse_rows", 0.45, 0.02),
            _row("sparse_random_global_rows", "sparse_rows", 0.44, 0.00),
            _row("sparse_random_per_layer_columns", "sparse_columns", 0.43, 0.01)]
    checks = {c["comparison"]: c for c in targets.issue_targets(rows)}
    assert {c["metric"] for c in checks.values()} == {"average"}  # no ranked values: no ranked checks
    lora, dora, full = checks["ours − LoRA r16"], checks["ours − DoRA r8"], checks["ours − full FT"]
    assert lora["ours"] == "sparse_taylor_global_rows" and lora["margin"] == pytest.approx(5.0) and lora["met"]
    assert dora["margin"] == pytest.approx(-0.2) and dora["met"]  # within the allowed -0.5
    assert full["margin"] == pytest.approx(15.0) and full["met"]
    crit = checks["best criterion − random (same scope, axis)"]
    assert crit["reference"] == "sparse_random_global_rows" and crit["margin"] == pytest.approx(1.0)
    assert crit["required"] == pytest.approx(math.sqrt((2.0 ** 2 + 0.0 ** 2) / 2)) and not crit["met"]
    assert crit["strict"] and not lora["strict"]  # beat the std (>), but reach the fixed margins (>=)
    title, head, table = targets.targets_table(list(checks.values()))
    assert head[-1] == "met" and [r[-1] for r in table] == ["yes", "yes", "yes", "**no**"]


def test_ranked_targets_use_their_own_best_config():
    rows = [_row("lora_r16", "lora", 0.4, 0.0, ranked=0.45), _row("dora_r8", "dora", 0.4, 0.0, ranked=0.45),
            _row("full", "full", 0.3, 0.0, ranked=0.46),
            _row("sparse_l2_per_layer_rows", "sparse_rows", 0.45, 0.0, ranked=0.40),
            _row("sparse_random_per_layer_columns", "sparse_columns", 0.40, 0.0, ranked=0.455)]
    ranked = [c for c in targets.issue_targets(rows) if c["metric"] == "choice_average"]
    assert {c["ours"] for c in ranked if "random" not in c["comparison"]} == {"sparse_random_per_layer_columns"}
    by = {c["comparison"]: c for c in ranked}
    assert not by["ours − LoRA r16"]["met"] and by["ours − DoRA r8"]["met"] and not by["ours − full FT"]["met"]
    # the best non-random criterion (l2 rows) is compared with random at its own scope and axis
    assert "best criterion − random (same scope, axis)" not in by  # sparse_random_per_layer_rows is absent


def test_sweep_lr_override_is_a_test_phase_diagnostic(tmp_path, capsys):
    base = ["--out", str(tmp_path), "--model_name_or_path", "m", "--data_dir", "d", "--lr", "3e-4"]
    with pytest.raises(SystemExit):
        sweep.parse_args(["--phase", "all", *base])
    assert "--lr needs --phase test" in capsys.readouterr().err
    sweep.main(["--phase", "test", *base, "--only", "sparse_taylor_per_layer_columns", "--seeds", "1,2",
                "--dry_run"])
    printed = capsys.readouterr().out
    assert "test-sparse_taylor_per_layer_columns-lr3e-4-s1" in printed and "lr3e-4-s2" in printed
    assert "--learning_rate 0.0003" in printed and "dry run: test 2 runs" in printed
    assert not (tmp_path / "tuned_lr.json").exists()
