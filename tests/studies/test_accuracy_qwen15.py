"""The issue-17 study (studies/accuracy/studies.py, qwen15): its parameter budgets against the real Qwen2 shapes
(a Qwen2Config built here on the meta device, PEFT and the slice injection counting what they train), its run list
and order, the command lines the recipe's own parser reads, the one-study-per-folder rule, the choice of the
columns config on validation, and end to end on the CPU (a tiny Qwen2 with q/k/v biases): tune -> pick -> test ->
solo through sweep.py --smoke, checked against the runs' own results.json."""
import json
import re
import shlex
import time

import pytest

from studies.accuracy import grid, studies, sweep, tuning
from studies.accuracy.studies import QWEN15

TARGETS = list(grid.TARGETS)
# Qwen2.5-Coder-1.5B-Instruct (its GGUF's metadata)
QWEN15_CONFIG = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                     num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)


def _meta_qwen2(layers: int):
    """Qwen2 with the 1.5B model's layer shapes on the meta device (no weights are allocated)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**{**QWEN15_CONFIG, "num_hidden_layers": layers})
    with torch.device("meta"):
        return cfg, Qwen2ForCausalLM(cfg)


def test_budgets_match_what_peft_and_the_slices_train_on_the_real_qwen2_shapes():
    import torch
    from commonsense.modeling import apply_peft, count_parameters
    from sprune_trainer import SparseNeuronConfig
    from sprune_trainer.layers.surgery import inject_slices

    cfg, _ = _meta_qwen2(28)
    shape = grid.LlamaShape.from_config(cfg.to_dict())
    assert shape == grid.QWEN25_CODER_15B and shape.head_dim == 128
    lora16 = grid.lora_params(shape, 16)
    assert lora16 == 18_464_768 and grid.dora_params(shape, 16) == 19_109_888
    cfgs = QWEN15.configs(shape, calibration_batches=50)
    ks = {axis: grid.budget_neurons(shape, axis, lora16) for axis in ("rows", "columns")}
    for axis, k, count in (("rows", 36, 18_321_408), ("columns", 28, 18_063_360)):
        assert ks[axis] == k and grid.sparse_params(shape, k, axis) == count <= lora16 < grid.sparse_params(
            shape, k + 1, axis)
        config = cfgs[f"sparse_random_per_layer_{axis}"]
        assert config.flags[config.flags.index("--neurons_per_layer") + 1] == str(k) and config.expected_params == count
    # what PEFT and the slices really train, on two layers of the real shapes (the counts are per layer x layers;
    # PEFT takes seconds per layer on the meta device)
    cfg2, model = _meta_qwen2(2)
    two = grid.LlamaShape.from_config(cfg2.to_dict())
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.bias is not None  # Qwen2: q/k/v biases, trained by neither method
    for name, (d_in, d_out) in two.linears().items():
        mod = getattr(layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp, name)
        assert (mod.in_features, mod.out_features) == (d_in, d_out)
    assert count_parameters(apply_peft(model, "lora", 16, 32, 0.05, TARGETS))[0] == grid.lora_params(two, 16)
    assert count_parameters(apply_peft(_meta_qwen2(2)[1], "dora", 16, 32, 0.05, TARGETS))[0] == grid.dora_params(
        two, 16)
    for axis, k in ks.items():
        _, m = _meta_qwen2(2)
        layers = [n for n, mod in m.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
        inject_slices(m, {n: torch.arange(k) for n in layers}, SparseNeuronConfig(neurons_per_layer=k, axis=axis))
        assert count_parameters(m)[0] == grid.sparse_params(two, k, axis) == grid.sparse_params(shape, k, axis) // 14


def _first_round(runs):
    """The runs of the committed first round (studies.QWEN15_NEW_RUNS selects the second)."""
    return [r for r in runs if not re.search(studies.QWEN15_NEW_RUNS, r.name)]


def test_run_list_order_picks_slots_and_solo():
    cfgs = QWEN15.configs(grid.QWEN25_CODER_15B, calibration_batches=50)
    tune = _first_round(QWEN15.tune_runs(cfgs))
    assert len(tune) == 23 and {r.seed for r in tune} == {1}
    # one lr of every family (both columns candidates), then the next lr
    assert [r.name for r in tune[:6]] == ["tune-full-lr2e-6-s1", "tune-lora_r16-lr1e-4-s1", "tune-dora_r16-lr1e-4-s1",
                                          "tune-sparse_l2_per_layer_rows-lr3e-5-s1",
                                          "tune-sparse_random_per_layer_columns-lr3e-5-s1",
                                          "tune-sparse_taylor_per_layer_columns-lr3e-5-s1"]
    # the four-lr grids (rows, columns) have a 4th round, full FT's five-lr grid a 5th
    assert [QWEN15.lr_grids[r.config.family].index(r.lr) for r in tune] == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 4 + [4]
    # the runs of the earlier grids keep their names, so the committed tune phase is resumed, not redone
    assert {r.name for r in tune} >= {"tune-full-lr5e-6-s1", "tune-full-lr1e-5-s1", "tune-full-lr5e-5-s1",
                                      "tune-lora_r16-lr1e-3-s1", "tune-sparse_l2_per_layer_rows-lr1e-3-s1"}
    lrs = {"full": 2e-5, "lora": 1e-4, "dora": 3e-4, "sparse_rows": 1e-3, "sparse_columns": 1e-4,
           "sparse_coupled": 3e-4, "sparse_eqmem": 1e-4}
    test = _first_round(QWEN15.test_runs(cfgs, lrs, {"sparse_columns": "sparse_taylor_per_layer_columns"}))
    assert len(test) == 27 == len({r.name for r in test}) and [r.seed for r in test] == [1] * 9 + [2] * 9 + [3] * 9
    assert [r.name for r in test[:9]] == [
        "test-zero_shot-s1", "test-full-lr2e-5-s1", "test-lora_r16-lr1e-4-s1", "test-dora_r16-lr3e-4-s1",
        "test-sparse_taylor_per_layer_rows-lr1e-3-s1", "test-sparse_zeroth_order_per_layer_rows-lr1e-3-s1",
        "test-sparse_l2_per_layer_rows-lr1e-3-s1", "test-sparse_random_per_layer_rows-lr1e-3-s1",
        "test-sparse_taylor_per_layer_columns-lr1e-4-s1"]
    zero = test[0]
    assert zero.lr is None and "--learning_rate" not in zero.flags() and zero.meta()["learning_rate"] is None
    # no pick yet: the first candidate
    assert _first_round(QWEN15.test_runs(cfgs, lrs, {}, seeds=[1]))[-1].config.name == "sparse_random_per_layer_columns"
    assert [QWEN15.run_slots(r.config) for r in test[:5]] == [1, 4, 3, 4, 2]  # slots of ~12 GiB
    solo = _first_round(QWEN15.solo_runs(cfgs))  # both columns candidates (no tuning needed), no zero-shot
    assert [r.config.name for r in solo][-2:] == ["sparse_random_per_layer_columns", "sparse_taylor_per_layer_columns"]
    assert len(solo) == 9 and all(r.seed == 1 and r.lr == QWEN15.default_lr(r.config.family) for r in solo)


def _dry_run(capsys, argv) -> dict:
    """run name -> its recipe argv (after the interpreter and the script), from sweep.py --dry_run's listing."""
    res = sweep.main(argv)
    lines = capsys.readouterr().out.splitlines()
    argvs = {a: shlex.split(b)[2:] for a, b in zip(lines, lines[1:]) if b.startswith("    ") and a[:1].isalpha()}
    return {"counts": res["counts"], "argv": argvs}


def test_command_lines_parse_with_the_recipe_to_the_study_values(tmp_path, capsys):
    pytest.importorskip("sprune_trainer.config")
    import llama_commonsense

    common = ["--study", "qwen15", "--dry_run", "--out", str(tmp_path / "o"), "--model_name_or_path",
              str(tmp_path / "none"), "--data_dir", str(tmp_path)]
    runs = _dry_run(capsys, common)
    # the first round's 23 + 27, and the second's 2 + 2 tune + 4 configs x 3 seeds + 3 NF4 configs x 3 seeds
    assert runs["counts"] == {"tune": 27, "test": 48} and len(runs["argv"]) == 75
    solo = _dry_run(capsys, common + ["--phase", "solo"])
    assert solo["counts"] == {"solo": 13} and not (tmp_path / "o").exists()  # a dry run writes nothing

    def parse(name):
        argv = {**runs["argv"], **solo["argv"]}[name]
        return llama_commonsense.parse_args(argv + ["--use_cpu", "true"])  # --bf16 needs a GPU else

    m, d, s, t = parse("test-zero_shot-s1")
    assert (m.method, t.do_train, d.eval_before, m.dtype, d.max_eval_samples) == ("full", False, True, "bfloat16", 500)
    assert d.extra_eval == "hellaswag,ARC-Challenge,openbookqa" and t.bf16 and t.seed == 1
    m, d, s, t = parse("tune-full-lr1e-5-s1")
    assert (m.dtype, d.validation_per_task, d.max_train_samples, t.learning_rate, t.logging_steps) == (
        "float32", 200, 6000, 1e-5, 10)
    m, d, s, t = parse("test-sparse_zeroth_order_per_layer_rows-lr3e-4-s2")
    assert (m.dtype, s.importance, s.axis, s.neurons_per_layer, s.calibration_batches, d.eval_before,
            s.sparse_seed) == ("bfloat16", "zeroth_order", "rows", 36, 50, False, 2)
    m, d, s, t = parse("solo-dora_r16-lr3e-4-s1")
    assert (m.method, m.lora_r, t.max_steps, d.eval_after, d.max_train_samples, d.extra_eval) == (
        "dora", 16, 200, False, 200 * 16, None)
    with_attn = _dry_run(capsys, common + ["--only", "^test-lora_r16-lr3e-4-s1$", "--attn_implementation", "sdpa"])
    argv = with_attn["argv"]["test-lora_r16-lr3e-4-s1"]
    assert argv[argv.index("--attn_implementation") + 1] == "sdpa"
    assert "--attn_implementation" not in runs["argv"]["test-lora_r16-lr3e-4-s1"]  # not passed unless asked


def test_one_study_per_results_folder(tmp_path):
    assert studies.of_folder(tmp_path) is studies.SMOLLM2  # no study.json: issue 8's folder
    studies.mark_folder(tmp_path / "a", studies.SMOLLM2)
    assert not (tmp_path / "a").exists()  # smollm2 writes nothing
    studies.mark_folder(tmp_path / "q", QWEN15)
    assert json.loads((tmp_path / "q" / studies.STUDY_FILE).read_text()) == {"study": "qwen15", "issue": 17}
    assert studies.of_folder(tmp_path / "q") is QWEN15
    with pytest.raises(SystemExit, match="qwen15"):
        studies.mark_folder(tmp_path / "q", studies.SMOLLM2)
    (tmp_path / "old" / "runs" / "test-full-lr1e-4-s1").mkdir(parents=True)  # issue 8's runs, no study.json
    with pytest.raises(SystemExit, match="smollm2"):
        studies.mark_folder(tmp_path / "old", QWEN15)
    with pytest.raises(ValueError, match="unknown study 'qwen7'"):
        studies.get("qwen7")


def _tune_run(config, family, lr, avg, nonfinite=0):
    return {"meta": {"phase": "tune", "family": family, "config": config, "learning_rate": lr},
            "results": {"after": {"average": avg}, "training": {"nonfinite_skipped_steps": nonfinite}}}


def test_columns_config_and_lr_picked_on_validation_refused_runs_left_out():
    runs = [_tune_run("sparse_random_per_layer_columns", "sparse_columns", 1e-4, 0.60),
            _tune_run("sparse_random_per_layer_columns", "sparse_columns", 3e-4, 0.70),
            _tune_run("sparse_taylor_per_layer_columns", "sparse_columns", 1e-4, 0.70),  # tie: the smaller lr
            _tune_run("sparse_taylor_per_layer_columns", "sparse_columns", 1e-3, 0.90, nonfinite=3),  # refused
            _tune_run("lora_r16", "lora", 3e-4, 0.5), _tune_run("lora_r16", "lora", 1e-3, 0.5),
            _tune_run("sparse_l2_per_layer_rows", "sparse_rows", 1e-4, 0.4, nonfinite=1)]
    tuned = tuning.best_lrs(runs, QWEN15)
    cols = tuned["families"]["sparse_columns"]
    assert (cols["config"], cols["lr"], cols["val_average"]) == ("sparse_taylor_per_layer_columns", 1e-4, 0.70)
    assert cols["candidates"] == {
        "sparse_random_per_layer_columns": {"3e-5": None, "1e-4": 0.6, "3e-4": 0.7, "1e-3": None},
        "sparse_taylor_per_layer_columns": {"3e-5": None, "1e-4": 0.7, "3e-4": None, "1e-3": None}}
    assert cols["grid"] == cols["candidates"]["sparse_taylor_per_layer_columns"]
    assert cols["source"] == "tuned on 3 of 8 (config, lr) pairs"
    assert tuned["families"]["lora"]["lr"] == 3e-4 and "candidates" not in tuned["families"]["lora"]
    rows = tuned["families"]["sparse_rows"]  # its only run was refused: the default
    assert rows["lr"] == 3e-4 and rows["source"].startswith("default") and rows["config"] == "sparse_l2_per_layer_rows"
    assert "non-finite" in tuned["rule"]
    # the same tie, candidates swapped in order: the first listed wins
    swapped = studies.Study(**{**QWEN15.__dict__, "tune_configs": {
        "sparse_columns": ("sparse_taylor_per_layer_columns", "sparse_random_per_layer_columns")}})
    runs[1]["meta"]["learning_rate"] = 1e-4
    assert tuning.best_lrs(runs, swapped)["families"]["sparse_columns"]["config"] == "sparse_taylor_per_layer_columns"


# ------------------------------------------------------------------ end to end: sweep.py --study qwen15 --smoke

@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    """A tiny Qwen2 (q/k/v biases, tied embeddings) and data folder (helpers.tiny_model_and_data),
    swept through tune -> pick -> test and then the solo phase."""
    from helpers import TINY, tiny_model_and_data
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("qwen15")
    model, data = tiny_model_and_data(root, Qwen2Config, Qwen2ForCausalLM, tie_word_embeddings=True, **TINY)
    out = root / "sweep"
    common = ["--study", "qwen15", "--smoke", "--parallel", "2", "--out", str(out), "--model_name_or_path", model,
              "--data_dir", data, "--max_train_samples", "8"]
    all_phases = sweep.main(common + ["--phase", "all", "--only", "columns-|zero_shot"], t0=time.time())
    picked = json.loads((out / "tuned_lr.json").read_text())["families"]["sparse_columns"]["config"]
    solo = sweep.main(common + ["--phase", "solo", "--only", f"{picked}-lr"], t0=time.time())
    return {"out": out, "model": model, "all": all_phases, "solo": solo}


def _results(out, name):
    return json.loads((out / "runs" / name / "results.json").read_text())


@pytest.mark.slow
def test_smoke_tunes_picks_tests_and_measures_alone(tiny_qwen):
    out = tiny_qwen["out"]
    assert studies.of_folder(out) is QWEN15
    tune = ["tune-sparse_random_per_layer_columns-lr3e-4-s1", "tune-sparse_taylor_per_layer_columns-lr3e-4-s1"]
    assert sorted(tiny_qwen["all"]["stats"]["tune"].finished) == tune, (out / "sweep_log.txt").read_text()[-3000:]
    vals = {n.split("-")[1]: _results(out, n)["after"]["average"] for n in tune}
    tuned = json.loads((out / "tuned_lr.json").read_text())["families"]["sparse_columns"]
    # the better validation average; a tie goes to random (listed first)
    best = max(vals, key=lambda c: (vals[c], c == "sparse_random_per_layer_columns"))
    assert tuned["config"] == best and tuned["val_average"] == vals[best]
    pick = f"test-{best}-lr3e-4-s1"
    assert sorted(tiny_qwen["all"]["stats"]["test"].finished) == sorted([pick, "test-zero_shot-s1"])
    assert list(tiny_qwen["solo"]["stats"]["solo"].finished) == [f"solo-{best}-lr3e-4-s1"]  # --only the pick
    solo_res = _results(out, f"solo-{best}-lr3e-4-s1")
    assert "after" not in solo_res and solo_res["training"]["steps"] == 2  # --solo_steps 2 under --smoke
    shape = grid.LlamaShape.from_model_dir(tiny_qwen["model"])
    k = grid.budget_neurons(shape, "columns", grid.lora_params(shape, 16))
    assert solo_res["training"]["trainable_params"] == grid.sparse_params(shape, k, "columns")

    table = json.loads((out / "accuracy.json").read_text())
    by = {r["config"]: r for r in table["test"]}
    zero = _results(out, "test-zero_shot-s1")
    assert "training" not in zero and "after" not in zero  # evaluated as it is: the recipe's `before`
    assert by["zero_shot"]["average"] == {"mean": zero["before"]["average"], "std": 0.0}
    assert by["zero_shot"]["learning_rate"] is None and by["zero_shot"]["refused"] == []
    trained = _results(out, pick)
    assert by[best]["average"]["mean"] == trained["after"]["average"]
    assert ("no non-finite count" in by[best]["flags"]) == ("nonfinite_skipped_steps" not in trained["training"])
    [solo_row] = table["solo"]
    assert solo_row["config"] == best and solo_row["steps"] == 2
    assert solo_row["peak_memory_mib"] == pytest.approx(solo_res["training"]["peak_memory"]["bytes"] / 2**20)
    assert solo_row["tokens_per_second"] == solo_res["training"]["tokens_per_second"] > 0
    md = (out / "accuracy.md").read_text()
    assert "Memory and speed, each config alone on the GPU (solo phase)" in md and "| flags |" in md
    assert "Tuned learning rates" in md and f"| sparse_columns | {best} | 0.0003 |" in md
    for png in ("accuracy.png", "accuracy_tradeoff.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
