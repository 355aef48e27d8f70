"""The user-stack benchmark (benchmarks/user_stack.py) in its CPU smoke mode: every method goes through the Trainer in
a child process, with checkpointing and torch_compile (aot_eager), and the results say what the runs did: the
same batches, the plain run's losses under each switch, compiled slices equal to eager ones, a resumed second
call that runs only what is missing, and a table whose ratios are those of the JSON."""
import csv
import json
import math

import pytest
import torch

pytest.importorskip("peft")

# the tiny shape (2 layers, hidden 256, MLP 512, k/v 128 wide): ours r = 64 rows x d_in of the 7 projections; LoRA
# r16 x (d_in + d_out) of q, o (256 + 256), k, v (256 + 128), gate, up, down (256 + 512)
TINY_ROWS = 64 * (6 * 256 + 512) * 2
TINY_LORA = 16 * (2 * (256 + 256) + 2 * (256 + 128) + 3 * (256 + 512)) * 2


def _rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.mark.slow
def test_user_stack_smoke_runs_every_method_and_switch_and_resumes(tmp_path):
    from benchmarks import user_stack
    from benchmarks.user_stack_report import markdown

    out = tmp_path / "out"
    common = ["--smoke", "--out", str(out), "--slices-dir", str(tmp_path / "slices"), "--work-dir",
              str(tmp_path / "work")]
    first = user_stack.main([*common, "--switches", "plain,ckpt,compile",
                             "--only", "*/plain/*,*/ckpt/*,*/compile/ours"])
    plain_ours = dict(next(r for r in first["configs"] if r["key"] == "tiny/2x64/plain/ours"))
    # a second call resumes: what is recorded is not run again (no process at all here: Liger is skipped on a CPU)
    doc = user_stack.main([*common, "--switches", "plain,liger", "--methods", "ours"])

    rows = {r["key"]: r for r in doc["configs"]}
    assert len(doc["meta"]["calls"]) == 2
    assert rows["tiny/2x64/plain/ours"] == plain_ours
    assert rows["tiny/2x64/liger/ours"]["status"].startswith("skipped: ")
    ok = {k: r for k, r in rows.items() if r["status"] == "ok"}
    assert sorted(ok) == sorted([f"tiny/2x64/{s}/{m}" for s in ("plain", "ckpt") for m in ("ours", "lora", "floor")]
                                + ["tiny/2x64/compile/ours"])
    for r in ok.values():
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"]), r["key"]
        assert r["tokens_per_s"] == pytest.approx(2 * 64 * 2 / sum(r["step_s"][1:]))
        assert r["batch_fingerprints"] == plain_ours["batch_fingerprints"]  # the same batches everywhere
        # nothing is trained before the first step: every method's first loss is the frozen model's
        assert r["losses"][0] == pytest.approx(plain_ours["losses"][0], rel=1e-6)
        assert r["params_with_grad_at_step_1"] == r["trainable_tensors"], r["key"]  # also under checkpointing
    assert {r["trainable_params"] for k, r in ok.items() if k.endswith("/ours")} == {TINY_ROWS}
    assert {r["trainable_params"] for k, r in ok.items() if k.endswith("/lora")} == {TINY_LORA}
    assert {r["trainable_params"] for k, r in ok.items() if k.endswith("/floor")} == {0}

    floor, ours = ok["tiny/2x64/plain/floor"], ok["tiny/2x64/plain/ours"]
    assert ours["losses"][-1] != floor["losses"][-1]  # the slices trained
    for switch in ("ckpt", "compile"):  # the same losses on the same batches as the plain run
        r = ok[f"tiny/2x64/{switch}/ours"]
        assert _rel(r["losses"], ours["losses"]) <= 1e-4 and r["loss_ok"]
    assert ok["tiny/2x64/ckpt/lora"]["loss_ok"] and ok["tiny/2x64/ckpt/floor"]["loss_ok"]

    assert ours["rebuild"]["state"] == "on" and ours["rebuild"]["rebuilt"] > 0
    assert ok["tiny/2x64/ckpt/ours"]["rebuild"]["state"].startswith("off in 12 of 14 layers (checkpointing")
    compiled = ok["tiny/2x64/compile/ours"]
    assert compiled["rebuild"]["state"].startswith("off (compiled")
    slices = compiled["slices_vs_eager"]
    assert slices["ok"] and slices["slices"] == slices["moved"] == 14 and slices["max_rel_diff"] <= 1e-4
    # the fp32 truth was run for the check (fp32 here already: it is the eager run with checkpointing)
    assert [r["key"] for r in doc["slice_reruns"] if r["status"] == "ok"] == ["tiny/2x64/fp32_ckpt/ours"]
    assert slices["err_compiled_vs_fp32"] <= 1e-4 and slices["err_eager_vs_fp32"] <= 1e-4

    table = (out / "table.md").read_text()
    assert table == markdown(doc)
    for switch, label in (("plain", "plain"), ("ckpt", "checkpointing")):
        o, l, f = (ok[f"tiny/2x64/{switch}/{m}"] for m in ("ours", "lora", "floor"))
        assert o["tps_x_lora"] == pytest.approx(o["tokens_per_s"] / l["tokens_per_s"])
        assert o["tps_x_floor"] == pytest.approx(o["tokens_per_s"] / f["tokens_per_s"])
        line = next(x for x in table.splitlines() if x.startswith(f"| {label} |"))
        assert f"| {o['tps_x_lora']:.3f} | {o['tps_x_floor']:.3f} |" in line
    target = next(t for t in doc["targets"] if t["key"] == "tiny/2x64/plain/ours" and "LoRA" in t["target"])
    assert target["value"] == ours["tps_x_lora"] and target["met"] == (ours["tps_x_lora"] >= 1.2)
    assert json.loads((out / "results.json").read_text())["targets"] == doc["targets"]
    with open(out / "results.csv") as f:
        assert sorted(r["key"] for r in csv.DictReader(f)) == sorted(rows)
    assert (out / "results.png").stat().st_size > 0


def _slices_file(path, values):
    from safetensors.torch import save_file
    save_file({f"s{i}": torch.tensor(v, dtype=torch.float32) for i, v in enumerate(values)}, str(path))
    return str(path)


def test_compiled_slices_beyond_the_rtol_pass_when_no_farther_from_fp32_than_twice_eager(tmp_path):
    """Two slices: eager 0.10 from the truth in its worst slice; compiled 0.30 from eager (beyond rtol 0.15) passes at
    0.20 from the truth (<= 2 x 0.10) and fails at 0.25; an unmoved slice fails whatever the distances."""
    from benchmarks.user_stack_report import judge_compiled_slices

    truth = _slices_file(tmp_path / "t.safetensors", [[1.0, 0.0], [0.0, 1.0]])
    eager = _slices_file(tmp_path / "e.safetensors", [[1.1, 0.0], [0.0, 1.0]])
    near = _slices_file(tmp_path / "n.safetensors", [[0.8, 0.0], [0.0, 1.0]])
    far = _slices_file(tmp_path / "f.safetensors", [[0.75, 0.0], [0.0, 1.0]])
    ok = judge_compiled_slices(near, eager, truth, rtol=0.15)
    assert ok["max_rel_diff"] == pytest.approx(0.3 / 1.1) and ok["err_eager_vs_fp32"] == pytest.approx(0.1)
    assert ok["err_compiled_vs_fp32"] == pytest.approx(0.2) and ok["ok"]
    assert not judge_compiled_slices(far, eager, truth, rtol=0.15)["ok"]
    assert not judge_compiled_slices(near, eager, None, rtol=0.15)["ok"]  # no truth: the rtol alone
    assert judge_compiled_slices(near, eager, None, rtol=0.3)["ok"]
    unmoved = _slices_file(tmp_path / "u.safetensors", [[1.1, 0.0], [0.0, 0.0]])
    assert not judge_compiled_slices(unmoved, eager, truth, rtol=10.0)["ok"]
