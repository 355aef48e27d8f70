"""The accuracy sweep (studies/accuracy/) on CPU: the run grid and its parameter arithmetic, the parallel
launcher (budget, deadline, resume), the learning-rate choice and the aggregate; end to end, sweep.py --smoke
runs recipes/llama_commonsense.py as subprocesses on a tiny Llama + tiny LLM-Adapters folder, and the numbers
it writes are checked against the runs' own results.json and against grid.py's predictions."""
import json
import math
import re
import statistics
import subprocess
import sys
import time

import pytest

from helpers import LORA_R2, RECIPE_MODEL_CONFIG as RECIPE_TEST_CONFIG, REPO
from studies.accuracy import grid, sweep, tuning
from studies.accuracy.studies import SMOLLM2
from studies.accuracy.launcher import Job, SweepLog, _estimate, run_jobs


# ------------------------------------------------------------------ grid: the run list and its arithmetic

def test_budget_neurons_match_lora_r16_on_smollm2():
    s = grid.SMOLLM2_135M
    assert s == grid.LlamaShape.from_config({"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                                             "num_attention_heads": 9, "num_key_value_heads": 3})  # head_dim 64
    lora16 = grid.lora_params(s, 16)
    assert lora16 == 30 * 16 * ((576 + 576) + 2 * (576 + 192) + (576 + 576) + 2 * (576 + 1536) + (1536 + 576))
    rows, cols = grid.budget_neurons(s, "rows", lora16), grid.budget_neurons(s, "columns", lora16)
    assert (rows, cols) == (32, 31)
    for axis, k in (("rows", rows), ("columns", cols)):  # the largest k within LoRA r16's count
        assert grid.sparse_params(s, k, axis) <= lora16 < grid.sparse_params(s, k + 1, axis)
    assert grid.sparse_params(s, 32, "rows") == 30 * 32 * (6 * 576 + 1536)
    assert grid.sparse_params(s, 31, "columns") == 30 * 31 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576)
    cfgs = grid.configs(s, calibration_batches=50)
    flags = cfgs["sparse_hessian_global_rows"].flags
    assert flags[flags.index("--neurons_per_layer") + 1] == "32"
    assert cfgs["sparse_l2_per_layer_columns"].expected_params == grid.sparse_params(s, 31, "columns")
    assert cfgs["sparse_l2_global_columns"].expected_params is None  # depends on the selection
    # the recipe test's independently written LoRA r=2 count of its 2-layer model
    assert grid.lora_params(grid.LlamaShape.from_config(RECIPE_TEST_CONFIG.to_dict()), 2) == LORA_R2


def test_run_list_counts_order_and_flags():
    cfgs = grid.configs(grid.SMOLLM2_135M, calibration_batches=50)
    tune = SMOLLM2.tune_runs(cfgs)
    assert len(tune) == 15 and {r.seed for r in tune} == {1}
    assert {(r.config.family, r.lr) for r in tune} == {(f, lr) for f, g in SMOLLM2.lr_grids.items() for lr in g}
    assert {r.config.name for r in tune} == {c for names in SMOLLM2.tune_configs.values() for c in names}
    lrs = {"full": 5e-5, "lora": 1e-3, "dora": 2e-4, "sparse_rows": 3e-3, "sparse_columns": 3e-4}
    test = SMOLLM2.test_runs(cfgs, lrs, {})
    assert len(test) == 24 * 3 == len({r.name for r in test})
    last_seed1 = max(i for i, r in enumerate(test) if r.seed == 1)
    assert last_seed1 == 23 and all(r.seed > 1 for r in test[24:])  # every config has seed 1 before any seed 2
    by_name = {r.name: r for r in test}
    lora8 = by_name["test-lora_r8-lr1e-3-s2"]
    assert lora8.lr == 1e-3 and lora8.flags()[:8] == ["--method", "lora", "--lora_r", "8", "--lora_alpha", "16",
                                                     "--lora_dropout", "0.05"]
    taylor = by_name["test-sparse_taylor_global_columns-lr3e-4-s3"].flags()
    assert taylor[taylor.index("--sparse_seed") + 1] == "3" and taylor[taylor.index("--axis") + 1] == "columns"
    assert len(grid.select(test, r"sparse_random_.*-s1$")) == 4
    smoke = SMOLLM2.test_runs(cfgs, lrs, {}, seeds=[1], smoke=True)
    assert [r.config.name for r in smoke] == ["full", "lora_r8", "lora_r16", "dora_r8", "sparse_l2_per_layer_rows",
                                              "sparse_taylor_global_columns"]
    assert [r.lr for r in SMOLLM2.tune_runs(cfgs, smoke=True)] == [5e-5, 5e-4, 5e-4, 1e-3, 1e-3]


def test_every_flag_of_a_run_exists_in_the_recipe_parser(tmp_path, capsys):
    """The dry run's command lines parse with the recipe's own HfArgumentParser, to the intended values."""
    pytest.importorskip("sprune_trainer.config")
    import llama_commonsense

    res = sweep.main(["--dry_run", "--out", str(tmp_path / "o"), "--model_name_or_path", str(tmp_path / "none"),
                      "--data_dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert res["counts"] == {"tune": 15, "test": 72} and "dry run: tune 15 runs, test 72 runs" in printed
    assert not (tmp_path / "o").exists()  # a dry run writes nothing
    lines = [ln.split() for ln in printed.splitlines() if ln.startswith("    ")]
    assert len(lines) == 87
    parsed = {}
    for argv in (lines[0], lines[3], lines[-1]):  # full tune, sparse rows tune, a sparse test run
        m, d, s, t = llama_commonsense.parse_args(argv[2:] + ["--use_cpu", "true"])  # --bf16 needs a GPU else
        parsed[m.method] = (m, d, s, t)
    m, d, s, t = parsed["full"]
    assert (d.validation_per_task, d.max_eval_samples, m.dtype, t.bf16, t.learning_rate) == (100, -1, "float32",
                                                                                              True, 2e-5)
    assert (t.per_device_train_batch_size, d.max_train_samples, d.eval_batch_size, d.eval_before) == (16, 4000, 128,
                                                                                                       False)
    assert (t.warmup_steps, t.logging_steps, t.save_strategy, m.save_adapter, t.disable_tqdm) == (0.06, 50, "no",
                                                                                                   False, True)
    m, d, s, t = parsed["sparse"]
    assert (d.max_eval_samples, d.validation_per_task, m.dtype, s.neurons_per_layer, s.axis, s.importance, s.scope,
            s.calibration_batches, s.sparse_seed, t.seed) == (200, 0, "bfloat16", 31, "columns", "zeroth_order",
                                                              "global", 50, 3, 3)


# ------------------------------------------------------------------ launcher, tuning, aggregate (synthetic)

def _fake_job(tmp_path, name, sleep, phase="test", config=None):
    code = (f"import json, time, pathlib; time.sleep({sleep}); "
            f"pathlib.Path({str(tmp_path / name / 'results.json')!r}).write_text(json.dumps({{'ok': 1}}))")
    return Job(name, [sys.executable, "-c", code], tmp_path / name, {"phase": phase, "config": config})


def test_launcher_budget_deadline_and_resume(tmp_path):
    log = SweepLog(tmp_path / "log.txt", time.time())
    # budget: after the first 1 s job, another ~1 s would end past 1.6 s -> the other two are never launched
    jobs = [_fake_job(tmp_path, f"j{i}", 1.0) for i in range(3)]
    st = run_jobs(jobs, parallel=1, log=log, t0=time.time(), time_budget_s=1.6)
    assert list(st.finished) == ["j0"] and st.not_launched == ["j1", "j2"] and not st.killed
    assert not (tmp_path / "j1").exists() and json.loads((tmp_path / "j0" / "run.json").read_text())["phase"] == "test"
    # resume: j0 is skipped, j1 and j2 run two at once
    t = time.time()
    st = run_jobs(jobs, parallel=2, log=log, t0=t)
    assert st.done_before == ["j0"] and sorted(st.finished) == ["j1", "j2"] and time.time() - t < 1.9 + 1.5
    # deadline: a running job is killed, none after it launched
    t = time.time()
    st = run_jobs([_fake_job(tmp_path, "slow", 60), _fake_job(tmp_path, "next", 0)], parallel=1, log=log, t0=t,
                  deadline_s=1.0)
    assert st.killed == ["slow"] and st.not_launched == ["next"] and time.time() - t < 10
    failing = Job("bad", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "bad", {})
    assert run_jobs([failing], parallel=1, log=log, t0=time.time()).failed == {"bad": 3}
    text = (tmp_path / "log.txt").read_text()
    assert len(re.findall(r"\] done j\d", text)) == 3 and "KILLED slow" in text and "FAILED bad" in text


def test_launcher_budget_estimates_per_config_and_passes_over_what_does_not_fit(tmp_path):
    """A second long run would end past the budget: passed over; the short run after it still fits (its own
    config's duration, not the long one's, is its estimate)."""
    log = SweepLog(tmp_path / "log.txt", time.time())
    jobs = [_fake_job(tmp_path, "short1", 0, config="S"), _fake_job(tmp_path, "long1", 3.0, config="L"),
            _fake_job(tmp_path, "long2", 3.0, config="L"), _fake_job(tmp_path, "short2", 0, config="S")]
    # short1 ~o s, long1 ~3+o: long2 would end at ~6+3o > 4.5, short2 at ~3+3o (fits while process start o < 0.5 s)
    st = run_jobs(jobs, parallel=1, log=log, t0=time.time(), time_budget_s=4.5)
    assert list(st.finished) == ["short1", "long1", "short2"] and st.not_launched == ["long2"]
    assert not (tmp_path / "long2").exists()


def test_launcher_estimate_falls_back_to_the_phase_then_the_config_in_another_phase():
    history = [("test", "L", 300.0), ("test", "S", 100.0), ("tune", "S", 50.0)]
    assert _estimate(history, {"phase": "test", "config": "S"}) == 100.0   # its own (phase, config)
    assert _estimate(history, {"phase": "test", "config": "N"}) == 300.0   # a new config: its phase's longest
    assert _estimate(history, {"phase": "solo", "config": "S"}) == 100.0   # a first solo run: its config's runs
    assert _estimate(history, {"phase": "solo", "config": "N"}) is None    # nothing known: launched
    assert _estimate(history + [("solo", "L", 20.0)], {"phase": "solo", "config": "S"}) == 20.0


def _timed_job(tmp_path, name, slots, sleep=0.8):
    """A job that records when it ran (start, end) in its results.json."""
    code = (f"import json, time, pathlib; t = time.time(); time.sleep({sleep}); "
            f"pathlib.Path({str(tmp_path / name / 'results.json')!r}).write_text(json.dumps([t, time.time()]))")
    return Job(name, [sys.executable, "-c", code], tmp_path / name, {"phase": "test"}, slots=slots)


def test_launcher_slots_a_wide_job_waits_for_room(tmp_path):
    log = SweepLog(tmp_path / "log.txt", time.time())
    jobs = [_timed_job(tmp_path, "a", 1), _timed_job(tmp_path, "wide", 2), _timed_job(tmp_path, "b", 1),
            _timed_job(tmp_path, "c", 1), _timed_job(tmp_path, "wider_than_all", 5, sleep=0.3)]
    st = run_jobs(jobs, parallel=3, log=log, t0=time.time())
    assert sorted(st.finished) == sorted(j.name for j in jobs)
    span = {j.name: json.loads((j.run_dir / "results.json").read_text()) for j in jobs}

    def overlap(x, y):
        return span[x][0] < span[y][1] and span[y][0] < span[x][1]
    assert overlap("a", "wide") and not overlap("b", "a")  # b (1 slot) waited: a + wide held all 3
    assert overlap("b", "c") and not overlap("c", "wide")
    # 5 slots of 3: it runs, alone
    assert not any(overlap("wider_than_all", n) for n in ("a", "wide", "b", "c"))


def test_a_run_that_failed_max_failures_times_is_given_up(tmp_path):
    from studies.accuracy import aggregate, studies

    log = SweepLog(tmp_path / "log.txt", time.time())
    out = tmp_path / "out"
    studies.mark_folder(out, studies.QWEN15)
    runs = out / "runs" / "test-full-lr1e-5-s1"
    code = f"import pathlib; p = pathlib.Path({str(runs / 'attempt')!r}); p.write_text(p.read_text() + 'x' " \
           f"if p.exists() else 'x'); raise SystemExit(3)"
    job = Job(runs.name, [sys.executable, "-c", code], runs, {"phase": "test"})
    for attempt in (1, 2):
        st = run_jobs([job], parallel=1, log=log, t0=time.time(), max_failures=2)
        assert st.failed == {job.name: 3} and job.failures == attempt
    st = run_jobs([job], parallel=1, log=log, t0=time.time(), max_failures=2)
    assert st.given_up == [job.name] and not st.failed and (runs / "attempt").read_text() == "xx"  # not run again
    assert run_jobs([job], parallel=1, log=log, t0=time.time()).failed  # without a limit it is retried
    aggregate.write_all(out)
    [failed] = json.loads((out / "accuracy.json").read_text())["failed_runs"]
    assert failed["run"] == job.name and len(failed["failures"]) == 3 and failed["failures"][0].startswith(
        "exit code 3 after")
    assert f"| {job.name} | exit code 3 after" in (out / "accuracy.md").read_text()


def _synthetic_run(out, phase, config, family, seed, lr, accs, params=1000, choice=None, no_answer=0, extra=None):
    name = f"{phase}-{config}-lr{grid.lr_tag(lr)}-s{seed}"
    d = out / "runs" / name
    d.mkdir(parents=True)
    meta = {"name": name, "phase": phase, "config": config, "family": family, "seed": seed, "learning_rate": lr,
            "expected_trainable_params": params}
    (d / "run.json").write_text(json.dumps(meta))
    res = {"after": {"tasks": {t: {"accuracy": a, "n": 10, "no_answer": no_answer} for t, a in accs.items()},
                     "average": sum(accs.values()) / len(accs)},
           "training": {"trainable_params": params, "peak_memory": {"bytes": 3 * 2**20},
                        "tokens_per_second": 10.0 * seed, "train_runtime_s": 2.0},
           "total_time_s": 5.0}
    if choice is not None:  # label-ranking accuracy; runs evaluated before it existed have none
        for t, a in choice.items():
            res["after"]["tasks"][t]["choice_accuracy"] = a
        res["after"]["choice_average"] = sum(choice.values()) / len(choice)
    if extra is not None:  # --extra_eval sets: generation accuracy = ranked accuracy here
        res["after_extra"] = {"tasks": {t: {"accuracy": a, "choice_accuracy": a, "n": 10} for t, a in extra.items()},
                              "average": sum(extra.values()) / len(extra),
                              "choice_average": sum(extra.values()) / len(extra)}
    (d / "results.json").write_text(json.dumps(res))
    return res


def test_aggregate_alone_on_synthetic_results(tmp_path):
    accs = {1: {"boolq": 0.5, "piqa": 0.7}, 2: {"boolq": 0.6, "piqa": 0.9}, 3: {"boolq": 0.8, "piqa": 0.8}}
    for seed, a in accs.items():
        _synthetic_run(tmp_path, "test", "lora_r16", "lora", seed, 5e-4, a, choice={t: v - 0.1 for t, v in a.items()},
                       no_answer=seed, extra={"olmo_hellaswag": 0.25 * seed})
    _synthetic_run(tmp_path, "test", "sparse_l2_per_layer_rows", "sparse_rows", 1, 1e-3, {"boolq": 0.4, "piqa": 0.6})
    _synthetic_run(tmp_path, "tune", "full", "full", 1, 2e-5, {"val_boolq": 0.3})
    (tmp_path / "runs" / "unfinished").mkdir()  # a run without results.json is ignored
    (tmp_path / "runs" / "unfinished" / "run.json").write_text("{}")
    proc = subprocess.run([sys.executable, str(REPO / "studies" / "accuracy" / "aggregate.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = json.loads((tmp_path / "accuracy.json").read_text())
    [lora, sparse] = table["test"]  # family order: lora before sparse
    assert (lora["config"], lora["n_seeds"], lora["seeds"]) == ("lora_r16", 3, [1, 2, 3])
    for t in ("boolq", "piqa"):
        vals = [accs[s][t] for s in (1, 2, 3)]
        assert lora["tasks"][t]["mean"] == pytest.approx(statistics.mean(vals))
        assert lora["tasks"][t]["std"] == pytest.approx(statistics.stdev(vals))
    avgs = [(a["boolq"] + a["piqa"]) / 2 for a in accs.values()]
    assert lora["average"]["mean"] == pytest.approx(statistics.mean(avgs))
    assert lora["average"]["std"] == pytest.approx(statistics.stdev(avgs))
    assert lora["tokens_per_second"] == pytest.approx(20.0) and lora["peak_memory_mib"] == pytest.approx(3.0)
    assert sparse["n_seeds"] == 1 and sparse["average"] == {"mean": pytest.approx(0.5), "std": 0.0}
    assert lora["choice_average"]["mean"] == pytest.approx(statistics.mean(avgs) - 0.1)
    assert lora["choice_average"]["std"] == pytest.approx(statistics.stdev(avgs))
    assert lora["choice_tasks"]["piqa"]["mean"] == pytest.approx(0.7)
    assert lora["no_answer_rate"] == pytest.approx(statistics.mean([2 * s / 20 for s in (1, 2, 3)]))
    assert math.isnan(sparse["choice_average"]["mean"]) and sparse["no_answer_rate"] == 0
    assert lora["extra"]["choice_tasks"]["olmo_hellaswag"] == {"mean": pytest.approx(0.5), "std": pytest.approx(0.25)}
    assert sparse["extra"] is None
    assert table["tune"][0]["tasks"] == {"val_boolq": {"mean": 0.3, "std": 0.0}}
    csv_lines = (tmp_path / "accuracy.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("phase,family,config,learning_rate,n_seeds,average_mean")
    md = (tmp_path / "accuracy.md").read_text()
    # averages .6/.75/.8; ranked 0.1 lower; no answer 2/4/6 of 20
    assert "| lora | lora_r16 | 0.0005 | 3 | 71.7 ± 10.4 | 61.7 ± 10.4 | 63.3 ± 15.3 | 80.0 ± 10.0 | 20.0 |" in md
    assert "| sparse_rows | sparse_l2_per_layer_rows | 0.001 | 1 | 50.0 ± 0.0 |  | 40.0 ± 0.0 |" in md
    assert "| lora_r16 | 0.0005 | 3 | 61.7 ± 10.4 | 53.3 ± 15.3 | 70.0 ± 10.0 |" in md  # the ranking table
    assert "| lora_r16 | 0.0005 | 3 | 50.0 ± 25.0 | 50.0 ± 25.0 | 50.0 ± 25.0 |" in md  # further evaluation
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_best_lr_is_the_highest_validation_average_and_ties_go_to_the_smaller_lr():
    def rec(family, lr, avg):
        return {"meta": {"phase": "tune", "family": family, "config": SMOLLM2.tune_configs[family][0],
                         "learning_rate": lr},
                "results": {"after": {"average": avg}}}
    runs = [rec("lora", 2e-4, 0.5), rec("lora", 5e-4, 0.6), rec("lora", 1e-3, 0.6),
            rec("sparse_rows", 3e-4, 0.2), rec("sparse_rows", 1e-3, 0.1),
            rec("dora", 5e-4, 0.3525), rec("dora", 1e-3, 0.35250000000000004)]  # a tie up to float rounding
    fams = tuning.best_lrs(runs)["families"]
    assert fams["lora"]["lr"] == 5e-4 and fams["lora"]["val_average"] == 0.6
    assert fams["lora"]["grid"] == {"2e-4": 0.5, "5e-4": 0.6, "1e-3": 0.6}
    assert fams["sparse_rows"]["lr"] == 3e-4 and fams["dora"]["lr"] == 5e-4
    assert fams["full"]["lr"] == 5e-5 and fams["full"]["source"].startswith("default")


# ------------------------------------------------------------------ end to end: sweep.py --smoke

def _sweep_args(tiny):
    return ["--phase", "all", "--smoke", "--parallel", "2", "--only", "sparse", "--out", str(tiny["out"]),
            "--model_name_or_path", tiny["model"], "--data_dir", tiny["data"], "--max_train_samples", "8"]


@pytest.fixture(scope="module")
def swept(tiny):
    return sweep.main(_sweep_args(tiny), t0=time.time())


SMOKE_RUNS = ["tune-sparse_l2_per_layer_rows-lr1e-3-s1", "tune-sparse_l2_per_layer_columns-lr1e-3-s1",
              "test-sparse_l2_per_layer_rows-lr1e-3-s1", "test-sparse_taylor_global_columns-lr1e-3-s1"]


@pytest.mark.slow
def test_smoke_sweep_runs_tunes_and_aggregates(tiny, swept):
    out = tiny["out"]
    for name in SMOKE_RUNS:
        assert (out / "runs" / name / "results.json").is_file(), (out / "runs" / name / "log.txt").read_text()[-3000:]
    for phase, names in (("tune", SMOKE_RUNS[:2]), ("test", SMOKE_RUNS[2:])):
        assert sorted(swept["stats"][phase].finished) == sorted(names)
    tune = json.loads((out / "runs" / SMOKE_RUNS[0] / "results.json").read_text())
    assert list(tune["after"]["tasks"]) == ["val_boolq", "val_winogrande"]  # validation sets, no test file
    assert all(t["n"] == 2 for t in tune["after"]["tasks"].values()) and tune["data"]["train_examples"] == 8
    tuned = json.loads((out / "tuned_lr.json").read_text())["families"]
    for fam in ("sparse_rows", "sparse_columns"):
        assert tuned[fam]["lr"] in SMOLLM2.lr_grids[fam] and tuned[fam]["source"].startswith("tuned")
        run = out / "runs" / f"tune-{SMOLLM2.tune_configs[fam][0]}-lr1e-3-s1" / "results.json"
        assert tuned[fam]["val_average"] == pytest.approx(json.loads(run.read_text())["after"]["average"])
    table = json.loads((out / "accuracy.json").read_text())
    assert [r["config"] for r in table["test"]] == ["sparse_l2_per_layer_rows", "sparse_taylor_global_columns"]
    for row in table["test"] + table["tune"]:
        run = json.loads((out / "runs" / row["runs"][0] / "results.json").read_text())
        assert row["n_seeds"] == 1 and row["average"] == {"mean": run["after"]["average"], "std": 0.0}
        assert set(row["tasks"]) == set(run["after"]["tasks"])
        assert row["trainable_params"] == run["training"]["trainable_params"] > 0
    # the per-layer sparse run trains exactly what grid.py predicted for this model (LoRA r16's budget)
    shape = grid.LlamaShape.from_model_dir(tiny["model"])
    k = grid.budget_neurons(shape, "rows", grid.lora_params(shape, 16))
    rows = next(r for r in table["test"] if r["config"] == "sparse_l2_per_layer_rows")
    assert k == 32 and rows["trainable_params"] == rows["expected_trainable_params"] == grid.sparse_params(
        shape, k, "rows") == 2 * 32 * (6 * 64 + 128) == grid.lora_params(shape, 16)
    log = (out / "sweep_log.txt").read_text()
    for name in SMOKE_RUNS:
        assert re.search(rf"done {re.escape(name)}  [\d.]+ s  (val|test) avg [\d.]+%", log)
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG" and "sparse_taylor_global_columns" in (
        out / "accuracy.md").read_text()


@pytest.mark.slow
def test_second_invocation_launches_nothing(tiny, swept):
    out = tiny["out"]
    before = {n: (out / "runs" / n / "results.json").stat().st_mtime_ns for n in SMOKE_RUNS}
    again = sweep.main(_sweep_args(tiny), t0=time.time())
    for phase in ("tune", "test"):
        st = again["stats"][phase]
        assert not st.finished and not st.failed and not st.not_launched and len(st.done_before) == 2
    assert before == {n: (out / "runs" / n / "results.json").stat().st_mtime_ns for n in SMOKE_RUNS}
    assert json.loads((out / "accuracy.json").read_text())["test"][0]["n_seeds"] == 1
