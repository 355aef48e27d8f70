"""The GPU benchmark suite (benchmarks/) on CPU: every method trains exactly what it claims and leaves the
shared model untouched, ratios are computed against the right baselines, and the smoke run writes
consistent JSON / CSV / Markdown."""
import csv
import gc
import json
import warnings

import pytest
import torch

from benchmarks import make_table, report
from benchmarks.measure import StepSettings, bench_config, model_is_plain
from benchmarks.methods import main_methods, random_selection, target_layers
from benchmarks.shapes import build_model, random_batch

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fast_cpu():
    """One thread (tiny matrices: more threads only add overhead) and frozen long-lived objects, so the
    suite's gc.collect() between measurements stays cheap; both restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)


def _expected_trained(model, spec):
    """(numbers with gradients, numbers that can change) of each method on `model`, from the layer shapes."""
    layers = target_layers(model).values()
    if spec.kind == "floor":
        return 0, 0
    if spec.kind == "ours":
        n = sum(spec.r * (l.in_features if spec.axis == "rows" else l.out_features) for l in layers)
        return n, n
    if spec.kind in ("lora", "dora"):
        n = sum(spec.r * (l.in_features + l.out_features) for l in layers)
        n += sum(l.out_features for l in layers) if spec.kind == "dora" else 0  # DoRA magnitude vector
        return n, n
    if spec.kind == "masked":
        return sum(l.weight.numel() for l in layers), sum(spec.r * l.in_features for l in layers)
    n = sum(p.numel() for p in model.parameters())
    return n, n


def test_every_method_trains_what_it_claims_and_leaves_the_model_plain():
    model, _ = build_model("tiny", CPU, torch.float32)
    batch = random_batch(model.config.vocab_size, 2, 16, CPU)
    settings = StepSettings(warmup=0, steps=2, autocast=False, lr=1e-2)
    for spec in main_methods(64):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        row = bench_config(model, spec, batch, checkpointing=spec.kind == "ours", settings=settings, device=CPU,
                           strict=True)
        assert row["status"] == "ok" and row["tokens_per_s"] > 0 and len(row["step_s_all"]) == 2
        assert (row["trainable_params"], row["effective_params"]) == _expected_trained(model, spec), spec.name
        assert model_is_plain(model), spec.name
        assert [type(m).__name__ for m in target_layers(model).values()] == ["Linear"] * 14
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        if spec.kind in ("floor", "ours", "lora", "dora"):
            assert not changed, (spec.name, sorted(changed)[:3])  # adapters never touch the base weights
        elif spec.kind == "full":
            assert len(changed) == len(before)
        else:  # masked SpFT: exactly the selected rows of the projections changed
            selection = random_selection(target_layers(model), spec.r, "rows")
            assert changed == {f"{n}.weight" for n in selection}
            for name, rows in selection.items():
                diff = (model.get_submodule(name).weight != before[f"{name}.weight"]).any(dim=1)
                assert diff.nonzero().flatten().tolist() == sorted(rows.tolist())
            model.load_state_dict(before)


def test_ratios_use_the_baseline_of_the_same_configuration():
    def run(method, ckpt, peak, tps, status="ok"):
        return {"model": "m", "batch": 4, "seq": 8, "checkpointing": ckpt, "method": method, "status": status,
                "peak_bytes": peak, "tokens_per_s": tps}
    runs = [run("floor", False, 100, 1000), run("lora_r16", False, 120, 500), run("masked_spft", False, 400, 900),
            run("ours", False, 101, 950), run("floor", True, 50, 800), run("ours", True, 60, 400),
            run("full_ft", True, None, None, status="oom")]
    report.add_ratios(runs)
    ours_off, ours_on, oom = runs[3], runs[5], runs[6]
    assert ours_off["mem_x_floor"] == pytest.approx(1.01) and ours_off["tps_x_floor"] == pytest.approx(0.95)
    assert ours_off["mem_x_lora16"] == pytest.approx(101 / 120) and ours_off["tps_x_lora16"] == pytest.approx(1.9)
    assert ours_off["mem_x_masked"] == pytest.approx(101 / 400)
    assert ours_on["mem_x_floor"] == pytest.approx(1.2) and ours_on["tps_x_floor"] == pytest.approx(0.5)
    assert ours_on["mem_x_lora16"] is None  # no LoRA measured with checkpointing
    assert all(oom[c] is None for c, _, _ in report.RATIOS)


def test_smoke_run_writes_consistent_results(tmp_path):
    from benchmarks import run_all
    with warnings.catch_warnings():
        run_all.main(["--smoke", "--out", str(tmp_path), "--checkpointing", "off", "--criteria", "l2,taylor",
                      "--sweep", "--main", "--sweep-rs", "8", "--sweep-seqs", "64"])
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["meta"]["gpu"].startswith("cpu")
    runs = doc["runs"]
    assert [r["method"] for r in runs] == [s.name for s in main_methods(64)]
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in runs)
    floor = runs[0]
    assert floor["tps_x_floor"] == 1.0 and floor["mem_x_floor"] is None  # no memory statistics on CPU
    for r in runs:
        assert r["tps_x_floor"] == pytest.approx(r["tokens_per_s"] / floor["tokens_per_s"])
    scoring = {(s["criterion"], s["micro_batch_size"]): s for s in doc["scoring"]}
    assert set(scoring) == {("l2", 0), ("taylor", 0), ("taylor", 1)}  # weight-only criteria are not split
    assert scoring[("l2", 0)]["batches_measured"] == 0
    assert all("peak_x_training" not in s for s in doc["scoring"])  # no memory statistics on CPU
    taylor = scoring[("taylor", 1)]
    assert taylor["batches_measured"] == 2 and taylor["target_batches"] == 50
    assert taylor["seconds_extrapolated"] == pytest.approx(
        taylor["setup_s"] + taylor["first_batch_s"] + 49 * taylor["per_batch_s"])
    assert taylor["fraction_of_epoch"] == pytest.approx(taylor["seconds_extrapolated"] / taylor["epoch_s"])
    with open(tmp_path / "results.csv") as f:
        assert [row["method"] for row in csv.DictReader(f)] == [r["method"] for r in runs]
    table = (tmp_path / "results.md").read_text()
    assert table == make_table.markdown(doc)
    assert all(f"| {r['label']} |" in table for r in runs)
    sweep = json.loads((tmp_path / "sweep.json").read_text())["runs"]
    assert {r["sweep"] for r in sweep} == {"size", "r", "seq"}
    reused = [r for r in sweep if r["sweep"] == "r" and r["method"] == "floor"][0]
    first = [r for r in sweep if r["sweep"] == "size" and r["method"] == "floor"][0]
    assert reused["tokens_per_s"] == first["tokens_per_s"]  # measured once, shared between sweeps
    assert (tmp_path / "results.png").stat().st_size > 0 and (tmp_path / "sweep.png").stat().st_size > 0


@pytest.mark.parametrize("checkpointing", [True, False])
def test_checkpointing_switch_recomputes_the_forward_and_is_undone(checkpointing):
    model, _ = build_model("tiny", CPU, torch.float32)
    batch = random_batch(model.config.vocab_size, 2, 16, CPU)
    mlp, calls = model.model.layers[0].mlp, []
    forward = mlp.forward
    mlp.forward = lambda x: calls.append(1) or forward(x)  # (module hooks are not run again by HF's recompute)
    spec = main_methods(64)[1]  # ours rows
    bench_config(model, spec, batch, checkpointing, StepSettings(warmup=1, steps=2, autocast=False), CPU, strict=True)
    assert len(calls) == 3 * (2 if checkpointing else 1)  # checkpointing runs each block's forward again
    calls.clear()
    model.train()
    loss = model(**batch).loss  # afterwards: nothing trainable and no grad-requiring inputs are left
    assert len(calls) == 1 and not loss.requires_grad


def test_op_counts_show_the_batched_optimizer_and_fused_backward():
    from benchmarks import op_counts
    rows = {(spec.name, batched): c for spec, batched, c in op_counts.main(["--shape", "tiny", "--r", "8",
                                                                              "--batch-seq", "1x16"])}
    assert rows[("ours_rows_int8", True)]["optimizer"] < rows[("ours_rows_int8", False)]["optimizer"] / 2
    assert rows[("ours_rows_fp32", True)]["backward"] < rows[("ours_rows_fp32_unfused", False)]["backward"]
    assert rows[("ours_cols_fp32", True)]["backward"] < rows[("ours_cols_fp32_unfused", False)]["backward"]
    assert rows[("floor", True)]["optimizer"] == 0
    # full FT runs the floor's forward; its backward adds each linear's weight gradient
    assert rows[("full_ft", None)]["forward"] == rows[("floor", True)]["forward"]
    assert rows[("full_ft", None)]["backward"] > rows[("floor", True)]["backward"]
    assert rows[("lora_r16", None)]["forward"] > rows[("floor", True)]["forward"]


def test_saved_bytes_reports_rows_recompute_and_columns_against_the_floor(tmp_path):
    from benchmarks import saved_bytes
    out = saved_bytes.main(["--shape", "tiny", "--layers", "2", "--tokens", "32", "--out", str(tmp_path / "s.json")])
    per = out["per_token_layer"]
    assert json.loads((tmp_path / "s.json").read_text())["per_token_layer"] == per
    # tiny: hidden 256, intermediate 512, r = 64; per layer the slices keep a bf16 copy of each delta
    deltas = 64 * (6 * 256 + 512) * 2 / 32
    inputs = (2 * 256 + 512) * 2  # the q/k/v and gate/up norm outputs and down_proj's input, bf16, per token
    assert per["ours_rows_fp32_recompute"] - per["floor"] == pytest.approx(deltas, rel=0.02)
    assert per["ours_rows_fp32"] - per["ours_rows_fp32_recompute"] == pytest.approx(inputs, rel=0.02)


def test_the_trainer_defaults_variants_guard_the_step_and_keep_the_result():
    """ours_rows_fp32_guard / _no_cudnn measure what SparseNeuronTrainer adds by default: the guarded step gives
    the same slices as the plain one when all is finite and skips a step with a NaN gradient; cuDNN-off is a
    no-op off CUDA (so the same numbers)."""
    from benchmarks.measure import make_step, prepared_method
    from benchmarks.methods import MethodSpec

    model, _ = build_model("tiny", CPU, torch.float32)
    batch = random_batch(model.config.vocab_size, 2, 16, CPU)
    specs = {s.name: s for s in main_methods(64)}
    trained = {}
    for name in ("ours_rows_fp32", "ours_rows_fp32_guard", "ours_rows_fp32_no_cudnn"):
        torch.manual_seed(0)
        with prepared_method(model, specs[name], checkpointing=False, lr=1e-2) as prepared:
            assert hasattr(type(prepared.optimizer), "_nonfinite_guard") == (name == "ours_rows_fp32_guard")
            step = make_step(prepared, batch, CPU, autocast=False)
            step(), step()
            trained[name] = [p.detach().clone() for p in prepared.optimizer.param_groups[0]["params"]]
    for name in ("ours_rows_fp32_guard", "ours_rows_fp32_no_cudnn"):
        assert all(torch.equal(a, b) for a, b in zip(trained[name], trained["ours_rows_fp32"])), name
    spec = MethodSpec("g", "ours", 64, "rows", "float32", guard=True)
    with prepared_method(model, spec, checkpointing=False, lr=1e-2) as prepared:
        params = prepared.optimizer.param_groups[0]["params"]
        before = [p.detach().clone() for p in params]
        prepared.model(**batch).loss.backward()
        params[0].grad[0, 0] = float("nan")
        prepared.optimizer.step()
        assert all(torch.equal(a, b) for a, b in zip(params, before))
        assert type(prepared.optimizer)._nonfinite_guard.skipped_total == 1
