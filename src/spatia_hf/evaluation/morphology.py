"""Morphology shifts, the read-out of the perturbation task (12): measured and true log-folds.

Crops are measured by :func:`spatia_hf.evaluation.generation.nucleus_area` (one measurement for real
and generated crops, so a shift between "before" and "after" an expression edit is a shift of the
cells, not of the measuring). Nucleus area is the feature the synthetic tissue's ``NUCSIZE`` gene
drives (area = type area x (rate / reference) ** exponent).
"""

from __future__ import annotations

import numpy as np


def log_fold_shift(before: np.ndarray, after: np.ndarray) -> float:
    """Median over cells of ``log(after / before)`` of a positive feature, for paired measurements
    (same cells, same noise, only the expression edited). Pairs where either value is 0 (no nucleus
    found) are left out."""
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    if before.shape != after.shape or before.size == 0:
        raise ValueError(f"before {before.shape} and after {after.shape}: expected equal, non-empty shapes")
    ok = (before > 0) & (after > 0)
    if not ok.any():
        raise ValueError("no pair has a positive feature in both measurements (no nucleus found): cannot "
                         "measure a shift. Fix: check the images' nuclear channel")
    return float(np.median(np.log(after[ok]) - np.log(before[ok])))


def true_log_shift(ground_truth: dict, gene: str, fold: float) -> float:
    """True log-fold shift of the feature ``gene`` drives when its expression is multiplied by
    ``fold``, from a synthetic tissue's ground truth (``morphology_genes[gene].exponent``)."""
    genes = ground_truth.get("morphology_genes", {})
    if gene not in genes:
        raise KeyError(f"gene {gene!r} drives no morphology in this ground truth; morphology genes: {sorted(genes)}")
    if fold <= 0:
        raise ValueError(f"fold={fold}: expected a positive expression fold")
    return float(genes[gene]["exponent"] * np.log(fold))
