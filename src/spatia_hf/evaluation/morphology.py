"""Nucleus measures of crops and the morphology shifts of the perturbation task (12).

Every nucleus measure of the package lives here: masks and areas of the central nucleus, rotation-invariant
morphology features (for the type classifier and feature distances), and measured vs true log-folds. Real
and generated crops go through one measurement, so a shift between "before" and "after" an expression edit
is a shift of the cells, not of the measuring. Nucleus area is the feature the synthetic tissue's ``NUCSIZE`` gene
drives (area = type area x (rate / reference) ** exponent).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage


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


N_RINGS = 8


def as_float_images(images: Any) -> np.ndarray:
    """Crops as float64 ``(N, C, H, W)`` in [0, 1] (uint8 is divided by 255; torch is converted)."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"images: expected (N, C, H, W) crops, got shape {x.shape}")
    return x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)


def _pixel_sizes(pixel_size_um, n: int) -> np.ndarray:
    px = np.broadcast_to(np.asarray(pixel_size_um, dtype=np.float64), (n,)).copy()
    if not (np.isfinite(px).all() and (px > 0).all()):
        raise ValueError(f"pixel_size_um: expected positive µm per pixel, got {np.unique(px)[:5]}")
    return px


def nucleus_masks(images: Any, pixel_size_um, channel: int = 0, smooth_um: float = 0.75, level: float = 0.5,
                  peak_quantile: float = 90.0, window_um: float = 4.0) -> np.ndarray:
    """Boolean ``(N, H, W)`` mask of the nucleus at the centre of each crop.

    The DAPI plane is smoothed (Gaussian, ``smooth_um``), its background is the 5th percentile, its
    peak the ``peak_quantile`` percentile of a central ``window_um`` window (robust to chromatin
    texture, unlike the maximum); the nucleus is the connected region above
    ``background + level x (peak - background)`` that holds the brightest central pixel. A crop
    without a nucleus (peak barely above background) gets an empty mask.
    """
    x = as_float_images(images)
    n, c, h, w = x.shape
    if not 0 <= channel < c:
        raise ValueError(f"channel={channel}: the crops have {c} channels")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level}: expected a fraction in (0, 1)")
    px = _pixel_sizes(pixel_size_um, n)
    masks = np.zeros((n, h, w), dtype=bool)
    cy, cx = h // 2, w // 2
    for i in range(n):
        plane = ndimage.gaussian_filter(x[i, channel], smooth_um / px[i]) if smooth_um > 0 else x[i, channel]
        background = np.percentile(plane, 5)
        half = max(1, int(round(window_um / px[i] / 2)))
        win = plane[cy - half : cy + half + 1, cx - half : cx + half + 1]
        peak = np.percentile(win, peak_quantile)
        if peak - background <= 0.02:  # no nucleus at the centre
            continue
        labels, _ = ndimage.label(plane >= background + level * (peak - background))
        central = labels[cy - half : cy + half + 1, cx - half : cx + half + 1]
        if not (central > 0).any():
            continue
        r, col = np.unravel_index(int(np.argmax(np.where(central > 0, win, -np.inf))), win.shape)
        masks[i] = labels == central[r, col]
    return masks


def nucleus_area(images: Any, pixel_size_um, channel: int = 0, **kwargs) -> np.ndarray:
    """Area (µm²) of the central nucleus of each crop (0 when none); see :func:`nucleus_masks`."""
    masks = nucleus_masks(images, pixel_size_um, channel=channel, **kwargs)
    return masks.sum(axis=(1, 2)) * _pixel_sizes(pixel_size_um, len(masks)) ** 2


NUCLEUS_FEATURES = ("log1p_area_um2", "log_elongation", "nucleus_mean", "nucleus_std", "nucleus_laplacian",
                    "solidity")


def morphology_feature_names(channel_names: Sequence[str]) -> list[str]:
    """Names of :func:`morphology_features`' columns for crops with ``channel_names``, in order (what a
    per-feature comparison of generated and real crops is reported under)."""
    names = list(NUCLEUS_FEATURES)
    for ch in channel_names:
        names += [f"{ch}_ring{k}" for k in range(N_RINGS)] + [f"{ch}_p{q}" for q in (10, 50, 90)]
    return names


def morphology_features(images: Any, pixel_size_um, nucleus_channel: int = 0) -> np.ndarray:
    """Rotation-invariant features ``(N, F)`` of crops, for type classification and feature distances.

    Per crop: nucleus area (µm², log), elongation and solidity proxies from the mask's second moments,
    mean / std / Laplacian energy of the nuclear stain inside the nucleus (brightness, texture), and
    for every channel the mean intensity in ``N_RINGS`` rings around the centre (out to half the crop,
    in µm so crops of different pixel sizes compare) plus its 10/50/90th percentiles.
    """
    x = as_float_images(images)
    n, c, h, w = x.shape
    px = _pixel_sizes(pixel_size_um, n)
    masks = nucleus_masks(x, px, channel=nucleus_channel)
    yy, xx = np.mgrid[0:h, 0:w]
    radius_px = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2)
    feats = []
    for i in range(n):
        m = masks[i]
        area = m.sum() * px[i] ** 2
        dapi = x[i, nucleus_channel]
        if m.sum() >= 3:
            ys, xs = np.nonzero(m)
            cov = np.cov(np.stack([ys, xs]).astype(np.float64))
            ev = np.sort(np.linalg.eigvalsh(cov))
            elong = float(np.sqrt(ev[1] / max(ev[0], 1e-6)))
            inside = dapi[m]
            lap = ndimage.laplace(ndimage.gaussian_filter(dapi, 0.5))[m]
            nuc = [np.log1p(area), np.log(elong), inside.mean(), inside.std(), np.sqrt((lap**2).mean()),
                   m.sum() / max(np.pi * np.sqrt(ev[0] * ev[1]) * 4, 1.0)]
        else:
            nuc = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        r_um = radius_px * px[i]
        edges = np.linspace(0, (min(h, w) / 2) * px[i], N_RINGS + 1)
        ring = np.digitize(r_um, edges) - 1
        prof = []
        for ch in range(c):
            plane = x[i, ch]
            sums = np.bincount(ring[ring < N_RINGS], weights=plane[ring < N_RINGS], minlength=N_RINGS)
            cnts = np.bincount(ring[ring < N_RINGS], minlength=N_RINGS)
            prof.extend((sums / np.maximum(cnts, 1)).tolist())
            prof.extend(np.percentile(plane, [10, 50, 90]).tolist())
        feats.append(nuc + prof)
    return np.asarray(feats, dtype=np.float64)

