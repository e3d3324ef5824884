"""Column names and ``datasets.Features`` of the three dataset configs: cells, niches, tissues.

Every producer (builder, readers) and consumer (collators, evaluation, embed) imports names from
here, so a renamed column breaks loudly in one place. Images are stored as ``Array3D`` uint8
``(C, H, W)`` after per-slide robust normalisation (any channel count, unlike PIL images);
expression is sparse: ``gene_indices`` index ``gene_panel.json["genes"]`` and ``gene_counts``
hold the raw counts of those genes.
"""

from __future__ import annotations

from datasets import Array3D, Features, List, Value

from ..utils.columns import (  # noqa: F401  (the names are part of this module's API)
    CONFIGS,
    GENE_PANEL_FILE,
    SAMPLE_ID,
    IMAGE,
    GENE_INDICES,
    GENE_COUNTS,
    X_UM,
    Y_UM,
    PIXEL_SIZE_UM,
    CELL_ID,
    NICHE_ID,
    CELL_IDS,
    CELL_REL_X_UM,
    CELL_REL_Y_UM,
    N_CELLS,
    THUMBNAIL,
    NICHE_IDS,
    NICHE_X_UM,
    NICHE_Y_UM,
    N_NICHES,
)


def _expression() -> dict:
    return {GENE_INDICES: List(Value("int32")), GENE_COUNTS: List(Value("float32"))}


def cell_features(n_channels: int, crop_px: int, label_keys=(), value_keys=()) -> Features:
    """Features of the ``cells`` config. ``label_keys`` are string labels (cell_type, domain);
    ``value_keys`` are per-cell float ground truth (e.g. nucleus_area_um2 in the synthetic tissue)."""
    feats = {
        CELL_ID: Value("string"),
        SAMPLE_ID: Value("string"),
        IMAGE: Array3D(shape=(n_channels, crop_px, crop_px), dtype="uint8"),
        **_expression(),
        X_UM: Value("float32"),
        Y_UM: Value("float32"),
        PIXEL_SIZE_UM: Value("float32"),
        NICHE_ID: Value("string"),
    }
    feats.update({k: Value("string") for k in label_keys})
    feats.update({k: Value("float32") for k in value_keys})
    return Features(feats)


def niche_features(n_channels: int, niche_px: int, label_keys=()) -> Features:
    """Features of the ``niches`` config: members, relative positions (µm), summed expression,
    majority labels."""
    feats = {
        NICHE_ID: Value("string"),
        SAMPLE_ID: Value("string"),
        IMAGE: Array3D(shape=(n_channels, niche_px, niche_px), dtype="uint8"),
        **_expression(),
        X_UM: Value("float32"),
        Y_UM: Value("float32"),
        PIXEL_SIZE_UM: Value("float32"),
        CELL_IDS: List(Value("string")),
        CELL_REL_X_UM: List(Value("float32")),
        CELL_REL_Y_UM: List(Value("float32")),
        N_CELLS: Value("int32"),
    }
    feats.update({k: Value("string") for k in label_keys})
    return Features(feats)


def tissue_features(n_channels: int, thumb_px: int, label_keys=()) -> Features:
    """Features of the ``tissues`` config: one row per section, pseudo-bulk and section labels."""
    feats = {
        SAMPLE_ID: Value("string"),
        THUMBNAIL: Array3D(shape=(n_channels, thumb_px, thumb_px), dtype="uint8"),
        **_expression(),
        PIXEL_SIZE_UM: Value("float32"),
        NICHE_IDS: List(Value("string")),
        NICHE_X_UM: List(Value("float32")),
        NICHE_Y_UM: List(Value("float32")),
        N_CELLS: Value("int32"),
        N_NICHES: Value("int32"),
    }
    feats.update({k: Value("string") for k in label_keys})
    return Features(feats)
