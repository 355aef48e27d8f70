"""Trainer checkpoint folders: which ones are complete enough to resume from.

The Trainer writes `checkpoint-N/` file by file; the adapter first and `trainer_state.json` last. A folder
from a crash mid-save lacks the latter (or holds a torn adapter), so resume skips it for the previous one."""
from __future__ import annotations

import json
import os
import re

from transformers.utils import logging

from .checkpoint import read_sparse_adapter

logger = logging.get_logger(__name__)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def checkpoint_problem(path: str) -> str | None:
    """Why `path` cannot be resumed from, or None if it can."""
    if not os.path.isdir(path):
        return "not a directory"
    try:
        with open(os.path.join(path, TRAINER_STATE)) as f:
            json.load(f)
    except FileNotFoundError:
        return f"no {TRAINER_STATE} (the save did not finish)"
    except json.JSONDecodeError:
        return f"{TRAINER_STATE} is torn"
    try:
        read_sparse_adapter(path)
    except (OSError, ValueError) as e:
        return str(e)
    return None


def require_complete_checkpoint(path: str) -> None:
    problem = checkpoint_problem(path)
    if problem:
        raise ValueError(f"cannot resume from {path}: {problem}")


def last_complete_checkpoint(output_dir: str) -> str | None:
    """Newest `checkpoint-N` under `output_dir` that can be resumed from (incomplete ones are skipped)."""
    if not os.path.isdir(output_dir):
        return None
    found = sorted(((int(m.group(1)), d) for d in os.listdir(output_dir) if (m := _CHECKPOINT.match(d))), reverse=True)
    for _, d in found:
        path = os.path.join(output_dir, d)
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning(f"skipping {path}: {problem}")
    return None
