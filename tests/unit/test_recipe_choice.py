"""Label-ranking accuracy (recipes/commonsense/choice.py) against a direct, unpadded computation."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from commonsense.choice import label_logprobs, rank_labels
from commonsense.evaluation import evaluate_all
from commonsense.prompting import generate_prompt
from commonsense.tasks import OUTPUT_PREFIX, choice_labels
from helpers import make_tokenizer

PIQA = ("Please choose the correct solution to the question: open a jar\n\nSolution1: twist the lid\n\n"
        "Solution2: paint the lid\n\nAnswer format: solution1/solution2")
ARC = ("Please choose the correct answer to the question: what is hot?\n\nAnswer1: ice Answer2: fire Answer3: snow "
       "Answer4: rain\n\nAnswer format: answer1/answer2/answer3/answer4")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def direct_logprob(model, tok, prompt: str, label: str) -> float:
    """log p(OUTPUT_PREFIX + label | prompt), one unpadded sequence, full logits."""
    ctx = tok(prompt, add_special_tokens=True)["input_ids"]
    cont = tok(OUTPUT_PREFIX + label, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return float(sum(logp[len(ctx) - 1 + t, c] for t, c in enumerate(cont)))


def test_choice_labels_come_from_the_answer_format_line():
    assert choice_labels("piqa", PIQA) == ["solution1", "solution2"]
    assert choice_labels("ARC-Easy", ARC) == ["answer1", "answer2", "answer3", "answer4"]
    assert choice_labels("boolq", "no format line") == ["true", "false"]


def test_label_logprobs_equal_unpadded_sequences(model, tok):
    prompts = [generate_prompt(PIQA), generate_prompt(ARC), generate_prompt("short? Answer format: true/false")]
    labels = [choice_labels("piqa", PIQA), choice_labels("ARC-Easy", ARC), ["true", "false"]]
    got = label_logprobs(model, tok, prompts, labels, batch_size=4)  # mixed lengths: left padding in play
    for p, labs, scores in zip(prompts, labels, got):
        assert scores == pytest.approx([direct_logprob(model, tok, p, lab) for lab in labs], abs=1e-4)
    assert rank_labels(model, tok, prompts, labels, batch_size=3) == [
        labs[max(range(len(labs)), key=s.__getitem__)] for labs, s in zip(labels, got)]
    assert model.training is False


def test_evaluate_all_reports_label_ranking_next_to_generation(model, tok):
    """Every item gets a ranked label (never a format miss); its accuracy and average are in the results."""
    from datasets import Dataset

    ds = Dataset.from_list([{"instruction": PIQA, "input": "", "answer": "solution1"}] * 2)
    res = evaluate_all(model, tok, {"piqa": ds}, batch_size=2, max_new_tokens=3)
    t = res["tasks"]["piqa"]
    assert set(t) >= {"accuracy", "choice_accuracy", "no_answer", "chance", "samples"}
    scores = label_logprobs(model, tok, [generate_prompt(PIQA)], [["solution1", "solution2"]])[0]
    assert t["choice_accuracy"] == (1.0 if scores[0] > scores[1] else 0.0)
    assert res["choice_average"] == t["choice_accuracy"] and res["chance_average"] == pytest.approx(0.5)
    assert all(s["choice"] in ("solution1", "solution2") for s in t["samples"])


def test_recipe_table_shows_the_ranked_accuracy():
    from commonsense.report import format_table

    res = {"tasks": {"piqa": {"accuracy": 0.0, "choice_accuracy": 0.75, "n": 4, "chance": 0.5}}, "average": 0.0,
           "choice_average": 0.75, "chance_average": 0.5}
    lines = format_table(None, res).splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["task", "n", "chance", "generation after",
                                                              "ranked after"]
    assert [c.strip() for c in lines[3].split("|")[1:-1]] == ["average", "4", "50.0", "0.0 [0.0, 49.0]",
                                                              "75.0 [30.1, 95.4]"]  # 95% Wilson intervals


def test_ranking_can_be_switched_off(model, tok):
    from datasets import Dataset

    ds = Dataset.from_list([{"instruction": PIQA, "input": "", "answer": "solution1"}])
    res = evaluate_all(model, tok, {"piqa": ds}, batch_size=1, max_new_tokens=2, ranking=False)
    assert "choice_average" not in res and "choice_accuracy" not in res["tasks"]["piqa"]
    assert "choice" not in res["tasks"]["piqa"]["samples"][0] and res["tasks"]["piqa"]["n"] == 1


def test_labels_of_different_lengths_take_one_pass_each(model, tok):
    from commonsense.choice import _requests

    prompt = generate_prompt("pick one")
    labels = [["x", "a much longer label"], ["answer1", "answer2"]]
    reqs = _requests(tok, [prompt, prompt], labels)
    assert [r[1] for r in reqs if r[0] == 0] == [[0], [1]]  # one request per label
    assert [r[1] for r in reqs if r[0] == 1] == [[0, 1]]    # one shared request when only the last token differs
    got = label_logprobs(model, tok, [prompt, prompt], labels, batch_size=2)
    for labs, scores in zip(labels, got):
        assert scores == pytest.approx([direct_logprob(model, tok, prompt, lab) for lab in labs], abs=1e-4)
