"""The qwen15 study's second round (studies.QWEN15_NEW_RUNS): coupled neurons, random columns at 8 bytes per trained
number and at LoRA r16's peak memory, and the NF4 merge. Its run list and order against the committed first round
(reused, skipped, its tuning unchanged), the command lines the recipe reads, and what the aggregate shows of the new
runs (merged-into-NF4 and equal-memory tables), on the CPU without a model."""
import copy
import gzip
import json
import re
import shlex
import shutil

import pytest

from helpers import REPO
from studies.accuracy import aggregate, grid, run_results, studies, sweep, tuning
from studies.accuracy.studies import QWEN15, QWEN15_NEW_RUNS

COMMITTED = REPO / "studies" / "accuracy" / "results" / "qwen15"
SEED_1 = ["sparse_random_per_layer_coupled", "sparse_taylor_per_layer_coupled", "sparse_random_per_layer_columns_8byte",
          "sparse_random_per_layer_columns_eqmem"]
NF4 = ["qlora_r16", "sparse_random_per_layer_rows_nf4", "sparse_random_per_layer_rows_nf4_init"]


def _committed_tuned() -> dict:
    return json.loads((COMMITTED / "tuned_lr.json").read_text())


def _round2(tuned: dict) -> list[grid.Run]:
    cfgs = QWEN15.configs(grid.QWEN25_CODER_15B, calibration_batches=50)
    lrs = {f: QWEN15.default_lr(f) for f in QWEN15.lr_grids} | tuning.lrs_of(tuned)
    runs = QWEN15.tune_runs(cfgs) + QWEN15.test_runs(cfgs, lrs, tuning.picks_of(tuned))
    return grid.select(runs, QWEN15_NEW_RUNS)


def test_second_round_order_seed_1_of_every_config_first_nf4_last_at_three_seeds():
    runs = _round2(_committed_tuned())
    names = [r.name for r in runs]
    # coupled: its tuned 1e-4; equal memory: its grid's default until its tuning runs; the rest: tuned columns /
    # LoRA / rows (the NF4 sparse runs)
    lr = {c: "1e-4" if c.endswith(("coupled", "eqmem", "rows_nf4", "rows_nf4_init")) else "3e-4" for c in SEED_1 + NF4}
    eqmem = "sparse_random_per_layer_columns_eqmem"
    assert names == ([f"tune-sparse_random_per_layer_coupled-lr1e-4-s1", f"tune-{eqmem}-lr3e-5-s1",
                      f"tune-sparse_random_per_layer_coupled-lr3e-4-s1", f"tune-{eqmem}-lr1e-4-s1"]
                     + [f"test-{c}-lr{lr[c]}-s{s}" for s in (1, 2, 3) for c in SEED_1]
                     + [f"test-{c}-lr{lr[c]}-s{s}" for s in (1, 2, 3) for c in NF4])
    assert [QWEN15.run_slots(r.config) for r in runs[:4]] == [2, 3, 2, 3]
    assert [QWEN15.run_slots(r.config) for r in runs[4:8]] == [2, 2, 2, 3]  # eqmem: LoRA's memory, LoRA's slots
    assert [QWEN15.run_slots(r.config) for r in runs[-9:]] == [3, 2, 2] * 3
    # a tuning that picks another lr moves that family's configs, and nothing else
    tuned = copy.deepcopy(_committed_tuned())
    tuned["families"]["sparse_coupled"] = {"lr": 3e-4, "config": "sparse_random_per_layer_coupled"}
    tuned["families"]["sparse_eqmem"] = {"lr": 3e-5, "config": eqmem}
    test = [r for r in _round2(tuned) if r.phase == "test"]
    assert [r.name for r in test if r.lr == 3e-4 and "coupled" in r.name] == [
        f"test-sparse_{i}_per_layer_coupled-lr3e-4-s{s}" for s in (1, 2, 3) for i in ("random", "taylor")]
    assert [r.name for r in test if r.lr == 3e-5] == [f"test-{eqmem}-lr3e-5-s{s}" for s in (1, 2, 3)]


def test_committed_runs_are_reused_and_their_tuning_unchanged(tmp_path):
    """Every committed run is in today's list under its name (so the sweep skips it) but for earlier picks, every
    run still to do is the second round's, the tuned lrs of the committed families come out the same, and the
    folder's tables regenerate byte for byte until new runs arrive."""
    if not (COMMITTED / "runs").is_dir():
        pytest.skip("no committed qwen15 runs")
    tuned = _committed_tuned()
    cfgs = QWEN15.configs(grid.QWEN25_CODER_15B, calibration_batches=50)
    lrs = {f: QWEN15.default_lr(f) for f in QWEN15.lr_grids} | tuning.lrs_of(tuned)
    runs = QWEN15.tune_runs(cfgs) + QWEN15.test_runs(cfgs, lrs, tuning.picks_of(tuned)) + QWEN15.solo_runs(cfgs)
    done = {d.name for d in (COMMITTED / "runs").iterdir() if run_results.find(d)}
    listed = {r.name for r in runs}
    # an earlier tuning's pick, and equal memory at the columns' lr before it had a family of its own: kept
    stale = {"test-full-lr5e-6-s1", "test-full-lr5e-6-s2", "test-sparse_random_per_layer_columns_eqmem-lr3e-4-s1"}
    assert done - listed == stale
    assert {r.name for r in runs if r.name not in done} <= {r.name for r in grid.select(runs, QWEN15_NEW_RUNS)}
    again = tuning.best_lrs(aggregate.load_runs(COMMITTED), QWEN15)
    assert again["rule"] == tuned["rule"]
    assert {f: again["families"][f] for f in tuned["families"]} == tuned["families"]
    assert again["families"]["sparse_coupled"]["source"] == "tuned on 2 of 2 lrs"
    assert again["families"]["sparse_eqmem"]["source"].startswith("default")  # no tune run yet

    dst = tmp_path / "qwen15"
    shutil.copytree(COMMITTED, dst, ignore=shutil.ignore_patterns("accuracy.*"))
    aggregate.write_all(dst)
    for name in ("accuracy.json", "accuracy.csv", "accuracy.md"):
        assert (dst / name).read_bytes() == (COMMITTED / name).read_bytes(), name


def test_second_round_configs_and_the_equal_memory_k():
    shape = grid.QWEN25_CODER_15B
    cfgs = QWEN15.configs(shape, calibration_batches=50)

    def flag(config, name):
        f = cfgs[config].flags
        return f[f.index(name) + 1]

    for i in ("random", "taylor"):  # coupled: the rows' k, a count that depends on the selection
        c = cfgs[f"sparse_{i}_per_layer_coupled"]
        assert (c.family, flag(c.name, "--axis"), flag(c.name, "--neurons_per_layer"), c.expected_params) == (
            "sparse_coupled", "coupled", "36", None)
    columns = cfgs["sparse_random_per_layer_columns"]
    eight = cfgs["sparse_random_per_layer_columns_8byte"]
    assert eight.flags == (*columns.flags, "--slice_dtype", "bfloat16", "--optimizer_state", "int8",
                           "--compensated_update", "true")
    assert (eight.family, eight.expected_params) == ("sparse_columns", 18_063_360)
    # equal memory: the byte model of studies.py on the solo peaks, rounded down
    eq = cfgs["sparse_random_per_layer_columns_eqmem"]
    assert (eq.family, flag(eq.name, "--neurons_per_layer"), eq.expected_params) == (
        "sparse_eqmem", "463", 298_690_560)  # its own lr family: 16x the columns' trained numbers
    per_k = 18 * 645_120 + 2 * 16 * 256 * 28 * 7
    assert per_k == 13_217_792 and grid.sparse_params(shape, 1, "columns") == 645_120
    predicted = lambda k: studies.QWEN15_COLUMNS_PEAK + (k - 28) * per_k  # noqa: E731
    assert predicted(463) <= studies.QWEN15_LORA_PEAK < predicted(464)
    assert studies.QWEN15_LORA_PEAK / 2**20 == pytest.approx(23_809, abs=0.5)  # the solo table's MiB
    assert studies.QWEN15_COLUMNS_PEAK / 2**20 == pytest.approx(18_316, abs=0.5)
    assert eq.name in QWEN15.not_ours  # 16x LoRA's trainable count: never "ours" in the targets
    # NF4: QLoRA in the lora family (LoRA's tuned lr), ours as the tuned random rows on an NF4 base
    q = cfgs["qlora_r16"]
    assert q.family == "lora" and q.flags == (*cfgs["lora_r16"].flags, "--load_in_4bit", "true",
                                              "--eval_merged_nf4", "true")
    assert cfgs["sparse_random_per_layer_rows_nf4"].flags == (*cfgs["sparse_random_per_layer_rows"].flags, "--quantize_base", "nf4",
                                                                 "--eval_merged_nf4", "true")
    assert cfgs["sparse_random_per_layer_rows_nf4_init"].flags == (
        *cfgs["sparse_random_per_layer_rows"].flags, "--quantize_base", "nf4", "--init_from_quantization_error", "true", "--eval_merged_nf4", "true")
    # a tiny model (CI): the k is capped at its narrowest layer's columns
    tiny = grid.LlamaShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16)
    assert QWEN15.configs(tiny, 2)["sparse_random_per_layer_columns_eqmem"].expected_params == grid.sparse_params(
        tiny, 64, "columns")


def test_the_device_selection_lists_exactly_the_second_round_and_the_recipe_reads_it(tmp_path, capsys):
    """sweep.py --only QWEN15_NEW_RUNS on a copy of the committed tuning (phases tune, then test, as the device runs
    them); every command line parses with the recipe to the config's values (coupled: once the library knows the
    axis)."""
    from sprune_trainer.config import AXES

    import llama_commonsense

    out = tmp_path / "q"
    out.mkdir()
    shutil.copy(COMMITTED / "tuned_lr.json", out / "tuned_lr.json")
    argvs, counts = {}, {}
    for phase in ("tune", "test"):
        res = sweep.main(["--study", "qwen15", "--phase", phase, "--dry_run", "--out", str(out),
                          "--model_name_or_path", str(tmp_path / "none"), "--data_dir", str(tmp_path),
                          "--only", QWEN15_NEW_RUNS])
        counts.update(res["counts"])
        lines = capsys.readouterr().out.splitlines()
        argvs.update({a: shlex.split(b)[2:] for a, b in zip(lines, lines[1:])
                      if b.startswith("    ") and a[:1].isalpha()})
    assert counts == {"tune": 4, "test": 21} and list(argvs) == [r.name for r in _round2(_committed_tuned())]
    for name, argv in argvs.items():
        if "coupled" in name and "coupled" not in AXES:
            continue  # the library's axis="coupled" has not landed here yet
        m, d, s, t = llama_commonsense.parse_args(argv + ["--use_cpu", "true"])
        want_lr = float(re.search(r"-lr([0-9.e-]+)-s\d$", name).group(1))
        assert (d.max_train_samples, t.seed, t.learning_rate) == (6000, int(name[-1]), want_lr), name
        if "_8byte" in name:
            assert (s.slice_dtype, s.optimizer_state, s.compensated_update, s.neurons_per_layer) == (
                "bfloat16", "int8", True, 28)
        if "_eqmem" in name:
            assert (s.axis, s.neurons_per_layer, s.slice_dtype) == ("columns", 463, "float32")
        if name.startswith("test-qlora"):
            assert (m.method, m.lora_r, m.load_in_4bit, d.eval_merged_nf4) == ("lora", 16, True, True)
        if "_nf4" in name:
            assert (s.quantize_base, s.init_from_quantization_error, d.eval_merged_nf4) == (
                "nf4", name.startswith("test-sparse_random_per_layer_rows_nf4_init"), True)
        assert d.eval_merged_nf4 == bool(re.search("nf4|qlora", name))


# ------------------------------------------------------------------ the aggregate of the new runs

def _copy_run(dst, src_name, name, config, family, edit=lambda res: None):
    """A committed run copied under another name / config, its results edited."""
    src = COMMITTED / "runs" / src_name
    meta = json.loads((src / "run.json").read_text())
    meta.update(name=name, config=config, family=family)
    res = run_results.read(src)
    edit(res)
    shutil.rmtree(dst / "runs" / name, ignore_errors=True)  # a committed attempt of the same name: replaced
    (dst / "runs" / name).mkdir(parents=True)
    (dst / "runs" / name / "run.json").write_text(json.dumps(meta))
    with gzip.open(dst / "runs" / name / run_results.PACKED, "wt") as f:
        json.dump(res, f)
    return res


def _shifted(evals: dict, by: float) -> dict:
    out = copy.deepcopy(evals)
    out["average"] += by
    out["choice_average"] += by
    for t in out["tasks"].values():
        t["accuracy"] += by
        t["choice_accuracy"] += by
    return out


def test_aggregate_shows_before_and_after_the_nf4_merge_and_the_equal_memory_peaks(tmp_path):
    if not (COMMITTED / "runs").is_dir():
        pytest.skip("no committed qwen15 runs")
    dst = tmp_path / "qwen15"
    shutil.copytree(COMMITTED, dst, ignore=shutil.ignore_patterns("accuracy.*"))

    def merged(by):
        def edit(res):
            res[aggregate.MERGED] = _shifted(res["after"], by)
            res[aggregate.MERGED + "_extra"] = _shifted(res["after_extra"], by)
        return edit

    qlora = _copy_run(dst, "test-lora_r16-lr3e-4-s1", "test-qlora_r16-lr3e-4-s1", "qlora_r16", "lora", merged(-0.05))
    _copy_run(dst, "test-sparse_random_per_layer_rows-lr1e-4-s1",
              "test-sparse_random_per_layer_rows_nf4_init-lr1e-4-s1",
              "sparse_random_per_layer_rows_nf4_init", "sparse_rows", merged(-0.01))

    def bigger(res):
        res["training"]["peak_memory"]["bytes"] = 24_000 * 2**20
        res["training"]["trainable_params"] = 298_690_560
        res["after"] = _shifted(res["after"], 0.2)  # the best average: must still not be "ours" in the targets
    for s in (1, 2):
        _copy_run(dst, f"test-sparse_random_per_layer_columns-lr3e-4-s{s}",
                  f"test-sparse_random_per_layer_columns_eqmem-lr3e-4-s{s}", "sparse_random_per_layer_columns_eqmem",
                  "sparse_eqmem", bigger)
    for s in (1, 2, 3):  # 8 bytes per trained number: 0.2 points below the 16-byte runs
        _copy_run(dst, f"test-sparse_random_per_layer_columns-lr3e-4-s{s}",
                  f"test-sparse_random_per_layer_columns_8byte-lr3e-4-s{s}", "sparse_random_per_layer_columns_8byte",
                  "sparse_columns", lambda res: res.update(after=_shifted(res["after"], -0.002)))
    aggregate.write_all(dst)
    md = (dst / "accuracy.md").read_text()

    def table(title):
        block = md.split(title, 1)[1].split("\n\n", 2)[1]
        return {line.split(" | ")[0].strip("| "): line.split(" | ") for line in block.splitlines()[2:]}

    rows = table("After merging the update back into the NF4 base")
    assert set(rows) == {"qlora_r16", "sparse_random_per_layer_rows_nf4_init"}
    q = rows["qlora_r16"]
    before, after = 100 * qlora["after"]["average"], 100 * qlora["after"]["average"] - 5
    assert q[3:6] == [f"{before:.1f} ± 0.0", f"{after:.1f} ± 0.0", f"{after - before:+.1f}"]
    o = rows["sparse_random_per_layer_rows_nf4_init"]
    assert o[5] == "-1.0" and o[-1].strip(" |") == "-1.0"  # generation and further-eval ranked changes

    eq = table("Equal memory: peak MiB of the test runs themselves")
    lora_peaks = [run_results.read(COMMITTED / "runs" / f"test-lora_r16-lr3e-4-s{s}")["training"]["peak_memory"]["bytes"]
                  for s in (1, 2, 3)]
    assert eq["sparse_random_per_layer_columns_eqmem"][1:5] == ["2", "24,000", "", "298,690,560"]
    assert eq["lora_r16"][1:4] == ["3", f"{sum(lora_peaks) / 3 / 2**20:,.0f}", "23,809"]

    table_json = json.loads((dst / "accuracy.json").read_text())
    row = next(r for r in table_json["test"] if r["config"] == "qlora_r16")
    assert row["merged"]["average"]["mean"] == pytest.approx(qlora["after"]["average"] - 0.05)
    assert "merged" not in next(r for r in table_json["test"] if r["config"] == "lora_r16")
    eqmem = next(r for r in table_json["test"] if r["config"] == "sparse_random_per_layer_columns_eqmem")
    assert eqmem["average"]["mean"] == max(r["average"]["mean"] for r in table_json["test"])  # the best, yet
    # never ours: eqmem (off LoRA's trainable budget) and ours on NF4 (another base; here the next best)
    assert {c["ours"] for c in table_json["targets"] if c["comparison"].startswith("ours")} == {
        "sparse_taylor_per_layer_coupled"}
    [pair] = [c for c in table_json["targets"] if c["comparison"].startswith("8 bytes") and c["metric"] == "average"]
    assert pair["margin"] == pytest.approx(-0.2) and pair["required"] == -0.3 and pair["met"]
    head = (dst / "accuracy.csv").read_text().splitlines()[0].split(",")
    assert head[-8:] == [f"{k}_{m}_{p}" for k, m in aggregate.MERGED_CSV for p in ("mean", "std")]

