"""LLM-Adapters prompt template and tokenization that trains on the response only.

The template is LLM-Adapters' `generate_prompt` from commonsense_evaluate.py, byte for byte (including its
16-space indentation and the space after "request."), used for both training and evaluation so the model
sees at test time exactly the prompt it was trained on; the training target is the record's `output`
("the correct answer is answer2") followed by EOS.
"""
from __future__ import annotations

from typing import Any, Optional

IGNORE_INDEX = -100  # label value ignored by the loss

_IND = " " * 16
TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    f"{_IND}### Instruction:\n{_IND}{{instruction}}\n\n{_IND}### Input:\n{_IND}{{input}}\n\n"
    f"{_IND}### Response:\n{_IND}"
)
TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n"
    f"{_IND}### Instruction:\n{_IND}{{instruction}}\n\n{_IND}### Response:\n{_IND}"
)


def generate_prompt(instruction: str, input: Optional[str] = None) -> str:
    """The prompt up to (and including) the indentation where the response starts."""
    if input:
        return TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input)
    return TEMPLATE_NO_INPUT.format(instruction=instruction)


def tokenize_example(example: dict[str, Any], tokenizer, max_length: int = 256,
                     train_on_inputs: bool = False) -> dict[str, Any]:
    """Prompt and response are tokenized separately and concatenated, so the label mask falls exactly on
    the boundary (no BPE merge across it) and the prompt tokens equal those seen at evaluation.

    labels: IGNORE_INDEX on the prompt (unless train_on_inputs), response ids + EOS after it.
    Over max_length, the prompt is cut from the left (its end — the options and "Answer format" line and
    the "### Response:" header — is what the answer depends on); the response is never cut unless it
    alone exceeds max_length. `truncated` tells which rows were cut.
    """
    prompt_ids = tokenizer(generate_prompt(example["instruction"], example.get("input")),
                           add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(example["output"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    response_ids = response_ids[:max_length]
    room = max_length - len(response_ids)
    truncated = len(prompt_ids) > room
    if truncated:
        prompt_ids = prompt_ids[len(prompt_ids) - room:] if room > 0 else []
    input_ids = prompt_ids + response_ids
    labels = (list(prompt_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)) + response_ids
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels,
            "truncated": truncated}


def tokenize_dataset(ds, tokenizer, max_length: int = 256, train_on_inputs: bool = False, desc="tokenizing"):
    """Dataset of records -> input_ids / attention_mask / labels (+ `truncated`, `task` kept for stats)."""
    drop = [c for c in ds.column_names if c != "task"]
    return ds.map(tokenize_example, fn_kwargs=dict(tokenizer=tokenizer, max_length=max_length,
                                                   train_on_inputs=train_on_inputs),
                  remove_columns=drop, desc=desc, keep_in_memory=True)
