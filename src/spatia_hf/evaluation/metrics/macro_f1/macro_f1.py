"""Macro-averaged F1 of class predictions, as an ``evaluate`` metric shipped with spatia-hf.

Macro-F1 weighs every cell type equally, so a rare type (T cells in a tumour) counts as much as a
common one: the headline metric of the annotation tasks 1-3.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score

_DESCRIPTION = """Unweighted mean over classes of the per-class F1 (sklearn.metrics.f1_score, average="macro").
Classes are the union of the classes in predictions and references unless `labels` is given; a class
never predicted scores 0."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class codes.
    references (list of int): true class codes, same length.
    labels (list of int, optional): the classes to average over (default: all seen).
Returns:
    macro_f1 (float): in [0, 1].
    per_class_f1 (dict): class code (str) -> F1.
Examples:
    >>> metric = spatia_hf.evaluation.metrics.load_metric("macro_f1")
    >>> metric.compute(predictions=[0, 1, 1, 1, 2], references=[0, 0, 1, 1, 2])["macro_f1"]
    0.8222222222222223
"""

_CITATION = """@article{scikit-learn, title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others}, journal={JMLR}, volume={12}, pages={2825--2830}, year={2011}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MacroF1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(self, predictions, references, labels=None) -> dict:
        if len(references) == 0:
            raise ValueError("references is empty: macro_f1 needs at least one example")
        y_true, y_pred = np.asarray(references), np.asarray(predictions)
        classes = np.asarray(labels) if labels is not None else np.union1d(y_true, y_pred)
        per_class = f1_score(y_true, y_pred, labels=classes, average=None, zero_division=0.0)
        return {"macro_f1": float(np.mean(per_class)),
                "per_class_f1": {str(int(c)): float(f) for c, f in zip(classes, per_class)}}
