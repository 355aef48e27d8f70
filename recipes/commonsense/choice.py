"""Answer-label ranking: a format-independent accuracy reported next to LLM-Adapters' generation accuracy.

Generation accuracy counts an answer in the wrong format as wrong: a model fine-tuned only on tasks whose
labels are "answerN" writes "answer2" for PIQA, whose labels are "solution1/solution2", and scores 0 there
whatever it knows. Ranking each item's own labels by log p("the correct answer is <label>" | prompt) (the
multiple-choice protocol of lm-evaluation-harness) measures which allowed answer the model prefers.
"""
from __future__ import annotations

from typing import Optional

import torch

from .progress import bar
from .tasks import OUTPUT_PREFIX


@torch.no_grad()
def label_logprobs(model, tokenizer, prompts: list[str], labels: list[list[str]], batch_size: int = 16,
                   desc: str = "ranking") -> list[list[float]]:
    """Sum of log-probabilities of OUTPUT_PREFIX + label after each prompt, for every label of every item.

    Prompt and continuation are tokenized separately and concatenated, as in training (prompting.py), and
    left-padded so every continuation ends the sequence; only the last positions' logits are computed."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pairs = []  # (item, label index, context ids, continuation ids)
    for i, (prompt, labs) in enumerate(zip(prompts, labels)):
        ctx = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        for j, lab in enumerate(labs):
            pairs.append((i, j, ctx, tokenizer(OUTPUT_PREFIX + lab, add_special_tokens=False)["input_ids"]))
    order = sorted(range(len(pairs)), key=lambda p: len(pairs[p][2]) + len(pairs[p][3]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out: list[list[Optional[float]]] = [[None] * len(labs) for labs in labels]
    try:
        for start in bar(range(0, len(order), batch_size), desc=desc, leave=False):
            batch = [pairs[p] for p in order[start:start + batch_size]]
            seqs = [ctx + cont for _, _, ctx, cont in batch]
            width, keep = max(map(len, seqs)), max(len(b[3]) for b in batch)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, width - len(s):] = torch.tensor(s)
                mask[r, width - len(s):] = 1
            ids, mask = ids.to(device), mask.to(device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift the positions
            # logits at position t predict token t + 1: the last `keep` tokens need the `keep` positions before
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                           logits_to_keep=keep + 1).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            targets = ids[:, -keep:]
            tok = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, keep)
            for r, (i, j, _, cont) in enumerate(batch):
                out[i][j] = float(tok[r, keep - len(cont):].sum())
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def rank_labels(model, tokenizer, prompts: list[str], labels: list[list[str]], batch_size: int = 16,
                desc: str = "ranking") -> list[str]:
    """The most likely label of each item."""
    scores = label_logprobs(model, tokenizer, prompts, labels, batch_size, desc)
    return [labs[max(range(len(labs)), key=s.__getitem__)] for labs, s in zip(labels, scores)]
