"""Niches: square grid tiles of ``niche_um`` µm over a section, and what summarises them.

Grid tiles serve where a tiling is the point: the ``niches`` config of a built dataset (niche
images, summed expression), the tissue tokens of a section (``tissues`` config, tissue
classification, ``embed_dataset(tissue=True)``) and the ``grid`` pretraining schedule. The niche
model itself embeds and pretrains on cell-centred neighbourhoods
(:mod:`spatia_hf.data.neighbourhoods`): a tile cuts a cell's context at its edge.

A cell belongs to the tile containing its centroid (tiles start at 0 µm, so two builds of
the same section agree). Only tiles with at least one cell become niches. Niche expression is
the sum of its cells' counts (a sparse membership matrix times the count matrix) and a niche
label is the majority of its cells' labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass
class NicheGrid:
    """Grid niches of one section.

    Attributes:
        niche_of_cell: niche index of every cell.
        grid_yx: ``(n_niches, 2)`` integer (row, col) of each niche's tile, row-major sorted.
        centres_um: ``(n_niches, 2)`` x, y of each tile's centre in µm.
        niche_um: tile side in µm.
    """

    niche_of_cell: np.ndarray
    grid_yx: np.ndarray
    centres_um: np.ndarray
    niche_um: float

    @property
    def n_niches(self) -> int:
        return len(self.grid_yx)

    def ids(self, sample_id: str) -> list[str]:
        """Stable niche ids ``<sample_id>_niche_<row>_<col>`` (unique across sections)."""
        return [f"{sample_id}_niche_{int(r)}_{int(c)}" for r, c in self.grid_yx]

    def membership(self) -> sp.csr_matrix:
        """``(n_niches, n_cells)`` 0/1 matrix."""
        n = len(self.niche_of_cell)
        return sp.csr_matrix((np.ones(n, dtype=np.float32), (self.niche_of_cell, np.arange(n))),
                             shape=(self.n_niches, n))

    def members(self) -> list[np.ndarray]:
        """Cell indices of each niche, in cell order."""
        order = np.argsort(self.niche_of_cell, kind="stable")
        bounds = np.searchsorted(self.niche_of_cell[order], np.arange(self.n_niches + 1))
        return [order[bounds[i] : bounds[i + 1]] for i in range(self.n_niches)]


def grid_niches(centroids_um: np.ndarray, niche_um: float) -> NicheGrid:
    """Assign each cell to the ``niche_um`` grid tile containing its centroid."""
    if not niche_um > 0:
        raise ValueError(f"niche_um={niche_um}: expected a positive size in µm (e.g. 50.0)")
    xy = np.asarray(centroids_um, dtype=np.float64)
    gx = np.floor(xy[:, 0] / niche_um).astype(np.int64)
    gy = np.floor(xy[:, 1] / niche_um).astype(np.int64)
    keys, inverse = np.unique(np.stack([gy, gx], axis=1), axis=0, return_inverse=True)
    centres = np.stack([(keys[:, 1] + 0.5) * niche_um, (keys[:, 0] + 0.5) * niche_um], axis=1)
    return NicheGrid(inverse.reshape(-1).astype(np.int64), keys, centres, float(niche_um))


def majority_labels(values: pd.Series | np.ndarray, groups: np.ndarray, n_groups: int) -> list[str | None]:
    """Most frequent non-missing label per group; ties go to the label that sorts first; None if
    a group has no labelled cells."""
    s = pd.Series(np.asarray(values, dtype=object))
    df = pd.DataFrame({"g": np.asarray(groups), "v": s})
    df = df[df["v"].notna()]
    out: list[str | None] = [None] * n_groups
    if df.empty:
        return out
    df["v"] = df["v"].astype(str)
    counts = df.groupby(["g", "v"]).size().reset_index(name="n")
    counts = counts.sort_values(["g", "n", "v"], ascending=[True, False, True]).drop_duplicates("g")
    for g, v in zip(counts["g"].to_numpy(), counts["v"].to_numpy()):
        out[int(g)] = v
    return out
