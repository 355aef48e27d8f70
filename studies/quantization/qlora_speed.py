#!/usr/bin/env python
"""NF4 bases: peak memory and tokens/s of ours (row slices over bitsandbytes Linear4bit) against QLoRA (PEFT LoRA
r16 over the same Linear4bit) at the same trainable-parameter count, and the frozen NF4 floor, side by side in
one run (issue 6). Random-init bf16 Llama shapes whose seven projections are quantized to NF4 (blocksize 64,
compute bf16, uint8 storage: QLoRA's setup); measured by the same code as the main suite (benchmarks/measure.py).

    python studies/quantization/qlora_speed.py --shapes smollm2-135m,llama2-7b --out $OUT/qlora_speed.json

Equal parameters: LoRA r16 trains sum 16 * (d_in + d_out); ours r rows train sum r * d_in; r is the nearest
integer to equal (the table shows both counts)."""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.measure import StepSettings, bench_config, release_memory  # noqa: E402
from benchmarks.methods import MethodSpec, target_layers  # noqa: E402
from benchmarks.report import environment, write_json  # noqa: E402
from benchmarks.shapes import build_model, quantize_targets, random_batch  # noqa: E402


def equal_rows(model, lora_r: int) -> int:
    """Rows per layer that train as many numbers as LoRA rank `lora_r` on the same projections."""
    layers = target_layers(model).values()
    lora = sum(lora_r * (m.in_features + m.out_features) for m in layers)
    return max(1, round(lora / sum(m.in_features for m in layers)))


def specs(r: int) -> list[MethodSpec]:
    return [MethodSpec("floor_nf4", "floor"),
            MethodSpec(f"ours_rows_r{r}_nf4", "ours", r, "rows", "float32"),
            MethodSpec(f"ours_rows_r{r}_nf4_int8", "ours", r, "rows", "int8"),
            MethodSpec("qlora_r16", "lora", 16)]


def _gib(row) -> str:
    return "n/a" if row.get("peak_bytes") is None else f"{row['peak_bytes'] / 2**30:.2f}"


def _ratio(row, ref) -> str:
    return "n/a" if row.get("peak_bytes") is None else f"{row['peak_bytes'] / ref['peak_bytes']:.3f}"


def table(rows: list[dict]) -> str:
    out = ["| shape | ckpt | method | trained params | peak GiB | × QLoRA | tokens/s | × QLoRA | × floor |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("status") != "ok":
            out.append(f"| {r['model']} | {'on' if r['checkpointing'] else 'off'} | {r['label']} | | {r['status']} | | | | |")
            continue
        ref = next(x for x in rows if x["model"] == r["model"] and x["checkpointing"] == r["checkpointing"]
                   and x["kind"] == "lora" and x.get("status") == "ok")
        floor = next(x for x in rows if x["model"] == r["model"] and x["checkpointing"] == r["checkpointing"]
                     and x["kind"] == "floor")
        out.append(f"| {r['model']} | {'on' if r['checkpointing'] else 'off'} | {r['label']} | "
                   f"{r['trainable_params'] / 1e6:.2f} M | {_gib(r)} | {_ratio(r, ref)} | {r['tokens_per_s']:,.0f} | "
                   f"{r['tokens_per_s'] / ref['tokens_per_s']:.3f} | {r['tokens_per_s'] / floor['tokens_per_s']:.3f} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="smollm2-135m,llama2-7b")
    ap.add_argument("--batch-seq", default="4x1024")
    ap.add_argument("--checkpointing", default="off,on")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    b, t = (int(v) for v in args.batch_seq.split("x"))
    settings = StepSettings(warmup=args.warmup, steps=args.steps, autocast=device.type == "cuda")
    doc = {"meta": {**environment(device), "batch": b, "seq": t, "settings": vars(settings)}, "runs": []}
    for shape in args.shapes.split(","):
        release_memory(device)
        model, info = build_model(shape, device)
        n = quantize_targets(model)
        release_memory(device)
        r = equal_rows(model, 16)
        doc["meta"][shape] = {**info, "nf4_projections": n, "rows_for_lora_r16_params": r}
        batch = random_batch(model.config.vocab_size, b, t, device)
        for ckpt in [c == "on" for c in args.checkpointing.split(",")]:
            for spec in specs(r):
                row = bench_config(model, spec, batch, ckpt, settings, device, strict=True)
                row["model"] = shape
                doc["runs"].append(row)
                print(f"{shape} ckpt={ckpt} {spec.label}: {row.get('status')} "
                      f"{(row.get('peak_bytes') or 0) / 2**30:.2f} GiB {row.get('tokens_per_s', 0):,.0f} tok/s", flush=True)
                write_json(doc, args.out)
        del model, batch
    doc["table_md"] = table(doc["runs"])
    write_json(doc, args.out)
    print(doc["table_md"])


if __name__ == "__main__":
    main()
