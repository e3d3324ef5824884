"""Moving graph communities' boundaries to where the embedding puts them.

Leiden on a neighbour graph of a smooth embedding (niche embeddings vary gradually across space)
finds the right domains but may cut between two of them anywhere along the band of cells with
intermediate embeddings. Lloyd iterations started from those communities (k-means initialised
at their centres) keep the communities Leiden found and move each cell to the nearest centre,
which places a boundary halfway between two domains in the embedding (issue 16 note: +0.04 to
+0.09 ARI of spatial domains over Leiden alone on generated tissues).
"""

from __future__ import annotations

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


__all__ = ["refine_to_centroids"]
