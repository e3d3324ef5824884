"""Catch centroids given in the wrong unit before any crop is cut.

An AnnData's ``obsm["spatial"]`` may hold image pixels (scanpy/squidpy's Visium and CosMx readers) or µm
(spatialdata-io's Xenium and MERSCOPE tables). Read in the wrong unit, every crop comes from the wrong place
and nothing fails: µm read as pixels of a 0.2 µm/px image puts the cells into the top-left fifth of it.
:func:`check_spatial_units` compares where the centroids land on the image under the unit given and under
the other one, and refuses when the given unit leaves most cells off the image or crowds them into a small
corner while the other unit fits, naming the other unit in the fix.
"""

from __future__ import annotations

import numpy as np

UNITS = ("px", "um")
UNIT_ARGUMENT = {"px": "spatial_units='px'", "um": "spatial_units='um'"}
UNIT_WORD = {"px": "image pixels", "um": "µm"}
# refuse when more than this fraction of centroids falls off the image (a few edge cells are normal:
# the builder drops or refuses those one by one with --outside)
MAX_OUTSIDE = 0.25
# "a small part of the image": the centroids' bounding box spans less than SMALL_SPAN of the image along
# both axes while the other unit keeps the cells on the image and spans at least OTHER_RATIO times as much
# (µm read as pixels shrink the layout by the pixel size: 0.2125 for Xenium, 0.5 for many exports)
SMALL_SPAN = 0.7
OTHER_RATIO = 1.5


def image_fit(xy_px: np.ndarray, height: int, width: int) -> tuple[float, float]:
    """(fraction of centroids on the image, largest fraction of an image side their bounding box spans)."""
    if len(xy_px) == 0:
        return 1.0, 1.0
    inside = (xy_px[:, 0] >= 0) & (xy_px[:, 0] < width) & (xy_px[:, 1] >= 0) & (xy_px[:, 1] < height)
    span = max(float(np.ptp(xy_px[:, 0])) / max(width, 1), float(np.ptp(xy_px[:, 1])) / max(height, 1))
    return float(inside.mean()), span


def to_pixels(xy: np.ndarray, units: str, pixel_size_um: float) -> np.ndarray:
    return xy if units == "px" else xy / pixel_size_um


def check_spatial_units(xy: np.ndarray, units: str, pixel_size_um: float, image_hw: tuple[int, int], *,
                        source: str = "AnnData", key: str = "spatial") -> None:
    """Raise ``ValueError`` when ``xy`` (``obsm[key]``) does not look like ``units`` on this image.

    Args:
        xy: ``(n, 2)`` centroids as stored (x = column, y = row).
        units: ``"px"`` (pixels of ``image``) or ``"um"``.
        pixel_size_um: µm per image pixel.
        image_hw: image height and width in pixels.
    """
    if units not in UNITS:
        raise ValueError(f"spatial_units={units!r}: expected 'px' (pixels of the image) or 'um'")
    xy = np.asarray(xy, dtype=np.float64)[:, :2]
    xy = xy[np.isfinite(xy).all(axis=1)]
    if len(xy) < 2 or np.isclose(pixel_size_um, 1.0, rtol=0.05):
        return  # with 1 µm/px both readings put the cells in the same place
    h, w = (int(v) for v in image_hw)
    other = "um" if units == "px" else "px"
    inside, span = image_fit(to_pixels(xy, units, pixel_size_um), h, w)
    inside_o, span_o = image_fit(to_pixels(xy, other, pixel_size_um), h, w)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    where = (f"{source}: obsm[{key!r}] centroids span x {lo[0]:.0f}-{hi[0]:.0f}, y {lo[1]:.0f}-{hi[1]:.0f}; read "
             f"as {UNIT_WORD[units]} ({UNIT_ARGUMENT[units]}, {pixel_size_um:g} µm/px) on the {w} x {h} px image")
    fix_other = (f"Fix: they look like {UNIT_WORD[other]}; pass {UNIT_ARGUMENT[other]} (CLI: --spatial-units "
                 f"{other}) with the right pixel_size_um")
    other_fits = inside_o >= 1 - MAX_OUTSIDE / 5
    if inside < 1 - MAX_OUTSIDE:
        fix = fix_other if other_fits else ("Fix: check pixel_size_um (--pixel-size), that the image belongs to "
                                            "these cells, and spatial_units ('px' or 'um')")
        raise ValueError(f"{where}, {1 - inside:.0%} of them fall outside it. {fix}")
    if span < SMALL_SPAN and other_fits and span_o >= OTHER_RATIO * span:
        raise ValueError(f"{where}, they cover only {span:.0%} of its width or height (as {UNIT_WORD[other]}: "
                         f"{min(span_o, 1):.0%}). {fix_other}. If the cells really occupy only that corner of the "
                         "image, pass check_units=False (CLI: --no-unit-check)")
