"""End to end: recipes/llama_commonsense.py main() on a tiny seeded random Llama (built and saved here, with a
BPE tokenizer trained here) and a tiny LLM-Adapters folder, on CPU: evaluate, fine-tune, save, evaluate;
then reload the saved adapter in an eval-only run and get the same predictions."""
import json
import re
from pathlib import Path

import pytest
import torch

from commonsense import sources, tasks as T
from commonsense.prompting import tokenize_example
from helpers import (DORA_R2, LORA_R2, SPARSE_ROWS_2, bnb_cpu_support, llm_adapters_records as _records,
                     make_tokenizer, tiny_quantizable_llama_config)

try:
    from sprune_trainer import SparseNeuronTrainer  # noqa: F401
    HAVE_TRAINER, WHY = True, ""
except Exception as e:  # noqa: BLE001 - any import failure means the core is not there yet
    HAVE_TRAINER, WHY = False, f"sprune_trainer.SparseNeuronTrainer not importable yet ({e!r})"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    from transformers import LlamaForCausalLM
    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = tiny_quantizable_llama_config(vocab_size=len(tok), max_position_embeddings=512,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id)
    model_dir = root / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = root / "data"
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    train = _records("boolq", 3) + _records("winogrande", 3)
    (data / "train" / "mixed.json").write_text(json.dumps(train))
    (data / "test" / "boolq.json").write_text(json.dumps(_records("boolq", 3, start=10)))
    (data / "test" / "piqa.json").write_text(json.dumps(_records("piqa", 3, start=10)))
    return {"root": root, "model": str(model_dir), "data": str(data), "tok": tok, "train": train}


def _run(setup, out, *extra):
    import llama_commonsense
    args = ["--model_name_or_path", setup["model"], "--data_dir", setup["data"], "--max_train_samples", "4",
            "--max_eval_samples", "3", "--per_device_train_batch_size", "2", "--max_new_tokens", "3",
            "--eval_batch_size", "2", "--output_dir", str(out), "--disable_tqdm", "true", "--use_cpu", "true",
            "--logging_steps", "1", "--seed", "0", "--learning_rate", "1e-2", *extra]
    return llama_commonsense.main(args)


def _check_run(setup, res, out):
    assert Path(res["paths"]["json"]).is_file() and Path(res["paths"]["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert json.loads(Path(res["paths"]["json"]).read_text())["method"] == res["method"]
    for phase in ("before", "after"):
        assert list(res[phase]["tasks"]) == ["boolq", "piqa"]
        for r in res[phase]["tasks"].values():
            assert r["n"] == 3 and len(r["samples"]) == 3 and 0.0 <= r["accuracy"] <= 1.0
            assert r["accuracy"] == sum(s["pred"] == s["answer"] for s in r["samples"]) / 3
            assert r["choice_accuracy"] == sum(s["choice"] == s["answer"] for s in r["samples"]) / 3
        assert res[phase]["tasks"]["boolq"]["chance"] == 0.5 and res[phase]["tasks"]["piqa"]["chance"] == 0.5
    tr = res["training"]
    assert tr["steps"] == 2  # 4 examples, batch 2, one epoch
    # tokens/s counts exactly the non-padding tokens of the 4 training examples
    trained = sources.load_local(setup["data"], max_train_samples=4, seed=0).train
    assert tr["train_tokens"] == sum(len(tokenize_example(r, setup["tok"], 256)["input_ids"]) for r in trained)
    assert tr["tokens_per_second"] > 0 and tr["peak_memory"]["bytes"] > 0
    assert (out / "adapter").is_dir()


def test_recipe_end_to_end_lora(setup, tmp_path):
    out = tmp_path / "lora"
    res = _run(setup, out, "--method", "lora", "--lora_r", "2", "--lora_alpha", "4")
    _check_run(setup, res, out)
    assert res["training"]["trainable_params"] == LORA_R2  # exactly q/k/v/o/gate/up/down of 2 layers
    assert (out / "adapter" / "adapter_config.json").is_file()
    # eval-only run from the saved adapter reproduces the fine-tuned predictions
    again = _run(setup, tmp_path / "lora_eval", "--method", "lora", "--do_train", "false", "--no_eval_before",
                 "--adapter_dir", str(out / "adapter"))
    assert "training" not in again and "before" not in again
    assert [s["output"] for t in again["after"]["tasks"].values() for s in t["samples"]] == \
           [s["output"] for t in res["after"]["tasks"].values() for s in t["samples"]]


@pytest.mark.parametrize("method", ["dora", "full"])
def test_recipe_other_methods_train_what_they_should(setup, tmp_path, method):
    res = _run(setup, tmp_path / method, "--method", method, "--lora_r", "2", "--no_eval_before",
               "--learning_rate", "1e-4")
    total = res["training"]["base_model_params"]
    expected = {"dora": DORA_R2, "full": total}[method]  # full: every weight
    assert res["training"]["trainable_params"] == expected and res["training"]["steps"] == 2
    assert list(res["after"]["tasks"]) == ["boolq", "piqa"]


@pytest.mark.skipif(not HAVE_TRAINER, reason=WHY)
def test_recipe_end_to_end_sparse(setup, tmp_path, capsys):
    out = tmp_path / "sparse"
    res = _run(setup, out, "--method", "sparse", "--neurons_per_layer", "2", "--importance", "l2")
    _check_run(setup, res, out)
    console = capsys.readouterr().out  # what the run trains, said on the console before training
    share = res["training"]["sparse_summary"]["trainable_percent"]
    assert (f"[sparse] importance=l2, axis=rows, scope=per_layer: 2 neurons per layer in 14 layers; training "
            f"{SPARSE_ROWS_2:,} of ") in console and f"({share:.2f} %)" in console
    assert console.index("[sparse] importance=l2") < console.index("'loss'")
    assert res["training"]["trainable_params"] == SPARSE_ROWS_2  # the slices and nothing else
    assert res["args"]["sparse"]["neurons_per_layer"] == 2
    again = _run(setup, tmp_path / "sparse_eval", "--method", "sparse", "--do_train", "false", "--no_eval_before",
                 "--adapter_dir", str(out / "adapter"))
    assert [s["output"] for t in again["after"]["tasks"].values() for s in t["samples"]] == \
           [s["output"] for t in res["after"]["tasks"].values() for s in t["samples"]]


def _usage_error(capsys, *argv) -> str:
    """main(argv) must stop as argparse does (exit code 2) and say why on one line: that line."""
    import llama_commonsense
    with pytest.raises(SystemExit) as stop:
        llama_commonsense.main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 2 and err[0].startswith("usage:"), err
    return err[1]


def test_recipe_rejects_unknown_task_before_loading_a_model(setup, tmp_path, capsys):
    assert re.search(r"error: Unknown task\(s\) \['hellaswag'\]", _usage_error(
        capsys, "--model_name_or_path", str(tmp_path / "no-model"), "--data_dir", setup["data"],
        "--tasks", "hellaswag", "--output_dir", str(tmp_path / "o")))
    assert "not a folder" in _usage_error(capsys, "--data_dir", str(tmp_path / "missing"),
                                          "--output_dir", str(tmp_path / "o"))


def _skip_without_4bit():
    """test_quantization's bitsandbytes probe (helpers.bnb_cpu_support), run here only (at module level it would
    skip this whole module on a machine without bitsandbytes)."""
    why = bnb_cpu_support()["4bit"]
    if why:
        pytest.skip(why)


@pytest.mark.skipif(not HAVE_TRAINER, reason=WHY)
@pytest.mark.parametrize("method, trained", [("sparse", SPARSE_ROWS_2), ("lora", LORA_R2)])
def test_recipe_on_a_4bit_base(setup, tmp_path, method, trained):
    """--load_in_4bit: the base loads as NF4 (bitsandbytes CPU backend here), sparse trains its slices over it and
    LoRA becomes QLoRA; both train exactly their adapter and evaluate before and after."""
    _skip_without_4bit()
    out = tmp_path / method
    res = _run(setup, out, "--method", method, "--load_in_4bit", "true", "--neurons_per_layer", "2",
               "--lora_r", "2", "--lora_alpha", "4", "--dtype", "float32")
    _check_run(setup, res, out)
    assert res["training"]["trainable_params"] == trained
    from commonsense.modeling import count_parameters, load_model_and_tokenizer
    model, _ = load_model_and_tokenizer(setup["model"], load_in_bits=4, dtype="float32")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    full_precision = load_model_and_tokenizer(setup["model"], dtype="float32")[0]
    assert count_parameters(model)[1] == res["training"]["base_model_params"] == count_parameters(full_precision)[1]


def test_recipe_rejects_full_ft_of_a_quantized_base(setup, tmp_path, capsys):
    assert "cannot train quantized" in _usage_error(capsys, "--model_name_or_path", setup["model"], "--data_dir",
                                                    setup["data"], "--method", "full", "--load_in_4bit", "true")


@pytest.mark.skipif(not HAVE_TRAINER, reason=WHY)
def test_recipe_quantize_base_with_exact_rows(setup, tmp_path):
    _skip_without_4bit()
    res = _run(setup, tmp_path / "qb", "--method", "sparse", "--neurons_per_layer", "2", "--dtype", "float32",
               "--quantize_base", "nf4", "--init_from_quantization_error", "true", "--no_eval_before")
    assert res["training"]["trainable_params"] == SPARSE_ROWS_2 and res["training"]["steps"] == 2
    assert res["args"]["sparse"]["quantize_base"] == "nf4" and list(res["after"]["tasks"]) == ["boolq", "piqa"]


def test_recipe_extra_eval_adds_olmo_validation_sets(setup, tmp_path, fake_olmo_dir, monkeypatch):
    monkeypatch.setattr(sources, "olmo_datasets_dir", lambda cache_dir=None, download=True: fake_olmo_dir)
    res = _run(setup, tmp_path / "extra", "--method", "lora", "--lora_r", "2", "--save_adapter", "false",
               "--extra_eval", "hellaswag,ARC-Challenge")
    want = sources.load_olmo_extra_eval(["hellaswag", "ARC-Challenge"], 3, seed=0, datasets_dir=str(fake_olmo_dir))
    for phase in ("before_extra", "after_extra"):
        tasks = res[phase]["tasks"]
        assert list(tasks) == ["olmo_hellaswag", "olmo_ARC-Challenge"]
        for name, r in tasks.items():
            assert [s["answer"] for s in r["samples"]] == list(want[name]["answer"]) and r["n"] == 3
            assert r["accuracy"] == sum(s["pred"] == s["answer"] for s in r["samples"]) / 3
            assert all(s["choice"] in T.choice_labels(name, want[name][0]["instruction"]) for s in r["samples"])
    assert list(res["after"]["tasks"]) == ["boolq", "piqa"]  # the test files' average stays their own
    assert res["data"]["eval_examples"] == {"boolq": 3, "piqa": 3, "olmo_hellaswag": 3, "olmo_ARC-Challenge": 3}


def test_recipe_extra_eval_refuses_repeats_of_the_test_files_and_other_sources(setup, capsys):
    base = ("--model_name_or_path", setup["model"], "--data_dir", setup["data"], "--method", "lora")
    assert "LLM-Adapters test files" in _usage_error(capsys, *base, "--extra_eval", "hellaswag,piqa")
    assert "needs --data_source local" in _usage_error(capsys, *base, "--extra_eval", "hellaswag",
                                                       "--validation_per_task", "1")


def test_recipe_trains_coupled_neurons_and_reloads_them(setup, tmp_path):
    out = tmp_path / "coupled"
    res = _run(setup, out, "--method", "sparse", "--neurons_per_layer", "2", "--importance", "taylor",
               "--axis", "coupled", "--calibration_batches", "2")
    _check_run(setup, res, out)
    assert 0 < res["training"]["trainable_params"] <= SPARSE_ROWS_2  # within the rows' budget at the same k
    again = _run(setup, tmp_path / "coupled_eval", "--method", "sparse", "--do_train", "false", "--no_eval_before",
                 "--adapter_dir", str(out / "adapter"))
    assert [s["output"] for t in again["after"]["tasks"].values() for s in t["samples"]] == \
           [s["output"] for t in res["after"]["tasks"].values() for s in t["samples"]]
