"""The one intermediate every reader produces and the multi-scale builder consumes.

A ``Section`` is one tissue section as measured: raw counts per cell, cell centroids in µm,
a lazily sliceable morphology image and the affine that maps µm to image pixels. Readers for
Xenium, CosMx, MERSCOPE, AnnData and SpatialData (and the synthetic tissue) all return
``Section`` objects, so the builder has a single input format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass
class Section:
    """One section: counts, positions (µm), image and provenance.

    Attributes:
        sample_id: unique name of the section (becomes ``sample_id`` in every dataset row).
        counts: cells x genes raw counts (``scipy.sparse.csr_matrix`` or dense ``np.ndarray``).
        genes: gene symbols, one per column of ``counts``; unique.
        cell_ids: one string id per row of ``counts``; unique.
        centroids_um: ``(n_cells, 2)`` float array of x, y in µm.
        image: morphology stains as a ``(C, H, W)`` array-like that supports slicing without
            loading the whole image (``np.memmap``, ``zarr`` array, tifffile's zarr store, or a
            plain ``np.ndarray`` for small images). uint8 / uint16 / float.
        pixel_size_um: µm per image pixel (isotropic).
        um_to_px: ``3x3`` affine mapping homogeneous (x_um, y_um, 1) to (col, row, 1) image pixels.
            Defaults to a pure scale ``1 / pixel_size_um`` (Xenium's convention: no offset).
        channel_names: name of each image channel (e.g. ``["DAPI", "boundary"]``).
        gene_ids: optional Ensembl ids aligned with ``genes``.
        obs: per-cell annotations (index = ``cell_ids``), e.g. ``cell_type``, ``domain``.
        label_keys: which ``obs`` columns are labels to carry into the datasets.
        section_labels: section-level labels (e.g. ``{"tissue": "...", "condition": "..."}``).
        dropped: counts of things removed on reading (control probes, blank codewords,
            background cells), reported in ``gene_panel.json``.
        technology: "xenium" | "cosmx" | "merscope" | "anndata" | "spatialdata" | "synthetic".
        uns: anything else worth keeping (ground truth of the synthetic tissue, reader versions).
    """

    sample_id: str
    counts: Any
    genes: list[str]
    cell_ids: list[str]
    centroids_um: np.ndarray
    image: Any
    pixel_size_um: float
    um_to_px: np.ndarray | None = None
    channel_names: list[str] | None = None
    gene_ids: list[str] | None = None
    obs: pd.DataFrame | None = None
    label_keys: list[str] = field(default_factory=list)
    section_labels: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    technology: str = "unknown"
    uns: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.um_to_px is None and self.pixel_size_um and self.pixel_size_um > 0:
            self.um_to_px = np.diag([1.0 / self.pixel_size_um, 1.0 / self.pixel_size_um, 1.0])

    @property
    def n_cells(self) -> int:
        return int(self.counts.shape[0])

    @property
    def n_genes(self) -> int:
        return int(self.counts.shape[1])

    def centroids_px(self) -> np.ndarray:
        """Cell centroids as (col, row) image pixels, through ``um_to_px``."""
        xy1 = np.c_[np.asarray(self.centroids_um, dtype=np.float64), np.ones(self.n_cells)]
        return (xy1 @ np.asarray(self.um_to_px, dtype=np.float64).T)[:, :2]

    def counts_csr(self) -> sp.csr_matrix:
        return self.counts.tocsr() if sp.issparse(self.counts) else sp.csr_matrix(self.counts)
