"""What to measure: the main comparison and the scaling sweeps, as lists of jobs grouped by model shape
(each shape is built once and serves all of its jobs)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .methods import MethodSpec, main_method, main_methods

FLOOR = main_method("floor")
LORA16 = main_method("lora_r16")


@dataclass(frozen=True)
class Job:
    model: str
    batch: int
    seq: int
    checkpointing: bool
    spec: MethodSpec
    sweep: Optional[str] = None   # r | seq | size (sweeps only)
    series: Optional[str] = None  # line the point belongs to in the sweep plot


def main_plan(models, batch_seqs, checkpointing=(False, True), r=64) -> dict[str, list[Job]]:
    return {m: [Job(m, b, t, ckpt, spec) for b, t in batch_seqs for ckpt in checkpointing for spec in main_methods(r)]
            for m in models}


def _ours(r, axis):
    return MethodSpec(f"ours_{axis}_r{r}", "ours", r, axis, "float32")


def sweep_plan(sweep_model: str, size_models, rs, seq_shapes, batch_seq=(4, 1024)) -> dict[str, list[Job]]:
    """size: floor / ours rows r64 / LoRA r16 per model; r: ours rows and columns per r (floor and LoRA r16
    as references); seq: floor / ours rows / ours columns / LoRA r16 per (batch, seq) of equal tokens.
    All without checkpointing. `sweep_model` goes last so the r and seq sweeps reuse its build."""
    b, t = batch_seq
    plan: dict[str, list[Job]] = {}
    for m in [m for m in size_models if m != sweep_model] + [sweep_model]:
        plan[m] = []
        if m in size_models:
            for spec, series in ((FLOOR, "frozen floor"), (_ours(64, "rows"), "ours rows r64"), (LORA16, "LoRA r16")):
                plan[m].append(Job(m, b, t, False, spec, "size", series))
    jobs = plan[sweep_model]
    jobs += [Job(sweep_model, b, t, False, FLOOR, "r", "frozen floor"), Job(sweep_model, b, t, False, LORA16, "r", "LoRA r16")]
    jobs += [Job(sweep_model, b, t, False, _ours(r, axis), "r", f"ours {axis}") for axis in ("rows", "columns") for r in rs]
    for bb, tt in seq_shapes:
        for spec, series in ((FLOOR, "frozen floor"), (_ours(64, "rows"), "ours rows r64"),
                             (_ours(64, "columns"), "ours columns r64"), (LORA16, "LoRA r16")):
            jobs.append(Job(sweep_model, bb, tt, False, spec, "seq", series))
    return plan
