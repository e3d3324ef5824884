"""Loading a built SPATIA dataset directory for training: configs, gene panel, split by section.

A dataset directory (written by ``spatia_hf.data.builder``) holds three configs (``cells``,
``niches``, ``tissues``) as Parquet shards listed in its ``README.md`` card, plus
``gene_panel.json``. Training holds out whole sections (``sample_id``), never random cells: cells
of one section share a slide, a stain and neighbours, so a random-cell split would leak.

:class:`CellNicheDataset` is the pretraining example of the ``niche`` schedule: a cell-centred
neighbourhood (a cell and its nearest cells, :mod:`spatia_hf.data.neighbourhoods`) with its member
cells' rows, fetched in a DataLoader worker so the collator only pads and masks;
:class:`LocalBlockSampler` orders them so that each batch holds nearby neighbourhoods of one section
(the tissue objective's input). :class:`NicheCellsDataset` is the same for grid niches (``grid`` schedule);
:class:`ArrowRows` reads batches of rows straight from Arrow for the collators.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, load_dataset
from huggingface_hub import DatasetCard

from . import schema
from .gene_panel import read_gene_panel
from .neighbourhoods import cell_neighbourhoods


@dataclass
class SpatiaDataset:
    """The configs of one dataset directory and its gene panel.

    Attributes:
        dataset_dir: the directory.
        genes: the dataset gene panel; ``gene_indices`` of every row index it.
        gene_ids: Ensembl ids aligned with ``genes`` (or None).
        configs: loaded configs by name (``cells``, ``niches``, ``tissues``).
        panel: the full ``gene_panel.json`` content (dropped / unknown gene reports).
    """

    dataset_dir: Path
    genes: list[str]
    gene_ids: list[str] | None
    configs: dict[str, Dataset] = field(default_factory=dict)
    panel: dict = field(default_factory=dict)

    def __getitem__(self, config: str) -> Dataset:
        if config not in self.configs:
            raise KeyError(f"config {config!r} was not loaded from {self.dataset_dir}; loaded: {sorted(self.configs)}")
        return self.configs[config]

    @property
    def sample_ids(self) -> list[str]:
        """Sorted section names present in the ``cells`` (or first loaded) config."""
        ds = self.configs.get("cells") or next(iter(self.configs.values()))
        return sorted(set(ds[schema.SAMPLE_ID]))


def load_spatia_dataset(dataset_dir: str | os.PathLike, configs: Sequence[str] = schema.CONFIGS,
                        **hub_kwargs) -> SpatiaDataset:
    """Load ``configs`` of a built dataset (a folder, or a Hub dataset id fetched once by
    :func:`resolve_dataset_dir` with ``hub_kwargs``) with its gene panel.

    Wrap a config in :class:`ArrowRows` for fast batched reads (uint8 images, arrays).
    """
    dataset_dir = resolve_dataset_dir(dataset_dir, **hub_kwargs)
    panel = read_gene_panel(dataset_dir)
    unknown = [c for c in configs if c not in schema.CONFIGS]
    if unknown:
        raise ValueError(f"configs={list(configs)}: unknown {unknown}; expected names from {schema.CONFIGS}")
    loaded = {}
    for name in configs:
        if not any((dataset_dir / name).glob("*.parquet")):
            raise FileNotFoundError(f"dataset_dir={str(dataset_dir)!r}: config {name!r} has no Parquet shards under "
                                    f"{name}/. Fix: rebuild the dataset")
        # load_dataset(DIR, name) caches by folder *name* only (two datasets in folders called "data"
        # share stale cache files); the parquet builder hashes the shard files (paths and mtimes).
        files = sorted(str(p) for p in (dataset_dir / name).glob("*.parquet"))
        loaded[name] = load_dataset("parquet", data_files={"train": files}, split="train")
    return SpatiaDataset(dataset_dir, list(panel["genes"]), panel.get("gene_ids"), loaded, panel)


def resolve_dataset_dir(path_or_repo_id: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                        local_files_only: bool = False) -> Path:
    """A local dataset folder for a path or a Hub dataset id (``snapshot_download``: downloaded once,
    then read from the cache, also with ``HF_HUB_OFFLINE=1``). The folder has the builder's layout."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    from ..utils.hub_ids import resolve_folder

    repo_id = os.fspath(path_or_repo_id)
    folder = resolve_folder(repo_id, what="dataset", repo_type="dataset", revision=revision, cache_dir=cache_dir,
                            token=token, local_files_only=local_files_only)
    missing = _missing_dataset_files(folder)
    if missing:
        # offline, snapshot_download returns whatever is cached, e.g. only the one config that
        # load_dataset(repo_id, "cells") fetched
        raise FileNotFoundError(
            f"the cached snapshot of dataset {repo_id!r} at {os.fspath(folder)!r} is incomplete (missing {missing}). "
            f"Fix: call spatia_hf.data.datasets.resolve_dataset_dir({repo_id!r}) once with network access (without "
            f"HF_HUB_OFFLINE=1) to download the whole dataset")
    return folder


def _missing_dataset_files(folder: Path) -> list[str]:
    """What a dataset folder lacks for every config of its card (and the gene panel) to load."""
    missing = [] if (folder / schema.GENE_PANEL_FILE).is_file() else [schema.GENE_PANEL_FILE]
    readme = folder / "README.md"
    if not readme.is_file():
        return missing + ["README.md"]
    for config in DatasetCard.load(readme).data.to_dict().get("configs") or []:
        files = config.get("data_files") or []
        patterns = [files] if isinstance(files, str) else [f["path"] if isinstance(f, Mapping) else f for f in files]
        for pattern in patterns:
            for p in [pattern] if isinstance(pattern, str) else pattern:
                if not list(folder.glob(p)):
                    missing.append(p)
    return missing


def default_eval_sections(sample_ids: Sequence[str]) -> list[str]:
    """The last section (by name) when there are several; none with a single section."""
    ids = sorted(set(sample_ids))
    return ids[-1:] if len(ids) > 1 else []


def split_by_section(ds: Dataset, eval_sections: Sequence[str] | None) -> tuple[Dataset, Dataset | None]:
    """``(train, eval)`` rows of ``ds`` by ``sample_id``; ``eval`` is None when no section is held out.

    ``eval_sections=None`` holds out :func:`default_eval_sections`.
    """
    sample_ids = np.asarray(ds[schema.SAMPLE_ID]).astype(str)
    present = sorted(set(sample_ids.tolist()))
    held = default_eval_sections(present) if eval_sections is None else list(eval_sections)
    missing = [s for s in held if s not in present]
    if missing:
        raise ValueError(f"eval_sections={held}: {missing} not in the dataset; its sections are {present}")
    is_eval = np.isin(sample_ids, held)
    if is_eval.all():
        raise ValueError(f"eval_sections={held}: every section is held out, nothing left to train on. "
                         f"Fix: hold out fewer of {present}")
    train = ds.select(np.flatnonzero(~is_eval))
    return train, (ds.select(np.flatnonzero(is_eval)) if is_eval.any() else None)


def truncate(ds: Dataset | None, n: int | None, seed: int = 0) -> Dataset | None:
    """A seeded random subset of ``n`` rows (all rows when ``n`` is None or larger)."""
    if ds is None or n is None or n >= len(ds):
        return ds
    rng = np.random.default_rng(seed)
    return ds.select(np.sort(rng.choice(len(ds), size=n, replace=False)))


def example_key(*parts: Any) -> int:
    """A stable 32-bit key of an example (e.g. sample_id and cell_id), independent of row order,
    process and Python hash randomisation; seeds per-example randomness."""
    return zlib.crc32("\x1f".join(str(p) for p in parts).encode())


def arrow_columns(table: pa.Table) -> dict[str, Any]:
    """An Arrow table -> numpy columns, fast: images (``Array3D``) as one ``[n, C, H, W]`` array of
    their stored dtype (uint8; ``datasets``' numpy format would widen them to int64), list columns
    as lists of arrays, strings as object arrays, numbers as arrays."""
    out: dict[str, Any] = {}
    for name in table.column_names:
        col = table.column(name)
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        if isinstance(col.type, pa.ExtensionType):
            out[name] = col.to_numpy()
        elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            lengths = col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
            flat = col.flatten().to_numpy(zero_copy_only=False)
            out[name] = np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            out[name] = np.asarray(col.to_pylist(), dtype=object)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


def _row(columns: dict[str, Any], i: int) -> dict[str, Any]:
    return {k: v[i] for k, v in columns.items()}


def chunk_starts(table: pa.Table) -> np.ndarray | None:
    """First row of every record batch of ``table`` (plus its length), or None when its columns are
    chunked differently (then :func:`take_rows` falls back to ``Table.take``)."""
    layouts = {tuple(len(c) for c in col.chunks) for col in table.columns}
    if len(layouts) != 1:
        return None
    return np.concatenate([[0], np.cumsum(next(iter(layouts)), dtype=np.int64)])


def take_rows(table: pa.Table, rows: np.ndarray, starts: np.ndarray | None) -> pa.Table:
    """``table.take(rows)`` chunk by chunk. ``Table.take`` on a table of many chunks (a memory-mapped
    dataset has one per write batch) first concatenates every chunk of every column, i.e. copies the
    whole dataset into memory for each batch: 2 s and +370 MB per 256 rows of a 40k-cell dataset."""
    if starts is None or table.num_columns == 0 or len(starts) <= 2:
        return table.take(rows)
    chunk = np.searchsorted(starts, rows, side="right") - 1
    order = np.argsort(chunk, kind="stable")
    pieces = []
    for c in np.unique(chunk):
        local = rows[order][chunk[order] == c] - starts[c]
        pieces.append(pa.Table.from_arrays([col.chunk(int(c)).take(pa.array(local)) for col in table.columns],
                                           schema=table.schema))
    taken = pa.concat_tables(pieces)
    return taken.take(pa.array(np.argsort(order, kind="stable")))


class ArrowRows(torch.utils.data.Dataset):
    """Rows of a ``datasets.Dataset`` read in batches straight from its Arrow table.

    ``__getitems__`` (which ``torch.utils.data.DataLoader`` calls with a whole batch of indices)
    does one ``pyarrow.Table.take`` and returns the batch as columns (:func:`arrow_columns`): about
    5x faster than ``Dataset.__getitem__`` with a list (which slices and re-types every row) and
    without the int64 widening of ``datasets``' numpy format. Collators accept both forms.
    """

    def __init__(self, ds: Dataset, columns: Sequence[str] | None = None) -> None:
        if columns is not None:
            missing = [c for c in columns if c not in ds.column_names]
            if missing:
                raise ValueError(f"columns {missing} are not in the dataset (it has {ds.column_names})")
        self.columns = list(columns) if columns is not None else list(ds.column_names)
        self.ds = ds
        table = ds.data.table if hasattr(ds.data, "table") else ds.data
        self._table = table.select(self.columns)
        self._chunk_starts = chunk_starts(self._table)
        # `select`/`train_test_split` keep the rows and add an indices mapping (datasets' `_indices`)
        indices = getattr(ds, "_indices", None)
        self._index = None if indices is None else np.asarray(indices.column(0).to_numpy(), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        rows = np.asarray(indices, dtype=np.int64)
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        rows = np.where(rows < 0, rows + len(self), rows)
        if self._index is not None:
            rows = self._index[rows]
        return arrow_columns(take_rows(self._table, rows, self._chunk_starts))

    def __getitem__(self, i: int) -> dict[str, Any]:
        return _row(self.__getitems__([i]), 0)


class NicheCellsDataset(torch.utils.data.Dataset):
    """Niches with their member cells: the example of the ``niche`` pretraining schedule.

    An example is ``{"niche": niche row, "cells": member-cell columns}`` with at most ``max_cells``
    members (a sample seeded by the niche id, the same every epoch, so a niche keeps its context;
    its relative positions and ids are cut to match). Member rows are found by
    ``(sample_id, cell_id)`` in ``cells``; a batch costs two Arrow reads (niches, then all members).
    """

    def __init__(self, niches: Dataset, cells: Dataset, max_cells: int = 32, seed: int = 0,
                 cell_columns: Sequence[str] | None = None) -> None:
        if max_cells < 1:
            raise ValueError(f"max_cells={max_cells}: expected >= 1")
        self.niches = ArrowRows(niches)
        self.cells = ArrowRows(cells, cell_columns)
        self.max_cells = int(max_cells)
        self.seed = int(seed)
        sample = np.asarray(cells[schema.SAMPLE_ID]).astype(str)
        cid = np.asarray(cells[schema.CELL_ID]).astype(str)
        self._row = {(s, c): i for i, (s, c) in enumerate(zip(sample.tolist(), cid.tolist()))}
        # Check membership once, up front: a niche pointing at a missing cell is a broken split.
        niche_samples = np.asarray(niches[schema.SAMPLE_ID]).astype(str)
        for s, ids in zip(niche_samples.tolist(), niches[schema.CELL_IDS]):
            for c in ids:
                if (s, str(c)) not in self._row:
                    raise ValueError(f"niches: member cell_id={str(c)!r} of section {s!r} is not in the cells "
                                     "config given (was it truncated or split differently?). Fix: split cells "
                                     "and niches by the same sections")

    def __len__(self) -> int:
        return len(self.niches)

    def _keep(self, sample_id: str, niche_id: str, n: int) -> np.ndarray:
        if n <= self.max_cells:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, example_key(sample_id, niche_id)])
        return np.sort(rng.choice(n, size=self.max_cells, replace=False))

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        niches = self.niches.__getitems__(indices)
        keeps, rows = [], []
        for k in range(len(indices)):
            s = str(niches[schema.SAMPLE_ID][k])
            ids = niches[schema.CELL_IDS][k]
            keep = self._keep(s, str(niches[schema.NICHE_ID][k]), len(ids))
            keeps.append(keep)
            rows.append([self._row[(s, str(ids[j]))] for j in keep])
        flat = [r for rr in rows for r in rr]
        cells = self.cells.__getitems__(flat) if flat else {}
        bounds = np.cumsum([0] + [len(r) for r in rows])
        out = []
        for k, keep in enumerate(keeps):
            niche = _row(niches, k)
            for col in (schema.CELL_IDS, schema.CELL_REL_X_UM, schema.CELL_REL_Y_UM):
                niche[col] = np.asarray(niche[col])[keep]
            sl = slice(int(bounds[k]), int(bounds[k + 1]))
            out.append({"niche": niche, "cells": {c: v[sl] for c, v in cells.items()}})
        return out

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]


class CellNicheDataset(torch.utils.data.Dataset):
    """Cell-centred neighbourhoods: example ``i`` is cell ``i`` of ``cells`` with its ``num_neighbours``
    nearest cells of the same section (within ``radius_um`` when given), the centre first.

    An example has the layout of :class:`NicheCellsDataset` (``{"niche": ..., "cells": ...}``), the
    niche row holding the centre's ``sample_id``, ``niche_id`` (= the centre's cell id), ``x_um``/
    ``y_um`` (the centre) and the members' ids and positions relative to the centre. The
    neighbourhoods are searched per batch in a k-d tree per section, so memory does not grow with
    ``num_neighbours x n_cells``.
    """

    def __init__(self, cells: Dataset, num_neighbours: int = 30, radius_um: float | None = None,
                 cell_columns: Sequence[str] | None = None) -> None:
        from scipy.spatial import cKDTree

        if num_neighbours < 1:
            raise ValueError(f"num_neighbours={num_neighbours}: expected >= 1")
        self.cells = ArrowRows(cells, cell_columns)
        self.num_neighbours = int(num_neighbours)
        self.radius_um = radius_um
        self.sample_ids = np.asarray(cells[schema.SAMPLE_ID]).astype(str)
        self.cell_ids = np.asarray(cells[schema.CELL_ID]).astype(str)
        self.xy_um = np.stack([np.asarray(cells[schema.X_UM], np.float64), np.asarray(cells[schema.Y_UM], np.float64)], 1)
        self.sections, self.section_of = np.unique(self.sample_ids, return_inverse=True)
        self._rows = [np.flatnonzero(self.section_of == k) for k in range(len(self.sections))]
        self._local = np.zeros(len(self.sample_ids), dtype=np.int64)  # row within its section
        for rows in self._rows:
            self._local[rows] = np.arange(len(rows))
        self.trees = [cKDTree(self.xy_um[rows]) for rows in self._rows]

    def __len__(self) -> int:
        return len(self.sample_ids)

    def neighbourhoods(self, centres: np.ndarray, k: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(member rows, offsets µm [m, 2])`` of each centre row (``k`` defaults to ``num_neighbours``)."""
        out = []
        for c in np.asarray(centres, dtype=np.int64):
            sec = self.section_of[c]
            rows = self._rows[sec]
            hood = cell_neighbourhoods(self.xy_um[rows], k or self.num_neighbours, self.radius_um,
                                       centres=self._local[[c]], tree=self.trees[sec])
            real = hood.mask[0]
            out.append((rows[hood.index[0][real]], hood.offsets_um[0][real]))
        return out

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        centres = np.asarray(indices, dtype=np.int64)
        hoods = self.neighbourhoods(centres)
        flat = np.concatenate([m for m, _ in hoods])
        cells = self.cells.__getitems__(flat.tolist())
        bounds = np.cumsum([0] + [len(m) for m, _ in hoods])
        out = []
        for k, (c, (members, offsets)) in enumerate(zip(centres, hoods)):
            niche = {schema.SAMPLE_ID: self.sample_ids[c], schema.NICHE_ID: self.cell_ids[c],
                     schema.X_UM: np.float32(self.xy_um[c, 0]), schema.Y_UM: np.float32(self.xy_um[c, 1]),
                     schema.CELL_IDS: self.cell_ids[members], schema.CELL_REL_X_UM: offsets[:, 0],
                     schema.CELL_REL_Y_UM: offsets[:, 1]}
            sl = slice(int(bounds[k]), int(bounds[k + 1]))
            out.append({"niche": niche, "cells": {col: v[sl] for col, v in cells.items()}})
        return out

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def train_sampler(self, batch_size: int, seed: int = 0) -> "LocalBlockSampler":
        """The training order :class:`~spatia_hf.training.trainer.SpatiaTrainer` uses: batches of nearby centres."""
        return LocalBlockSampler(self, batch_size, seed)


class LocalBlockSampler(torch.utils.data.Sampler):
    """Orders a :class:`CellNicheDataset` in blocks of ``block_size`` nearby centres of one section,
    so that a DataLoader with ``batch_size=block_size`` yields batches that are small tissues.

    Each block starts at a random cell (a fresh permutation every pass, seeded by ``(seed, pass)``)
    and takes every ``stride``-th of its ``block_size x stride`` nearest cells: neighbourhoods that
    overlap, spread over a window a few neighbourhoods wide. A pass yields ``len(dataset)``
    indices; cells may repeat within a pass.
    """

    def __init__(self, dataset: CellNicheDataset, block_size: int, seed: int = 0, stride: int = 6) -> None:
        if block_size < 1 or stride < 1:
            raise ValueError(f"block_size={block_size}, stride={stride}: expected >= 1")
        self.dataset, self.block_size, self.seed, self.stride = dataset, int(block_size), int(seed), int(stride)
        self.passes = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.passes])
        self.passes += 1
        n, yielded = len(self.dataset), 0
        for anchor in rng.permutation(n):
            members, _ = self.dataset.neighbourhoods([anchor], k=self.block_size * self.stride)[0]
            block = members[:: self.stride][: self.block_size]
            for i in block[: n - yielded]:
                yield int(i)
            yielded += min(len(block), n - yielded)
            if yielded >= n:
                return
