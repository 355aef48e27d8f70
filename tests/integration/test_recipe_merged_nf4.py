"""The recipe's --eval_merged_nf4 (recipes/commonsense/merging.py): the trained update merged back into the NF4 base,
then evaluated again. On a tiny seeded Llama on the CPU (bitsandbytes' CPU kernels): what the merge keeps of ours with
the low-quantization-error start and of QLoRA, the flag checks, and (slow) the recipe end to end."""
import copy

import pytest
import torch

from helpers import bnb_cpu_support, random_batches, tiny_model, tiny_quantizable_llama_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _needs_4bit():
    why = bnb_cpu_support()["4bit"]
    if why:
        pytest.skip(why)


def _model():
    return tiny_model(tiny_quantizable_llama_config())  # widths bitsandbytes' packed CPU 4-bit path takes


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_ours_merged_into_nf4_keeps_the_update_but_not_the_low_error_start(axis):
    """merge_sparse(requantize=True), as the library documents it: untouched rows re-quantize to the same codes and
    trained ones to Q(their new value). With the low-quantization-error start and no update yet the selected weights
    are W again, so the merged model is exactly the plain NF4 model Q(W): the start's gain is gone after the merge.
    With an update, the merged model stays near the unmerged one (the update is kept, up to NF4 rounding)."""
    from commonsense.merging import merge_into_nf4
    from sprune_trainer import SparseNeuronConfig
    from sprune_trainer.layers.quantization import bnb_kind, dequantize_weight
    from sprune_trainer.layers.surgery import quantize_with_sparse_correction, sliced_modules

    cfg = SparseNeuronConfig(neurons_per_layer=6, importance="random", axis=axis, quantize_base="nf4",
                             init_from_quantization_error=True)
    ids = random_batches(1)[0]["input_ids"]
    original = _model()
    ours = quantize_with_sparse_correction(_model(), cfg)
    plain = quantize_with_sparse_correction(_model(), cfg)  # the same Q(W), slices at zero: QLoRA's start
    for layer in sliced_modules(plain).values():
        layer.delta.data.zero_()
    ref, start, nf4 = _logits(original, ids), _logits(ours, ids), _logits(plain, ids)
    assert (start - ref).norm() < (nf4 - ref).norm()  # before the merge: closer to full precision than Q(W)

    merged, info = merge_into_nf4(copy.deepcopy(ours), "sparse")
    assert info["layers"] == 14 and info["how"] == "merge_sparse(requantize=True)"
    assert not sliced_modules(merged) and bnb_kind(merged.model.layers[0].mlp.down_proj) == "4bit"
    assert torch.equal(_logits(merged, ids), nf4)  # after it: the plain NF4 model, bit for bit

    torch.manual_seed(1)  # a "trained" update
    for layer in sliced_modules(ours).values():
        layer.delta.data += 0.05 * torch.randn_like(layer.delta)
    trained = _logits(ours, ids)
    name = "model.layers.1.self_attn.o_proj"
    layer = sliced_modules(ours)[name]
    exact = layer.merged_weight(dequantize_weight(layer.base_layer))
    before_codes = dequantize_weight(layer.base_layer)
    merged = merge_into_nf4(ours, "sparse")[0]
    after = dequantize_weight(merged.get_submodule(name))
    if axis == "rows":  # NF4 blocks run along rows: the untouched rows keep their codes
        rest = torch.ones(after.shape[0], dtype=torch.bool)
        rest[layer.index] = False
        assert torch.equal(after[rest], before_codes[rest])
    assert 0 < (after - exact).norm() < 0.5 * (exact - before_codes).norm()  # NF4 rounding, far below the update
    assert (_logits(merged, ids) - trained).norm() < 0.5 * (trained - nf4).norm()


def test_qlora_merged_into_nf4_requantizes_every_row(tmp_path):
    """QLoRA: each LoRA layer's 4-bit base dequantized + B A * scale, re-quantized with the base's settings; the
    PEFT wrappers go. A LoRA update touches every row, so every row's codes change."""
    from commonsense.merging import merge_into_nf4
    from commonsense.modeling import apply_peft, bitsandbytes_config
    from sprune_trainer.layers.quantization import bnb_kind, dequantize_weight
    from transformers import AutoModelForCausalLM

    _model().save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bitsandbytes_config(4, torch.float32),
                                                device_map={"": "cpu"}, dtype=torch.float32)
    model = apply_peft(base, "lora", 2, 4, 0.0, TARGETS)
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(std=0.05)
    ids = random_batches(1)[0]["input_ids"]
    unmerged = _logits(model, ids)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    before, delta = dequantize_weight(q.get_base_layer()), q.get_delta_weight("default").float()
    merged, info = merge_into_nf4(model, "lora")
    assert info["layers"] == 14 and type(merged).__name__ == "LlamaForCausalLM"
    new = merged.model.layers[0].self_attn.q_proj
    assert bnb_kind(new) == "4bit" and new.weight.quant_state.quant_type == "nf4"
    after = dequantize_weight(new)
    assert bool(((after - before).abs().sum(1) > 0).all())  # every row re-quantized
    assert 0 < (after - (before + delta)).norm() < delta.norm()  # the update, up to NF4 rounding
    assert (_logits(merged, ids) - unmerged).norm() < 0.5 * unmerged.norm()


@pytest.mark.parametrize("flags, ok", [
    (["--method", "sparse", "--quantize_base", "nf4"], True),
    (["--method", "sparse", "--quantize_base", "nf4", "--init_from_quantization_error", "true"], True),
    (["--method", "sparse", "--load_in_4bit", "true"], True),
    (["--method", "lora", "--load_in_4bit", "true"], True),
    (["--method", "sparse"], False),                                   # a bf16 base: no NF4 to merge into
    (["--method", "sparse", "--quantize_base", "fp4"], False),
    (["--method", "lora"], False),
    (["--method", "dora", "--load_in_4bit", "true"], False),           # DoRA's magnitude: not merged here
    (["--method", "sparse", "--quantize_base", "nf4", "--eval_after", "false"], False),
])
def test_eval_merged_nf4_flag_needs_an_nf4_base_and_an_evaluation(flags, ok, tmp_path, capsys):
    import llama_commonsense

    argv = ["--data_dir", str(tmp_path), "--eval_merged_nf4", "true", "--use_cpu", "true", *flags]
    if ok:
        _, data, _, _ = llama_commonsense.parse_args(argv)
        assert data.eval_merged_nf4
        return
    with pytest.raises(SystemExit) as e:
        llama_commonsense.parse_args(argv)
    assert e.value.code == 2 and "--eval_merged_nf4" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method, flags", [
    ("sparse", ["--quantize_base", "nf4", "--init_from_quantization_error", "true", "--neurons_per_layer", "2"]),
    ("lora", ["--load_in_4bit", "true", "--lora_r", "2", "--lora_alpha", "4"]),
])
def test_recipe_evaluates_after_training_and_after_the_nf4_merge(tmp_path, method, flags):
    import json

    import llama_commonsense
    from helpers import TINY, tiny_model_and_data
    from transformers import LlamaConfig, LlamaForCausalLM

    model, data = tiny_model_and_data(tmp_path, LlamaConfig, LlamaForCausalLM, **TINY)
    out = tmp_path / "out"
    res = llama_commonsense.main([
        "--model_name_or_path", model, "--data_dir", data, "--max_train_samples", "4", "--max_eval_samples", "3",
        "--per_device_train_batch_size", "2", "--max_new_tokens", "3", "--eval_batch_size", "2", "--output_dir",
        str(out), "--disable_tqdm", "true", "--use_cpu", "true", "--seed", "0", "--learning_rate", "1e-2",
        "--eval_before", "false", "--save_adapter", "false", "--dtype", "float32", "--method", method,
        "--eval_merged_nf4", "true", *flags])
    saved = json.loads((out / "results.json").read_text())
    for key in ("after", "after_merged_nf4"):
        assert list(saved[key]["tasks"]) == ["boolq", "piqa"] and 0 <= saved[key]["average"] <= 1
    assert saved["merge"]["layers"] == 14 and "eval_merged_nf4" in saved["phase_seconds"]
    assert res["after_merged_nf4"]["average"] == saved["after_merged_nf4"]["average"]
