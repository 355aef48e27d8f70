"""Benchmark suite of sprune_trainer (issue 7): memory and speed of sparse-neuron fine-tuning against the
frozen floor, LoRA, DoRA, masked sparse FT and full FT on random-init bf16 Llama shapes; plus importance
scoring cost, scaling sweeps and a profiler view. One command per suite, each well inside 9 minutes on
one H100 (80 GB):

    python benchmarks/run_all.py --out benchmarks/results/h100            # main comparison (~6-7 min)
    python benchmarks/run_all.py --sweep --out benchmarks/results/h100    # r / seq / model-size sweeps (~6 min)
    python benchmarks/run_all.py --profile --out benchmarks/results/h100  # torch.profiler, top kernels (~1 min)
    python benchmarks/run_all.py --smoke --out /tmp/bench-smoke           # tiny shapes on CPU (< 60 s)

Every run writes its JSON after each measurement (a run stopped by a time limit keeps what it measured) and
stops starting new measurements once `--budget-s` would be exceeded (those are recorded as "skipped")."""
from __future__ import annotations

import time

START = time.perf_counter()  # the time budget counts from here, imports included

import argparse  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: `benchmarks.*`

import torch  # noqa: E402

from benchmarks import methods, plans, report  # noqa: E402
from benchmarks.make_table import markdown  # noqa: E402
from benchmarks.measure import StepSettings, bench_config, release_memory  # noqa: E402
from benchmarks.plots import plot_main, plot_sweeps  # noqa: E402
from benchmarks.scoring import (COMMONSENSE_EXAMPLES, TOKENS_PER_EXAMPLE, epoch_seconds, measure_scoring,  # noqa: E402
                                needs_data)
from benchmarks.shapes import build_model, random_batch  # noqa: E402

MAIN_MODELS = ["llama3-8b", "llama2-7b", "llama3.2-1b"]  # the targets first
SIZE_MODELS = ["llama3.2-1b", "llama3.2-3b", "llama2-7b", "llama2-13b", "llama3-8b"]
CRITERIA = ["l2", "taylor", "taylor_elementwise", "hessian", "zeroth_order", "wanda"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", required=True, help="output folder (JSON, CSV, PNG, Markdown)")
    ap.add_argument("--sweep", action="store_true", help="run the scaling sweeps instead of the main comparison")
    ap.add_argument("--profile", action="store_true", help="run the profiler instead of the main comparison")
    ap.add_argument("--main", action="store_true", help="also run the main comparison with --sweep/--profile")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, 1+2 steps: checks the code paths")
    ap.add_argument("--models", default=None, help=f"comma list (main default {','.join(MAIN_MODELS)})")
    ap.add_argument("--batch-seq", default="4x1024", help="comma list of BxT for the main comparison")
    ap.add_argument("--checkpointing", default="off,on", help="off,on | off | on")
    ap.add_argument("--r", type=int, default=64, help="rows (columns) per layer for ours and masked SpFT")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per measurement")
    ap.add_argument("--no-autocast", action="store_true", help="run without bf16 autocast")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="model weights")
    ap.add_argument("--criteria", default=",".join(CRITERIA), help="importance criteria to time ('' = none)")
    ap.add_argument("--score-batches", type=int, default=3, help="calibration batches actually run per criterion")
    ap.add_argument("--score-target", type=int, default=50, help="calibration batches extrapolated to (paper: 50)")
    ap.add_argument("--score-micro-batches", default="0,1",
                    help="calibration_micro_batch_size values each data-driven criterion is measured at (0 = whole "
                         "batches); each row's peak is set against the training peak of ours rows at the same batch")
    ap.add_argument("--sweep-model", default="llama3-8b")
    ap.add_argument("--sweep-rs", default="8,16,32,64,128,256,512")
    ap.add_argument("--sweep-seqs", default="256,512,1024,2048,4096", help="at 4096 tokens per step")
    ap.add_argument("--size-models", default=",".join(SIZE_MODELS))
    ap.add_argument("--profile-model", default="llama3-8b")
    ap.add_argument("--profile-methods", default="floor,ours_rows_fp32,ours_cols_fp32,lora_r16")
    ap.add_argument("--trace", action="store_true", help="also write chrome traces (can be large)")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="start no measurement that would end after this many seconds from launch (estimated "
                         "from the last measurement of the same model)")
    ap.add_argument("--strict", action="store_true", help="raise on any non-OOM error (implied by --smoke)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.strict = True
        args.models = args.models or "tiny"
        args.batch_seq, args.warmup, args.steps, args.score_batches = "2x64", 1, 2, 2
        args.dtype, args.no_autocast = "float32", True  # bf16 matmuls are ~15x slower than fp32 on most CPUs
        args.sweep_model, args.size_models, args.profile_model = "tiny", "tiny", "tiny"
        args.sweep_rs, args.sweep_seqs = "8,64", "32,64,128"
    args.models = (args.models or ",".join(MAIN_MODELS)).split(",")
    args.batch_seq = [tuple(int(v) for v in bs.split("x")) for bs in args.batch_seq.split(",")]
    args.checkpointing = [{"off": False, "on": True}[c] for c in args.checkpointing.split(",")]
    args.criteria = [c for c in args.criteria.split(",") if c]
    args.score_micro_batches = [int(v) for v in args.score_micro_batches.split(",")]
    args.dtype = getattr(torch, args.dtype)
    return args


class Runner:
    """Builds each model shape once, runs its jobs, keeps the document on disk up to date."""

    def __init__(self, args, device, suite: str, path: str):
        self.args, self.device, self.path = args, device, path
        self.t0 = START
        self.settings = StepSettings(warmup=args.warmup, steps=args.steps, autocast=not args.no_autocast)
        self.doc = {"meta": {**report.environment(device), "suite": suite, "argv": sys.argv[1:],
                             "settings": {**vars(self.settings), "dtype": str(args.dtype).removeprefix("torch.")}, "budget_s": args.budget_s,
                             "epoch_assumption": f"one epoch = {COMMONSENSE_EXAMPLES:,} examples (commonsense_170k) x "
                                                 f"{TOKENS_PER_EXAMPLE} tokens, at our rows-r{args.r} tokens/s"},
                    "methods_doc": methods.__doc__, "models": {}, "runs": [], "scoring": []}
        self.seen: dict[tuple, dict] = {}
        self.last_wall: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def fits(self, estimate: float) -> bool:
        return self.elapsed() + estimate <= self.args.budget_s

    def save(self):
        report.add_ratios(self.doc["runs"])
        report.write_json(self.doc, self.path)

    def run_model(self, name: str, jobs: list[plans.Job], score: bool = False):
        if not jobs or not self.fits(self.last_wall.get("any", 0.0)):
            self._skip(jobs)
            return
        release_memory(self.device)
        model, info = build_model(name, self.device, self.args.dtype)
        gc.freeze()  # the model and libraries: long-lived, so each run's gc.collect() skips them
        self.doc["models"][name] = info
        print(f"[{self.elapsed():6.0f}s] built {name}: {info['params'] / 1e9:.2f} B params in {info['build_s']:.1f}s",
              flush=True)
        for job in jobs:
            key = (job.model, job.batch, job.seq, job.checkpointing, job.spec)
            if key in self.seen:  # the same measurement in another sweep: reuse it
                row = dict(self.seen[key])
            elif not self.fits(self.last_wall.get(name, 0.0)):
                row = self._skipped_row(job)
            else:
                batch = random_batch(model.config.vocab_size, job.batch, job.seq, self.device)
                row = bench_config(model, job.spec, batch, job.checkpointing, self.settings, self.device,
                                   strict=self.args.strict)
                del batch
                row["model"] = name
                self.seen[key] = row
                self.last_wall[name] = self.last_wall["any"] = row["wall_s"]
                self._print(row)
                if row.pop("model_left_modified", False):
                    gc.unfreeze()
                    del model
                    release_memory(self.device)
                    model, _ = build_model(name, self.device, self.args.dtype)
                    gc.freeze()
            row.update(model=name, sweep=job.sweep, series=job.series, model_params=info["params"])
            self.doc["runs"].append(row)
            self.save()
        if score:
            self.score(name, model)
        gc.unfreeze()  # let the next collection see the model's objects again
        del model
        release_memory(self.device)

    def score(self, name, model):
        vocab = model.config.vocab_size
        b, t = self.args.batch_seq[0]
        trained = {r["checkpointing"]: r for r in self.doc["runs"] if r["model"] == name and r["status"] == "ok"
                   and r["method"] == "ours_rows_fp32" and (r["batch"], r["seq"]) == (b, t)}
        ours = trained.get(False, trained.get(True))
        jobs = [(crit, mb) for crit in self.args.criteria
                for mb in (self.args.score_micro_batches if needs_data(crit) else [0])]
        for crit, mb in jobs:
            if not self.fits(4 * self.last_wall.get(name, 0.0)):
                self.doc["scoring"].append({"model": name, "criterion": crit, "micro_batch_size": mb,
                                            "status": "skipped"})
                continue
            batches = [random_batch(vocab, b, t, self.device, seed=100 + i) for i in range(self.args.score_batches)]
            row = measure_scoring(model, crit, batches, self.args.score_target, self.device, micro_batch_size=mb)
            del batches
            row["model"] = name
            for ckpt, key in ((False, "train_peak_bytes"), (True, "train_peak_bytes_ckpt")):
                if trained.get(ckpt, {}).get("peak_bytes") and row.get("peak_bytes"):
                    row[key] = trained[ckpt]["peak_bytes"]
                    row[key.replace("train_peak_bytes", "peak_x_training")] = row["peak_bytes"] / row[key]
            if ours is not None and row["status"] == "ok":
                row["epoch_s"] = epoch_seconds(ours["tokens_per_s"])
                row["epoch_tokens_per_s"] = ours["tokens_per_s"]
                row["fraction_of_epoch"] = row["seconds_extrapolated"] / row["epoch_s"]
            self.doc["scoring"].append(row)
            if row["status"] == "ok":
                msg = (f"{row['seconds_measured']:.1f}s for {row['batches_measured']} batches -> "
                       f"{row['seconds_extrapolated']:.1f}s for {row['target_batches']}")
                if row.get("fraction_of_epoch") is not None:
                    msg += f" = {100 * row['fraction_of_epoch']:.2f}% of an epoch"
            else:
                msg = row["status"]
            if row.get("peak_x_training") is not None:
                msg += f"; peak {row['peak_bytes'] / 2**30:.2f} GiB = {row['peak_x_training']:.2f}x training"
            print(f"[{self.elapsed():6.0f}s] {name} scoring {crit} (micro-batch {mb or 'whole'}): {msg}", flush=True)
            self.save()

    def _skipped_row(self, job):
        return {"method": job.spec.name, "label": job.spec.label, "kind": job.spec.kind, "r": job.spec.r,
                "axis": job.spec.axis, "state": job.spec.state, "batch": job.batch, "seq": job.seq,
                "checkpointing": job.checkpointing, "status": "skipped", "error": "time budget"}

    def _skip(self, jobs):
        for job in jobs:
            row = self._skipped_row(job)
            row.update(model=job.model, sweep=job.sweep, series=job.series)
            self.doc["runs"].append(row)
        self.save()

    def _print(self, r):
        head = (f"[{self.elapsed():6.0f}s] {r['model']} {r['batch']}x{r['seq']} ckpt={'on ' if r['checkpointing'] else 'off'} "
                f"{r['label']:<26}")
        if r["status"] != "ok":
            print(f"{head} {r['status'].upper()}: {r.get('error', '')[:120]}", flush=True)
            return
        mem = "" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**30:7.2f} GiB  "
        print(f"{head} {mem}{r['tokens_per_s']:10,.0f} tok/s  (wall {r['wall_s']:.1f}s)", flush=True)


def run_main(args, device):
    path = os.path.join(args.out, "results.json")
    runner = Runner(args, device, "main", path)
    for name, jobs in plans.main_plan(args.models, args.batch_seq, args.checkpointing, args.r).items():
        runner.run_model(name, jobs, score=True)
    report.write_csv(runner.doc["scoring"], report.SCORING_COLUMNS, os.path.join(args.out, "scoring.csv"))
    _write_outputs(runner, args.out, "results", plot_main)
    return runner


def _write_outputs(runner, out, stem, plot):
    """<stem>.csv, .png and .md (the table is printed too) from the runs measured so far."""
    report.write_csv(runner.doc["runs"], report.RUN_COLUMNS, os.path.join(out, f"{stem}.csv"))
    plot(runner.doc["runs"], os.path.join(out, f"{stem}.png"))
    table = markdown(runner.doc)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(table)
    print("\n" + table, flush=True)


def run_sweep(args, device):
    path = os.path.join(args.out, "sweep.json")
    runner = Runner(args, device, "sweep", path)
    rs = [int(v) for v in args.sweep_rs.split(",")]
    tokens = args.batch_seq[0][0] * args.batch_seq[0][1]
    seq_shapes = [(max(1, tokens // int(t)), int(t)) for t in args.sweep_seqs.split(",")]
    plan = plans.sweep_plan(args.sweep_model, args.size_models.split(","), rs, seq_shapes, args.batch_seq[0])
    for name, jobs in plan.items():
        runner.run_model(name, jobs)
    _write_outputs(runner, args.out, "sweep", plot_sweeps)
    return runner


def run_profile(args, device):
    from benchmarks.methods import main_method
    from benchmarks.profile_step import profile_method

    wanted = [main_method(n, args.r) for n in args.profile_methods.split(",")]
    model, info = build_model(args.profile_model, device, args.dtype)
    gc.freeze()
    b, t = args.batch_seq[0]
    batch = random_batch(model.config.vocab_size, b, t, device)
    reports = []
    for spec in wanted:
        trace = os.path.join(args.out, f"trace_{spec.name}.json") if args.trace else None
        text = profile_method(model, spec, batch, False, device, autocast=not args.no_autocast,
                              steps=2 if args.smoke else 3, trace_path=trace)
        print(text + "\n", flush=True)
        reports.append(text)
    gc.unfreeze()
    head = f"{report.environment(device)['gpu']}, {args.profile_model}, batch {b} x seq {t}\n\n"
    with open(os.path.join(args.out, "profile.txt"), "w") as f:
        f.write(head + "\n\n".join(reports))
    del model
    release_memory(device)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # tiny shapes: threads only add overhead (30x on a loaded 2-core box)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run on the GPU machine, or use --smoke for the CPU check")
        device = torch.device("cuda", 0)
    print(f"device: {report.environment(device)['gpu']}; torch {torch.__version__}", flush=True)
    run_main_suite = args.main or not (args.sweep or args.profile)
    if run_main_suite:
        run_main(args, device)
    if args.sweep:
        run_sweep(args, device)
    if args.profile:
        run_profile(args, device)
    print(f"done in {time.perf_counter() - START:.0f}s; results in {args.out}", flush=True)


if __name__ == "__main__":
    main()
