#!/usr/bin/env python
"""Which training batches drive a model's loss or gradients non-finite, and which operation does it.

Rebuilds the recipe's training data and the Trainer's own (seeded) batch order, then runs forward + backward
of the frozen pretrained model on every batch (or --steps), in --dtype, with the attention implementation /
SDPA backend of each --variant; for each non-finite batch it names the first module whose output (forward)
or output gradient (backward) holds NaN/inf (sprune_trainer.training.nonfinite_trace).

  python studies/nonfinite/scan_batches.py --model_name_or_path <folder> --data_dir ../shared/data/commonsense \
      --max_train_samples 6000 --batch_size 16 --dtype bfloat16 --variants sdpa,eager --out scan.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(ROOT, "recipes"), ROOT]

import torch  # noqa: E402

from sprune_trainer.training.nonfinite_trace import trace_nonfinite  # noqa: E402

SDPA_BACKENDS = {"math": "MATH", "efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION"}


def train_batches(args, tok, model):
    """The recipe's training set, tokenized and batched in the order the Trainer's dataloader gives."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from commonsense.prompting import tokenize_dataset
    from commonsense.sources import load_commonsense

    data = load_commonsense("auto", args.data_dir, max_train_samples=args.max_train_samples, max_eval_samples=1,
                            seed=args.seed)
    ds = tokenize_dataset(data.train, tok, args.max_length, False).remove_columns(["task", "truncated"])
    targs = TrainingArguments(output_dir="/tmp/scan_batches", per_device_train_batch_size=args.batch_size,
                              seed=args.seed, report_to=[], use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=targs, train_dataset=ds,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    return trainer.get_train_dataloader()


def variant_context(model, variant: str):
    """sdpa (torch picks the kernel), sdpa-<backend> (forced), or eager attention."""
    impl = "eager" if variant == "eager" else "sdpa"
    model.config._attn_implementation = impl
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = impl
    if variant.startswith("sdpa-"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[variant[5:]]))
    return contextlib.nullcontext()


def run_one(model, batch, variant, dtype):
    model.zero_grad(set_to_none=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bfloat16" and batch["input_ids"].is_cuda \
        else contextlib.nullcontext()
    with variant_context(model, variant), autocast:
        tr = trace_nonfinite(model, batch)
    g = [p.grad for p in model.parameters() if p.grad is not None]
    gnorm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x.float()) for x in g]))) if g else 0.
    return {"loss": tr.loss, "grad_norm": gnorm, "first_forward": tr.first_forward,
            "first_backward": tr.first_backward, "max_abs_output": tr.max_abs_output,
            "max_abs_module": tr.max_abs_module}


def describe(batch, tok):
    am = batch["attention_mask"]
    return {"shape": list(batch["input_ids"].shape), "lengths": am.sum(1).tolist(),
            "label_tokens": (batch["labels"] != -100).sum(1).tolist(),
            "pad_in_middle": bool(((am[:, 1:] > am[:, :-1]).any()).item())}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_name_or_path", required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--max_train_samples", type=int, default=6000)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--variants", default="sdpa", help="comma list: sdpa, eager, sdpa-math, sdpa-efficient, "
                                                      "sdpa-flash, sdpa-cudnn (first one scans every batch)")
    p.add_argument("--steps", default=None, help="comma list of 1-based steps to run (default: all)")
    p.add_argument("--trainable", default="all", choices=["all", "inputs"],
                   help="all: gradients for every weight (full FT); inputs: only through the activations")
    p.add_argument("--adapter_dir", default=None, help="a sparse adapter (e.g. checkpoint-N of the run) merged "
                                                     "into the model first: the weights the run had at step N")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=getattr(torch, args.dtype)).to(dev)
    if args.adapter_dir:
        from sprune_trainer import load_sparse_adapter, merge_sparse
        model = merge_sparse(load_sparse_adapter(model, args.adapter_dir))
        model.requires_grad_(True)  # loading froze the base; the scan wants every weight's gradient
    model.train()
    if args.trainable == "inputs":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    variants = args.variants.split(",")
    wanted = {int(s) for s in args.steps.split(",")} if args.steps else None
    report = {"args": vars(args), "torch": torch.__version__, "device": torch.cuda.get_device_name() if dev == "cuda"
              else "cpu", "nonfinite": [], "scanned": 0}
    t0 = time.time()
    for step, batch in enumerate(train_batches(args, tok, model), start=1):
        if wanted is not None and step not in wanted:
            continue
        batch = {k: v.to(dev) for k, v in batch.items()}
        res = run_one(model, batch, variants[0], args.dtype)
        report["scanned"] += 1
        bad = not (torch.isfinite(torch.tensor([res["loss"], res["grad_norm"]])).all())
        if bad or wanted is not None:
            entry = {"step": step, "batch": describe(batch, tok), variants[0]: res}
            for v in variants[1:]:
                try:
                    entry[v] = run_one(model, batch, v, args.dtype)
                except RuntimeError as e:  # e.g. a forced SDPA backend that cannot take this mask / dtype
                    entry[v] = {"error": str(e).splitlines()[0][:300]}
            report["nonfinite" if bad else "checked"] = report.get("nonfinite" if bad else "checked", []) + [entry]
            print(json.dumps(entry), flush=True)
        elif step % 25 == 0:
            print(f"step {step}: loss {res['loss']:.3f} grad_norm {res['grad_norm']:.3f} ({time.time() - t0:.0f} s)",
                  flush=True)
    report["seconds"] = time.time() - t0
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{len(report['nonfinite'])} of {report['scanned']} batches non-finite ({args.dtype}, {variants[0]}); "
          f"{args.out}")


if __name__ == "__main__":
    main()
