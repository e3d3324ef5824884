"""Painting synthetic cells into a 2-channel uint16 morphology image (DAPI-like, membrane).

Each cell is an elliptical nucleus (size, eccentricity, brightness, chromatin texture) inside an
elliptical membrane ring. Patches for a chunk of cells are computed at once as ``(n, P, P)``
arrays and composited with ``np.maximum.at`` (overlaps keep the brighter cell), so thousands of
cells render in well under a second; memory is bounded by the chunk size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

DAPI_BACKGROUND, DAPI_SCALE, DAPI_NOISE = 300.0, 14000.0, 60.0
MEMBRANE_BACKGROUND, MEMBRANE_SCALE, MEMBRANE_NOISE = 200.0, 9000.0, 45.0
EDGE_UM = 0.3  # soft edge of nuclei and membranes (optical blur)
RING_UM = 0.45  # half-width of the membrane ring
CYTOPLASM = 0.12  # faint membrane-channel fill inside the cell


@dataclass
class CellShapes:
    """Per-cell geometry and stain parameters (µm, radians, relative intensities)."""

    x_um: np.ndarray
    y_um: np.ndarray
    nucleus_a_um: np.ndarray  # semi-major axis
    nucleus_b_um: np.ndarray  # semi-minor axis
    membrane_a_um: np.ndarray
    membrane_b_um: np.ndarray
    orientation: np.ndarray
    dapi: np.ndarray  # nucleus brightness (0-1)
    texture: np.ndarray  # relative amplitude of chromatin texture
    membrane: np.ndarray  # membrane brightness (0-1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, in place on ``x`` (float32)."""
    x *= np.float32(0.5)
    np.tanh(x, out=x)
    x += np.float32(1.0)
    x *= np.float32(0.5)
    return x


def render_cells(shapes: CellShapes, height: int, width: int, pixel_size_um: float, rng: np.random.Generator,
                 chunk: int = 1024) -> np.ndarray:
    """``(2, height, width)`` uint16 image: channel 0 nuclei, channel 1 membranes, plus camera noise.

    Pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)`` in pixel units, i.e. its centre is at
    ``((c + 0.5) * px, (r + 0.5) * px)`` µm; a cell at ``x_um`` has pixel coordinate ``x_um / px``.
    """
    px = float(pixel_size_um)
    img = np.zeros((2, height, width), dtype=np.uint16)
    flat = img.reshape(2, -1)
    n = len(shapes.x_um)
    for s in range(0, n, chunk):
        sl = slice(s, min(s + chunk, n))
        _paint_chunk(flat, shapes, sl, height, width, px, rng)
    # background and camera noise, band by band (bounded memory)
    for r in range(0, height, 512):
        band = img[:, r : r + 512].astype(np.float32)
        noise = rng.standard_normal(band.shape, dtype=np.float32)
        band[0] += DAPI_BACKGROUND + DAPI_NOISE * noise[0]
        band[1] += MEMBRANE_BACKGROUND + MEMBRANE_NOISE * noise[1]
        img[:, r : r + 512] = np.clip(np.rint(band), 0, 65535).astype(np.uint16)
    return img


def _paint_chunk(flat: np.ndarray, sh: CellShapes, sl: slice, height: int, width: int, px: float,
                 rng: np.random.Generator) -> None:
    x, y = sh.x_um[sl] / px, sh.y_um[sl] / px  # continuous pixel coordinates
    reach_um = float(np.max(sh.membrane_a_um[sl])) + 3 * RING_UM + EDGE_UM
    p = 2 * int(math.ceil(reach_um / px)) + 2
    r0 = np.floor(y).astype(np.int64) - p // 2
    c0 = np.floor(x).astype(np.int64) - p // 2
    grid = np.arange(p, dtype=np.float32) + 0.5
    dv = ((r0[:, None] + grid[None, :]) - y[:, None]).astype(np.float32) * px  # (n, p) rows, µm
    du = ((c0[:, None] + grid[None, :]) - x[:, None]).astype(np.float32) * px  # (n, p) cols, µm
    theta = sh.orientation[sl].astype(np.float32)
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]  # float32 throughout: 2x faster
    u = du[:, None, :] * cos + dv[:, :, None] * sin  # (n, p, p) along the long axis
    v = -du[:, None, :] * sin + dv[:, :, None] * cos

    def rho(a, b):
        r = np.square(u / a[:, None, None])
        r += np.square(v / b[:, None, None])
        return np.sqrt(r, out=r)

    an, bn = sh.nucleus_a_um[sl].astype(np.float32), sh.nucleus_b_um[sl].astype(np.float32)
    am, bm = sh.membrane_a_um[sl].astype(np.float32), sh.membrane_b_um[sl].astype(np.float32)
    rn = np.sqrt(an * bn)[:, None, None] / np.float32(EDGE_UM)
    rm_edge = np.sqrt(am * bm)[:, None, None] / np.float32(EDGE_UM)
    rm_ring = np.sqrt(am * bm)[:, None, None] / np.float32(RING_UM)
    inside_n = _sigmoid((1.0 - rho(an, bn)) * rn)
    tex = rng.standard_normal(inside_n.shape, dtype=np.float32)
    tex = gaussian_filter(tex, sigma=(0, 0.5 / px, 0.5 / px), mode="wrap")
    tex /= tex.std(axis=(1, 2), keepdims=True) + 1e-6
    nucleus = inside_n * np.clip(1.0 + sh.texture[sl][:, None, None].astype(np.float32) * tex, 0.05, None)
    nucleus *= sh.dapi[sl][:, None, None].astype(np.float32)
    rhom = rho(am, bm)
    ring = np.exp(np.float32(-0.5) * np.square((rhom - 1.0) * rm_ring))
    ring += np.float32(CYTOPLASM) * _sigmoid((1.0 - rhom) * rm_edge)
    membrane = ring * sh.membrane[sl][:, None, None].astype(np.float32)

    rows = r0[:, None, None] + np.arange(p)[None, :, None]
    cols = c0[:, None, None] + np.arange(p)[None, None, :]
    valid = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    idx = (rows * width + cols)[valid]
    np.maximum.at(flat[0], idx, np.clip(np.rint(nucleus[valid] * DAPI_SCALE), 0, 65535).astype(np.uint16))
    np.maximum.at(flat[1], idx, np.clip(np.rint(membrane[valid] * MEMBRANE_SCALE), 0, 65535).astype(np.uint16))
