"""Cell-centred neighbourhoods: for every cell, its nearest cells (optionally within a radius in µm).

This is the niche definition the niche model uses, at embedding time and in pretraining (as in
Nicheformer, Novae and CellCharter): every cell gets its own neighbourhood, centred on itself, so
two cells 1 µm apart get almost the same context wherever they lie. Grid tiles
(:mod:`spatia_hf.data.niches`) remain only where a tiling is the point: the niche images and the
``niches``/``tissues`` configs of a built dataset (tissue tokens, section-level tasks).

The search uses a k-d tree (``scipy.spatial.cKDTree``) queried in chunks of centres, so memory is
``O(chunk_size x k)`` on top of the tree whatever the section size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

DEFAULT_NEIGHBOURS = 30  # cells per neighbourhood, centre included (chosen by measurement: issue 16 note)


@dataclass
class Neighbourhoods:
    """Neighbourhoods of ``n`` centre cells, at most ``k`` cells each, nearest first.

    Attributes:
        index: ``(n, k)`` int64 row of each member cell in the section; -1 on padding (a radius
            left fewer than ``k`` cells). Column 0 is the centre cell itself when it is included.
        offsets_um: ``(n, k, 2)`` float32 member position minus centre position (x, y in µm); 0 on padding.
    """

    index: np.ndarray
    offsets_um: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        """``(n, k)`` bool, True for real members."""
        return self.index >= 0

    def __len__(self) -> int:
        return len(self.index)


def cell_neighbourhoods(xy_um: np.ndarray, k: int = DEFAULT_NEIGHBOURS, radius_um: float | None = None, *,
                        centres: np.ndarray | None = None, include_centre: bool = True,
                        chunk_size: int = 4096, tree: cKDTree | None = None) -> Neighbourhoods:
    """The ``k`` nearest cells of every centre (within ``radius_um`` when given), nearest first.

    Args:
        xy_um: ``(n_cells, 2)`` cell centroids of ONE section, µm.
        k: most cells per neighbourhood, the centre included when ``include_centre``.
        radius_um: keep only members closer than this (µm); None = the ``k`` nearest whatever their distance.
        centres: rows of ``xy_um`` to centre neighbourhoods on (default: every cell).
        include_centre: put the centre cell first; otherwise the ``k`` nearest *other* cells.
        chunk_size: centres per tree query (bounds the scratch memory).
        tree: a ``cKDTree`` of ``xy_um`` already built (reused across calls).
    """
    xy = np.asarray(xy_um, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"xy_um: expected (n_cells, 2) centroids in µm, got shape {xy.shape}")
    if k < 1:
        raise ValueError(f"k={k}: expected at least 1 cell per neighbourhood")
    if radius_um is not None and not radius_um > 0:
        raise ValueError(f"radius_um={radius_um}: expected a positive radius in µm or None")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: expected >= 1")
    n = len(xy)
    centres = np.arange(n) if centres is None else np.asarray(centres, dtype=np.int64)
    tree = cKDTree(xy) if tree is None else tree
    query_k = min(k + (0 if include_centre else 1), n)
    bound = np.inf if radius_um is None else float(radius_um)
    index = np.full((len(centres), k), -1, dtype=np.int64)
    offsets = np.zeros((len(centres), k, 2), dtype=np.float32)
    for start in range(0, len(centres), chunk_size):
        rows = centres[start : start + chunk_size]
        _, idx = tree.query(xy[rows], k=query_k, distance_upper_bound=bound)
        idx = np.asarray(idx, dtype=np.int64).reshape(len(rows), query_k)
        idx[idx >= n] = -1  # beyond the radius
        idx = _centre_first(idx, rows) if include_centre else _drop_centre(idx, rows)[:, :k]
        width = idx.shape[1]
        index[start : start + len(rows), :width] = idx
        real = idx >= 0
        rel = xy[np.where(real, idx, 0)] - xy[rows][:, None, :]
        offsets[start : start + len(rows), :width] = np.where(real[..., None], rel, 0.0)
    return Neighbourhoods(index, offsets)


def _centre_first(idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Move each centre to column 0 (cells at the same position can come back in any order); a
    centre missing from its row (more than k cells at one point) replaces the last member."""
    idx = idx.copy()
    is_self = idx == rows[:, None]
    where = np.where(is_self.any(1), is_self.argmax(1), idx.shape[1] - 1)
    r = np.arange(len(rows))
    idx[r, where] = idx[r, 0]
    idx[:, 0] = rows
    return idx


def _drop_centre(idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Remove each centre from its row, keeping the order of the others (last column dropped when absent)."""
    keep = idx != rows[:, None]
    drop_last = keep.all(1)
    keep[drop_last, -1] = False
    return idx[keep].reshape(len(rows), idx.shape[1] - 1)


__all__ = ["Neighbourhoods", "cell_neighbourhoods", "DEFAULT_NEIGHBOURS"]
