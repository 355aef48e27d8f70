"""Evaluation as in LLM-Adapters: greedy generation from the prompt, answer word extraction, accuracy.

Batched generation with left padding; prompts are sorted by length so a batch holds similar lengths
(less padding), results are put back in dataset order.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from datasets import Dataset

from .progress import bar
from .prompting import generate_prompt
from .tasks import extract_answer, n_choices

ACCURACY_SCRIPT = Path(__file__).with_name("evaluate_metrics") / "accuracy.py"


def load_accuracy():
    """`evaluate`'s accuracy, offline: the metric script shipped next to this module (the hub's
    `evaluate.load("accuracy")` needs the hub and scikit-learn). Same formula."""
    import evaluate

    return evaluate.load(str(ACCURACY_SCRIPT))


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], batch_size: int = 16, max_new_tokens: int = 10,
             desc: str = "generating") -> list[str]:
    """Greedy continuation of each prompt (new tokens only, special tokens dropped)."""
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    out: list[Optional[str]] = [None] * len(prompts)
    try:
        for start in bar(range(0, len(order), batch_size), desc=desc, leave=False):
            idx = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=True).to(device)
            seq = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                 num_beams=1, temperature=None, top_p=None, top_k=None,
                                 use_cache=True)
            new = seq[:, enc["input_ids"].shape[1]:]  # (B, <= max_new_tokens)
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                out[i] = text
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out  # type: ignore[return-value]


def generate_sharded(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int, desc: str,
                     rank: int = 0, world: int = 1) -> list[str]:
    """`generate` over this rank's contiguous share of the prompts, gathered on every rank (DDP / ZeRO-1/2:
    each process holds the whole model)."""
    if world <= 1:
        return generate(model, tokenizer, prompts, batch_size, max_new_tokens, desc=desc)
    from accelerate.utils import gather_object

    per = math.ceil(len(prompts) / world)
    idx = list(range(rank * per, min(len(prompts), (rank + 1) * per)))
    local = generate(model, tokenizer, [prompts[i] for i in idx], batch_size, max_new_tokens, desc=desc)
    out = [""] * len(prompts)
    for i, text in gather_object(list(zip(idx, local))):
        out[i] = text
    return out


def evaluate_task(model, tokenizer, task: str, ds: Dataset, metric, batch_size: int = 16,
                  max_new_tokens: int = 10, desc: Optional[str] = None, rank: int = 0, world: int = 1) -> dict:
    """Accuracy of `model` on one task's records; also returns every prediction for the results JSON."""
    prompts = [generate_prompt(r["instruction"], r["input"]) for r in ds]
    outputs = generate_sharded(model, tokenizer, prompts, batch_size, max_new_tokens, desc or task, rank, world)
    preds = [extract_answer(task, o, r["instruction"]) for o, r in zip(outputs, ds)]
    refs = list(ds["answer"])
    acc = metric.compute(predictions=preds, references=refs)["accuracy"]
    chance = sum(1.0 / n_choices(task, r["instruction"]) for r in ds) / max(len(ds), 1)
    return {"accuracy": float(acc), "n": len(refs), "no_answer": sum(p == "" for p in preds), "chance": chance,
            "samples": [{"output": o, "pred": p, "answer": a} for o, p, a in zip(outputs, preds, refs)]}


def evaluate_all(model, tokenizer, eval_sets: dict[str, Dataset], metric=None, batch_size: int = 16,
                 max_new_tokens: int = 10, label: str = "eval", rank: int = 0, world: int = 1) -> dict:
    """{task: result} plus "average" (unweighted mean over tasks, as in the papers' tables)."""
    metric = metric or load_accuracy()
    results = {}
    for task in bar(list(eval_sets), desc=f"{label}: tasks"):
        results[task] = evaluate_task(model, tokenizer, task, eval_sets[task], metric, batch_size,
                                      max_new_tokens, desc=f"{label}: {task}", rank=rank, world=world)
    accs = [r["accuracy"] for r in results.values()]
    chance = [r["chance"] for r in results.values()]
    return {"tasks": results, "average": sum(accs) / len(accs) if accs else float("nan"),
            "chance_average": sum(chance) / len(chance) if chance else float("nan")}
