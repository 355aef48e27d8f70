"""Importance scoring at its defaults against checkpointed training, at the Llama-2-7B and Llama-3-8B shapes on one
GPU, through SparseNeuronTrainer: scoring's peak memory and time next to the training peak of the same run.

    python studies/scoring_cost/measure.py --out studies/scoring_cost/results/h100 --budget-s 500
    python studies/scoring_cost/measure.py --smoke --out /tmp/scoring_cost      # CPU, tiny shape: checks the code

Every measurement is a fresh process of this script (`--job`), so each peak is its own; a job's output goes to
<out>/logs/<name>.log (files, not pipes), its result to <out>/jobs/<name>.json. Per shape (random-init bf16
weights, benchmarks/shapes.py), batch --batch x --seq, gradient checkpointing on with the Trainer's default
settings, rows r = 64 on q/k/v/o/gate/up/down:
  train   importance='random' (no scoring): --train-steps optimizer steps; peak over train(), median step time;
  <crit>  prepare_sparse_model() with the criterion at the config's defaults (calibration_micro_batch_size 'auto');
          peak over it; time from --calibration-batches batches extrapolated to --target-batches (the default 50) as
          benchmarks/scoring.py does; the part sizes scoring used.
A job that would start with less than --min-job-s left of --budget-s is skipped; one still running when the budget
ends is killed. results.json (settings, jobs, summary) and results.csv (the summary): per (shape, criterion) the
scoring peak over the training peak (target <= 1: met / missed) and the scoring time in training steps and as a
share of a commonsense_170k epoch."""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # a checkout that is not installed (the GPU machine)
    sys.path.insert(0, ROOT)

CRITERIA = ("taylor", "hessian", "taylor_elementwise", "zeroth_order", "wanda")
NEURONS = 64  # the paper's r


def job_list(a) -> list[dict]:
    common = dict(device=a.device, batch=a.batch, seq=a.seq, micro=a.micro)
    jobs = []
    for shape in a.shapes.split(","):
        jobs.append(dict(common, name=f"{shape}-train", kind="train", shape=shape, steps=a.train_steps))
        for crit in a.criteria.split(","):
            jobs.append(dict(common, name=f"{shape}-{crit}", kind="score", shape=shape, criterion=crit,
                             calibration_batches=a.calibration_batches, target_batches=a.target_batches))
    return jobs


# ---- one job, in its own process -------------------------------------------------------------------------

def run_job(job: dict) -> dict:
    import torch
    from benchmarks.measure import is_oom, peak_bytes, sync
    from benchmarks.shapes import SHAPES, build_model

    device = torch.device(job["device"])
    model, info = build_model(job["shape"], device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    row = {"name": job["name"], "kind": job["kind"], "shape": job["shape"], "criterion": job.get("criterion"),
           "batch": job["batch"], "seq": job["seq"], "params": info["params"], "status": "ok"}
    data = RandomTokens(job["batch"] * max(job.get("steps", 0), job.get("calibration_batches", 0)), job["seq"],
                        SHAPES[job["shape"]]["vocab_size"])
    measure = measure_training if job["kind"] == "train" else measure_scoring
    trainer = make_trainer(job, model, data)
    row["checkpointing_kwargs"] = repr(getattr(trainer.args, "activation_checkpointing_kwargs",
                                               getattr(trainer.args, "gradient_checkpointing_kwargs", None)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        row.update(measure(trainer, job, device, sync))
    except Exception as exc:  # noqa: BLE001  (an out-of-memory is a result; anything else fails the job)
        if not is_oom(exc):
            raise
        row.update(status="oom", error=str(exc).splitlines()[0][:300])
    row["peak_bytes"] = peak_bytes(device)
    return row


def make_trainer(job: dict, model, data):
    import dataclasses
    import tempfile

    from transformers import TrainingArguments

    from benchmarks.scoring import config_fields
    from sprune_trainer import SparseNeuronConfig, SparseNeuronTrainer

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    cuda = job["device"].startswith("cuda")
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=job["batch"],
                             max_steps=job.get("steps", 1), learning_rate=1e-4, lr_scheduler_type="constant",
                             bf16=cuda, use_cpu=not cuda, report_to="none", save_strategy="no", logging_steps=1,
                             disable_tqdm=True, dataloader_num_workers=0, seed=0, **{checkpointing: True})
    fields = {"importance": "random"} if job["kind"] == "train" else dict(
        config_fields(job["criterion"]), calibration_batches=job["calibration_batches"])
    if job["kind"] == "score" and job["micro"] != "default":
        fields["calibration_micro_batch_size"] = int(job["micro"]) if job["micro"].isdigit() else job["micro"]
    return SparseNeuronTrainer(model=model, args=args, train_dataset=data,
                               sparse_config=SparseNeuronConfig(neurons_per_layer=NEURONS, **fields))


def measure_training(trainer, job, device, sync) -> dict:
    from transformers import TrainerCallback

    trainer.prepare_sparse_model()  # random rows: no scoring inside the measured span
    if device.type == "cuda":
        import torch
        torch.cuda.reset_peak_memory_stats(device)
    steps: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync(device)
            steps.append(-time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            steps[-1] += time.perf_counter()

    trainer.add_callback(StepTimes())
    trainer.train()
    steady = sorted(steps[1:] or steps)
    step_s = steady[len(steady) // 2]
    return {"steps": len(steps), "step_s": step_s, "tokens_per_s": job["batch"] * job["seq"] / step_s}


def measure_scoring(trainer, job, device, sync) -> dict:
    from benchmarks.scoring import extrapolated, stamped
    from sprune_trainer._hf_internals import model_checkpoints

    stamps: list[float] = []
    parts: list[int] = []
    checkpointed: list[bool] = []
    batches, loss = trainer._calibration_batches, trainer._calibration_loss

    def counted_loss(model, part):
        parts.append(int(part["input_ids"].shape[0]))
        checkpointed.append(model_checkpoints(model))
        return loss(model, part)
    trainer._calibration_batches = lambda: stamped(batches(), device, stamps)
    trainer._calibration_loss = counted_loss
    notes = LogNotes("sprune_trainer")
    sync(device)
    t0 = time.perf_counter()
    trainer.prepare_sparse_model()
    sync(device)
    end = time.perf_counter()
    return {"seconds_measured": end - t0, "part_sizes": parts, "largest_part": max(parts),
            "scored_with_checkpointing": all(checkpointed),
            "auto_notes": notes.messages("calibration_micro_batch_size"),
            **extrapolated(t0, stamps, end, job["target_batches"])}


class LogNotes(logging.Handler):
    """Keeps the INFO records of a logger (the auto micro-batch choice is logged there)."""

    def __init__(self, name: str):
        super().__init__(logging.INFO)
        self.records: list[str] = []
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(self)

    def emit(self, record):
        self.records.append(record.getMessage())

    def messages(self, containing: str) -> list[str]:
        return [m for m in self.records if containing in m]


class RandomTokens:
    """n seeded sequences of uniform random tokens, labels = inputs (a map-style dataset)."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0):
        import torch
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def child(job_json: str, result_path: str) -> int:
    job = json.loads(job_json)
    try:
        row = run_job(job)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        row = {"name": job["name"], "kind": job["kind"], "shape": job["shape"], "criterion": job.get("criterion"),
               "status": "error", "error": f"{type(exc).__name__}: {exc}"[:300]}
    with open(result_path, "w") as f:
        json.dump(row, f, indent=1)
    return 0 if row["status"] != "error" else 1


# ---- the parent: jobs one after the other, then the summary ----------------------------------------------

def launch(job: dict, out: str, seconds_left: float) -> dict:
    logs, results = os.path.join(out, "logs"), os.path.join(out, "jobs")
    os.makedirs(logs, exist_ok=True)
    os.makedirs(results, exist_ok=True)
    result = os.path.join(results, f"{job['name']}.json")
    if os.path.exists(result):
        os.remove(result)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    with open(os.path.join(logs, f"{job['name']}.log"), "w") as sink:
        try:
            subprocess.run([sys.executable, os.path.abspath(__file__), "--job", json.dumps(job), "--result", result],
                           stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=seconds_left)
        except subprocess.TimeoutExpired:
            return dict(_identity(job), status="timeout", wall_s=time.perf_counter() - t0)
    if not os.path.exists(result):
        return dict(_identity(job), status="error", error="no result (see its log)", wall_s=time.perf_counter() - t0)
    with open(result) as f:
        return dict(json.load(f), wall_s=time.perf_counter() - t0)


def _identity(job: dict) -> dict:
    return {k: job.get(k) for k in ("name", "kind", "shape", "criterion")}


def summarize(rows: list[dict]) -> list[dict]:
    """Per scoring job: its peak over its shape's training peak, and its time in training steps / epoch share."""
    from benchmarks.scoring import epoch_seconds

    train = {r["shape"]: r for r in rows if r["kind"] == "train" and r.get("status") == "ok"}
    out = []
    for r in rows:
        if r["kind"] != "score":
            continue
        t = train.get(r["shape"], {})
        s = {"shape": r["shape"], "criterion": r["criterion"], "status": r.get("status"),
             "largest_part": r.get("largest_part"), "scoring_peak_gib": _gib(r.get("peak_bytes")),
             "training_peak_gib": _gib(t.get("peak_bytes")), "scoring_s": r.get("seconds_extrapolated"),
             "train_step_s": t.get("step_s")}
        if r.get("status") == "ok" and t.get("peak_bytes") and r.get("peak_bytes") is not None:
            s["peak_ratio"] = r["peak_bytes"] / t["peak_bytes"]
            s["peak_target"] = "met" if s["peak_ratio"] <= 1.0 else "missed"
        elif r.get("status") == "oom":
            s["peak_target"] = "missed"
        if s["scoring_s"] is not None and t.get("step_s"):
            s["scoring_in_train_steps"] = s["scoring_s"] / t["step_s"]
            s["pct_of_commonsense_epoch"] = 100 * s["scoring_s"] / epoch_seconds(t["tokens_per_s"])
        out.append(s)
    return out


def _gib(b):
    return None if b is None else b / 2**30


def environment() -> dict:
    import torch
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--shapes", default="llama2-7b,llama3-8b", help="names in benchmarks/shapes.py")
    ap.add_argument("--criteria", default=",".join(CRITERIA))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro", default="default", help="calibration_micro_batch_size: default (the config's), "
                                                       "auto, or a number")
    ap.add_argument("--calibration-batches", type=int, default=4, help="batches scored; time extrapolated from them")
    ap.add_argument("--target-batches", type=int, default=50, help="the config's default calibration_batches")
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget-s", type=float, default=500.0, help="wall time for all jobs")
    ap.add_argument("--min-job-s", type=float, default=45.0, help="a job starts only with this much budget left")
    ap.add_argument("--smoke", action="store_true", help="CPU, the tiny shape, 2 x 16 tokens, few batches")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.job:
        sys.exit(child(a.job, a.result))
    if not a.out:
        ap.error("--out is required")
    if a.smoke:
        a.device, a.shapes, a.batch, a.seq, a.min_job_s = "cpu", "tiny", 2, 16, 0.0
        a.calibration_batches, a.target_batches, a.train_steps = 2, 3, 2
    deadline = time.perf_counter() + a.budget_s
    rows = []
    for job in job_list(a):
        left = deadline - time.perf_counter()
        if left < max(a.min_job_s, 1.0):
            rows.append(dict(_identity(job), status="skipped"))
            continue
        rows.append(launch(job, a.out, left))
        print(f"{job['name']}: {rows[-1].get('status')} ({rows[-1].get('wall_s', 0):.0f} s)", flush=True)
    summary = summarize(rows)
    settings = {k: v for k, v in vars(a).items() if k not in ("job", "result", "out")}
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"environment": environment(), "settings": settings, "jobs": rows, "summary": summary}, f, indent=1)
    with open(os.path.join(a.out, "results.csv"), "w", newline="") as f:
        columns = sorted({k for s in summary for k in s}, key=lambda k: list(summary[0]).index(k)
                         if summary and k in summary[0] else 99)
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(summary)
    return summary


if __name__ == "__main__":
    main()
