"""The quantization study's scripts (studies/quantization/) run end to end (tiny shapes) and show what they are
meant to show."""
import json

import pytest

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'sprune_trainer[bnb]')")
pytest.importorskip("peft")
from helpers import needs_bnb  # noqa: E402

needs_4bit = needs_bnb("4bit")  # test_quantization's CPU probe and skip reason
# the scripts import as top-level modules: pyproject puts studies/quantization on sys.path


@needs_4bit
def test_reconstruction_error_script(tmp_path):
    import reconstruction_error
    out = tmp_path / "recon.json"
    total = reconstruction_error.main(["--shapes", "tiny", "--rows", "16", "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["summary"] == total
    row = saved["matrices"]["tiny.q_proj"]
    assert row["params_ours"] == 16 * 128 and row["params_lora"] == 8 * 256  # the same budget
    assert total["qlora"]["fro_total_ratio"] == 1.0
    for method in ("ours_l2", "ours_best_rows", "loftq_T1", "loftq_T5"):
        assert 0.5 < total[method]["fro_total_ratio"] < 1.0 and 0.5 < total[method]["nuc_total_ratio"] < 1.0
    assert total["ours_best_rows"]["fro_total"] <= total["ours_l2"]["fro_total"]  # best rows are best for Frobenius


@needs_4bit
def test_merge_requantize_script(tmp_path):
    import merge_requantize
    out = tmp_path / "requant.json"
    merge_requantize.main(["--shapes", "tiny", "--rows", "16", "--device", "cpu", "--update_scale", "0.01",
                           "--out", str(out)])
    saved = json.loads(out.read_text())
    for row in saved["matrices"].values():
        assert row["ours@0.01"]["rows_changed"] <= 16  # only the trained rows re-quantize differently
        assert row["qlora@0.01"]["rows_changed"] > 16   # a low-rank update touches every row
    s = saved["summary"]
    assert s["ours@0.01"]["update_kept"] > 0.9 > s["qlora@0.01"]["update_kept"]


@needs_4bit
def test_qlora_speed_script_compares_equal_budgets_on_nf4(tmp_path):
    import qlora_speed
    out = tmp_path / "speed.json"
    qlora_speed.main(["--shapes", "tiny", "--batch-seq", "2x32", "--checkpointing", "off", "--warmup", "1",
                      "--steps", "1", "--device", "cpu", "--out", str(out)])
    runs = {r["method"]: r for r in json.loads(out.read_text())["runs"]}
    assert all(r["status"] == "ok" for r in runs.values())
    ours = next(r for name, r in runs.items() if name.startswith("ours_rows") and r["state"] == "float32")
    assert abs(ours["trainable_params"] / runs["qlora_r16"]["trainable_params"] - 1) < 0.05  # equal budget
    assert runs["floor_nf4"]["trainable_params"] == 0
