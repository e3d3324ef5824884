"""Pretraining examples streamed from a dataset's Parquet shards (``datasets`` streaming mode).

Map-style loading (``load_spatia_dataset``) converts every shard to an Arrow cache file and keeps
an index of all cells: right for small data, not for a corpus of millions of cells. Here the
``cells`` shards are read as a ``datasets.IterableDataset`` (row groups, no cache, bounded memory):

- held-out sections are filtered out on the fly (``sample_id``), so evaluation stays honest;
- the ``niche`` schedule groups the cells of one niche (``sample_id``, ``niche_id``) within a window
  of ``GROUP_WINDOW_CELLS`` streamed cells into one example, in Arrow (the builder writes a
  section's cells tile by tile and niche by niche, so a niche's cells lie together); a niche cut
  by a window or a processing-tile edge arrives as two smaller examples,
  which the model sees as niches with fewer sampled cells (``max_cells_per_niche`` samples anyway).
  Relative positions come from the grid: a niche id ``<sample>_niche_<row>_<col>`` and the
  build's ``niche_um`` give the tile centre, as the builder computed it;
- ``shuffle`` shuffles the shard order and draws from a buffer of ``buffer_size`` examples (memory:
  the buffered examples and the Arrow windows they still reference; a buffer of 1000 niche examples
  over 2048-cell windows held ~1.1 GB more than the map-style loader at 64 px);
- ``split_dataset_by_node`` gives every rank its own stream (whole shards when their number
  divides the world size, else every world_size-th example);
- :class:`StreamingExamples` repeats the stream (one pass = one "stream epoch", reshuffled) so
  all ranks step in lockstep for ``max_steps``, and snapshots the stream's ``state_dict()`` at
  every batch boundary; :class:`StreamStateCallback` saves the snapshot of the batches trained
  into each checkpoint, and :func:`restore_stream_state` loads it on resume (the Trainer's own
  batch skipping is turned off then). As ``datasets`` documents, examples that sat in the
  shuffle buffer at the checkpoint are not replayed after a resume (the buffer refills), and a
  batched Arrow map may skip one group window.
"""

from __future__ import annotations

import collections
import logging
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from transformers import TrainerCallback

from ..data import schema
from ..data.builder import SECTIONS_FILE
from ..data.datasets import arrow_columns, default_eval_sections, example_key
from ..data.shard_reader import shard_files
from ..utils.io import read_json, write_json

logger = logging.getLogger(__name__)

STREAM_STATE_FILE = "stream_state_rank{rank}.json"
# Cells grouped into niches at a time (a window of the stream). The examples of a window are slices of
# one Arrow table, and an example waiting in the shuffle buffer keeps its whole window alive: small
# windows keep that bounded (512 cells of 2 x 64 x 64 px: 4 MB per window).
GROUP_WINDOW_CELLS = 512
# Shards read at once into the shuffle buffer (datasets' max_buffer_input_shards, default 10): each open
# shard holds its decoded row group and grouping window, so this bounds the stream's memory.
SHUFFLE_INPUT_SHARDS = 2
_NICHE_GRID = re.compile(r"_niche_(-?\d+)_(-?\d+)$")


def section_ids(dataset_dir: str | Path) -> list[str]:
    """Sorted section names, from the ``sample_id`` column of the ``tissues`` shards only (one row per section)."""
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for f in shard_files(dataset_dir, "tissues"):
        ids.update(str(s) for s in pq.read_table(f, columns=[schema.SAMPLE_ID]).column(0).to_pylist())
    return sorted(ids)


def niche_um(dataset_dir: str | Path) -> float:
    """The niche grid's tile side (µm) the dataset was built with (``sections.json``)."""
    path = Path(dataset_dir) / SECTIONS_FILE
    info = read_json(path) if path.is_file() else {}
    value = info.get("build", {}).get("niche_um")
    if value is None:
        raise ValueError(f"{path}: no build.niche_um; the niche schedule needs it to place cells in their niche. "
                         "Fix: rebuild the dataset with `spatia convert`, or use --schedule cell")
    return float(value)


def held_out_sections(dataset_dir: str | Path, eval_sections: Sequence[str] | None) -> list[str]:
    """The sections kept out of training (as ``split_by_section`` chooses them for map-style data)."""
    present = section_ids(dataset_dir)
    held = default_eval_sections(present) if eval_sections is None else list(eval_sections)
    missing = [s for s in held if s not in present]
    if missing:
        raise ValueError(f"eval_sections={held}: {missing} not in the dataset; its sections are {present}")
    if set(held) >= set(present):
        raise ValueError(f"eval_sections={held}: every section is held out, nothing left to train on")
    return held


def _keep_sections(exclude: Sequence[str]) -> Callable[[pa.Table], pa.Table]:
    excluded = pa.array(sorted(set(map(str, exclude))), pa.string())

    def keep(table: pa.Table) -> pa.Table:
        return table.filter(pc.invert(pc.is_in(table.column(schema.SAMPLE_ID), value_set=excluded)))

    return keep


def group_niches(table: pa.Table, tile_um: float) -> pa.Table:
    """A window of cell rows -> one row per (sample_id, niche_id) present in it.

    Output columns: ``niche.niche_id``, ``niche.sample_id``, ``cell_rel_x_um`` / ``cell_rel_y_um`` (µm from the
    tile centre) and every cell column as a list column (member cells in stream order).
    """
    n = table.num_rows
    if n == 0:
        return pa.table({})
    sample = table.column(schema.SAMPLE_ID).to_numpy(zero_copy_only=False).astype(str)
    niche = table.column(schema.NICHE_ID).to_numpy(zero_copy_only=False).astype(str)
    key = np.char.add(np.char.add(sample, "\x1f"), niche)
    order = np.argsort(key, kind="stable")  # runs of one niche split inside the window join again
    if not np.array_equal(order, np.arange(n)):
        table, sample, niche, key = table.take(order), sample[order], niche[order], key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    offsets = pa.array(np.r_[starts, n].astype(np.int32))
    centres = np.empty((len(starts), 2))
    for j, s in enumerate(starts):
        m = _NICHE_GRID.search(niche[s])
        if m is None:
            raise ValueError(f"cells.{schema.NICHE_ID}={niche[s]!r} is not a grid niche id "
                             "('<sample>_niche_<row>_<col>'). Fix: use --schedule cell, or a dataset built by "
                             "`spatia convert`")
        row, col = int(m.group(1)), int(m.group(2))
        centres[j] = ((col + 0.5) * tile_um, (row + 0.5) * tile_um)
    which = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, n]))
    x = table.column(schema.X_UM).to_numpy(zero_copy_only=False) - centres[which, 0]
    y = table.column(schema.Y_UM).to_numpy(zero_copy_only=False) - centres[which, 1]
    columns = {
        f"niche.{schema.NICHE_ID}": pa.array(niche[starts]),
        f"niche.{schema.SAMPLE_ID}": pa.array(sample[starts]),
        schema.CELL_REL_X_UM: pa.ListArray.from_arrays(offsets, pa.array(x.astype(np.float32))),
        schema.CELL_REL_Y_UM: pa.ListArray.from_arrays(offsets, pa.array(y.astype(np.float32))),
    }
    for name in table.column_names:
        values = table.column(name).combine_chunks()
        columns[f"cells.{name}"] = pa.ListArray.from_arrays(offsets, values)
    return pa.table(columns)


def niche_example(row: dict[str, Any], max_cells: int, seed: int) -> dict:
    """One grouped niche row (numpy columns of length 1) -> ``{"niche": ..., "cells": ...}`` as the
    ``NicheCollator`` takes it, with at most ``max_cells`` members (a sample seeded by the niche)."""
    cells = {k[len("cells."):]: v for k, v in row.items() if k.startswith("cells.")}
    sample_id, niche_id = str(row[f"niche.{schema.SAMPLE_ID}"]), str(row[f"niche.{schema.NICHE_ID}"])
    n = len(cells[schema.CELL_ID])
    keep = np.arange(n)
    if n > max_cells:
        rng = np.random.default_rng([seed, example_key(sample_id, niche_id)])
        keep = np.sort(rng.choice(n, size=max_cells, replace=False))
    niche = {schema.SAMPLE_ID: sample_id, schema.NICHE_ID: niche_id,
             schema.CELL_IDS: np.asarray(cells[schema.CELL_ID])[keep],
             schema.CELL_REL_X_UM: np.asarray(row[schema.CELL_REL_X_UM])[keep],
             schema.CELL_REL_Y_UM: np.asarray(row[schema.CELL_REL_Y_UM])[keep]}
    return {"niche": niche, "cells": {k: np.asarray(v)[keep] for k, v in cells.items()}}


def _shard_sections(path: str) -> set[str]:
    """Sections present in one Parquet shard (from row-group statistics when written, else the column)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    index = meta.schema.to_arrow_schema().get_field_index(schema.SAMPLE_ID)
    found: set[str] = set()
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(index).statistics
        if stats is None or not stats.has_min_max:
            return set(map(str, pq.read_table(path, columns=[schema.SAMPLE_ID]).column(0).unique().to_pylist()))
        found.update({str(stats.min), str(stats.max)})
        if stats.min != stats.max:
            return set(map(str, pq.read_table(path, columns=[schema.SAMPLE_ID]).column(0).unique().to_pylist()))
    return found


def open_cell_stream(dataset_dir: str | Path, *, exclude_sections: Sequence[str] = (),
                     columns: Sequence[str] | None = None) -> IterableDataset:
    """The ``cells`` shards as an Arrow-formatted ``datasets.IterableDataset`` without ``exclude_sections``.

    Shards holding only excluded sections are left out before streaming (so ranks split the training
    shards between them); rows of excluded sections in mixed shards are filtered on the fly."""
    files = shard_files(dataset_dir, "cells")
    excluded = set(map(str, exclude_sections))
    if excluded:
        files = [f for f in files if not _shard_sections(f) <= excluded]
        if not files:
            raise ValueError(f"every cells shard of {str(dataset_dir)!r} belongs to the held-out sections "
                             f"{sorted(excluded)}. Fix: hold out fewer sections")
    ds = load_dataset("parquet", data_files={"train": files}, split="train", streaming=True)
    if columns is not None:
        ds = ds.select_columns(list(dict.fromkeys([*columns, schema.SAMPLE_ID])))
    ds = ds.with_format("arrow")
    if exclude_sections:
        ds = ds.map(_keep_sections(exclude_sections), batched=True, batch_size=GROUP_WINDOW_CELLS)
    return ds


def pretraining_stream(dataset_dir: str | Path, *, schedule: str, exclude_sections: Sequence[str] = (),
                       cell_columns: Sequence[str], seed: int = 0, buffer_size: int = 1000,
                       rank: int = 0, world_size: int = 1, input_shards: int = SHUFFLE_INPUT_SHARDS) -> IterableDataset:
    """Cells (``schedule="cell"``) or grouped niches (``"niche"``) of the training sections:
    shuffled (shard order + a ``buffer_size`` buffer, seeded) and split for ``rank`` of ``world_size``."""
    if schedule == "niche":
        needed = [*cell_columns, schema.NICHE_ID, schema.X_UM, schema.Y_UM]
        ds = open_cell_stream(dataset_dir, exclude_sections=exclude_sections, columns=needed)
        tile = niche_um(dataset_dir)
        names = list(dict.fromkeys([*needed, schema.SAMPLE_ID]))
        ds = ds.map(lambda t: group_niches(t.select(names), tile), batched=True, batch_size=GROUP_WINDOW_CELLS,
                    remove_columns=names)
    else:
        ds = open_cell_stream(dataset_dir, exclude_sections=exclude_sections, columns=cell_columns)
    if buffer_size > 1:
        ds = ds.shuffle(seed=seed, buffer_size=buffer_size, max_buffer_input_shards=input_shards)
    if world_size > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    return ds


class StreamingExamples(torch.utils.data.IterableDataset):
    """A repeating, resumable stream of collator-ready examples for the Trainer's DataLoader.

    Args:
        stream: an Arrow-formatted ``datasets.IterableDataset`` (rows arrive as 1-row tables).
        to_example: one row (a dict of length-1 numpy columns) -> the example the collator takes.
        batch_size: examples per batch on this rank, where the stream's state is snapshot.
        on_epoch: called with the stream epoch when a new pass starts (collators' ``epoch``).

    Iterate it in the main process (``dataloader_num_workers=0``): the state lives here.
    """

    split_by_rank = True  # one stream per rank already (SpatiaTrainer does not shard it again)

    def __init__(self, stream: IterableDataset, to_example: Callable[[dict], Any], batch_size: int,
                 on_epoch: Callable[[int], None] | None = None, keep_snapshots: int = 16) -> None:
        self.stream = stream
        self.to_example = to_example
        self.batch_size = int(batch_size)
        self.on_epoch = on_epoch
        self.epoch = 0
        self.batches_yielded = 0
        self._snapshots: collections.OrderedDict[int, dict] = collections.OrderedDict()
        self._keep = int(keep_snapshots)
        self._resume: dict | None = None

    def __iter__(self):
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError("StreamingExamples must be read in the main process (its state is checkpointed). "
                               "Fix: --dataloader_num_workers 0 with --streaming")
        while True:
            self.stream.set_epoch(self.epoch)
            if self._resume is not None:
                self.stream.load_state_dict(self._resume)
                self._resume = None
            if self.on_epoch is not None:
                self.on_epoch(self.epoch)
            count = 0
            for table in self.stream:
                example = self.to_example(_first_row(table))
                count += 1
                if count % self.batch_size == 0:
                    self.batches_yielded += 1
                    self._remember(self.batches_yielded)
                yield example
            if count == 0:
                raise ValueError("the training stream is empty (every section held out, or no cells). Fix: check "
                                 "--eval_sections and the dataset")
            self.epoch += 1

    def _remember(self, batches: int) -> None:
        self._snapshots[batches] = {"epoch": self.epoch, "batches": batches, "stream": self.stream.state_dict()}
        while len(self._snapshots) > self._keep:
            self._snapshots.popitem(last=False)

    def state_at(self, batches: int) -> dict | None:
        """The stream state right after ``batches`` batches were yielded (None if no longer kept)."""
        return self._snapshots.get(batches)

    def load_state(self, state: dict) -> None:
        """Continue after the batches recorded in ``state`` (from :meth:`state_at`)."""
        self.epoch = int(state["epoch"])
        self.batches_yielded = int(state["batches"])
        self._resume = state["stream"]


def _first_row(table: pa.Table) -> dict:
    return {k: v[0] for k, v in arrow_columns(table).items()}


class StreamStateCallback(TrainerCallback):
    """Writes the stream state of the batches trained so far into every checkpoint
    (``checkpoint-N/stream_state_rank{R}.json``), one file per rank."""

    def __init__(self, examples: StreamingExamples, rank: int) -> None:
        self.examples = examples
        self.rank = int(rank)

    def on_save(self, args, state, control, **kwargs):
        batches = state.global_step * args.gradient_accumulation_steps
        snapshot = self.examples.state_at(batches)
        if snapshot is None:
            logger.warning("no stream state for %d batches (kept: %s); a resume from step %d restarts the stream",
                           batches, list(self.examples._snapshots)[-3:], state.global_step)
            return control
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        write_json(folder / STREAM_STATE_FILE.format(rank=self.rank), snapshot)
        return control


def restore_stream_state(examples: StreamingExamples, checkpoint: str | Path, rank: int) -> bool:
    """Load the stream state this rank saved in ``checkpoint``; False when there is none."""
    path = Path(checkpoint) / STREAM_STATE_FILE.format(rank=rank)
    if not path.is_file():
        logger.warning("%s: no stream state; the stream restarts from its beginning", path)
        return False
    examples.load_state(read_json(path))
    return True
