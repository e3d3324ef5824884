"""Adjusted Rand index between a clustering and reference labels, as an ``evaluate`` metric.

Tasks 4 (cell clustering vs cell types) and 5 (spatial-domain clustering vs domains). Chance-adjusted:
0 for a random partition, 1 for a perfect match, independent of how clusters are numbered.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import adjusted_rand_score

_DESCRIPTION = """Adjusted Rand index (Hubert & Arabie 1985): sklearn.metrics.adjusted_rand_score."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): cluster ids.
    references (list of int): true class codes, same length.
Returns:
    adjusted_rand_index (float): in [-0.5, 1]; 0 = chance.
Examples:
    >>> metric = spatia_hf.evaluation.metrics.load_metric("adjusted_rand_index")
    >>> metric.compute(predictions=[0, 0, 1, 2], references=[0, 0, 1, 1])
    {'adjusted_rand_index': 0.5714285714285714}
"""

_CITATION = """@article{hubert1985comparing, title={Comparing partitions}, author={Hubert, L. and Arabie, P.},
  journal={Journal of Classification}, volume={2}, pages={193--218}, year={1985}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AdjustedRandIndex(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.adjusted_rand_score.html"],
        )

    def _compute(self, predictions, references) -> dict:
        if len(references) == 0:
            raise ValueError("references is empty: adjusted_rand_index needs at least one example")
        return {"adjusted_rand_index": float(adjusted_rand_score(np.asarray(references), np.asarray(predictions)))}
