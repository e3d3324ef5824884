"""Normalised mutual information between a clustering and reference labels, as an ``evaluate`` metric.

Tasks 4 and 5, next to the adjusted Rand index: NMI rewards recovering the information in the labels
even when clusters split a class, where ARI penalises the split.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import normalized_mutual_info_score

_DESCRIPTION = """Mutual information normalised by the arithmetic mean of the two entropies
(sklearn.metrics.normalized_mutual_info_score, average_method="arithmetic")."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): cluster ids.
    references (list of int): true class codes, same length.
    average_method (str, optional): "arithmetic" (default), "geometric", "min" or "max".
Returns:
    normalized_mutual_info (float): in [0, 1].
Examples:
    >>> metric = spatia_hf.evaluation.metrics.load_metric("normalized_mutual_info")
    >>> metric.compute(predictions=[0, 0, 1, 2], references=[0, 0, 1, 1])
    {'normalized_mutual_info': 0.8}
"""

_CITATION = """@article{vinh2010information, title={Information theoretic measures for clusterings comparison},
  author={Vinh, N. X. and Epps, J. and Bailey, J.}, journal={JMLR}, volume={11}, pages={2837--2854}, year={2010}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NormalizedMutualInfo(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.normalized_mutual_info_score.html"],
        )

    def _compute(self, predictions, references, average_method: str = "arithmetic") -> dict:
        if len(references) == 0:
            raise ValueError("references is empty: normalized_mutual_info needs at least one example")
        value = normalized_mutual_info_score(np.asarray(references), np.asarray(predictions),
                                             average_method=average_method)
        return {"normalized_mutual_info": float(value)}
