"""Per-gene correlation across cells: the one implementation behind the ``per_gene_correlation`` metric
module (evaluation) and the fine-tuning Trainer's ``compute_metrics`` (training)."""

from __future__ import annotations

import warnings

import numpy as np


def per_column_pearson(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Pearson r of each column; NaN where the reference is constant, 0 where only the prediction is."""
    from scipy.stats import pearsonr

    ref_const = np.ptp(ref, axis=0) == 0
    pred_const = np.ptp(pred, axis=0) == 0
    out = np.full(pred.shape[1], np.nan)
    ok = ~ref_const & ~pred_const
    if ok.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[ok] = pearsonr(pred[:, ok], ref[:, ok], axis=0).statistic
    out[~ref_const & pred_const] = 0.0
    return out


def per_column_spearman(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Spearman rho of each column (Pearson r of the ranks), with :func:`per_column_pearson`'s conventions."""
    from scipy.stats import rankdata

    return per_column_pearson(rankdata(pred, axis=0), rankdata(ref, axis=0))


def mean_and_median(values: np.ndarray, name: str) -> dict[str, float]:
    """``{name}_mean`` and ``{name}_median`` over the defined (non-NaN) values."""
    defined = values[~np.isnan(values)]
    return {f"{name}_mean": float(defined.mean()) if defined.size else float("nan"),
            f"{name}_median": float(np.median(defined)) if defined.size else float("nan")}
