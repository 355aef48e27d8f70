"""studies/accuracy/run_checks.py: runs that did not really train are refused, what counted runs did is flagged;
and the aggregate of an issue-17 folder (synthetic runs whose numbers are known) leaves the refused runs out of the
means and the targets, shows the flags, and takes memory / speed from the solo phase."""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from studies.accuracy import aggregate, run_checks, studies

NAN, INF = float("nan"), float("inf")


def _as_read(results: dict) -> dict:
    """Through JSON as the recipe writes it (NaN / Infinity tokens) and the aggregate reads it."""
    return json.loads(json.dumps(results))


def _task(answers, preds, choices=None):
    samples = [{"answer": a, "pred": p, **({} if choices is None else {"choice": c})}
               for a, p, c in zip(answers, preds, choices or preds)]
    out = {"accuracy": sum(a == p for a, p in zip(answers, preds)) / len(answers), "n": len(answers),
           "no_answer": sum(p == "" for p in preds), "chance": 0.5, "samples": samples}
    if choices is not None:
        out["choice_accuracy"] = sum(a == c for a, c in zip(answers, choices)) / len(answers)
    return out


def _evaluation(tasks: dict) -> dict:
    ev = {"tasks": tasks, "average": statistics.mean(t["accuracy"] for t in tasks.values())}
    if all("choice_accuracy" in t for t in tasks.values()):
        ev["choice_average"] = statistics.mean(t["choice_accuracy"] for t in tasks.values())
    return ev


def _training(nonfinite=0, log=(), loss=0.5):
    return {"nonfinite_skipped_steps": nonfinite, "log_history": list(log), "train_loss": loss}


def test_refusals_name_what_went_wrong():
    clean = _training(log=[{"loss": 1.2, "grad_norm": 0.4, "step": 10}, {"train_loss": 0.9, "step": 20}])
    assert run_checks.refusals(_as_read({"training": clean})) == []
    assert run_checks.refusals({}) == []  # zero-shot: nothing trained, nothing to refuse
    assert run_checks.refusals({"training": _training(nonfinite=3)}) == ["non-finite steps 3"]
    nan_log = _training(log=[{"loss": 1.0, "grad_norm": 0.3, "step": 10}, {"loss": 0.8, "grad_norm": NAN, "step": 20},
                             {"loss": INF, "grad_norm": NAN, "step": 30}], loss=NAN)
    assert run_checks.refusals(_as_read({"training": nan_log})) == ["loss inf at step 30", "grad_norm nan at step 20",
                                                                     "train_loss nan"]


def test_flags_constant_answers_and_the_constant_baseline():
    gold_b, gold_p = ["true", "true", "true", "false"], ["solution1", "solution2", "solution1", "solution2"]
    after = _evaluation({
        "boolq": _task(gold_b, ["true"] * 4, ["true", "false", "true", "false"]),  # gen .75 = its constant share
        "piqa": _task(gold_p, [""] * 4, gold_p)})                                  # no answer at all: constant too
    extra = _evaluation({"olmo_hellaswag": _task(["ending1", "ending2"], ["ending1", "ending2"],
                                                 ["ending3", "ending3"])})
    res = _as_read({"training": _training(), "after": after, "after_extra": extra})
    # generation average .375 <= constant .625 (.75, .5); ranked .75 is above; extra: ranked 0 <= constant .5
    assert run_checks.flags(res) == ["constant generation: boolq", "constant generation: piqa",
                                     "generation <= constant", "extra constant ranked: olmo_hellaswag",
                                     "extra ranked <= constant"]
    assert run_checks.refusals(res) == []
    learned = _as_read({"training": _training(), "after": _evaluation({"piqa": _task(gold_p, gold_p, gold_p)})})
    assert run_checks.flags(learned) == []
    old_recipe = {"training": {"train_loss": 0.5}, "after": learned["after"]}
    assert run_checks.flags(old_recipe) == ["no non-finite count"]
    zero_shot = {"before": after}  # evaluated as it is: the same checks on `before`, no training to count
    assert run_checks.flags(zero_shot)[:3] == ["constant generation: boolq", "constant generation: piqa",
                                               "generation <= constant"]


# ------------------------------------------------------------------ the aggregate of an issue-17 folder

GOLD = ["true", "false"] * 5  # constant answer: 50 %


def _run(out: Path, phase: str, config: str, family: str, seed: int, lr, correct: int, nonfinite=0,
         train=True, peak_mib=100.0, tokens_s=1000.0, setup_s=2.0, params=18_000_000):
    """A run whose boolq generation and ranked accuracy are correct / 10 (ranked = generation)."""
    name = f"{phase}-{config}" + ("" if lr is None else f"-lr{lr:g}") + f"-s{seed}"
    d = out / "runs" / name
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"name": name, "phase": phase, "config": config, "family": family,
                                            "seed": seed, "learning_rate": lr}))
    preds = GOLD[:correct] + [{"true": "false", "false": "true"}[a] for a in GOLD[correct:]]
    res = {"training": {**_training(nonfinite), "trainable_params": params, "tokens_per_second": tokens_s,
                        "peak_memory": {"kind": "cuda_max_allocated", "bytes": int(peak_mib * 2**20)},
                        "train_runtime_s": 10.0, "setup_s": setup_s, "steps": 200}} if train else {}
    if phase != "solo":
        res["after" if train else "before"] = _evaluation({"boolq": _task(GOLD, preds, preds)})
    (d / "results.json").write_text(json.dumps(res))
    return res


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen15_aggregate")
    studies.mark_folder(out, studies.QWEN15)
    correct = {"lora_r16": (8, 6, 9), "dora_r16": (8, 8, 8), "full": (9, 9, 9),
               "sparse_taylor_per_layer_rows": (9, 8, 9), "sparse_random_per_layer_rows": (7, 8, 9)}
    family = {"lora_r16": "lora", "dora_r16": "dora", "full": "full"}
    for config, per_seed in correct.items():
        for seed, c in enumerate(per_seed, 1):
            _run(out, "test", config, family.get(config, "sparse_rows"), seed, 3e-4, c,
                 nonfinite=2 if (config, seed) == ("lora_r16", 2) else 0, peak_mib=500.0)
    for seed in (1, 2, 3):
        _run(out, "test", "zero_shot", "zero_shot", seed, None, 5, train=False)  # 50 %: the constant answer
    _run(out, "solo", "lora_r16", "lora", 1, 3e-4, 0, peak_mib=1000.0, tokens_s=4321.0, setup_s=1.5)
    paths = aggregate.write_all(out)
    return {"out": out, "paths": paths, "table": json.loads((out / "accuracy.json").read_text()),
            "md": (out / "accuracy.md").read_text()}


def test_refused_runs_are_left_out_of_the_means_and_listed(qwen_folder):
    rows = {r["config"]: r for r in qwen_folder["table"]["test"]}
    lora = rows["lora_r16"]
    assert (lora["n_seeds"], lora["seeds"]) == (2, [1, 3])  # seed 2 skipped 2 non-finite steps
    assert lora["average"]["mean"] == pytest.approx(0.85) and lora["average"]["std"] == pytest.approx(
        statistics.stdev([0.8, 0.9]))
    assert lora["refused"] == [{"run": "test-lora_r16-lr0.0003-s2", "seed": 2, "reasons": ["non-finite steps 2"]}]
    assert "### Runs left out: they did not really train (run_checks.py)" in qwen_folder["md"]
    assert "| test-lora_r16-lr0.0003-s2 | non-finite steps 2 |" in qwen_folder["md"]
    zero = rows["zero_shot"]
    assert zero["average"]["mean"] == 0.5 and zero["flags"] == {"generation <= constant": [1, 2, 3],
                                                               "ranked <= constant": [1, 2, 3]}
    assert "generation <= constant (s1,s2,s3); ranked <= constant (s1,s2,s3) |" in qwen_folder["md"]
    assert rows["full"]["flags"] == {} and rows["full"]["refused"] == []


def test_issue_17_targets_from_the_counted_runs(qwen_folder):
    checks = {(c["metric"], c["comparison"]): c for c in qwen_folder["table"]["targets"]}
    ours = 100 * statistics.mean([0.9, 0.8, 0.9])  # sparse taylor rows, the best sparse config
    lora = checks[("average", "ours − LoRA r16")]
    assert lora["ours"] == "sparse_taylor_per_layer_rows" and lora["margin"] == pytest.approx(ours - 85.0)
    assert lora["required"] == 0.0 and lora["met"] and lora["reference_seeds"] == 2
    assert lora["reference_flags"] == ["refused 1"] and lora["ours_flags"] == []
    dora = checks[("average", "ours − DoRA r16")]
    assert dora["margin"] == pytest.approx(ours - 80.0) and dora["required"] == -0.5 and dora["met"]
    full = checks[("average", "ours − full FT")]
    assert full["margin"] == pytest.approx(ours - 90.0) and full["required"] == -1.0 and not full["met"]
    crit = checks[("choice_average", "best criterion − random (same scope, axis)")]
    pooled = math.sqrt((statistics.stdev([90, 80, 90]) ** 2 + statistics.stdev([70, 80, 90]) ** 2) / 2)
    assert crit["reference"] == "sparse_random_per_layer_rows" and crit["margin"] == pytest.approx(ours - 80.0)
    assert crit["required"] == pytest.approx(pooled) and not crit["met"]
    md = qwen_folder["md"]
    assert "### Targets of issue 17" in md and "| flags |" in md.split("### Targets of issue 17")[1].split("###")[0]
    assert "lora_r16: refused 1" in md


def test_memory_and_speed_come_from_the_solo_phase(qwen_folder):
    table, md = qwen_folder["table"], qwen_folder["md"]
    [solo] = table["solo"]
    assert (solo["config"], solo["peak_memory_mib"], solo["tokens_per_second"], solo["setup_s"]) == (
        "lora_r16", 1000.0, 4321.0, 1.5)
    lines = {ln.split(" | ")[1]: ln for ln in md.split("### Test sets (")[1].split("###")[0].splitlines()
             if ln.startswith("| ") and " | " in ln}
    assert "| 1,000 | 4,321 | 1.5 |" in lines["lora_r16"]                  # measured alone
    assert "| 500† | 1,000† | 2.0† |" in lines["sparse_taylor_per_layer_rows"]  # shared GPU only: marked
    assert "|  |  |  |" in lines["zero_shot"]                               # trains nothing
    with open(qwen_folder["out"] / "accuracy.csv") as f:
        by = {r["config"]: r for r in csv.DictReader(f)}
    assert float(by["lora_r16"]["solo_peak_memory_mib"]) == 1000.0 and by["full"]["solo_peak_memory_mib"] == ""
    assert by["lora_r16"]["refused"] == "s2: non-finite steps 2" and float(by["full"]["setup_s"]) == 2.0
    for key in ("png", "tradeoff"):
        assert qwen_folder["paths"][key].read_bytes()[:4] == b"\x89PNG"


def test_runs_of_an_earlier_tunings_lr_stay_in_the_tables_but_not_in_the_targets(tmp_path):
    """Full FT re-tuned to a lower lr after two seeds ran at the old one: the old runs are kept and flagged, the
    targets compare against the tuned lr's runs only, and README's table leaves them out."""
    from studies.accuracy import readme_table, tuning

    studies.mark_folder(tmp_path, studies.QWEN15)
    for seed in (1, 2):
        _run(tmp_path, "test", "full", "full", seed, 5e-6, 10)           # the earlier pick: 100 %
    for seed in (1, 2, 3):
        _run(tmp_path, "test", "full", "full", seed, 2e-6, 7)            # the tuned lr: 70 %
        _run(tmp_path, "test", "sparse_random_per_layer_rows", "sparse_rows", seed, 1e-4, 8)
    tuned = {"rule": "test", "families": {
        "full": {"lr": 2e-6, "config": "full", "val_average": 0.7, "source": "tuned"},
        "sparse_rows": {"lr": 1e-4, "config": "sparse_l2_per_layer_rows", "val_average": 0.8, "source": "tuned"}}}
    (tmp_path / "tuned_lr.json").write_text(json.dumps(tuned))
    aggregate.write_all(tmp_path)
    table = json.loads((tmp_path / "accuracy.json").read_text())
    assert sorted((r["config"], r["learning_rate"]) for r in table["test"]) == [
        ("full", 2e-6), ("full", 5e-6), ("sparse_random_per_layer_rows", 1e-4)]
    [vs_full] = [c for c in table["targets"] if c["comparison"] == "ours − full FT" and c["metric"] == "average"]
    assert vs_full["reference_value"] == pytest.approx(70.0) and vs_full["reference_seeds"] == 3 and vs_full["met"]
    md = (tmp_path / "accuracy.md").read_text()
    [old] = [ln for ln in md.splitlines() if ln.startswith("| full | full | 5e-06 |")]
    [new] = [ln for ln in md.splitlines() if ln.startswith("| full | full | 2e-06 |")]
    assert aggregate.NOT_TUNED in old and aggregate.NOT_TUNED not in new
    with open(tmp_path / "accuracy.csv") as f:
        flags = {(r["config"], r["learning_rate"]): r["flags"] for r in csv.DictReader(f) if r["phase"] == "test"}
    assert flags[("full", "5e-06")] == aggregate.NOT_TUNED and flags[("full", "2e-06")] == ""
    block = readme_table.block(tmp_path)
    assert "| full | 2e-06 | 3 | 70.0 ± 0.0 |" in block and "5e-06" not in block.split("Targets")[0]
    assert "left out: 2 runs at an earlier tuning's lr" in block
    # the predicate itself: a losing candidate of a family that tuned several configs is not the choice either
    cols = {"families": {"sparse_columns": {"lr": 3e-4, "config": "a", "candidates": {"a": {}, "b": {}}}}}
    row = {"family": "sparse_columns", "config": "b", "learning_rate": 3e-4}
    assert not tuning.is_tuned_choice(row, cols) and tuning.is_tuned_choice({**row, "config": "a"}, cols)
    assert tuning.is_tuned_choice({"family": "zero_shot", "config": "zero_shot", "learning_rate": None}, cols)
    assert tuning.is_tuned_choice(row, None)  # no tuning on record: nothing to be stale against
