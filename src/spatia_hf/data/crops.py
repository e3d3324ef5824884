"""Cropping a whole-slide image tile by tile, with bounded memory.

The image is only ever sliced as ``image[:, r0:r1, c0:c1]`` (works for ``np.memmap``, zarr and
tifffile's zarr store). It is visited one tile of ``tile_px`` (plus a margin of half a crop) at
a time; every crop whose centre lies in the tile is cut from that one buffer with a single
vectorised gather (large windows are resized in place instead, see
:meth:`CropResampler.from_tile`), resized with area averaging and normalised. Crops that reach
past the image border are zero-padded and counted. A thumbnail is accumulated from the same tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_TILE_PX = 2048
# Windows this large are resized in place in their tile (one GEMM per window on a strided view)
# instead of being copied out first: measured here (one thread, best of 5), the column pass of
# 151 px -> 64 px took 26 µs per window this way against 51 µs with the copy; below ~96 px the
# copy plus one batched GEMM is cheaper.
WINDOW_GEMM_MIN_PX = 96
# Decoded image chunks kept for later tiles (see TileGrid): the margin chunks of one tile row.
BLOCK_CACHE_BYTES = 256 * 2**20


def window_px(size_um: float, pixel_size_um: float) -> int:
    """Side in image pixels of a square window of ``size_um`` µm (at least 1 px)."""
    return max(1, int(round(size_um / pixel_size_um)))


def window_starts(centres_px: np.ndarray, size_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left (row, col) of ``size_px`` windows centred on (col, row) continuous pixel positions.

    Pixel ``i`` covers ``[i, i + 1)``; the window is the ``size_px`` run of pixels whose middle
    is nearest to the centre.
    """
    c = np.asarray(centres_px, dtype=np.float64)
    starts = np.floor(c - size_px / 2.0 + 0.5).astype(np.int64)
    return starts[:, 1], starts[:, 0]


def overlaps_border(rows0: np.ndarray, cols0: np.ndarray, size_px: int, height: int, width: int) -> np.ndarray:
    """Which windows reach past the image (they are zero-padded there)."""
    return (rows0 < 0) | (cols0 < 0) | (rows0 + size_px > height) | (cols0 + size_px > width)


def resize(crops: torch.Tensor, out_px: int) -> torch.Tensor:
    """``(n, C, S, S)`` float -> ``(n, C, out_px, out_px)``: area averaging when shrinking
    (every source pixel counts once), bilinear when enlarging, identity when equal.
    (Reference implementation; the builder uses the equivalent, faster :class:`CropResampler`.)"""
    s = crops.shape[-1]
    if s == out_px:
        return crops
    if s > out_px:
        return F.interpolate(crops, size=(out_px, out_px), mode="area")
    return F.interpolate(crops, size=(out_px, out_px), mode="bilinear", align_corners=False)


class CropResampler:
    """Resize square windows ``S -> out_px`` and normalise them to uint8 in one fused step.

    Area averaging and bilinear interpolation are separable, so a batch of windows is resized with
    two plain matrix products against an ``(S, out_px)`` weight matrix (the same weights as
    ``F.interpolate(mode="area" | "bilinear")``), which BLAS runs much faster than pooling
    kernels; the per-slide affine normalisation, rounding and clipping follow on the small output.
    """

    def __init__(self, size_in: int, size_out: int):
        self.size_in, self.size_out = int(size_in), int(size_out)
        eye = torch.eye(self.size_in).unsqueeze(0)
        if self.size_in > self.size_out:
            self.weights = F.adaptive_avg_pool1d(eye, self.size_out)[0]
        elif self.size_in < self.size_out:
            self.weights = F.interpolate(eye, size=self.size_out, mode="linear", align_corners=False)[0]
        else:
            self.weights = None

    def __call__(self, raw: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
        """``raw`` ``(n, C, S, S)`` (float32 ideally) -> ``(n, C, out, out)`` uint8 with
        ``round((x - low) / (high - low) * 255)`` clipped to [0, 255], per channel."""
        n, c, s, _ = raw.shape
        x = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
        if self.weights is None:
            return self._to_uint8(x.clone(), low, high)
        y = (x.reshape(-1, s) @ self.weights).reshape(n, c, s, self.size_out)  # columns: one GEMM
        return self._to_uint8(self._rows(y), low, high)

    def from_tile(self, tile: "Tile", rows0: np.ndarray, cols0: np.ndarray, low: np.ndarray,
                  high: np.ndarray) -> np.ndarray:
        """The same bytes as ``self(tile.gather(rows0, cols0, S), low, high)``, for windows with absolute
        top-left corners ``rows0, cols0`` inside ``tile`` (whose data should already be float32).

        Windows of at least :data:`WINDOW_GEMM_MIN_PX` are not copied out of the tile: the column
        pass runs as one small GEMM per window straight on its strided view (BLAS takes the tile's
        row stride as the leading dimension), which halves the cost of 151 px windows. Each output
        is the same sequence of multiply-adds as in the batched GEMM, so the bytes do not change.
        """
        rows0, cols0 = np.asarray(rows0, dtype=np.int64), np.asarray(cols0, dtype=np.int64)
        s = self.size_in
        if self.weights is None or s < WINDOW_GEMM_MIN_PX or len(rows0) == 0:
            return self(tile.gather(rows0, cols0, s), low, high)
        c, h, w = tile.data.shape
        r, q = rows0 - tile.r0, cols0 - tile.c0
        if r.min() < 0 or q.min() < 0 or r.max() + s > h or q.max() + s > w:
            raise ValueError(f"windows of {s} px at rows {int(rows0.min())}..{int(rows0.max())}, cols "
                             f"{int(cols0.min())}..{int(cols0.max())} leave the tile (rows {tile.r0}..{tile.r0 + h}, "
                             f"cols {tile.c0}..{tile.c0 + w}). Fix: read the tile with need= covering them")
        data = torch.from_numpy(np.asarray(tile.data, dtype=np.float32))
        weights = self.weights.expand(c, s, self.size_out)  # one GEMM per window for all its channels
        y = torch.empty((len(r), c, s, self.size_out))
        for i, (a, b) in enumerate(zip(r.tolist(), q.tolist())):
            torch.bmm(data[:, a : a + s, b : b + s], weights, out=y[i])
        return self._to_uint8(self._rows(y), low, high)

    def _rows(self, y: torch.Tensor) -> torch.Tensor:
        """Second (row) pass of the separable resize: ``(n, C, S, out)`` -> ``(n, C, out, out)``."""
        n, c, s, o = y.shape
        return torch.matmul(self.weights.T, y.reshape(n * c, s, o)).reshape(n, c, o, o)  # batched GEMM

    @staticmethod
    def _to_uint8(x: torch.Tensor, low: np.ndarray, high: np.ndarray) -> np.ndarray:
        """Per-channel affine normalisation of float ``(n, C, o, o)`` (in place), rounded half up, clipped."""
        c = x.shape[1]
        low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
        scale = torch.as_tensor(255.0 / (high - low), dtype=torch.float32).view(1, c, 1, 1)
        bias = torch.as_tensor(0.5 - low * 255.0 / (high - low), dtype=torch.float32).view(1, c, 1, 1)
        x.mul_(scale).add_(bias).clamp_(0.0, 255.0)  # +0.5 then truncation: round half up
        return x.to(torch.uint8).numpy()


@dataclass
class Tile:
    """A buffer of the image covering rows ``[r0, r0 + H)``, cols ``[c0, c0 + W)``, zero outside."""

    row: int
    col: int
    r0: int
    c0: int
    data: np.ndarray  # (C, H, W), dtype of the image

    def gather(self, rows0: np.ndarray, cols0: np.ndarray, size_px: int) -> np.ndarray:
        """``(n, C, S, S)`` windows with absolute top-left corners ``rows0, cols0`` (one gather)."""
        view = np.lib.stride_tricks.sliding_window_view(self.data, (size_px, size_px), axis=(1, 2))
        # numpy lays the advanced-index axis out first in memory: moving it first is free
        return np.moveaxis(view[:, rows0 - self.r0, cols0 - self.c0], 0, 1)


class TileGrid:
    """A grid of ``tile_px`` tiles over a ``(C, H, W)`` image, each read with ``margin_px`` around it."""

    def __init__(self, image, tile_px: int, margin_px: int, block: tuple[int, int] | None = None,
                 cache_bytes: int = BLOCK_CACHE_BYTES):
        """``block``: the (rows, cols) chunk grid the image is stored (and decoded) in, see
        :func:`storage_block`; given, tiles are assembled from whole chunks and the chunks that
        neighbouring tiles share (their margins) are decoded once, not two to four times."""
        self.image = image
        self.c, self.h, self.w = (int(v) for v in image.shape)
        self.tile_px = int(tile_px)
        self.margin = int(margin_px)
        self.n_rows = max(1, math.ceil(self.h / self.tile_px))
        self.n_cols = max(1, math.ceil(self.w / self.tile_px))
        self.cache = _ChunkCache(self, block, cache_bytes) if block is not None else None

    def tile_of(self, centres_px: np.ndarray) -> np.ndarray:
        """Flat tile index (row-major) of each (col, row) position (clamped onto the grid)."""
        c = np.asarray(centres_px, dtype=np.float64)
        tr = np.clip(np.floor(c[:, 1] / self.tile_px), 0, self.n_rows - 1).astype(np.int64)
        tc = np.clip(np.floor(c[:, 0] / self.tile_px), 0, self.n_cols - 1).astype(np.int64)
        return tr * self.n_cols + tc

    def read(self, flat: int, need: tuple[int, int, int, int] | None = None) -> Tile:
        """Tile ``flat`` plus its margin, grown to cover ``need`` = (r0, c0, r1, c1) if given (windows
        of positions clamped onto the grid); zero-filled where it leaves the image."""
        tr, tc = divmod(int(flat), self.n_cols)
        r0 = tr * self.tile_px - self.margin
        c0 = tc * self.tile_px - self.margin
        r1 = min((tr + 1) * self.tile_px, self.h) + self.margin
        c1 = min((tc + 1) * self.tile_px, self.w) + self.margin
        if need is not None:
            r0, c0, r1, c1 = min(r0, need[0]), min(c0, need[1]), max(r1, need[2]), max(c1, need[3])
        rr0, cc0, rr1, cc1 = max(r0, 0), max(c0, 0), min(r1, self.h), min(c1, self.w)
        if self.cache is not None:
            inside = (rr0, cc0, rr1, cc1) == (r0, c0, r1, c1)
            data = (np.empty if inside else np.zeros)((self.c, r1 - r0, c1 - c0), dtype=np.dtype(self.image.dtype))
            if rr1 > rr0 and cc1 > cc0:
                self.cache.fill(data, r0, c0, (rr0, cc0, rr1, cc1), tr, tc)
            return Tile(tr, tc, r0, c0, data)
        part = np.asarray(self.image[:, rr0:rr1, cc0:cc1]) if rr1 > rr0 and cc1 > cc0 else None
        if part is not None and (rr0, cc0, rr1, cc1) == (r0, c0, r1, c1):
            data = part
        else:
            data = np.zeros((self.c, r1 - r0, c1 - c0), dtype=np.dtype(self.image.dtype))
            if part is not None:
                data[:, rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = part
        return Tile(tr, tc, r0, c0, data)

    def inner(self, tile: Tile) -> tuple[int, int, np.ndarray]:
        """The tile without its margin (clipped to the image): (row0, col0, data)."""
        r0, c0 = tile.row * self.tile_px, tile.col * self.tile_px
        r1, c1 = min(r0 + self.tile_px, self.h), min(c0 + self.tile_px, self.w)
        return r0, c0, tile.data[:, r0 - tile.r0 : r1 - tile.r0, c0 - tile.c0 : c1 - tile.c0]


def storage_block(image) -> tuple[int, int] | None:
    """(rows, cols) of the chunks an image is stored and decoded in, where it says so (``.chunks``
    of zarr arrays and of the readers' lazy views); None otherwise (memmaps, plain arrays, dask)."""
    chunks = getattr(image, "chunks", None)
    try:
        bh, bw = int(chunks[-2]), int(chunks[-1])
    except (TypeError, IndexError, ValueError):
        return None
    return (bh, bw) if bh > 0 and bw > 0 else None


def _rectangles(missing: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Cover the True cells of a 2-D mask with rectangles ``(i0, i1, j0, j1)``: runs along each row,
    merged down while the next row has the same run (an L-shaped gap becomes two reads)."""
    done: list[tuple[int, int, int, int]] = []
    open_: dict[tuple[int, int], int] = {}
    for i, row in enumerate(missing):
        edges = np.flatnonzero(np.diff(np.r_[0, row.astype(np.int8), 0]))
        runs = set(zip(edges[::2].tolist(), edges[1::2].tolist()))
        for run in list(open_):
            if run not in runs:
                done.append((open_.pop(run), i, *run))
        for run in runs:
            open_.setdefault(run, i)
    done.extend((i0, len(missing), *run) for run, i0 in open_.items())
    return done


class _ChunkCache:
    """Decoded chunks of a :class:`TileGrid`'s image, kept while a later tile still needs them.

    Tiles are read in row-major order. A chunk in the margin that a tile shares with its right
    neighbour, or with the next tile row, is decoded once and kept until no later tile can reach
    it; at most ``max_bytes`` are kept (those needed last are dropped first; a dropped chunk is
    simply read again). The tile buffers are byte for byte those of direct reads.
    """

    def __init__(self, grid: "TileGrid", block: tuple[int, int], max_bytes: int):
        self.grid, self.bh, self.bw, self.max_bytes = grid, int(block[0]), int(block[1]), int(max_bytes)
        self.blocks: dict[tuple[int, int], np.ndarray] = {}
        self.reads = 0  # image reads issued (for tests and benchmarks)

    def fill(self, out: np.ndarray, r0: int, c0: int, box: tuple[int, int, int, int], tr: int, tc: int) -> None:
        """Copy the image part ``box`` = (r0, c0, r1, c1) (inside the image) into ``out``, whose
        top-left is at absolute (``r0``, ``c0``), as part of reading tile (``tr``, ``tc``)."""
        g, bh, bw = self.grid, self.bh, self.bw
        rr0, cc0, rr1, cc1 = box
        br0, br1, bc0, bc1 = rr0 // bh, (rr1 - 1) // bh + 1, cc0 // bw, (cc1 - 1) // bw + 1

        def paste(src: np.ndarray, a0: int, b0: int) -> None:  # src covers rows a0.., cols b0.. (absolute)
            ra, rb = max(a0, rr0), min(a0 + src.shape[1], rr1)
            ca, cb = max(b0, cc0), min(b0 + src.shape[2], cc1)
            out[:, ra - r0 : rb - r0, ca - c0 : cb - c0] = src[:, ra - a0 : rb - a0, ca - b0 : cb - b0]

        missing = np.ones((br1 - br0, bc1 - bc0), dtype=bool)
        for (i, j), block in self.blocks.items():
            if br0 <= i < br1 and bc0 <= j < bc1:
                missing[i - br0, j - bc0] = False
                paste(block, i * bh, j * bw)
        for i0, i1, j0, j1 in _rectangles(missing):
            a0, b0 = (br0 + i0) * bh, (bc0 + j0) * bw
            part = np.asarray(g.image[:, a0 : min((br0 + i1) * bh, g.h), b0 : min((bc0 + j1) * bw, g.w)])
            self.reads += 1
            paste(part, a0, b0)
            for i in range(br0 + i0, br0 + i1):
                for j in range(bc0 + j0, bc0 + j1):
                    if self._needed_later(i, j, tr, tc):
                        self.blocks[i, j] = part[:, (i * bh - a0) : (i + 1) * bh - a0,
                                                 (j * bw - b0) : (j + 1) * bw - b0].copy()
        for key in [k for k in self.blocks if not self._needed_later(*k, tr, tc)]:
            del self.blocks[key]
        self._trim(tr, tc)

    def _needed_later(self, i: int, j: int, tr: int, tc: int) -> bool:
        """Can a tile after (tr, tc) in row-major order reach chunk (i, j) (margins included)?"""
        g = self.grid
        next_row = tr + 1 < g.n_rows and (i + 1) * self.bh > (tr + 1) * g.tile_px - g.margin
        return next_row or self._in_row(i, j, tr, tc)

    def _in_row(self, i: int, j: int, tr: int, tc: int) -> bool:
        """Can a later tile of tile row ``tr`` (right of ``tc``) reach chunk (i, j)?"""
        g = self.grid
        t, m = g.tile_px, g.margin
        return (tc + 1 < g.n_cols and (j + 1) * self.bw > (tc + 1) * t - m
                and (i + 1) * self.bh > tr * t - m and i * self.bh < min((tr + 1) * t, g.h) + m)

    def _trim(self, tr: int, tc: int) -> None:
        """Keep at most ``max_bytes``: drop the chunks needed last (the next row's, rightmost) first."""
        total = sum(b.nbytes for b in self.blocks.values())
        if total <= self.max_bytes:
            return
        last_first = sorted(self.blocks, key=lambda k: (not self._in_row(*k, tr, tc), k[1]), reverse=True)
        for key in last_first:
            total -= self.blocks.pop(key).nbytes
            if total <= self.max_bytes:
                break


class ThumbnailAccumulator:
    """Builds a ``thumb_px`` thumbnail (area mean of ``factor`` x ``factor`` blocks) from tiles.

    Tiles must start at multiples of ``factor`` (choose ``tile_px`` with :meth:`aligned_tile_px`).
    Tiles never visited (no cells there) are filled by a strided read in :meth:`finish`.
    """

    def __init__(self, shape: tuple[int, int, int], thumb_px: int):
        self.c, self.h, self.w = (int(v) for v in shape)
        self.thumb_px = int(thumb_px)
        self.factor = max(1, math.ceil(max(self.h, self.w) / self.thumb_px))
        self.th, self.tw = math.ceil(self.h / self.factor), math.ceil(self.w / self.factor)
        self.sum = np.zeros((self.c, self.th, self.tw), dtype=np.float64)
        self.count = np.zeros((self.th, self.tw), dtype=np.float64)

    def aligned_tile_px(self, tile_px: int) -> int:
        return max(1, math.ceil(tile_px / self.factor)) * self.factor

    def add(self, r0: int, c0: int, data: np.ndarray) -> None:
        k = self.factor
        if r0 % k or c0 % k:
            raise ValueError("thumbnail tiles must start at multiples of the thumbnail factor")
        c, h, w = data.shape
        hp, wp = math.ceil(h / k) * k, math.ceil(w / k) * k
        if (hp, wp) != (h, w):
            padded = np.zeros((c, hp, wp), dtype=np.float32)
            padded[:, :h, :w] = data
            ones = np.zeros((hp, wp), dtype=np.float32)
            ones[:h, :w] = 1
        else:
            padded, ones = data.astype(np.float32, copy=False), None
        s = padded.reshape(c, hp // k, k, wp // k, k).sum(axis=(2, 4), dtype=np.float64)
        n = (np.full((hp // k, wp // k), float(k * k)) if ones is None
             else ones.reshape(hp // k, k, wp // k, k).sum(axis=(1, 3), dtype=np.float64))
        tr, tc = r0 // k, c0 // k
        self.sum[:, tr : tr + s.shape[1], tc : tc + s.shape[2]] += s
        self.count[tr : tr + s.shape[1], tc : tc + s.shape[2]] += n

    def finish(self, image, grid: "TileGrid", visited: set[int]) -> np.ndarray:
        """Mean image ``(C, th, tw)`` in raw units; unvisited tiles get a strided (nearest) read."""
        k = self.factor
        for flat in range(grid.n_rows * grid.n_cols):
            if flat in visited:
                continue
            tr, tc = divmod(flat, grid.n_cols)
            r0, c0 = tr * grid.tile_px, tc * grid.tile_px
            r1, c1 = min(r0 + grid.tile_px, self.h), min(c0 + grid.tile_px, self.w)
            if r1 <= r0 or c1 <= c0:
                continue
            part = np.asarray(image[:, r0:r1:k, c0:c1:k], dtype=np.float64)
            a, b = r0 // k, c0 // k
            self.sum[:, a : a + part.shape[1], b : b + part.shape[2]] += part
            self.count[a : a + part.shape[1], b : b + part.shape[2]] += 1
        return self.sum / np.maximum(self.count, 1)[None]
