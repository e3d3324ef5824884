"""Per-gene correlation across cells: the one implementation behind the ``per_gene_correlation`` metric
module (evaluation) and the fine-tuning Trainer's ``compute_metrics`` (training)."""

from __future__ import annotations

import numpy as np


def per_column_pearson(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Pearson r of each column (genes) across rows (cells, axis -2), for any leading axes (e.g.
    bootstrap draws stacked as ``(n_draws, n_cells, n_genes)``, all scored in one array operation);
    NaN where the reference is constant, 0 where only the prediction is."""
    pred, ref = np.asarray(pred, np.float64), np.asarray(ref, np.float64)
    ref_const = np.ptp(ref, axis=-2) == 0
    pred_const = np.ptp(pred, axis=-2) == 0
    pc = pred - pred.mean(axis=-2, keepdims=True)
    rc = ref - ref.mean(axis=-2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (pc * rc).sum(axis=-2) / np.sqrt((pc * pc).sum(axis=-2) * (rc * rc).sum(axis=-2))
    r = np.where(pred_const, 0.0, np.clip(r, -1.0, 1.0))
    return np.where(ref_const, np.nan, r)


def per_column_spearman(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Spearman rho of each column (Pearson r of the ranks across rows, average ties), with
    :func:`per_column_pearson`'s conventions and leading axes."""
    from scipy.stats import rankdata

    return per_column_pearson(rankdata(pred, axis=-2), rankdata(ref, axis=-2))


def mean_and_median(values: np.ndarray, name: str) -> dict[str, float]:
    """``{name}_mean`` and ``{name}_median`` over the defined (non-NaN) values."""
    defined = values[~np.isnan(values)]
    return {f"{name}_mean": float(defined.mean()) if defined.size else float("nan"),
            f"{name}_median": float(np.median(defined)) if defined.size else float("nan")}
