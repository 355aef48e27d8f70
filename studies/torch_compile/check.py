"""Compiled training against eager training on a GPU, through the Trainer: do the slices move, and as eager ones do?

    python studies/torch_compile/check.py --out studies/torch_compile/results/h100 [--variants a,b,...]

Each variant runs in its own process (a crash or a compile cache stays there), on a Llama-3-8B-width model with
`--layers` decoder layers, random-init weights, batch 4 x 1024, random rows / columns r = 64 on q/k/v/o/gate/up/down
(random: the same neurons whatever the dtype), lr 1e-4 constant, `--steps` optimizer steps over the same seeded
batches. Every variant saves its slices; the parent compares each compiled bf16 run with its eager bf16 twin per
slice, against the fp32 truth: the same eager run on the same (bf16-valued) weights in float32 without autocast.
Pass: every slice moved, and the compiled run's largest per-slice distance from the fp32 truth is at most twice the
eager run's (the compiler fuses ops and rounds to bf16 in other places, so its bf16 error differs from eager's in
where it falls, not in size).
`inplace_compiled` forces the eager in-place update while compiling (what the library did before compiling took
the out-of-place form): on torch 2.11 it must stop at step 1 with SlicesNotTrainingError.
Writes results.json, results.csv and log.txt under --out. Runs are concurrent (--jobs), so no speed is reported."""
from __future__ import annotations

import argparse
import csv
import faulthandler
import json
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

# name -> (axis, recompute_slice_inputs, compiled, options)
VARIANTS = {
    "eager_rows_rebuild": ("rows", None, False, {}),
    "eager_rows_saved": ("rows", False, False, {}),
    "eager_columns": ("columns", None, False, {}),
    "fp32_rows": ("rows", False, False, {"fp32": True}),
    "fp32_columns": ("columns", None, False, {"fp32": True}),
    "compiled_rows_rebuild": ("rows", None, True, {}),
    "compiled_rows_saved": ("rows", False, True, {}),
    "compiled_columns": ("columns", None, True, {}),
    "inplace_compiled": ("rows", False, True, {"inplace": True}),
    "liger_eager_rows": ("rows", None, False, {"liger": True}),
    "liger_compiled_rows": ("rows", None, True, {"liger": True}),
    "lora_liger_compiled": (None, None, True, {"liger": True, "lora": True}),
}
TWINS = {"compiled_rows_rebuild": "eager_rows_rebuild", "compiled_rows_saved": "eager_rows_saved",
         "compiled_columns": "eager_columns", "liger_compiled_rows": "liger_eager_rows"}
TRUTH = {"rows": "fp32_rows", "columns": "fp32_columns"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


SLICES = "/tmp/compile_check/slices"  # ~20 MB a run at 2 layers: kept on the machine, compared there


def worker(name: str, layers: int, steps: int, tiny: bool) -> dict:
    import torch
    from transformers import LlamaConfig, AutoModelForCausalLM, Trainer, TrainingArguments
    from safetensors.torch import save_file

    from sprune_trainer import SparseNeuronConfig, SparseNeuronTrainer
    from sprune_trainer.layers import sliced_matmul

    axis, recompute, compiled, opts = VARIANTS[name]
    if opts.get("inplace"):
        sliced_matmul.updates_output_in_place = lambda: True
    widths = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                  vocab_size=128256, seq=1024, r=64)
    if tiny:  # a CPU dry run of this script's plumbing
        widths = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=256, seq=16, r=8)
    device = torch.device("cpu" if tiny else "cuda")
    seq, r = widths.pop("seq"), widths.pop("r")
    config = LlamaConfig(**widths, num_hidden_layers=layers, rope_theta=500000.0, max_position_embeddings=8192,
                         use_cache=False, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    bf16 = not opts.get("fp32")
    if not bf16:
        model.float()  # the same bf16-valued weights, computed in float32
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (4 * steps, seq), generator=g)
    data = [{"input_ids": row, "labels": row.clone()} for row in ids]
    args = TrainingArguments(output_dir=os.path.join("/tmp/compile_check", name), per_device_train_batch_size=4,
                             max_steps=steps, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
                             weight_decay=0.0, bf16=bf16, logging_steps=1, save_strategy="no", report_to="none",
                             disable_tqdm=True, seed=0, torch_compile=compiled, use_liger_kernel=bool(opts.get("liger")),
                             dataloader_num_workers=0, use_cpu=tiny)
    if opts.get("lora"):
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))
        trainer = Trainer(model=model, args=args, train_dataset=data)
    else:
        cfg = SparseNeuronConfig(importance="random", neurons_per_layer=r, axis=axis, target_modules=TARGETS,
                                 recompute_slice_inputs=recompute)
        trainer = SparseNeuronTrainer(model=model, args=args, train_dataset=data, sparse_config=cfg)
    if not tiny:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = {"variant": name, "axis": axis, "recompute_slice_inputs": recompute, "compiled": compiled, **opts,
              "torch": torch.__version__, "device": "cpu (tiny)" if tiny else torch.cuda.get_device_name()}
    try:
        trainer.train()
        result["status"] = "trained"
    except Exception as e:  # recorded, not hidden: the parent reports it
        result["status"] = f"{type(e).__name__}: {str(e)[:400]}"
        result["traceback_tail"] = traceback.format_exc()[-1500:]
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["peak_gib"] = None if tiny else round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["losses"] = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    result["grad_norms"] = [round(float(h["grad_norm"]), 4) for h in trainer.state.log_history if "grad_norm" in h]
    trained = {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    result["trainable_tensors"] = len(trained)
    result["sum_abs_trained"] = float(sum(t.abs().sum() for t in trained.values()))
    if not opts.get("lora"):
        os.makedirs(SLICES, exist_ok=True)
        save_file(trained, os.path.join(SLICES, f"{name}.safetensors"))
    return result


def rel_diff(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare(results: dict) -> list[dict]:
    from safetensors.torch import load_file
    loaded = {}

    def slices(name):
        if name not in loaded:
            path = os.path.join(SLICES, f"{name}.safetensors")
            loaded[name] = load_file(path) if os.path.exists(path) else None
        return loaded[name]

    rows = []
    for compiled, eager in TWINS.items():
        if compiled not in results or eager not in results:
            continue
        c, e, t = slices(compiled), slices(eager), slices(TRUTH[VARIANTS[compiled][0]])
        if c is None or e is None or t is None:
            continue
        for n in e:
            err_c, err_e = rel_diff(c[n], t[n]), rel_diff(e[n], t[n])
            rows.append({"compiled": compiled, "eager": eager, "slice": n, "rel_diff_compiled_eager": rel_diff(c[n], e[n]),
                         "err_compiled_vs_fp32": err_c, "err_eager_vs_fp32": err_e,
                         "compiled_sum_abs": float(c[n].abs().sum()), "eager_sum_abs": float(e[n].abs().sum()),
                         "moved": bool(c[n].abs().sum() > 0)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--jobs", type=int, default=3)
    p.add_argument("--watchdog", type=float, default=240, help="seconds before a run is dumped and ended (0: never)")
    p.add_argument("--tiny", action="store_true", help="CPU dry run on a tiny model (checks this script only)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.worker:
        if a.watchdog > 0:  # a hung compile or kernel prints every thread's stack and ends the run
            faulthandler.dump_traceback_later(a.watchdog, exit=True)
        print(json.dumps(worker(a.worker, a.layers, a.steps, a.tiny)), flush=True)
        return
    names = [n for n in a.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    path = os.path.join(a.out, "results.json")
    results = json.load(open(path))["runs"] if os.path.exists(path) else {}
    log = open(os.path.join(a.out, "log.txt"), "a")
    pending = list(names)
    running = []
    os.makedirs(SLICES, exist_ok=True)
    while pending or running:
        while pending and len(running) < a.jobs:
            n = pending.pop(0)
            cmd = [sys.executable, __file__, "--out", a.out, "--layers", str(a.layers), "--steps", str(a.steps),
                   "--watchdog", str(a.watchdog), "--worker", n] + (["--tiny"] if a.tiny else [])
            # output to a file: a chatty run (recompilation warnings) would fill a pipe and block on its writes
            sink = open(os.path.join(SLICES, f"{n}.log"), "w+")
            running.append((n, subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True), sink))
        time.sleep(2)
        for n, proc, sink in list(running):
            if proc.poll() is None:
                continue
            running.remove((n, proc, sink))
            sink.seek(0)
            text = sink.read()
            sink.close()
            log.write(f"==== {n} (exit {proc.returncode})\n{text[-6000:]}\n")
            log.flush()
            last = [line for line in text.splitlines() if line.startswith("{\"variant\"")]
            results[n] = json.loads(last[-1]) if last else {"variant": n, "status": f"process exit {proc.returncode}",
                                                             "output_tail": text[-1500:]}
            print(f"{n}: {results[n]['status']} sum|trained|={results[n].get('sum_abs_trained')} "
                  f"peak={results[n].get('peak_gib')} GiB wall={results[n].get('wall_s')} s", flush=True)
            json.dump({"runs": results}, open(path, "w"), indent=1)
    rows = compare(results)
    summary = {}
    for r in rows:
        s = summary.setdefault(r["compiled"], {"max_rel_diff_compiled_eager": 0.0, "max_err_compiled_vs_fp32": 0.0,
                                               "max_err_eager_vs_fp32": 0.0, "slices": 0, "all_moved": True})
        for key in ("rel_diff_compiled_eager", "err_compiled_vs_fp32", "err_eager_vs_fp32"):
            s["max_" + key] = max(s["max_" + key], r[key])
        s["slices"] += 1
        s["all_moved"] = s["all_moved"] and r["moved"]
    for s in summary.values():
        s["ok"] = s["all_moved"] and s["max_err_compiled_vs_fp32"] <= 2 * s["max_err_eager_vs_fp32"]
    for name, s in summary.items():
        print(f"{name}: {s['slices']} slices, max rel diff vs eager {s['max_rel_diff_compiled_eager']:.4f}; vs fp32: "
              f"compiled {s['max_err_compiled_vs_fp32']:.4f}, eager {s['max_err_eager_vs_fp32']:.4f}: "
              f"{'PASS' if s['ok'] else 'FAIL'}")
    json.dump({"runs": results, "comparison": summary, "command": " ".join(sys.argv)}, open(path, "w"), indent=1)
    if rows:
        with open(os.path.join(a.out, "results.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
