"""Accuracy of class predictions, as an ``evaluate`` metric shipped with spatia-hf (loads offline).

Used by tasks 1 (annotation probe), 6 (section classification) and 11 (type accuracy of generated
images). Classes are integer codes; the task code maps label strings to codes.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score

_DESCRIPTION = """Fraction of predictions equal to the reference class: sklearn.metrics.accuracy_score."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class codes, one per example.
    references (list of int): true class codes, same length.
    sample_weight (list of float, optional): per-example weights.
Returns:
    accuracy (float): in [0, 1].
Examples:
    >>> metric = spatia_hf.evaluation.metrics.load_metric("accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""

_CITATION = """@article{scikit-learn, title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others}, journal={JMLR}, volume={12}, pages={2825--2830}, year={2011}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, sample_weight=None) -> dict:
        if len(references) == 0:
            raise ValueError("references is empty: accuracy needs at least one example")
        return {"accuracy": float(accuracy_score(np.asarray(references), np.asarray(predictions),
                                                 sample_weight=sample_weight))}
