"""A built dataset's ``cells`` / ``tissues`` configs as plain arrays, the input of every task.

The tasks are functions over arrays so that any method (SPATIA, a baseline, a user's own model) can be
scored on the same cells; this module is the one place that turns dataset rows into those arrays.
Expression becomes a ``scipy.sparse.csr_matrix`` of raw counts over the dataset's gene panel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from spatia_hf.data import schema


@dataclass
class CellArrays:
    """Every cell of a ``cells`` config, one row each.

    Attributes:
        cell_ids, sample_ids: strings, ``(n_cells,)``.
        counts: raw counts, ``csr_matrix (n_cells, n_genes)`` float32.
        genes: the dataset gene panel (columns of ``counts``).
        xy_um: centroids in µm, ``(n_cells, 2)``.
        images: uint8 crops ``(n_cells, C, H, W)`` (None when loaded without images).
        pixel_size_um: µm per pixel of the stored crops, ``(n_cells,)``.
        labels: string labels per cell (``cell_type``, ``domain``, ...).
        values: float ground truth per cell (``nucleus_area_um2``, ...).
    """

    cell_ids: np.ndarray
    sample_ids: np.ndarray
    counts: sp.csr_matrix
    genes: list[str]
    xy_um: np.ndarray
    images: np.ndarray | None
    pixel_size_um: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return int(self.counts.shape[0])

    def label(self, key: str) -> np.ndarray:
        """The label column ``key``, with an error listing the available ones."""
        if key not in self.labels:
            raise KeyError(f"label {key!r} is not in this dataset; its cell labels are {sorted(self.labels)}. "
                           "Fix: build the dataset with that obs column in label_keys")
        return self.labels[key]

    def gene_index(self, names: Sequence[str]) -> np.ndarray:
        """Column indices of gene symbols, with an error naming the missing ones."""
        col = {g: j for j, g in enumerate(self.genes)}
        missing = [g for g in names if g not in col]
        if missing:
            raise KeyError(f"genes {missing} are not in the dataset panel ({len(self.genes)} genes)")
        return np.array([col[g] for g in names], dtype=np.int64)

    def subset(self, idx: np.ndarray) -> "CellArrays":
        """The cells ``idx`` (row order kept)."""
        return CellArrays(self.cell_ids[idx], self.sample_ids[idx], self.counts[idx], self.genes, self.xy_um[idx],
                          None if self.images is None else self.images[idx], self.pixel_size_um[idx],
                          {k: v[idx] for k, v in self.labels.items()}, {k: v[idx] for k, v in self.values.items()})


@dataclass
class SectionArrays:
    """Every section of a ``tissues`` config: pseudo-bulk counts and section labels."""

    sample_ids: np.ndarray
    counts: sp.csr_matrix
    genes: list[str]
    labels: dict[str, np.ndarray] = field(default_factory=dict)


def _sparse_rows(indices, counts, n_genes: int) -> sp.csr_matrix:
    idx = [np.asarray(i, dtype=np.int64) for i in indices]
    val = [np.asarray(c, dtype=np.float32) for c in counts]
    indptr = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum([len(i) for i in idx], out=indptr[1:])
    flat_idx = np.concatenate(idx) if idx else np.zeros(0, np.int64)
    if flat_idx.size and (flat_idx.min() < 0 or flat_idx.max() >= n_genes):
        raise ValueError(f"gene_indices out of range [0, {n_genes}): the rows do not match gene_panel.json. "
                         "Fix: rebuild the dataset")
    return sp.csr_matrix((np.concatenate(val) if val else np.zeros(0, np.float32), flat_idx, indptr),
                         shape=(len(idx), n_genes))


def _string_columns(ds, features, exclude) -> dict[str, np.ndarray]:
    return {k: np.asarray(ds[k]).astype(str) for k, f in features.items()
            if k not in exclude and getattr(f, "dtype", None) == "string"}


def cells_to_arrays(cells, genes: Sequence[str], with_images: bool = True) -> CellArrays:
    """Arrays of a loaded ``cells`` Dataset (any format) over the gene panel ``genes``."""
    ds = cells.with_format("numpy")
    feats = cells.features
    core = {schema.CELL_ID, schema.SAMPLE_ID, schema.IMAGE, schema.GENE_INDICES, schema.GENE_COUNTS, schema.X_UM,
            schema.Y_UM, schema.PIXEL_SIZE_UM, schema.NICHE_ID}
    labels = _string_columns(ds, feats, core)
    values = {k: np.asarray(ds[k], dtype=np.float32) for k, f in feats.items()
              if k not in core and getattr(f, "dtype", None) in ("float32", "float64")}
    return CellArrays(
        cell_ids=np.asarray(ds[schema.CELL_ID]).astype(str),
        sample_ids=np.asarray(ds[schema.SAMPLE_ID]).astype(str),
        counts=_sparse_rows(ds[schema.GENE_INDICES], ds[schema.GENE_COUNTS], len(genes)),
        genes=list(genes),
        xy_um=np.stack([np.asarray(ds[schema.X_UM], np.float64), np.asarray(ds[schema.Y_UM], np.float64)], axis=1),
        images=np.asarray(ds[schema.IMAGE], dtype=np.uint8) if with_images else None,
        pixel_size_um=np.asarray(ds[schema.PIXEL_SIZE_UM], dtype=np.float64),
        labels=labels, values=values,
    )


def tissues_to_arrays(tissues, genes: Sequence[str]) -> SectionArrays:
    """Arrays of a loaded ``tissues`` Dataset: one row per section."""
    ds = tissues.with_format("numpy")
    core = {schema.SAMPLE_ID, schema.THUMBNAIL, schema.GENE_INDICES, schema.GENE_COUNTS, schema.PIXEL_SIZE_UM,
            schema.NICHE_IDS, schema.NICHE_X_UM, schema.NICHE_Y_UM, schema.N_CELLS, schema.N_NICHES}
    return SectionArrays(np.asarray(ds[schema.SAMPLE_ID]).astype(str),
                         _sparse_rows(ds[schema.GENE_INDICES], ds[schema.GENE_COUNTS], len(genes)), list(genes),
                         _string_columns(ds, tissues.features, core))


def load_arrays(dataset_dir: str | Path, with_images: bool = True) -> tuple[CellArrays, SectionArrays, dict]:
    """``(cells, sections, gene_panel)`` of a built dataset directory, loaded offline."""
    from ..data.datasets import load_spatia_dataset

    data = load_spatia_dataset(dataset_dir, configs=("cells", "tissues"))
    return (cells_to_arrays(data["cells"], data.genes, with_images), tissues_to_arrays(data["tissues"], data.genes),
            data.panel)
