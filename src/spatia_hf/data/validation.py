"""One gate every ``Section`` passes before the builder touches it.

Readers (AnnData, Xenium, CosMx, MERSCOPE, SpatialData, the synthetic tissue) only have to
produce a :class:`~spatia_hf.data.section.Section`; :func:`validate_section` then checks what
would otherwise corrupt a dataset silently (NaN counts, duplicate genes, cells off the image,
...) and raises :class:`SectionValidationError` naming the field, the offending value and the fix.
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import scipy.sparse as sp

from .section import Section

SAMPLE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
OUTSIDE_POLICIES = ("error", "drop")
_MAX_LISTED = 5


class SectionValidationError(ValueError):
    """A Section cannot be turned into a dataset; the message names the field and the fix."""


def _fail(sample_id: str, field: str, problem: str, fix: str) -> None:
    raise SectionValidationError(f"section {sample_id!r}: {field}: {problem}. Fix: {fix}")


def _first(items, n: int = _MAX_LISTED) -> str:
    items = list(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(repr(x) for x in items[:n]) + more


def _duplicates(values: list[str]) -> list[str]:
    seen: set[str] = set()
    dups: list[str] = []
    for v in values:
        if v in seen and v not in dups:
            dups.append(v)
        seen.add(v)
    return dups


def _check_counts(s: Section) -> None:
    counts = s.counts
    if counts is None or not hasattr(counts, "shape") or len(counts.shape) != 2:
        _fail(s.sample_id, "counts", f"expected a 2-D cells x genes matrix, got {type(counts).__name__}",
              "pass a scipy.sparse matrix or numpy array of raw counts")
    n_cells, n_genes = counts.shape
    if n_cells == 0:
        _fail(s.sample_id, "counts", "the section is empty (0 cells)",
              "drop this section or check the reader's filters (e.g. cell ids, FOV selection)")
    if n_genes == 0:
        _fail(s.sample_id, "genes", "the section has 0 genes", "check the gene panel / var_names of the input")
    data = counts.data if sp.issparse(counts) else np.asarray(counts)
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        _fail(s.sample_id, "counts", f"non-numeric dtype {data.dtype}", "convert counts to integers or floats")
    if np.issubdtype(data.dtype, np.floating):
        bad = ~np.isfinite(data)
        if bad.any():
            example = data[bad].ravel()[0]
            _fail(s.sample_id, "counts", f"{int(bad.sum())} NaN or inf values (e.g. {example})",
                  "replace missing values with 0 or remove the affected cells/genes before converting")
    if data.size and np.issubdtype(data.dtype, np.number) and data.min() < 0:
        _fail(s.sample_id, "counts", f"{int((data < 0).sum())} negative values (min {data.min()})",
              "pass raw counts (>= 0), not scaled or centred values (e.g. use adata.layers['counts'] or adata.raw)")
    if len(s.genes) != n_genes:
        _fail(s.sample_id, "genes", f"{len(s.genes)} gene names for {n_genes} count columns",
              "give exactly one gene symbol per column of counts")
    if len(s.cell_ids) != n_cells:
        _fail(s.sample_id, "cell_ids", f"{len(s.cell_ids)} cell ids for {n_cells} count rows",
              "give exactly one id per row of counts")


def _check_names(s: Section) -> None:
    if not isinstance(s.sample_id, str) or not SAMPLE_ID_PATTERN.match(s.sample_id):
        _fail(str(s.sample_id), "sample_id", f"{s.sample_id!r} is empty or has characters other than letters, "
              "digits, '.', '_' and '-' (it names the shard files)", "pass a sample id such as 'lung_s1'")
    empty = [i for i, g in enumerate(s.genes) if not isinstance(g, str) or not g.strip()]
    if empty:
        _fail(s.sample_id, "genes", f"{len(empty)} empty or non-string gene names at columns {_first(empty)}",
              "name every gene (symbol), e.g. from var['gene_symbols']")
    dups = _duplicates(list(s.genes))
    if dups:
        _fail(s.sample_id, "genes", f"duplicate gene names {_first(dups)}",
              "make gene names unique (e.g. adata.var_names_make_unique()) or sum the duplicate columns")
    if s.gene_ids is not None and len(s.gene_ids) != len(s.genes):
        _fail(s.sample_id, "gene_ids", f"{len(s.gene_ids)} ids for {len(s.genes)} genes",
              "align gene_ids with genes or pass gene_ids=None")
    dups = _duplicates([str(c) for c in s.cell_ids])
    if dups:
        _fail(s.sample_id, "cell_ids", f"duplicate cell ids {_first(dups)}", "make cell ids unique within the section")


def _check_geometry(s: Section) -> tuple[int, int, int]:
    try:
        px = float(s.pixel_size_um)
    except (TypeError, ValueError):
        px = float("nan")
    if not np.isfinite(px) or px <= 0:
        _fail(s.sample_id, "pixel_size_um", f"{s.pixel_size_um!r} is not a positive number",
              "pass the image pixel size in µm per pixel (e.g. 0.2125 for Xenium, 0.12028 for CosMx)")
    shape = getattr(s.image, "shape", None)
    if shape is None or len(shape) != 3:
        _fail(s.sample_id, "image", f"expected a (C, H, W) array, got shape {shape}",
              "pass channels first; for a single 2-D stain add a channel axis (image[None]); "
              "for (H, W, C) move the last axis first")
    c, h, w = (int(v) for v in shape)
    if c < 1 or h < 1 or w < 1:
        _fail(s.sample_id, "image", f"empty image of shape {tuple(shape)}", "pass the morphology image of the section")
    dtype = np.dtype(getattr(s.image, "dtype", np.float32))
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        _fail(s.sample_id, "image", f"unsupported dtype {dtype}", "pass uint8, uint16 or float stains")
    if s.channel_names is not None and len(s.channel_names) != c:
        _fail(s.sample_id, "channel_names", f"{len(s.channel_names)} names for {c} image channels",
              "give one name per channel or channel_names=None")
    m = np.asarray(s.um_to_px, dtype=np.float64) if s.um_to_px is not None else None
    if m is None or m.shape != (3, 3) or not np.isfinite(m).all():
        _fail(s.sample_id, "um_to_px", f"expected a finite 3x3 affine, got {None if m is None else m.shape}",
              "pass the µm -> pixel affine or leave it None for a pure 1/pixel_size scale")
    xy = np.asarray(s.centroids_um)
    if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] != s.counts.shape[0]:
        _fail(s.sample_id, "centroids_um", f"expected shape ({s.counts.shape[0]}, 2), got {xy.shape}",
              "give one (x, y) centroid in µm per cell")
    if not np.issubdtype(xy.dtype, np.number):
        _fail(s.sample_id, "centroids_um", f"non-numeric dtype {xy.dtype}", "pass float x, y positions in µm")
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        ids = [s.cell_ids[i] for i in np.flatnonzero(bad)]
        _fail(s.sample_id, "centroids_um", f"{int(bad.sum())} cells have NaN/inf positions (first: {_first(ids)})",
              "remove cells without a centroid before converting")
    return c, h, w


def _check_obs(s: Section) -> None:
    if s.obs is None:
        if s.label_keys:
            _fail(s.sample_id, "label_keys", f"{s.label_keys} given but obs is None", "pass obs with those columns")
        return
    if len(s.obs) != s.counts.shape[0]:
        _fail(s.sample_id, "obs", f"{len(s.obs)} rows for {s.counts.shape[0]} cells", "align obs with the count rows")
    missing = [k for k in s.label_keys if k not in s.obs.columns]
    if missing:
        _fail(s.sample_id, "label_keys", f"columns {_first(missing)} are not in obs (have {_first(s.obs.columns, 10)})",
              "pick label keys among the obs columns")


def cells_outside_image(section: Section) -> np.ndarray:
    """Boolean mask of cells whose centroid (through ``um_to_px``) is not on the image."""
    _, h, w = (int(v) for v in section.image.shape)
    cr = section.centroids_px()
    return ~((cr[:, 0] >= 0) & (cr[:, 0] < w) & (cr[:, 1] >= 0) & (cr[:, 1] < h))


def drop_cells(section: Section, keep: np.ndarray, reason: str) -> Section:
    """A copy of ``section`` without the cells where ``keep`` is False, counted in ``dropped[reason]``."""
    keep = np.asarray(keep, dtype=bool)
    idx = np.flatnonzero(keep)
    counts = section.counts_csr()[idx] if sp.issparse(section.counts) else np.asarray(section.counts)[idx]
    dropped = dict(section.dropped)
    dropped[reason] = dropped.get(reason, 0) + int((~keep).sum())
    return replace(
        section,
        counts=counts,
        cell_ids=[section.cell_ids[i] for i in idx],
        centroids_um=np.asarray(section.centroids_um)[idx],
        obs=None if section.obs is None else section.obs.iloc[idx],
        dropped=dropped,
    )


def validate_section(section: Section, *, outside: str = "error") -> Section:
    """Check a Section; return it (or a copy without off-image cells when ``outside="drop"``).

    Args:
        section: what a reader produced.
        outside: what to do with cells whose centroid lies off the image: ``"error"`` (default,
            raises with the count and the first ids) or ``"drop"`` (removes them and counts them in
            ``section.dropped["cells_outside_image"]``, which ends up in ``gene_panel.json``).
    """
    if outside not in OUTSIDE_POLICIES:
        raise ValueError(f"outside={outside!r}: expected one of {OUTSIDE_POLICIES}")
    if not isinstance(section, Section):
        raise SectionValidationError(f"expected a Section, got {type(section).__name__}. Fix: readers must return "
                                     "spatia_hf.data.Section objects")
    _check_names(section)
    _check_counts(section)
    _, h, w = _check_geometry(section)
    _check_obs(section)
    out = cells_outside_image(section)
    if out.any():
        n = int(out.sum())
        if outside == "error":
            ids = [section.cell_ids[i] for i in np.flatnonzero(out)]
            _fail(section.sample_id, "centroids_um", f"{n} of {section.n_cells} cells lie outside the "
                  f"{w} x {h} px image (first: {_first(ids)})",
                  "check pixel_size_um / the µm->px transform and the image, or pass outside='drop' "
                  "(CLI: --outside drop) to drop and count them")
        section = drop_cells(section, ~out, "cells_outside_image")
        if section.n_cells == 0:
            _fail(section.sample_id, "centroids_um", "every cell lies outside the image",
                  "check pixel_size_um and the µm->px transform")
    return section
