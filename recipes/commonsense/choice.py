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


def _requests(tokenizer, prompts: list[str], labels: list[list[str]]) -> list[tuple]:
    """(item, label indices, ids, n_common, last tokens): one forward pass scores several labels when their
    continuations differ only in the last token ("... answer1" / "... answer2": the usual case), else one per label.
    ids = context + the continuation without its last token; n_common = how many of those are continuation."""
    reqs = []
    for i, (prompt, labs) in enumerate(zip(prompts, labels)):
        ctx = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        conts = [tokenizer(OUTPUT_PREFIX + lab, add_special_tokens=False)["input_ids"] for lab in labs]
        heads = {tuple(c[:-1]) for c in conts}
        if len(heads) == 1:
            head = list(heads.pop())
            reqs.append((i, list(range(len(labs))), ctx + head, len(head), [c[-1] for c in conts]))
        else:
            reqs += [(i, [j], ctx + c[:-1], len(c) - 1, [c[-1]]) for j, c in enumerate(conts)]
    return reqs


@torch.no_grad()
def label_logprobs(model, tokenizer, prompts: list[str], labels: list[list[str]], batch_size: int = 16,
                   desc: str = "ranking") -> list[list[float]]:
    """Sum of log-probabilities of OUTPUT_PREFIX + label after each prompt, for every label of every item.

    Prompt and continuation are tokenized separately and concatenated, as in training (prompting.py), and
    left-padded so every continuation ends the sequence; only the last positions' logits are computed."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    reqs = _requests(tokenizer, prompts, labels)
    order = sorted(range(len(reqs)), key=lambda k: len(reqs[k][2]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out: list[list[Optional[float]]] = [[None] * len(labs) for labs in labels]
    try:
        for start in bar(range(0, len(order), batch_size), desc=desc, leave=False):
            batch = [reqs[k] for k in order[start:start + batch_size]]
            width, keep = max(len(b[2]) for b in batch), max(b[3] for b in batch) + 1
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, b in enumerate(batch):
                ids[r, width - len(b[2]):] = torch.tensor(b[2])
                mask[r, width - len(b[2]):] = 1
            ids, mask = ids.to(device), mask.to(device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift the positions
            # the last `keep` positions predict the continuation's common tokens, then the candidate last token
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                           logits_to_keep=keep).logits[:, -keep:].float(), dim=-1)
            for r, (i, js, _, n_common, lasts) in enumerate(batch):
                common = logp[r, keep - 1 - n_common:keep - 1].gather(-1, ids[r, width - n_common:, None]).sum() \
                    if n_common else logp.new_zeros(())
                final = logp[r, keep - 1, lasts]
                for j, f in zip(js, final.tolist()):
                    out[i][j] = float(common) + f
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def rank_labels(model, tokenizer, prompts: list[str], labels: list[list[str]], batch_size: int = 16,
                desc: str = "ranking") -> list[str]:
    """The most likely label of each item."""
    scores = label_logprobs(model, tokenizer, prompts, labels, batch_size, desc)
    return [labs[max(range(len(labs)), key=s.__getitem__)] for labs, s in zip(labels, scores)]
