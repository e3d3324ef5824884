"""Per-slide intensity normalisation: robust percentiles per channel, applied to every crop.

Stains are normalised once per section (slide), never per crop, so that a dim cell stays dim
next to a bright one. The percentiles are estimated from small windows read around a
deterministic sample of cell centroids (that is where the tissue is), so a 20k x 20k image is
never loaded whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_PERCENTILES = (0.5, 99.5)


@dataclass
class Normalization:
    """Maps raw stain values to [0, 255]: ``(x - low) / (high - low) * 255``, clipped, per channel."""

    low: np.ndarray
    high: np.ndarray
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    n_pixels: int = 0

    def apply(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """``(..., C, H, W)`` raw values (float) -> uint8, the same affine for every crop of the slide."""
        t = torch.as_tensor(x, dtype=torch.float32)
        shape = [1] * t.ndim
        shape[-3] = -1
        lo = torch.as_tensor(self.low, dtype=torch.float32).reshape(shape)
        scale = 255.0 / torch.as_tensor(self.high - self.low, dtype=torch.float32).reshape(shape)
        return ((t - lo) * scale).clamp_(0, 255).round_().to(torch.uint8).numpy()

    def to_json(self) -> dict:
        return {"percentiles": list(self.percentiles), "low": [float(v) for v in self.low],
                "high": [float(v) for v in self.high], "n_pixels_sampled": int(self.n_pixels)}


def estimate_normalization(
    image,
    centroids_px: np.ndarray,
    *,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    n_windows: int = 256,
    window_px: int = 48,
    seed: int = 0,
) -> Normalization:
    """Robust per-channel percentiles of a slide from ``n_windows`` windows of ``window_px``.

    Args:
        image: ``(C, H, W)`` array-like sliceable without loading it (memmap, zarr).
        centroids_px: ``(n, 2)`` (col, row) cell centroids in image pixels; windows are centred on a
            seeded random subset of them.
        percentiles: (low, high) percentiles mapped to 0 and 255.
    """
    lo_p, hi_p = percentiles
    if not 0 <= lo_p < hi_p <= 100:
        raise ValueError(f"percentiles={percentiles}: expected 0 <= low < high <= 100")
    c, h, w = (int(v) for v in image.shape)
    rng = np.random.default_rng(seed)
    n = len(centroids_px)
    pick = rng.choice(n, size=min(n_windows, n), replace=False) if n else np.zeros(0, dtype=int)
    pick.sort()  # read in image order: friendlier to tiled stores
    half = window_px // 2
    samples = []
    for col, row in np.asarray(centroids_px)[pick]:
        r0, c0 = max(int(row) - half, 0), max(int(col) - half, 0)
        r1, c1 = min(r0 + window_px, h), min(c0 + window_px, w)
        if r1 > r0 and c1 > c0:
            samples.append(np.asarray(image[:, r0:r1, c0:c1]).reshape(c, -1))
    if not samples:  # no cells: a coarse strided read
        step = max(1, max(h, w) // 512)
        samples.append(np.asarray(image[:, ::step, ::step]).reshape(c, -1))
    pix = np.concatenate(samples, axis=1).astype(np.float64)
    low = np.percentile(pix, lo_p, axis=1)
    high = np.percentile(pix, hi_p, axis=1)
    high = np.where(high > low, high, low + 1.0)  # a flat channel maps to 0, not NaN
    return Normalization(low=low, high=high, percentiles=(float(lo_p), float(hi_p)), n_pixels=pix.shape[1])
