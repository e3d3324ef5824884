"""Moving graph communities' boundaries to where the embedding puts them.

Leiden on a neighbour graph of a smooth embedding (niche embeddings vary gradually across space)
finds the right domains but may cut between two of them anywhere along the band of cells with
intermediate embeddings. Lloyd iterations started from those communities (k-means initialised
at their centres) keep the communities Leiden found and move each cell to the nearest centre,
which places a boundary halfway between two domains in the embedding (issue 16 note: +0.04 to
+0.09 ARI of spatial domains over Leiden alone on generated tissues).

A niche embedding that is a composition (each cell's neighbourhood as proportions of cell states)
is clustered under the Hellinger distance, i.e. Euclidean distance between square roots of the
proportions (the usual metric for compositions): raw proportions weigh a difference of 0.1 the same
for a state at 0.8 and one at 0.1, where the square root counts the rare state's change as larger.
Measured on generated tissues (session 8 note): +0.017 / +0.006 / +0.001 / +0.005 ARI of spatial domains
on bands / blobs / the demo tissue / 4,000-cell bands, three pretraining seeds each.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np


def refine_to_centroids(x: np.ndarray, labels: np.ndarray, *, max_iter: int = 100) -> np.ndarray:
    """Labels after Lloyd iterations from the centres of ``labels`` in ``x`` (same number of groups;
    codes 0..k-1 ordered by each group's first cell)."""
    from sklearn.cluster import KMeans

    x = np.asarray(x, np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(f"x: expected [n_cells, dims] matching {len(labels)} labels, got {tuple(x.shape)}")
    groups = list(dict.fromkeys(labels.tolist()))
    if len(groups) < 2:
        return np.zeros(len(labels), dtype=np.int64)
    centres = np.stack([x[labels == g].mean(0) for g in groups])
    moved = KMeans(n_clusters=len(groups), init=centres, n_init=1, max_iter=max_iter).fit_predict(x)
    _, first, inverse = np.unique(moved, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse].astype(np.int64)


def search_resolution(run: Callable[[float], np.ndarray], target: int, steps: int = 20,
                      bounds: tuple[float, float] = (1e-3, 20.0)) -> tuple[float, np.ndarray]:
    """Leiden's domain count follows its resolution, not a requested number: bisect log(resolution)
    within ``bounds`` (starting at 1) for ``target`` groups, at most ``steps`` more runs of
    ``run(resolution) -> labels``; the count closest to ``target`` wins, the lowest resolution on
    ties. One search for ``tl.domains`` and evaluation task 5, so both cluster alike."""
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    best_res, best = 1.0, np.asarray(run(1.0))
    for _ in range(steps):
        if np.unique(best).size == target:
            break
        mid = 0.5 * (lo + hi)
        res = math.exp(mid)
        labels = np.asarray(run(res))
        k, best_k = np.unique(labels).size, np.unique(best).size
        if abs(k - target) < abs(best_k - target) or (abs(k - target) == abs(best_k - target) and res < best_res):
            best_res, best = res, labels
        lo, hi = (mid, hi) if k < target else (lo, mid)
    return best_res, best


def is_composition(x: np.ndarray, atol: float = 1e-3) -> bool:
    """Whether every row of ``x`` is a vector of proportions (finite, >= 0, summing to 1)."""
    x = np.asarray(x)
    if x.ndim != 2 or x.size == 0 or not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        return False
    return bool(x.min() >= -atol and np.abs(x.sum(axis=1) - 1.0).max() <= atol)


def domain_features(x: np.ndarray, hellinger: bool | None = None) -> tuple[np.ndarray, bool]:
    """The features spatial domains are clustered on, and whether the Hellinger map was applied.

    ``hellinger``: None (default) applies the square root when ``x`` is a composition
    (:func:`is_composition`), True always (proportions expected), False never."""
    x = np.asarray(x)
    apply = is_composition(x) if hellinger is None else bool(hellinger)
    if apply and hellinger and not is_composition(x):
        raise ValueError("hellinger=True: expected a composition (rows of proportions >= 0 summing to 1). Fix: pass "
                         "obsm['X_spatia_niche'] of a checkpoint with cell states, or hellinger=None")
    return (np.sqrt(np.clip(x, 0.0, None)) if apply else x), apply


__all__ = ["domain_features", "is_composition", "refine_to_centroids", "search_resolution"]
