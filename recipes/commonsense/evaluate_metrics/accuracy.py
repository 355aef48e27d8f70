"""Accuracy as an `evaluate` metric script that loads offline: `evaluate.load("<this file>")`.

The hub's "accuracy" metric (`evaluate.load("accuracy")`) is fetched from the Hugging Face hub at run time
and calls scikit-learn; this one is the same formula — (weighted) share of predictions equal to their
reference — over string labels ("answer2", "true", ...), with numpy only.
"""
import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the proportion of predictions equal to their reference (exact string match)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): predicted labels ("" when no answer could be extracted).
    references (list of str): gold labels.
    normalize (bool): return the fraction (default) instead of the count of correct predictions.
    sample_weight (list of float): optional weights.
Returns:
    accuracy (float)
Examples:
    >>> m = evaluate.load("accuracy.py")
    >>> m.compute(predictions=["answer1", ""], references=["answer1", "answer2"])
    {'accuracy': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = np.asarray([p == r for p, r in zip(predictions, references)], dtype=np.float64)
        w = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        total = float((correct * w).sum())
        return {"accuracy": total / float(w.sum()) if normalize else total}
