"""One config of a built dataset read straight from its Parquet shards, batch by batch.

``load_spatia_dataset`` (map-style) converts every shard into an Arrow cache file that is then
memory-mapped: every page a pass touches stays resident, so a pass over a 100k-cell section's
crops holds ~1 GB of file pages, and the first load of a large dataset spends minutes writing the
cache. A pass that reads every row once in order (embedding a section) needs neither:
:class:`ConfigShards` reads it with ``datasets``' streaming mode (``load_dataset("parquet", ...,
streaming=True)``: row groups decoded as they are read, only the ``columns`` asked for, the sections
asked for selected by a Parquet filter), so memory is bounded by one batch whatever the section size.
Row order is the shards' order, as map-style loading gives it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
from datasets import IterableDataset, load_dataset

from . import schema


def shard_files(dataset_dir: str | Path, config: str) -> list[str]:
    """The Parquet shards of ``config`` in a dataset directory written by the builder, in order."""
    folder = Path(dataset_dir) / config
    files = sorted(str(p) for p in folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"dataset_dir={str(dataset_dir)!r}: config {config!r} has no Parquet shards under "
                                f"{config}/. Fix: pass a directory written by `spatia convert` / `spatia synth` "
                                "(streaming reads local shards)")
    return files


class ConfigShards:
    """Rows of one config (``cells``, ``niches``, ``tissues``) of a local dataset folder, optionally only
    those of ``sample_ids``, read in order without an Arrow cache.

    ``len()`` is the number of rows (from the Parquet metadata; with ``sample_ids``, counted in the pass
    that checks them); :meth:`batches` yields numpy columns (:func:`~spatia_hf.data.datasets.arrow_columns`:
    images as uint8 ``[n, C, H, W]``); :meth:`read` returns whole columns (for the small ones: ids, positions).
    """

    def __init__(self, dataset_dir: str | Path, config: str, sample_ids: Sequence[str] | None = None):
        if config not in schema.CONFIGS:
            raise ValueError(f"config={config!r}: expected one of {schema.CONFIGS}")
        self.dataset_dir, self.config = Path(dataset_dir), config
        self.files = shard_files(self.dataset_dir, config)
        self.sample_ids = None if sample_ids is None else sorted(set(map(str, sample_ids)))
        self._len: int | None = None
        if self.sample_ids is not None:
            found = self.read([schema.SAMPLE_ID])[schema.SAMPLE_ID].astype(str)
            self._len = len(found)
            present = set(found.tolist())
            missing = [s for s in self.sample_ids if s not in present]
            if missing:
                everything = ConfigShards(self.dataset_dir, config).read([schema.SAMPLE_ID])[schema.SAMPLE_ID]
                raise ValueError(f"sample_ids: {missing[:5]} not in the dataset (it has "
                                 f"{sorted(set(everything.astype(str).tolist()))[:5]}...)")

    def stream(self, columns: Sequence[str]) -> IterableDataset:
        """The rows as a ``datasets.IterableDataset`` of only ``columns`` (Arrow format)."""
        filters = None if self.sample_ids is None else [(schema.SAMPLE_ID, "in", self.sample_ids)]
        return load_dataset("parquet", data_files={"train": self.files}, split="train", streaming=True,
                            columns=list(columns), filters=filters).with_format("arrow")

    def tables(self, columns: Sequence[str], batch_size: int) -> Iterator[pa.Table]:
        """Arrow tables of ``batch_size`` rows (the last one shorter), in order."""
        yield from self.stream(columns).iter(batch_size)

    def batches(self, columns: Sequence[str], batch_size: int) -> Iterator[dict]:
        """Numpy columns of ``batch_size`` rows at a time, in order."""
        from .datasets import arrow_columns

        for table in self.tables(columns, batch_size):
            yield arrow_columns(table)

    def read(self, columns: Sequence[str], batch_size: int = 65536) -> dict:
        """Whole ``columns`` as numpy arrays (strings as object arrays): meant for small columns."""
        from .datasets import arrow_columns

        tables = list(self.tables(columns, batch_size))
        table = pa.concat_tables(tables) if tables else None
        if table is None:
            return {c: np.zeros(0) for c in columns}
        return arrow_columns(table)

    def __len__(self) -> int:
        if self._len is None:
            if self.sample_ids is None:
                import pyarrow.parquet as pq

                self._len = sum(pq.ParquetFile(f).metadata.num_rows for f in self.files)
            else:
                self._len = sum(t.num_rows for t in self.tables([schema.SAMPLE_ID], 65536))
        return self._len

    def __repr__(self) -> str:
        return (f"ConfigShards({str(self.dataset_dir)!r}, {self.config!r}, sample_ids={self.sample_ids}, "
                f"{len(self.files)} shards)")


__all__ = ["ConfigShards", "shard_files"]
