"""Morphology measured from cell crops: the read-out of the perturbation task (12).

Generated and real crops are measured the same way, so a shift between "before" and "after" an
expression edit is a shift of the measurement, not of the measuring. Nucleus area is the feature the
synthetic tissue's ``NUCSIZE`` gene drives (area = type area x (rate / reference) ** exponent).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def nucleus_area_um2(images: np.ndarray, pixel_size_um: float | np.ndarray, channel: int = 0,
                     level: float = 0.5, center_px: int | None = None) -> np.ndarray:
    """Area (µm²) of the nucleus at the centre of each crop.

    The nucleus is the connected region above ``level`` x its peak intensity that contains the
    brightest pixel of the central window (a half-maximum contour, robust to blur and to the crop's
    overall brightness).

    Args:
        images: ``(N, C, H, W)`` crops (any numeric dtype; generated float images in [0, 1] too).
        pixel_size_um: µm per pixel of the crops (scalar or one per crop).
        channel: the nuclear stain channel (DAPI is 0 in this package's datasets).
        level: threshold as a fraction of the peak (0.5 = half maximum).
        center_px: side of the central window searched for the peak (default H // 4, at least 3).
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images has shape {images.shape}: expected (N, C, H, W) crops")
    if not 0 <= channel < images.shape[1]:
        raise ValueError(f"channel={channel}: the crops have {images.shape[1]} channels")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level}: expected a fraction of the peak in (0, 1)")
    n, _, h, w = images.shape
    px = np.broadcast_to(np.asarray(pixel_size_um, dtype=np.float64), (n,))
    half = max(3, center_px or h // 4) // 2
    cy, cx = h // 2, w // 2
    areas = np.zeros(n)
    for i in range(n):
        img = images[i, channel].astype(np.float64)
        img = img - np.percentile(img, 5)  # background offset
        win = img[cy - half: cy + half + 1, cx - half: cx + half + 1]
        r, c = np.unravel_index(int(np.argmax(win)), win.shape)
        peak = win[r, c]
        if peak <= 0:
            continue  # no nucleus: area 0
        regions, _ = ndimage.label(img >= level * peak)
        areas[i] = np.count_nonzero(regions == regions[cy - half + r, cx - half + c]) * px[i] ** 2
    return areas


def log_fold_shift(before: np.ndarray, after: np.ndarray, eps: float = 1e-6) -> float:
    """Median over cells of ``log(after / before)`` of a positive feature, for paired measurements
    (same cells, same noise, only the expression edited)."""
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    if before.shape != after.shape or before.size == 0:
        raise ValueError(f"before {before.shape} and after {after.shape}: expected equal, non-empty shapes")
    return float(np.median(np.log(np.maximum(after, eps)) - np.log(np.maximum(before, eps))))


def true_log_shift(ground_truth: dict, gene: str, fold: float) -> float:
    """True log-fold shift of the feature ``gene`` drives when its expression is multiplied by
    ``fold``, from a synthetic tissue's ground truth (``morphology_genes[gene].exponent``)."""
    genes = ground_truth.get("morphology_genes", {})
    if gene not in genes:
        raise KeyError(f"gene {gene!r} drives no morphology in this ground truth; morphology genes: {sorted(genes)}")
    if fold <= 0:
        raise ValueError(f"fold={fold}: expected a positive expression fold")
    return float(genes[gene]["exponent"] * np.log(fold))
