#!/usr/bin/env python
"""Operator calls per training step, method by method (torch.profiler, CPU or GPU): what the fused sliced matmul
and the batched optimizer steps remove. On a GPU most of these calls launch a kernel, and with hundreds of slices
a step of small kernels is bound by launches, not by arithmetic; the counts do not depend on the device.

    python benchmarks/op_counts.py --shape tiny               # CPU, seconds
    python benchmarks/op_counts.py --shape llama2-7b --device cuda

Counted: every `aten::` call recorded in one step (nested calls included, the same way for every method), split
into the step's forward, backward and optimizer parts."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from benchmarks.measure import prepared_method, sync  # noqa: E402
from benchmarks.methods import MethodSpec, main_method  # noqa: E402
from benchmarks.shapes import build_model, random_batch  # noqa: E402

PARTS = ("forward", "backward", "optimizer")


# (method of the main comparison, SliceAdamW's batched steps on?): each change next to the path it replaces, then
# the references with their own optimizer settings (None: foreach left as set up): PEFT adds dropout, A, B and a
# scale per linear (DoRA a weight norm too), full FT a weight gradient per linear
VARIANTS = (("floor", True), ("ours_rows_fp32_unfused", False), ("ours_rows_fp32", True),
            ("ours_cols_fp32_unfused", False), ("ours_cols_fp32", True), ("ours_rows_int8", False),
            ("ours_rows_int8", True), ("lora_r16", None), ("dora_r16", None), ("full_ft", None))


def variants(r: int) -> list[tuple[MethodSpec, Optional[bool]]]:
    return [(main_method(name, r), batched) for name, batched in VARIANTS]


def count_step(model, spec: MethodSpec, batched: Optional[bool], batch: dict, device) -> dict[str, int]:
    with prepared_method(model, spec, checkpointing=False, lr=1e-5) as prepared:
        if prepared.optimizer is not None and batched is not None:
            for group in prepared.optimizer.param_groups:
                group["foreach"] = batched

        def step():
            with record_function("forward"), torch.autocast(device.type, dtype=torch.bfloat16):
                loss = prepared.model(**batch).loss
            with record_function("backward"):
                loss.backward()
            with record_function("optimizer"):
                if prepared.optimizer is not None:
                    prepared.optimizer.step()
                    prepared.optimizer.zero_grad(set_to_none=True)

        step()  # warm-up: lazy state, caches
        sync(device)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
            sync(device)
    events = prof.events()
    spans = {e.name: (e.time_range.start, e.time_range.end) for e in events if e.name in PARTS}
    counts = dict.fromkeys(PARTS, 0)
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        for part, (start, end) in spans.items():
            if start <= e.time_range.start <= end:  # backward ops run on the autograd thread: by time, not stack
                counts[part] += 1
    counts["total"] = sum(counts[p] for p in PARTS)
    return counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--batch-seq", default="2x64")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    b, t = (int(v) for v in args.batch_seq.split("x"))
    model, info = build_model(args.shape, device)
    batch = random_batch(model.config.vocab_size, b, t, device)
    print(f"aten calls per training step, {args.shape} ({info['params'] / 1e6:.1f} M params, "
          f"{info['num_hidden_layers']} layers x 7 projections), r = {args.r}, batch {b} x {t}, {device}")
    print(f"| method | optimizer steps | {' | '.join(PARTS)} | total |\n|---|---|---:|---:|---:|---:|")
    rows = []
    for spec, batched in variants(args.r):
        c = count_step(model, spec, batched, batch, device)
        rows.append((spec, batched, c))
        mode = "-" if spec.kind == "floor" else "AdamW" if batched is None else "batched" if batched else "per slice"
        print(f"| {spec.label} | {mode} | {' | '.join(str(c[p]) for p in PARTS)} | {c['total']} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
