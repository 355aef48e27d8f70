"""The user-stack table: ours (SparseNeuronTrainer, default config, l2 rows r = 64) against PEFT LoRA r16 (QLoRA on an
NF4 base) and the frozen floor, THROUGH the Trainer, with each switch a user turns on: plain, activation
checkpointing, Liger, Liger + checkpointing, torch_compile, NF4 base + checkpointing. Random-init Llama-3-8B shape
(all 32 layers unless --layers), bf16, batch 4 x 1024 and 1 x 8192, on one GPU:

    python benchmarks/user_stack.py --out benchmarks/results/user_stack --shapes 4x1024 \\
        --switches plain,ckpt,liger_ckpt,nf4_ckpt                  # 12 configurations, ~6 min on an H100
    python benchmarks/user_stack.py --out benchmarks/results/user_stack   # the rest, in calls of --budget-s; resumes
    python benchmarks/user_stack.py --smoke --out /tmp/user-stack-smoke  # tiny shapes on CPU (~40 s)

On the device machine: `bash studies/device/device_run.sh user-stack` (its header: wheels, carry, calls).

Each configuration (model x shape x switch x method) runs in a fresh process (a clean peak; Liger patches model
classes process-wide), output to a file (a pipe can fill and block a chatty compiled run). Per configuration:
peak memory (training, and the whole process), tokens/s over the timed steps, the per-step losses (compared with the
same method's plain run on the same batches), whether ours' input rebuild stayed on (a WARNING line when not), and
for compiled ours-runs the slices after all steps against the eager (plain) run's. A configuration whose package is
missing (liger-kernel, bitsandbytes) is recorded as "skipped: <why>". Configurations already in --out's
results.json (ok, oom or error) are not run again, so the run can be split over calls; --budget-s stops starting new
ones when the time left is too short. Outputs under --out: results.json, results.csv, table.md (ratios and item 5's
targets), results.png."""
from __future__ import annotations

import argparse
import fnmatch
import faulthandler
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import report  # noqa: E402
from benchmarks.user_stack_plan import (DEFAULT_SWITCHES, METHODS, SWITCHES, RunConfig,  # noqa: E402
                                        missing_dependency, plan, switch_on)
from benchmarks.user_stack_report import (CSV_COLUMNS, add_checks, judge_compiled_slices, markdown,  # noqa: E402
                                          targets)

DONE = ("ok", "oom", "error")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", required=True, help="output folder; its results.json is resumed")
    ap.add_argument("--models", default="llama3-8b", help="comma list of benchmarks/shapes.py names (llama2-7b, ...)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's own count)")
    ap.add_argument("--shapes", default="4x1024,1x8192", help="comma list of BATCHxSEQ")
    ap.add_argument("--switches", default=",".join(DEFAULT_SWITCHES), help=f"comma list of {list(SWITCHES)}")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of ours,lora,floor")
    ap.add_argument("--only", default=None,
                    help="comma list of patterns (fnmatch) on configuration keys MODEL/BxT/SWITCH/METHOD, e.g. "
                         "'*/compile/ours': run only the matching ones")
    ap.add_argument("--warmup", type=int, default=3, help="optimizer steps before the timed ones")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--r", type=int, default=64, help="ours: rows per targeted linear")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--compile-backend", default=None, help="TrainingArguments.torch_compile_backend (default: "
                                                            "the Trainer's, inductor)")
    ap.add_argument("--loss-rtol", type=float, default=0.01,
                    help="largest relative per-step loss difference from the plain run counted as the same (bf16)")
    ap.add_argument("--nf4-loss-rtol", type=float, default=0.02,
                    help="the same for runs on the NF4 base, which is another model than the bf16 one")
    ap.add_argument("--slice-rtol", type=float, default=0.15,
                    help="largest relative difference of a compiled run's slice from the eager run's counted as the "
                         "same (bf16: studies/torch_compile saw 0.08 after 6 steps, as far as eager is from fp32); "
                         "beyond it the fp32 truth decides (fp32_ckpt, run for the check: compiled no farther from "
                         "it than twice eager)")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="start no configuration expected to end after this many seconds from launch")
    ap.add_argument("--watchdog-s", type=float, default=480.0, help="a configuration's process is ended after this")
    ap.add_argument("--per-process", type=int, default=None,
                    help="configurations per process (default 1: a clean peak each, and Liger's patches stay in their "
                         "process; 0: all in one, the --smoke default)")
    ap.add_argument("--retry-errors", action="store_true", help="also run configurations recorded with an error")
    ap.add_argument("--slices-dir", default="/tmp/user_stack/slices",
                    help="where ours' slices are kept for the compiled-vs-eager check (hundreds of MB at 8B)")
    ap.add_argument("--work-dir", default="/tmp/user_stack/work", help="per-process configuration files and logs")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU: the tiny shape, 2x64, 1+2 steps, fp32, compile with aot_eager, one process")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        if args.models == ap.get_default("models"):
            args.models = "tiny"  # or tiny-moe, when asked for
        args.shapes, args.warmup, args.steps = "2x64", 1, 2
        args.compile_backend = args.compile_backend or "aot_eager"
        args.loss_rtol, args.slice_rtol = 1e-4, 1e-4
    if args.per_process is None:
        args.per_process = 0 if args.smoke else 1
    args.models = args.models.split(",")
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    args.switches = args.switches.split(",")
    args.methods = args.methods.split(",")
    args.only = args.only.split(",") if args.only else None
    unknown = [s for s in args.switches if s not in SWITCHES] + [m for m in args.methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown switches / methods {unknown}")
    return args


def configs(args) -> list[RunConfig]:
    smoke = dict(device="cpu", dtype="float32", bf16=False) if args.smoke else {}
    out = plan(args.models, args.shapes, args.switches, args.methods, layers=args.layers, warmup=args.warmup,
               steps=args.steps, r=args.r, lora_r=args.lora_r, lr=args.lr, compile_backend=args.compile_backend,
               output_dir=os.path.join(args.work_dir, "trainer"), **smoke)
    if args.only:
        out = [c for c in out if any(fnmatch.fnmatchcase(c.key, p) for p in args.only)]
    return [_with_slices_path(c, args.slices_dir) for c in out]


def _with_slices_path(cfg: RunConfig, folder: str) -> RunConfig:
    """ours, plain (the eager twin), fp32_ckpt (the truth) and compiled: save the slices for the compiled check."""
    if cfg.method != "ours" or cfg.switch not in ("plain", "fp32_ckpt", "compile"):
        return cfg
    name = cfg.key.replace("/", "__") + ".safetensors"
    return RunConfig(**{**cfg.as_dict(), "slices_path": os.path.join(folder, name)})


# ---- the document on disk ---------------------------------------------------------------------------------------

def load_doc(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"meta": {"benchmark": "user_stack", "what": __doc__, "calls": []}, "configs": [], "slice_reruns": []}


def save_outputs(doc: dict, args, plot: bool = False) -> None:
    rows = doc["configs"]
    add_checks(rows, args.loss_rtol, args.nf4_loss_rtol)
    doc["targets"] = targets(rows)
    report.write_json(doc, os.path.join(args.out, "results.json"))
    flat = [{**r, "rebuild_state": (r.get("rebuild") or {}).get("state"),
             "slices_max_rel_diff_vs_eager": (r.get("slices_vs_eager") or {}).get("max_rel_diff"),
             "slices_ok": (r.get("slices_vs_eager") or {}).get("ok")} for r in rows]
    report.write_csv(flat, CSV_COLUMNS, os.path.join(args.out, "results.csv"))
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(markdown(doc))
    if plot:
        from benchmarks.plots import plot_user_stack
        plot_user_stack(rows, os.path.join(args.out, "results.png"))


def record(doc: dict, row: dict) -> None:
    """Put `row` in the document, replacing an earlier row of the same configuration."""
    doc["configs"] = [r for r in doc["configs"] if r["key"] != row["key"]] + [row]


class Budget:
    """Seconds left of --budget-s, counted from the start of main()."""

    def __init__(self, seconds: float):
        self.seconds, self.t0 = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def estimate(self, doc: dict, cfg: RunConfig) -> float:
        """The wall time of the most similar finished configuration (0 when none: the first always runs)."""
        walls = {}
        for r in doc["configs"]:
            if r.get("process_s") is None or (r["model"], r.get("layers"), r["batch"], r["seq"]) != (
                    cfg.model, cfg.layers, cfg.batch, cfg.seq):
                continue
            same = r["switch"] == cfg.switch
            walls.setdefault(same, []).append(r["process_s"])
        if walls.get(True):
            return max(walls[True])
        if walls.get(False):
            return max(walls[False]) * (3 if switch_on(cfg.switch, "compile") else 1)
        return 0.0


# ---- processes --------------------------------------------------------------------------------------------------

def run_group(group: list[RunConfig], args, budget: Budget, tag: str) -> dict[str, dict]:
    """Run `group` in one fresh process (output to a log file), ended after --watchdog-s or at the end of the budget,
    whichever comes first; key -> row for each configuration it finished, and an error row for each one it did not
    (a crash, a hang), unless the budget ended it (then nothing: a later call runs it)."""
    budget_ends_it = budget.left() < args.watchdog_s
    timeout = min(args.watchdog_s, budget.left())
    os.makedirs(args.work_dir, exist_ok=True)
    spec = os.path.join(args.work_dir, f"{tag}.json")
    results = {c.key: os.path.join(args.work_dir, f"{tag}.{i}.result.json") for i, c in enumerate(group)}
    for path in results.values():
        if os.path.exists(path):
            os.remove(path)
    with open(spec, "w") as f:
        json.dump({"configs": [c.as_dict() for c in group], "results": list(results.values()),
                   "watchdog_s": timeout}, f)
    log_path = os.path.join(args.work_dir, f"{tag}.log")
    stopped, t0 = False, time.perf_counter()
    with open(log_path, "w+") as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--out", args.out, "--worker", spec],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            proc.wait(timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            stopped = True
        log.seek(0)
        text = log.read()
    timed_out = stopped or time.perf_counter() - t0 >= timeout - 5  # (the child's own watchdog ends it at timeout)
    by_budget = timed_out and budget_ends_it
    with open(os.path.join(args.out, "log.txt"), "a") as f:
        f.write(f"==== {tag}: {', '.join(c.key for c in group)} (exit {proc.returncode})\n{text[-8000:]}\n")
    rows = {}
    for cfg in group:
        path = results[cfg.key]
        if os.path.exists(path):
            with open(path) as f:
                rows[cfg.key] = json.load(f)
        elif not by_budget:
            why = f"still running after {timeout:.0f} s (--watchdog-s)" if timed_out else (
                f"process exit {proc.returncode} before a result")
            rows[cfg.key] = {**cfg.as_dict(), "key": cfg.key, "status": "error", "error": why,
                             "log_tail": text[-3000:]}
    return rows


def worker(spec_path: str) -> None:
    """In the child: run each configuration of the spec, writing each row as soon as it is measured."""
    with open(spec_path) as f:
        spec = json.load(f)
    if spec["watchdog_s"] > 0:  # a hung compile or kernel prints every thread's stack and ends the process
        faulthandler.dump_traceback_later(spec["watchdog_s"], exit=True)
    import torch
    if all(c["device"] == "cpu" for c in spec["configs"]):
        torch.set_num_threads(1)  # tiny CPU shapes: more threads only add overhead (and share 2 cores here)
    from benchmarks.trainer_run import run
    for cfg, path in zip(spec["configs"], spec["results"]):
        row = run(RunConfig(**cfg))
        print(f"RESULT {row['key']}: {row['status']} {row.get('error', '')}", flush=True)
        report.write_json(row, path)


# ---- the parent -------------------------------------------------------------------------------------------------

def _print_row(row: dict, budget: Budget) -> None:
    head = f"[{budget.elapsed():6.0f}s] {row['key']:<40}"
    if row["status"] != "ok":
        print(f"{head} {row['status'].upper()} {row.get('error', '')[:160]}", flush=True)
        return
    peak = "" if row.get("peak_bytes") is None else f"{row['peak_bytes'] / 2**30:7.2f} GiB "
    losses = row.get("losses") or [float("nan")]
    took = f"process {row['process_s']:.0f}s" if row.get("process_s") else f"run {row['wall_s']:.0f}s"
    print(f"{head} {peak}{row['tokens_per_s']:10,.0f} tok/s  loss {losses[0]:.4f} -> {losses[-1]:.4f}  ({took})",
          flush=True)
    rebuild = (row.get("rebuild") or {}).get("state")
    if rebuild and rebuild != "on":
        print(f"WARNING: {row['key']}: the input rebuild is not on: {rebuild}", flush=True)
    slices = row.get("slices_vs_eager")
    if slices:
        print(f"{' ' * 9}compiled slices vs eager: " + (f"max rel diff {slices['max_rel_diff']:.4f}, "
              f"{slices['moved']}/{slices['slices']} moved: {'ok' if slices['ok'] else 'OFF'}" if "max_rel_diff"
              in slices else slices.get("error", "")), flush=True)
        if not slices.get("ok"):
            print(f"WARNING: {row['key']}: compiled slices differ from eager ones or were not compared", flush=True)
    grads = row.get("params_with_grad_at_step_1")
    if grads is not None and grads != row.get("trainable_tensors"):
        print(f"WARNING: {row['key']}: only {grads} of {row['trainable_tensors']} trainable tensors got a gradient",
              flush=True)


def _twin_slices(doc: dict, twin: RunConfig, args, budget: Budget) -> Optional[str]:
    """The path of `twin`'s saved slices, running it first when they are not on this machine (measured in an
    earlier call, or not at all) and the budget allows; None when there are none."""
    if not os.path.exists(twin.slices_path) and budget.left() >= budget.estimate(doc, twin):
        rerun = run_group([twin], args, budget, f"p{os.getpid()}_{twin.switch}_rerun")
        rerun = rerun.get(twin.key, {"key": twin.key, "status": "stopped at the time budget"})
        doc["slice_reruns"].append({k: rerun.get(k) for k in ("key", "status", "gpu", "tokens_per_s", "error")})
    return twin.slices_path if os.path.exists(twin.slices_path) else None


def check_compiled_slices(doc: dict, row: dict, args, budget: Budget) -> None:
    """A compiled ours-run's slices against its eager twin's (the same configuration, plain) and the fp32 truth's
    (fp32_ckpt), each run first when its slices are not here (judge_compiled_slices says how they are judged)."""
    if row["method"] != "ours" or not switch_on(row["switch"], "compile") or row["status"] != "ok":
        return
    fields = {k: row[k] for k in RunConfig.__dataclass_fields__}
    eager = _twin_slices(doc, _with_slices_path(RunConfig(**{**fields, "switch": "plain", "slices_path": None}),
                                                args.slices_dir), args, budget)
    if eager is None:
        row["slices_vs_eager"] = {"error": "no eager slices: not here, and no time to rerun them or the rerun failed"}
        return
    truth = _twin_slices(doc, _with_slices_path(RunConfig(**{**fields, "switch": "fp32_ckpt", "slices_path": None}),
                                                args.slices_dir), args, budget)
    row["slices_vs_eager"] = judge_compiled_slices(row["slices_path"], eager, truth, args.slice_rtol)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    import torch
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on the GPU machine, or use --smoke for the CPU check")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.slices_dir, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    doc = load_doc(path)
    doc["meta"]["settings"] = {k: getattr(args, k) for k in ("r", "lora_r", "lr", "warmup", "steps", "loss_rtol",
                                                             "nf4_loss_rtol", "slice_rtol", "compile_backend")}
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/user_stack.py", *(argv or sys.argv[1:])])
    doc["meta"]["calls"].append({"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                 "budget_s": args.budget_s})
    budget = Budget(args.budget_s)
    done = {r["key"] for r in doc["configs"] if r.get("status") in DONE
            and not (args.retry_errors and r["status"] == "error")}
    pending = [c for c in configs(args) if c.key not in done]
    print(f"{len(pending)} configurations to run ({len(done)} recorded before)", flush=True)
    size = args.per_process or len(pending) or 1
    n = 0
    while pending:
        cfg = pending[0]
        why = missing_dependency(cfg.switch, cfg.device)
        if why:
            pending.pop(0)
            record(doc, {**cfg.as_dict(), "key": cfg.key, "status": f"skipped: {why}"})
            print(f"[{budget.elapsed():6.0f}s] {cfg.key:<40} skipped: {why}", flush=True)
            save_outputs(doc, args)
            continue
        group = [c for c in pending[:size] if not missing_dependency(c.switch, c.device)][:size]
        if budget.left() < sum(budget.estimate(doc, c) for c in group):
            print(f"[{budget.elapsed():6.0f}s] time budget: {len(pending)} configurations left for a later call "
                  f"(same command)", flush=True)
            break
        pending = [c for c in pending if c not in group]
        n += 1
        t0 = time.perf_counter()
        rows = run_group(group, args, budget, f"p{os.getpid()}_{n}")
        for cfg in group:
            row = rows.get(cfg.key)
            if row is None:
                print(f"[{budget.elapsed():6.0f}s] {cfg.key}: stopped at the time budget (not recorded)", flush=True)
                continue
            if len(group) == 1:
                row["process_s"] = time.perf_counter() - t0
            check_compiled_slices(doc, row, args, budget)
            record(doc, row)
            _print_row(row, budget)
        save_outputs(doc, args)
    save_outputs(doc, args, plot=True)
    with open(os.path.join(args.out, "table.md")) as f:
        print("\n" + f.read(), flush=True)
    print(f"done in {budget.elapsed():.0f}s; results in {args.out}", flush=True)
    return doc


if __name__ == "__main__":
    main()
