"""The PEFT export size study (studies/peft_export/sizes.py) runs on a tiny shape: real files, one decoder layer's
growth equal to the formula, and the committed 7B results agree with the formula too."""
import json

from studies.peft_export import sizes


def test_sizes_script_on_a_tiny_shape(tmp_path):
    result = sizes.main(["--shape", "tiny", "--k", "4", "--out", str(tmp_path / "sizes.json")])
    assert json.loads((tmp_path / "sizes.json").read_text()) == result
    assert [(c["axis"], c["slice_dtype"]) for c in result["cases"]] == [
        ("rows", "float32"), ("rows", "bfloat16"), ("columns", "float32"), ("columns", "bfloat16")]
    for case in result["cases"]:
        layer = case["per_decoder_layer"]
        # tiny rows: 4 * (64 * 6 + 128) values + 7 * 4 int64 indices; PEFT: 4 * (d_in + d_out) for each projection
        b = 4 if case["slice_dtype"] == "float32" else 2
        native = 4 * ((64 * 6 + 128) if case["axis"] == "rows" else (64 * 4 + 128 * 2 + 64)) * b + 7 * 4 * 8
        assert layer["native"]["tensor_bytes"] == native
        assert layer["peft"]["tensor_bytes"] == 4 * ((64 + 64) * 4 + (64 + 128) * 3) * b
        assert case["model"]["peft"] > case["model"]["native"]


def test_committed_7b_results_follow_the_formula():
    import torch
    result = json.loads(sizes.RESULTS.read_text())
    shape = result["shape"]
    for case in result["cases"]:
        want = sizes.formula(shape, result["k"], case["axis"], getattr(torch, case["slice_dtype"]))
        assert {k: v["tensor_bytes"] for k, v in case["per_decoder_layer"].items()} == want
    assert result["merged_model_bf16_bytes"] == 2 * 6_738_415_616  # Llama-2-7B's parameter count
