"""recipes/commonsense/stats.py and report.py: intervals against published values, the exact McNemar test against
hand-computed binomial tails, and a table / plot that mark noise as noise."""
import json

import pytest

from commonsense import report
from commonsense.stats import changed, mcnemar_p, mean_interval, wilson


@pytest.mark.parametrize("k, n, lo, hi", [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605),
                                          (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_matches_newcombe_1998(k, n, lo, hi):
    """Newcombe, Statistics in Medicine 17 (1998) 857-872: its worked examples, score method without continuity
    correction."""
    got = wilson(k, n)
    assert got == (pytest.approx(lo, abs=5e-5), pytest.approx(hi, abs=5e-5))


def test_mean_interval_is_the_pooled_wilson_for_equal_n_and_wider_for_smaller_tasks():
    assert mean_interval([0.25, 0.75], [16, 16]) == pytest.approx(wilson(16, 32))
    lo, hi = mean_interval([0.25, 0.75], [4, 28])  # n_eff = 4 / (1/4 + 1/28) = 14
    assert (lo, hi) == pytest.approx(wilson(7, 14))


def test_mcnemar_exact_p_is_the_two_sided_binomial_tail():
    assert mcnemar_p(1, 9) == 2 * (1 + 10) / 2 ** 10 == mcnemar_p(9, 1)   # C(10,0) + C(10,1)
    assert mcnemar_p(3, 5) == 2 * (1 + 8 + 28 + 56) / 2 ** 8
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(4, 4) == 1.0
    assert changed([True, True, False, False], [True, False, True, True]) == (2, 1)
    with pytest.raises(ValueError, match="same items"):
        changed([True], [True, False])


def _phase(task_outcomes, ranked=True):
    """A phase's results from per-item (pred correct, choice correct, answered) triples per task."""
    tasks = {}
    for task, items in task_outcomes.items():
        samples = [{"answer": "a", "pred": "a" if g else ("b" if answered else ""), "choice": "a" if c else "b"}
                   for g, c, answered in items]
        n = len(items)
        tasks[task] = {"n": n, "accuracy": sum(g for g, _, _ in items) / n, "chance": 0.5,
                       "no_answer": sum(not a for _, _, a in items), "samples": samples}
        if ranked:
            tasks[task]["choice_accuracy"] = sum(c for _, c, _ in items) / n
    out = {"tasks": tasks, "average": sum(t["accuracy"] for t in tasks.values()) / len(tasks),
           "chance_average": 0.5}
    if ranked:
        out["choice_average"] = sum(t["choice_accuracy"] for t in tasks.values()) / len(tasks)
    return out


def _cells(line):
    return [c.strip() for c in line.split("|")[1:-1]]


@pytest.fixture
def before_after():
    # boolq: generation 0/16 -> 12/16 (12 improved, none worse: p = 2 / 2^12); ranked 8/16 -> 9/16 (one flip)
    # piqa: generation 4/16 -> 5/16 (one flip: noise); nothing answered before, all after
    before = _phase({"boolq": [(False, i < 8, False) for i in range(16)],
                     "piqa": [(i < 4, i < 8, False) for i in range(16)]})
    after = _phase({"boolq": [(i < 12, i < 9, True) for i in range(16)],
                    "piqa": [(i < 5, i < 8, True) for i in range(16)]})
    return before, after


def test_table_shows_n_intervals_and_marks_noise(before_after):
    before, after = before_after
    lines = report.format_table(*before_after).splitlines()
    assert _cells(lines[0]) == ["task", "n", "chance", "generation before", "generation after", "change",
                                "ranked before", "ranked after", "change", "no answer % before -> after"]
    lo, hi = wilson(12, 16)
    boolq = _cells(lines[2])
    assert boolq[:6] == ["boolq", "16", "50.0", "0.0 [0.0, 19.4]", f"75.0 [{100 * lo:.1f}, {100 * hi:.1f}]",
                         "+75.0"]  # p = 2/4096: beyond noise, no mark
    assert boolq[6:] == ["50.0 [28.0, 72.0]", "56.2 [33.2, 76.9]", "+6.2 (noise)", "100 -> 0"]
    assert _cells(lines[3])[5] == "+6.2 (noise)"  # piqa generation: one item flipped
    average = _cells(lines[4])
    lo, hi = wilson(4, 32)
    assert average[:5] == ["average", "32", "50.0", f"12.5 [{100 * lo:.1f}, {100 * hi:.1f}]", average[4]]
    assert average[5] == "+40.6"  # 13 improved, 0 worse over the 32 items: p = 2 / 2^13
    assert average[8] == "+3.1 (noise)" and lines[-1] == report.LEGEND


def test_verdicts_say_chance_and_noise_in_words(before_after):
    gen, ranked = report.verdicts(*before_after)
    assert gen.startswith("generation accuracy after: 53.1 [36.4, 69.1] on 32 items")
    assert "chance 50.0 is inside the interval" in gen
    assert f"McNemar p = {2 / 2 ** 13:.2g}: beyond noise" in gen
    assert ranked.startswith("ranked accuracy after: 53.1 [") and "not distinguishable from guessing" in ranked
    assert "change +3.1 points (McNemar p = 1: within noise)" in ranked


def test_table_without_samples_or_ranking_and_for_one_phase():
    after = _phase({"boolq": [(True, True, True)] * 3 + [(False, False, True)]}, ranked=False)
    lines = report.format_table(None, after).splitlines()
    assert _cells(lines[0]) == ["task", "n", "chance", "generation after", "no answer % after"]
    assert _cells(lines[2]) == ["boolq", "4", "50.0", "75.0 [30.1, 95.4]", "0"]
    before = json.loads(json.dumps(after))
    for r in (before, after):
        del r["tasks"]["boolq"]["samples"]
    assert _cells(report.format_table(before, after).splitlines()[2])[5] == "+0.0"  # no samples: no test, no mark


def test_plot_has_a_panel_per_metric_and_the_no_answer_share(tmp_path, before_after):
    import matplotlib.image

    with_ranking = report.plot_before_after(*before_after, tmp_path / "a.png", "t")
    without = report.plot_before_after(_phase({"boolq": [(True, True, True)]}, ranked=False), None,
                                       tmp_path / "b.png", "t")
    # height (2.6 * panels + 0.6) inches at 120 dpi: 3 panels (generation, ranked, no answer) against 2
    assert matplotlib.image.imread(with_ranking).shape[0] == round((2.6 * 3 + 0.6) * 120)
    assert matplotlib.image.imread(without).shape[0] == round((2.6 * 2 + 0.6) * 120)
