"""Trainer checkpoint folders: which ones are complete enough to resume from.

The Trainer writes `checkpoint-N/` file by file, the adapter first and `trainer_state.json` last, and rewrites an
existing folder in place (after resuming from an older checkpoint), where the old `trainer_state.json` would make a
half-rewritten folder look complete. So a marker file is removed before anything in the folder is (re)written and
written only after `trainer_state.json`; resume takes only folders with the marker (and a readable state and
adapter), skipping others for the previous checkpoint."""
from __future__ import annotations

import contextlib
import json
import os
import re

from transformers.utils import logging

from .._hf_internals import after_trainer_state_saved
from .adapter import fsync_directory, read_sparse_adapter, replace_atomically

logger = logging.get_logger(__name__)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
COMPLETE_MARKER = "sparse_checkpoint_complete"


def unmark_complete(folder: str) -> None:
    """Before a checkpoint folder is (re)written: it is not complete until mark_complete runs again."""
    marker = os.path.join(folder, COMPLETE_MARKER)
    if os.path.exists(marker):
        os.remove(marker)
        fsync_directory(folder)


def mark_complete(folder: str) -> None:
    def write(path):
        with open(path, "w") as f:
            f.write("every file of this checkpoint was written before this one\n")
    replace_atomically(write, os.path.join(folder, COMPLETE_MARKER))


@contextlib.contextmanager
def marked_complete_after_trainer_state(state, folder: str, enabled: bool = True):
    """While the Trainer saves a checkpoint into `folder`: mark it complete as soon as it has written the folder's
    trainer_state.json (its last file), before it rotates older checkpoints out, so no crash leaves only unmarked
    ones."""
    if not enabled:
        yield
        return

    def mark_if_this_folder(json_path: str) -> None:
        if os.path.abspath(os.path.dirname(json_path)) == os.path.abspath(folder):
            mark_complete(folder)
    with after_trainer_state_saved(state, mark_if_this_folder):
        yield


def checkpoint_problem(path: str) -> str | None:
    """Why `path` cannot be resumed from, or None if it can."""
    if not os.path.isdir(path):
        return "not a directory"
    if not os.path.isfile(os.path.join(path, COMPLETE_MARKER)):
        return (f"no {COMPLETE_MARKER} marker (the save did not finish, or training stopped while the folder was "
                "being rewritten; a folder saved by an sprune_trainer without markers can be marked by hand once "
                "you know it is complete)")
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
