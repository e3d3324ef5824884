"""Agreement of a measured morphology shift with the true one, as an ``evaluate`` metric.

Task 12: an expression edit (e.g. raise NUCSIZE 4-fold) should move the generated morphology the way
the biology says (nucleus area x 4 ** 0.5). Each row is one (perturbation, morphology feature) pair
with its measured log-fold shift (generated-after vs generated-before, same noise) and the true
log-fold shift. Direction = sign agreement; size = how large the measured shift is relative to truth.
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr

_DESCRIPTION = """Sign agreement, median ratio and least-squares slope of measured vs true log-fold shifts."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): measured log-fold shifts, one per (perturbation, feature).
    references (list of float): true log-fold shifts, aligned.
    tolerance (float, optional): true shifts with |value| <= tolerance count as "no change" and are left
        out of the direction and ratio summaries (default 1e-8).
Returns:
    direction_agreement (float): fraction of non-zero true shifts whose measured shift has the same sign.
    size_ratio (float): median over them of measured / true (1 = right size, 0 = no effect, < 0 = wrong way).
    slope (float): least-squares slope through the origin of measured on true (all rows).
    pearson (float): correlation of measured and true (NaN with fewer than 3 rows or no variance).
    n_shifts (int), n_scored (int).
Examples:
    >>> metric = spatia_hf.evaluation.metrics.load_metric("morphology_shift")
    >>> metric.compute(predictions=[0.2, -0.1], references=[0.4, -0.4])["direction_agreement"]
    1.0
"""

_CITATION = """@article{spatia2025, title={SPATIA: Multimodal Model for Prediction and Generation of Spatial Cell
  Phenotypes}, journal={arXiv:2507.04704}, year={2025}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MorphologyShift(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
            reference_urls=["https://arxiv.org/abs/2507.04704"],
        )

    def _compute(self, predictions, references, tolerance: float = 1e-8) -> dict:
        measured = np.asarray(predictions, dtype=np.float64)
        true = np.asarray(references, dtype=np.float64)
        if measured.size == 0:
            raise ValueError("references is empty: morphology_shift needs at least one perturbation")
        if not (np.isfinite(measured).all() and np.isfinite(true).all()):
            raise ValueError("shifts contain NaN or inf. Fix: measure log-fold shifts of positive features only")
        scored = np.abs(true) > tolerance
        if not scored.any():
            raise ValueError(f"every true shift is within tolerance={tolerance} of 0: nothing to score the "
                             "direction against. Fix: perturb a gene that drives morphology")
        ratio = measured[scored] / true[scored]
        denom = float(true @ true)
        pearson = float("nan")
        if measured.size >= 3 and np.ptp(measured) > 0 and np.ptp(true) > 0:
            pearson = float(pearsonr(measured, true).statistic)
        return {"direction_agreement": float(np.mean(np.sign(measured[scored]) == np.sign(true[scored]))),
                "size_ratio": float(np.median(ratio)),
                "slope": float(measured @ true / denom),
                "pearson": pearson,
                "n_shifts": int(measured.size), "n_scored": int(scored.sum())}
