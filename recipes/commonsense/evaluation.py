"""Evaluation as in LLM-Adapters: greedy generation from the prompt, answer word extraction, accuracy; plus
the accuracy of ranking each item's answer labels (choice.py), which a wrong answer format cannot hide.

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
from .choice import rank_labels
from .tasks import choice_labels, extract_answer

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


def map_sharded(fn, items: list, rank: int = 0, world: int = 1) -> list:
    """fn(items) over this rank's contiguous share of `items`, gathered on every rank (DDP / ZeRO-1/2: each
    process holds the whole model)."""
    if world <= 1:
        return fn(items)
    from accelerate.utils import gather_object

    per = math.ceil(len(items) / world)
    idx = list(range(rank * per, min(len(items), (rank + 1) * per)))
    local = fn([items[i] for i in idx])
    out = [None] * len(items)
    for i, value in gather_object(list(zip(idx, local))):
        out[i] = value
    return out


def generate_sharded(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int, desc: str,
                     rank: int = 0, world: int = 1) -> list[str]:
    """`generate` over the ranks (see map_sharded)."""
    return map_sharded(lambda ps: generate(model, tokenizer, ps, batch_size, max_new_tokens, desc=desc), prompts,
                       rank, world)


def rank_sharded(model, tokenizer, prompts: list[str], labels: list[list[str]], batch_size: int, desc: str,
                 rank: int = 0, world: int = 1) -> list[str]:
    """`rank_labels` over the ranks (see map_sharded)."""
    items = list(zip(prompts, labels))
    return map_sharded(lambda its: rank_labels(model, tokenizer, [p for p, _ in its], [lab for _, lab in its],
                                               batch_size, desc=desc), items, rank, world)


def evaluate_task(model, tokenizer, task: str, ds: Dataset, metric, batch_size: int = 16,
                  max_new_tokens: int = 10, desc: Optional[str] = None, rank: int = 0, world: int = 1,
                  ranking: bool = True) -> dict:
    """Accuracy of `model` on one task's records: `accuracy` from greedy generation (LLM-Adapters' protocol) and
    `choice_accuracy` from ranking the item's answer labels (choice.py; `ranking`=False skips it); every
    prediction goes to `samples`."""
    prompts = [generate_prompt(r["instruction"], r["input"]) for r in ds]
    desc = desc or task
    outputs = generate_sharded(model, tokenizer, prompts, batch_size, max_new_tokens, desc, rank, world)
    preds = [extract_answer(task, o, r["instruction"]) for o, r in zip(outputs, ds)]
    labels = [choice_labels(task, r["instruction"]) for r in ds]
    refs = list(ds["answer"])
    out = {"accuracy": float(metric.compute(predictions=preds, references=refs)["accuracy"]), "n": len(refs),
           "no_answer": sum(p == "" for p in preds), "chance": sum(1.0 / len(lab) for lab in labels) / max(len(ds), 1),
           "samples": [{"output": o, "pred": p, "answer": a} for o, p, a in zip(outputs, preds, refs)]}
    if ranking:
        choices = rank_sharded(model, tokenizer, prompts, labels, batch_size, f"{desc} (ranking)", rank, world)
        out["choice_accuracy"] = float(metric.compute(predictions=choices, references=refs)["accuracy"])
        for sample, c in zip(out["samples"], choices):
            sample["choice"] = c
    return out


def evaluate_all(model, tokenizer, eval_sets: dict[str, Dataset], metric=None, batch_size: int = 16,
                 max_new_tokens: int = 10, label: str = "eval", rank: int = 0, world: int = 1,
                 ranking: bool = True) -> dict:
    """{task: result} plus "average", "choice_average" (with `ranking`; unweighted means over tasks, as in the
    papers' tables) and "chance_average"."""
    metric = metric or load_accuracy()
    results = {}
    for task in bar(list(eval_sets), desc=f"{label}: tasks"):
        results[task] = evaluate_task(model, tokenizer, task, eval_sets[task], metric, batch_size,
                                      max_new_tokens, desc=f"{label}: {task}", rank=rank, world=world,
                                      ranking=ranking)

    def mean(key: str) -> float:
        vals = [r[key] for r in results.values()]
        return sum(vals) / len(vals) if vals else float("nan")

    out = {"tasks": results, "average": mean("accuracy"), "chance_average": mean("chance")}
    if ranking:
        out["choice_average"] = mean("choice_accuracy")
    return out
