"""Sections -> a multi-scale ``datasets`` folder: ``cells``, ``niches`` and ``tissues`` configs.

``build_multiscale_dataset(sections, out_dir)`` validates every Section (shared checks in
``validation.py``), maps its genes onto one dataset panel, normalises its stains once per slide,
crops cells and niches tile by tile (bounded memory, vectorised), and writes Parquet shards typed
by the Features of ``schema.py``, a dataset card and two JSON side files:

```
DIR/README.md                      card; YAML lists the three configs (load_dataset(DIR, "cells"))
DIR/gene_panel.json                genes, gene_ids, dropped / unknown / missing genes per section
DIR/sections.json                  build parameters, per-section normalisation, provenance, ground truth
DIR/cells/<sample_id>-00000.parquet  ...  DIR/niches/...  DIR/tissues/<sample_id>-00000.parquet
```

Everything is written to a staging folder beside ``DIR`` (``.DIR.<random>.spatia-build``, made by
``utils.io.new_stage``) and moved into ``DIR`` at the end (``utils.io.publish``: over an existing
``DIR`` only the build's own files are replaced, plus shards of sections it no longer holds). Each
finished section leaves a marker in the staging folder's ``_progress``; ``resume=True`` reuses the
finished sections of the newest interrupted build (same parameters, same inputs) and yields
byte-identical shards.

Defaults (CPU scale; the paper uses 224-256 px crops): cells 32 µm -> 64 px, niches 50 µm grid
tiles -> 64 px, thumbnails 256 px; per-slide 0.5 / 99.5 percentile normalisation.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import shutil
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from . import schema
from .card import write_card
from .defaults import DEFAULT_CROP_PX, DEFAULT_CROP_UM, DEFAULT_NICHE_PX, DEFAULT_NICHE_UM, DEFAULT_THUMB_PX
from .crops import (
    DEFAULT_TILE_PX,
    CropResampler,
    ThumbnailAccumulator,
    TileGrid,
    overlaps_border,
    storage_block,
    window_px,
    window_starts,
)
from .gene_panel import PANEL_MODES, GenePanel
from .niches import NicheGrid, grid_niches, majority_labels
from .normalize import DEFAULT_PERCENTILES, Normalization, estimate_normalization
from .section import Section
from .shards import Ragged, table_from_columns, write_parquet
from .validation import OUTSIDE_POLICIES, validate_section
from spatia_hf.utils.progress import respects_progress
from ..utils.io import new_stage, publish, read_json, write_json

CELL_SHARD_ROWS = 4096
NICHE_SHARD_ROWS = 1024
CROP_BATCH = 256
CROP_BATCH_BYTES = 64 * 2**20
# Threads of the crop loop (2 cores): one reads the next tile, CROP_THREADS crop the current one
# (BLAS and numpy release the GIL), and up to SHARDS_IN_FLIGHT shards per config are encoded at once.
CROP_THREADS = 2
SHARDS_IN_FLIGHT = 2
SHARD_THREADS = 2
SECTIONS_FILE = "sections.json"
BUILD_SUFFIX = ".spatia-build"  # staging folder of a (resumable) build: .DIR.<random>.spatia-build beside DIR
PROGRESS_DIR = "_progress"
_RESERVED = set(schema.cell_features(1, 1).keys()) | set(schema.niche_features(1, 1).keys()) | set(
    schema.tissue_features(1, 1).keys())


@dataclass(frozen=True)
class BuildParams:
    """Everything that changes the bytes of the output (stored; resume requires equality)."""

    crop_um: float
    crop_px: int
    niche_um: float
    niche_px: int
    thumb_px: int
    label_keys: tuple[str, ...] | None
    value_keys: tuple[str, ...] | None
    section_label_keys: tuple[str, ...] | None
    gene_panel: str | tuple[str, ...]
    outside: str
    percentiles: tuple[float, float]
    tile_px: int
    cell_shard_rows: int
    niche_shard_rows: int

    def check(self) -> None:
        for name in ("crop_um", "niche_um"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}={v!r}: expected a positive size in µm")
        for name in ("crop_px", "niche_px", "thumb_px", "tile_px", "cell_shard_rows", "niche_shard_rows"):
            v = getattr(self, name)
            if not (isinstance(v, (int, np.integer)) and v > 0):
                raise ValueError(f"{name}={v!r}: expected a positive integer")
        if self.outside not in OUTSIDE_POLICIES:
            raise ValueError(f"outside={self.outside!r}: expected one of {OUTSIDE_POLICIES}")
        if isinstance(self.gene_panel, str) and self.gene_panel not in PANEL_MODES:
            raise ValueError(f"gene_panel={self.gene_panel!r}: expected one of {PANEL_MODES} or a list of genes")
        for group in (self.label_keys, self.value_keys, self.section_label_keys):
            bad = [k for k in (group or ()) if k in _RESERVED]
            if bad:
                raise ValueError(f"label/value keys {bad} collide with dataset columns; rename them in obs "
                                 "(e.g. obs.rename(columns=...)) or leave them out")

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass
class _Layout:
    """Column layout fixed by the first section (all shards of a config share one schema)."""

    n_channels: int
    channel_names: list[str]
    label_keys: list[str]
    value_keys: list[str]
    section_label_keys: list[str]


def _numeric_obs_columns(obs: pd.DataFrame | None, exclude: Iterable[str]) -> list[str]:
    if obs is None:
        return []
    skip = set(exclude)
    return [str(c) for c in obs.columns if c not in skip and pd.api.types.is_numeric_dtype(obs[c])
            and not pd.api.types.is_bool_dtype(obs[c])]


def _layout_for(section: Section, p: BuildParams) -> _Layout:
    have = [] if section.obs is None else list(map(str, section.obs.columns))
    for name, keys in (("label_keys", p.label_keys), ("value_keys", p.value_keys)):
        missing = [k for k in (keys or ()) if k not in have]
        if missing:
            raise ValueError(f"section {section.sample_id!r}: {name}: {missing} are not obs columns (obs has "
                             f"{have[:20]}). Fix: pick {name} among the obs columns")
    labels = list(p.label_keys) if p.label_keys is not None else list(section.label_keys)
    values = list(p.value_keys) if p.value_keys is not None else _numeric_obs_columns(section.obs, labels)
    values = [v for v in values if v not in _RESERVED]
    sec_labels = (list(p.section_label_keys) if p.section_label_keys is not None
                  else sorted(section.section_labels))
    c = int(section.image.shape[0])
    names = list(section.channel_names) if section.channel_names else [f"channel_{i}" for i in range(c)]
    return _Layout(c, names, labels, values, sec_labels)


def _jsonable(obj: Any, max_items: int = 100_000) -> Any:
    """A JSON-safe copy of provenance (numpy -> lists; anything else -> its repr)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, max_items) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, max_items) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.size <= max_items else f"<array {obj.shape} {obj.dtype}>"
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return repr(obj)


def _section_fingerprint(s: Section) -> str:
    """Hash of what a section's shards depend on (to refuse reusing stale resume markers)."""
    h = hashlib.sha256()
    h.update(s.sample_id.encode())
    h.update(json.dumps([s.n_cells, s.n_genes, list(map(str, s.genes)), list(map(int, s.image.shape)),
                         float(s.pixel_size_um), s.section_labels], default=str).encode())
    h.update("\x1f".join(map(str, s.cell_ids)).encode())
    h.update(np.ascontiguousarray(s.centroids_um, dtype=np.float64).tobytes())
    h.update(np.asarray(s.um_to_px, dtype=np.float64).tobytes())
    csr = s.counts_csr()
    h.update(np.float64(csr.sum()).tobytes())
    h.update(np.asarray(csr.getnnz(axis=1), dtype=np.int64).tobytes())
    if s.obs is not None:
        try:
            h.update(pd.util.hash_pandas_object(s.obs, index=True).to_numpy().tobytes())
        except TypeError:  # unhashable cells (lists, dicts): fall back on the columns and shape
            h.update(json.dumps([list(map(str, s.obs.columns)), list(s.obs.shape)]).encode())
    return h.hexdigest()


def _shard_name(sample_id: str, k: int) -> str:
    return f"{sample_id}-{k:05d}.parquet"


def _remove_section_shards(root: Path, sample_id: str) -> None:
    """A section's shards in the staging folder ``root`` (and temporaries of a killed shard write)."""
    pattern = re.compile(rf"^\.?{re.escape(sample_id)}-\d{{5}}\.parquet(\.tmp|\..+\.tmp\.parquet)?$")
    for config in schema.CONFIGS:
        d = root / config
        if d.is_dir():
            for f in d.iterdir():
                if pattern.match(f.name):
                    f.unlink()


class _ShardWriter:
    """Buffers rows (as source indices + images) and writes ``rows`` per Parquet shard.

    Shards are assembled and written on background threads (Arrow and Parquet release the GIL;
    encoding the nested image lists is the largest single cost of a build), overlapping with the
    cropping of the next rows; at most ``SHARDS_IN_FLIGHT`` shards per writer are queued or being
    written, so memory stays bounded. Each shard is one file written by one thread: the bytes do
    not depend on how many are in flight.
    """

    def __init__(self, features, directory: Path, sample_id: str, rows: int, columns, pool: ThreadPoolExecutor):
        self.features, self.dir, self.sample_id, self.rows, self.columns = features, directory, sample_id, rows, columns
        self.pool = pool
        self.pending: deque[Future] = deque()
        self.idx: list[np.ndarray] = []
        self.images: list[np.ndarray] = []
        self.buffered = 0
        self.paths: list[str] = []

    def add(self, idx: np.ndarray, images: np.ndarray) -> None:
        self.idx.append(np.asarray(idx))
        self.images.append(images)
        self.buffered += len(idx)
        while self.buffered >= self.rows:
            self._flush(self.rows)

    def close(self) -> list[str]:
        if self.buffered:
            self._flush(self.buffered)
        self._wait(0)
        return self.paths

    def _wait(self, at_most: int) -> None:
        """Wait (oldest first) until at most ``at_most`` shards are pending."""
        while len(self.pending) > at_most:
            self.pending.popleft().result()  # re-raises a failed write

    def _write(self, idx: np.ndarray, images: np.ndarray, path: Path) -> None:
        write_parquet(table_from_columns(self.features, self.columns(idx, images), len(idx)), path)

    def _flush(self, n: int) -> None:
        idx, images = np.concatenate(self.idx), np.concatenate(self.images)
        self.idx, self.images = [idx[n:]], [images[n:]]
        self.buffered = len(idx) - n
        path = self.dir / _shard_name(self.sample_id, len(self.paths))
        self._wait(SHARDS_IN_FLIGHT - 1)
        self.pending.append(self.pool.submit(self._write, idx[:n], images[:n], path))
        self.paths.append(f"{self.dir.name}/{path.name}")


def _labels(obs: pd.DataFrame | None, keys: list[str], n: int) -> dict[str, np.ndarray]:
    out = {}
    for k in keys:
        if obs is None or k not in obs.columns:
            out[k] = np.full(n, None, dtype=object)
        else:
            col = obs[k].astype(object).to_numpy()
            out[k] = np.array([None if (v is None or (isinstance(v, float) and math.isnan(v))) else str(v)
                               for v in col], dtype=object)
    return out


def _values(obs: pd.DataFrame | None, keys: list[str], n: int) -> dict[str, np.ndarray]:
    out = {}
    for k in keys:
        if obs is None or k not in obs.columns:
            out[k] = np.full(n, np.nan, dtype=np.float32)
        else:
            out[k] = pd.to_numeric(obs[k], errors="coerce").to_numpy(dtype=np.float32)
    return out


def _batch_size(channels: int, window_px: int) -> int:
    """Crops per vectorised batch: up to ``CROP_BATCH``, at most ~``CROP_BATCH_BYTES`` of float32 windows."""
    return int(max(1, min(CROP_BATCH, CROP_BATCH_BYTES // (4 * channels * window_px * window_px))))


def _ragged_rows(m: sp.csr_matrix, rows: np.ndarray) -> tuple[Ragged, Ragged]:
    sub = m[rows]
    return Ragged(sub.indptr, sub.indices), Ragged(sub.indptr, sub.data)


def _build_section(section: Section, panel: GenePanel, layout: _Layout, p: BuildParams, root: Path,
                   progress: bool) -> dict:
    """Write the cells / niches / tissues shards of one validated section; return its summary."""
    sid = section.sample_id
    n = section.n_cells
    counts, panel_report = panel.map_counts(section)
    xy_um = np.asarray(section.centroids_um, dtype=np.float64)
    cpx = section.centroids_px()
    px = float(section.pixel_size_um)
    c, h, w = (int(v) for v in section.image.shape)
    norm: Normalization = estimate_normalization(section.image, cpx, percentiles=p.percentiles)

    niches: NicheGrid = grid_niches(xy_um, p.niche_um)
    niche_ids = np.array(niches.ids(sid), dtype=object)
    niche_counts = (niches.membership() @ counts).tocsr()
    niche_counts.sort_indices()
    members = niches.members()
    m2p = np.asarray(section.um_to_px, dtype=np.float64)
    ncpx = (np.c_[niches.centres_um, np.ones(niches.n_niches)] @ m2p.T)[:, :2]

    s_cell, s_niche = window_px(p.crop_um, px), window_px(p.niche_um, px)
    thumb = ThumbnailAccumulator((c, h, w), p.thumb_px)
    grid = TileGrid(section.image, thumb.aligned_tile_px(p.tile_px), max(s_cell, s_niche) // 2 + 2,
                    block=storage_block(section.image))
    cell_tile, niche_tile = grid.tile_of(cpx), grid.tile_of(ncpx)
    # Cells are written tile by tile and, within a tile, niche by niche: a niche's cells lie together in
    # the shards, so a stream can group them into niche examples without an index (training/streaming.py).
    cell_order = np.lexsort((np.arange(n), niches.niche_of_cell, cell_tile))
    niche_order = np.lexsort((np.arange(niches.n_niches), niche_tile))
    tiles = np.unique(np.concatenate([cell_tile, niche_tile]))
    cell_bounds = np.searchsorted(cell_tile[cell_order], np.r_[tiles, tiles[-1] + 1], side="left")
    niche_bounds = np.searchsorted(niche_tile[niche_order], np.r_[tiles, tiles[-1] + 1], side="left")
    cr0, cc0 = window_starts(cpx, s_cell)
    nr0, nc0 = window_starts(ncpx, s_niche)
    cell_padded = overlaps_border(cr0, cc0, s_cell, h, w)
    niche_padded = overlaps_border(nr0, nc0, s_niche, h, w)

    labels = _labels(section.obs, layout.label_keys, n)
    values = _values(section.obs, layout.value_keys, n)
    cell_ids = np.array([str(x) for x in section.cell_ids], dtype=object)
    crop_pixel_um = s_cell * px / p.crop_px
    niche_pixel_um = s_niche * px / p.niche_px

    def cell_columns(idx: np.ndarray, images: np.ndarray) -> dict:
        gi, gc = _ragged_rows(counts, idx)
        cols = {
            schema.CELL_ID: cell_ids[idx], schema.SAMPLE_ID: [sid] * len(idx), schema.IMAGE: images,
            schema.GENE_INDICES: gi, schema.GENE_COUNTS: gc,
            schema.X_UM: xy_um[idx, 0], schema.Y_UM: xy_um[idx, 1],
            schema.PIXEL_SIZE_UM: np.full(len(idx), crop_pixel_um),
            schema.NICHE_ID: niche_ids[niches.niche_of_cell[idx]],
        }
        cols.update({k: v[idx] for k, v in labels.items()})
        cols.update({k: v[idx] for k, v in values.items()})
        return cols

    niche_labels = {k: np.array(majority_labels(v, niches.niche_of_cell, niches.n_niches), dtype=object)
                    for k, v in labels.items()}

    def niche_columns(idx: np.ndarray, images: np.ndarray) -> dict:
        gi, gc = _ragged_rows(niche_counts, idx)
        mem = [members[i] for i in idx]
        rel = [xy_um[m] - niches.centres_um[i] for m, i in zip(mem, idx)]
        cols = {
            schema.NICHE_ID: niche_ids[idx], schema.SAMPLE_ID: [sid] * len(idx), schema.IMAGE: images,
            schema.GENE_INDICES: gi, schema.GENE_COUNTS: gc,
            schema.X_UM: niches.centres_um[idx, 0], schema.Y_UM: niches.centres_um[idx, 1],
            schema.PIXEL_SIZE_UM: np.full(len(idx), niche_pixel_um),
            schema.CELL_IDS: [cell_ids[m].tolist() for m in mem],
            schema.CELL_REL_X_UM: Ragged.from_lists([r[:, 0] for r in rel], np.float32),
            schema.CELL_REL_Y_UM: Ragged.from_lists([r[:, 1] for r in rel], np.float32),
            schema.N_CELLS: np.array([len(m) for m in mem]),
        }
        cols.update({k: v[idx] for k, v in niche_labels.items()})
        return cols

    cell_feats = schema.cell_features(c, p.crop_px, layout.label_keys, layout.value_keys)
    niche_feats = schema.niche_features(c, p.niche_px, layout.label_keys)
    pool = ThreadPoolExecutor(max_workers=SHARD_THREADS, thread_name_prefix="spatia-shards")
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spatia-tiles")
    cropper = ThreadPoolExecutor(max_workers=CROP_THREADS, thread_name_prefix="spatia-crops")
    cells_w = _ShardWriter(cell_feats, root / "cells", sid, p.cell_shard_rows, cell_columns, pool)
    niches_w = _ShardWriter(niche_feats, root / "niches", sid, p.niche_shard_rows, niche_columns, pool)

    resample_cell, resample_niche = CropResampler(s_cell, p.crop_px), CropResampler(s_niche, p.niche_px)
    cell_batch, niche_batch = _batch_size(c, s_cell), _batch_size(c, s_niche)

    def crops(tile, idx, r0, c0, resample) -> np.ndarray:
        with torch.inference_mode():  # thread-local: entered on the crop thread
            return resample.from_tile(tile, r0[idx], c0[idx], norm.low, norm.high)

    big, small = 1 << 62, -(1 << 62)

    def tile_members(j: int) -> tuple[np.ndarray, np.ndarray]:
        """Cells and niches whose centre lies in the ``j``-th visited tile."""
        return (cell_order[cell_bounds[j] : cell_bounds[j + 1]], niche_order[niche_bounds[j] : niche_bounds[j + 1]])

    def load(j: int):
        """Read, convert and thumbnail the ``j``-th tile (on the reader thread, one tile ahead of the
        cropping: zlib / JPEG 2000 decoding and numpy's conversion release the GIL)."""
        tc, tn = tile_members(j)
        need = (min(cr0[tc].min(initial=big), nr0[tn].min(initial=big)),
                min(cc0[tc].min(initial=big), nc0[tn].min(initial=big)),
                max(cr0[tc].max(initial=small) + s_cell, nr0[tn].max(initial=small) + s_niche),
                max(cc0[tc].max(initial=small) + s_cell, nc0[tn].max(initial=small) + s_niche))
        tile = grid.read(int(tiles[j]), need)
        tile.data = tile.data.astype(np.float32)  # once per tile, not once per (overlapping) crop
        thumb.add(*grid.inner(tile))  # tiles reach the accumulator in order, from this thread only
        return tile

    visited: set[int] = set()
    bar = tqdm(total=n, desc=f"{sid}: cells", unit="cell", disable=not progress, leave=False)
    cropping: deque[tuple[_ShardWriter, np.ndarray, Future]] = deque()

    def collect(at_most: int) -> None:
        """Hand finished crop batches to their writers in submission order (the shard rows do not
        depend on which thread cropped them) until at most ``at_most`` are pending."""
        while len(cropping) > at_most:
            writer, idx, done = cropping.popleft()
            writer.add(idx, done.result())  # re-raises a failed crop
            if writer is cells_w:
                bar.update(len(idx))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each crop / reader / writer thread runs single-threaded kernels
    try:
        ahead = reader.submit(load, 0)
        for j, t in enumerate(tiles):
            tile = ahead.result()  # re-raises a failed read
            collect(0)  # the previous tile's last batches: from here on only this tile and the next are held
            if j + 1 < len(tiles):
                ahead = reader.submit(load, j + 1)
            visited.add(int(t))
            tc, tn = tile_members(j)
            jobs = ([(cells_w, tc[k : k + cell_batch], cr0, cc0, resample_cell) for k in range(0, len(tc), cell_batch)]
                    + [(niches_w, tn[k : k + niche_batch], nr0, nc0, resample_niche)
                       for k in range(0, len(tn), niche_batch)])
            for writer, idx, r0, c0, resample in jobs:
                cropping.append((writer, idx, cropper.submit(crops, tile, idx, r0, c0, resample)))
                collect(2 * CROP_THREADS)
            del tile
        collect(0)
        bar.close()
        cell_paths, niche_paths = cells_w.close(), niches_w.close()
    finally:
        torch.set_num_threads(threads)
        for executor in (cropper, reader, pool):
            executor.shutdown(wait=True, cancel_futures=True)

    raw_thumb = thumb.finish(section.image, grid, visited)
    thumbnail = np.zeros((1, c, p.thumb_px, p.thumb_px), dtype=np.uint8)
    thumbnail[0, :, : raw_thumb.shape[1], : raw_thumb.shape[2]] = norm.apply(raw_thumb)
    bulk = sp.csr_matrix(counts.sum(axis=0, dtype=np.float64).astype(np.float32))
    bulk.eliminate_zeros()
    tissue_cols = {
        schema.SAMPLE_ID: [sid], schema.THUMBNAIL: thumbnail,
        schema.GENE_INDICES: Ragged(bulk.indptr, bulk.indices), schema.GENE_COUNTS: Ragged(bulk.indptr, bulk.data),
        schema.PIXEL_SIZE_UM: [thumb.factor * px], schema.NICHE_IDS: [niche_ids.tolist()],
        schema.NICHE_X_UM: Ragged.from_lists([niches.centres_um[:, 0]], np.float32),
        schema.NICHE_Y_UM: Ragged.from_lists([niches.centres_um[:, 1]], np.float32),
        schema.N_CELLS: [n], schema.N_NICHES: [niches.n_niches],
    }
    tissue_cols.update({k: [section.section_labels.get(k)] for k in layout.section_label_keys})
    tissue_feats = schema.tissue_features(c, p.thumb_px, layout.section_label_keys)
    tpath = write_parquet(table_from_columns(tissue_feats, tissue_cols, 1), root / "tissues" / _shard_name(sid, 0))

    return {
        "sample_id": sid,
        "technology": section.technology,
        "n_cells": n,
        "n_niches": niches.n_niches,
        "pixel_size_um": px,
        "image_shape": [c, h, w],
        "image_dtype": str(np.dtype(section.image.dtype)),
        "channel_names": layout.channel_names,
        "crop_window_px": s_cell,
        "niche_window_px": s_niche,
        "n_crops_padded": int(cell_padded.sum()),
        "n_niche_crops_padded": int(niche_padded.sum()),
        "normalization": norm.to_json(),
        "section_labels": {k: str(v) for k, v in section.section_labels.items()},
        "dropped": {k: int(v) for k, v in section.dropped.items()},
        "gene_mapping": panel_report,
        "uns": _jsonable(section.uns),
        "shards": {"cells": cell_paths, "niches": niche_paths, "tissues": [f"tissues/{tpath.name}"]},
    }


def _as_params(crop_um, crop_px, niche_um, niche_px, thumb_px, label_keys, value_keys, section_label_keys,
               gene_panel, outside, percentiles, tile_px, cell_shard_rows, niche_shard_rows) -> BuildParams:
    def tup(x):
        return None if x is None else tuple(str(v) for v in x)

    panel = gene_panel if isinstance(gene_panel, str) else tuple(str(g) for g in gene_panel)
    return BuildParams(float(crop_um), int(crop_px), float(niche_um), int(niche_px), int(thumb_px),
                       tup(label_keys), tup(value_keys), tup(section_label_keys), panel, outside,
                       (float(percentiles[0]), float(percentiles[1])), int(tile_px), int(cell_shard_rows),
                       int(niche_shard_rows))


_SHARD = re.compile(r"^.+-\d{5}\.parquet$")


def stale_shard(rel: Path) -> bool:
    """``publish`` rule: a shard in a config folder (one of an earlier build's sections that this build lacks)."""
    return len(rel.parts) == 2 and rel.parts[0] in schema.CONFIGS and bool(_SHARD.match(rel.name))


def interrupted_builds(out_dir: str | Path) -> list[Path]:
    """Staging folders of interrupted builds of ``out_dir`` (those holding resume markers), newest first."""
    out = Path(os.path.abspath(out_dir))
    found = [p for p in out.parent.glob(f".{glob.escape(out.name)}.*{BUILD_SUFFIX}")
             if (p / PROGRESS_DIR / "params.json").is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


@respects_progress
def build_multiscale_dataset(
    sections: Iterable[Section],
    out_dir: str | Path,
    *,
    crop_um: float = DEFAULT_CROP_UM,
    crop_px: int = DEFAULT_CROP_PX,
    niche_um: float = DEFAULT_NICHE_UM,
    niche_px: int = DEFAULT_NICHE_PX,
    thumb_px: int = DEFAULT_THUMB_PX,
    label_keys: Sequence[str] | None = None,
    value_keys: Sequence[str] | None = None,
    section_label_keys: Sequence[str] | None = None,
    gene_panel: str | Sequence[str] = "first",
    outside: str = "error",
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    tile_px: int = DEFAULT_TILE_PX,
    cell_shard_rows: int = CELL_SHARD_ROWS,
    niche_shard_rows: int = NICHE_SHARD_ROWS,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    vocabulary: Any = None,
    min_gene_coverage: float = 0.0,
    num_proc: int = 1,
    shard: tuple[int, int] | None = None,
) -> Path:
    """Build the ``cells`` / ``niches`` / ``tissues`` dataset of ``sections`` into ``out_dir``.

    Args:
        sections: Sections from any reader (streamed one at a time; a list is needed only for
            ``gene_panel="union"``).
        out_dir: the dataset folder to create (must not exist unless ``overwrite=True``).
        crop_um, crop_px: cell crop side in µm, stored at ``crop_px`` pixels (default 32 µm -> 64 px).
        niche_um, niche_px: niche grid tile side in µm and its stored image side (50 µm -> 64 px).
        thumb_px: side of the section thumbnail (aspect ratio kept, zero-padded).
        label_keys: per-cell string labels from ``obs`` (default: the first section's ``label_keys``).
        value_keys: per-cell float values from ``obs`` (default: its numeric non-label columns).
        section_label_keys: section labels for ``tissues`` (default: the first section's keys).
        gene_panel: "first" (the first section's genes), "union" (all genes, first-seen order) or
            an explicit list of symbols; other sections are mapped by id/symbol, unknown genes
            dropped and reported in ``gene_panel.json``.
        outside: cells off the image: "error" (default) or "drop" (counted in ``gene_panel.json``).
        percentiles: per-slide robust intensity percentiles mapped to 0 and 255.
        tile_px: image tile side read at once (memory ~ C x (tile_px + crop)^2 x itemsize).
        resume: reuse the finished sections of an interrupted build with the same parameters.
        overwrite: build into an existing ``out_dir`` (once the new build is complete): its dataset files are
            replaced, shards of sections the new build lacks removed, every other file kept.
        progress: show progress bars.
        vocabulary: a model's gene vocabulary (model folder / ``config.json``, dataset folder, gene list;
            see :func:`spatia_hf.data.gene_panel.load_vocabulary`): each section's coverage by it (kept /
            unknown genes, matched by Ensembl id where both sides have one, else by symbol) is stored
            in ``sections.json`` (``gene_coverage``). None: no report.
        min_gene_coverage: refuse a section when less than this fraction of its genes is in
            ``vocabulary`` (the error names the first unknown genes); 0 only reports.
        num_proc: sections built at once, each in its own (spawned, one-thread) process; memory is
            bounded by ``num_proc`` sections in flight (1: in this process).
        shard: ``(i, n)``: build only the sections whose position in ``sections`` is ``i`` modulo
            ``n`` (an array job's share); the layout and a "first" gene panel still come from the
            first section, so the parts agree and :func:`spatia_hf.data.join.join_datasets` joins them.

    Returns:
        ``out_dir`` as a Path; ``datasets.load_dataset(str(out_dir), "cells")`` loads it.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists. Fix: choose another output folder or pass overwrite=True "
                              "(CLI: --overwrite)")
    p = _as_params(crop_um, crop_px, niche_um, niche_px, thumb_px, label_keys, value_keys, section_label_keys,
                   gene_panel, outside, percentiles, tile_px, cell_shard_rows, niche_shard_rows)
    p.check()
    if not 0.0 <= float(min_gene_coverage) <= 1.0:
        raise ValueError(f"min_gene_coverage={min_gene_coverage!r}: expected a fraction in [0, 1]")
    if min_gene_coverage > 0 and vocabulary is None:
        raise ValueError(f"min_gene_coverage={min_gene_coverage}: needs a vocabulary to measure coverage against. "
                         "Fix: pass vocabulary= (CLI: --vocabulary MODEL_DIR)")
    if int(num_proc) < 1:
        raise ValueError(f"num_proc={num_proc}: expected >= 1 (CLI: --num-proc)")
    if shard is not None and not (len(shard) == 2 and 0 <= int(shard[0]) < int(shard[1])):
        raise ValueError(f"shard={shard}: expected (i, n) with 0 <= i < n (CLI: --shard i/n)")
    found = interrupted_builds(out) if resume else []
    tmp = found[0] if found else new_stage(out, BUILD_SUFFIX)
    created = not found  # only a staging folder made by this call is ever removed on failure
    prog = tmp / PROGRESS_DIR
    if found:
        stored = read_json(prog / "params.json")
        if stored != p.to_json():
            raise ValueError(f"resume: the interrupted build in {tmp} used other parameters ({stored}). Fix: rerun "
                             "with the same parameters, or without resume to start over")
    prog.mkdir(parents=True, exist_ok=True)
    write_json(prog / "params.json", p.to_json())

    try:
        if p.gene_panel == "union":
            sections = list(sections)
            panel = GenePanel.from_sections(sections, "union")
        elif not isinstance(p.gene_panel, str):
            panel = GenePanel(list(p.gene_panel), None, "given")
        else:
            panel = None
        summaries, seen, layout = [], set(), None
        bar = tqdm(desc="sections", unit="section", disable=not progress)
        pool = _SectionPool(int(num_proc))
        for position, section in enumerate(sections):
            if shard is not None and position % int(shard[1]) != int(shard[0]) and layout is not None:
                continue  # another array job's section (the first one still fixes layout and panel)
            section = validate_section(section, outside=p.outside)
            sid = section.sample_id
            if sid in seen:
                raise ValueError(f"section {sid!r}: sample_id: used by an earlier section. Fix: give every "
                                 "section a unique sample id (CLI: --sample-id)")
            seen.add(sid)
            coverage = _gene_coverage(section, vocabulary, float(min_gene_coverage))
            if layout is None:
                layout = _layout_for(section, p)
                if panel is None:
                    panel = GenePanel.from_sections([section], "first")
                fixed = {"layout": asdict(layout), "panel": panel.to_json()}
                if (prog / "layout.json").exists() and read_json(prog / "layout.json") != fixed:
                    raise ValueError(f"resume: the inputs changed since the interrupted build in {tmp} (columns or "
                                     "gene panel differ). Fix: rerun without resume")
                write_json(prog / "layout.json", fixed)
            if shard is not None and position % int(shard[1]) != int(shard[0]):
                continue
            if section.image.shape[0] != layout.n_channels:
                raise ValueError(f"section {sid!r}: image: {section.image.shape[0]} channels, but earlier sections "
                                 f"have {layout.n_channels}. Fix: select the same stains for every section")
            marker = prog / f"{sid}.json"
            fp = _section_fingerprint(section)
            done = read_json(marker) if marker.exists() else None
            if done is not None and done.get("fingerprint") == fp:
                summary = done["summary"]
                summaries.append({**summary, "gene_coverage": coverage} if coverage is not None else summary)
                bar.update(1)
                continue
            _remove_section_shards(tmp, sid)
            summaries.append(None)
            slot = len(summaries) - 1

            def record(summary: dict, slot=slot, marker=marker, fp=fp, coverage=coverage) -> None:
                write_json(marker, {"fingerprint": fp, "summary": summary})
                summaries[slot] = {**summary, "gene_coverage": coverage} if coverage is not None else summary
                bar.update(1)

            pool.submit(section, panel, layout, p, tmp, progress, record)
        pool.close()
        bar.close()
        if not summaries:
            raise ValueError("no sections to build. Fix: check the reader's input paths")
        _finish(tmp, panel, layout, p, summaries)
        publish(tmp, out, stale=stale_shard)  # overwrite=True: files replaced only now that the build is complete
    except KeyboardInterrupt:
        print(f"interrupted: finished sections are kept in {tmp}; rerun with resume=True (CLI: --resume) "
              "to continue", file=sys.stderr)
        raise
    except BaseException:
        if 'pool' in locals():
            pool.shutdown()
        if created and not resume:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _build_section_worker(section: Section, panel: GenePanel, layout: _Layout, p: BuildParams, root: Path) -> dict:
    """``_build_section`` in a worker process: one torch thread (the BLAS/OpenMP ones come from the
    OMP_NUM_THREADS=1 the pool's environment gives)."""
    torch.set_num_threads(1)
    return _build_section(section, panel, layout, p, root, False)


class _SectionPool:
    """Runs ``_build_section`` for up to ``num_proc`` sections at once in spawned processes, handing each
    summary to its callback in the main process; ``num_proc=1`` builds in this process (no pickling)."""

    def __init__(self, num_proc: int) -> None:
        self.num_proc = num_proc
        self.pending: deque = deque()
        self.executor = None

    def _start(self):
        import multiprocessing as mp
        import os
        from concurrent.futures import ProcessPoolExecutor

        # Spawned workers inherit the environment when they start (possibly at any submit): one
        # OpenMP/BLAS thread each, for as long as the pool lives (this process's pools are already set up).
        self._saved_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        os.environ.update({k: "1" for k in self._saved_env})
        self.executor = ProcessPoolExecutor(self.num_proc, mp_context=mp.get_context("spawn"))

    def submit(self, section, panel, layout, p, root, progress, callback) -> None:
        if self.num_proc == 1:
            callback(_build_section(section, panel, layout, p, root, progress))
            return
        if self.executor is None:
            self._start()
        while len(self.pending) >= self.num_proc:  # bounded: at most num_proc sections in flight
            self._collect_one()
        self.pending.append((self.executor.submit(_build_section_worker, section, panel, layout, p, root), callback))

    def _collect_one(self) -> None:
        future, callback = self.pending.popleft()
        callback(future.result())

    def close(self) -> None:
        while self.pending:
            self._collect_one()
        self.shutdown()

    def shutdown(self) -> None:
        if self.executor is not None:
            for future, _ in self.pending:
                future.cancel()
            self.pending.clear()
            self.executor.shutdown(wait=True)
            self.executor = None
            import os

            for k, v in self._saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _gene_coverage(section: Section, vocabulary: Any, min_coverage: float) -> dict | None:
    """Coverage of a section's genes by a model vocabulary (None without one); refused below ``min_coverage``."""
    if vocabulary is None:
        return None
    from .gene_panel import panel_coverage

    cov = panel_coverage(section.genes, vocabulary, gene_ids=section.gene_ids, counts=section.counts,
                         dropped=section.dropped)
    if cov.fraction_kept < min_coverage:
        first = ", ".join(repr(g) for g in cov.unknown[:10])
        raise ValueError(f"section {section.sample_id!r}: genes: coverage {cov.fraction_kept:.2f} by the vocabulary is "
                         f"below min_gene_coverage={min_coverage:.2f}: {len(cov.unknown)} of {cov.n_panel} genes are "
                         f"unknown to it (first: {first}). Fix: check the gene naming (symbols / Ensembl ids), use a "
                         "model whose vocabulary fits this panel, or lower min_gene_coverage (--min-gene-coverage)")
    return cov.to_json()


def _finish(tmp: Path, panel: GenePanel, layout: _Layout, p: BuildParams, summaries: list[dict]) -> None:
    """Side files and card of a complete build; removes the resume markers."""
    from ..utils.version import __version__

    gene_panel = {
        **panel.to_json(),
        "sections": [s["sample_id"] for s in summaries],
        "dropped": {s["sample_id"]: s["dropped"] for s in summaries},
        "unknown_genes": {s["sample_id"]: {"n": len(s["gene_mapping"]["unknown_genes"]),
                                           "counts": s["gene_mapping"]["unknown_counts"],
                                           "genes": s["gene_mapping"]["unknown_genes"]} for s in summaries},
        "missing_genes": {s["sample_id"]: s["gene_mapping"]["missing_genes"] for s in summaries},
    }
    write_json(tmp / schema.GENE_PANEL_FILE, gene_panel)
    build = {**p.to_json(), "spatia_hf_version": __version__, "n_genes": len(panel), "gene_panel_mode": panel.mode,
             "channel_names": layout.channel_names, "label_keys": layout.label_keys,
             "value_keys": layout.value_keys, "section_label_keys": layout.section_label_keys}
    build["gene_panel"] = panel.mode if isinstance(p.gene_panel, str) else "given"
    info = {"build": build, "sections": [{k: v for k, v in s.items() if k != "gene_mapping"} for s in summaries]}
    write_json(tmp / SECTIONS_FILE, info)
    write_card(tmp, info)
    shutil.rmtree(tmp / PROGRESS_DIR)


def load_sections_info(dataset_dir: str | Path) -> dict:
    """``sections.json`` of a built dataset: build parameters and per-section provenance."""
    return read_json(Path(dataset_dir) / SECTIONS_FILE)
