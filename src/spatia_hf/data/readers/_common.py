"""Checks and table readers shared by the instrument readers (Xenium, CosMx, MERSCOPE, SpatialData).

Instrument bundles fail in a few recurring ways: a table lacks a column, matrix and metadata list
different cells, a count CSV is too big to load densely, the image is smaller than the centroids
imply. Each helper here turns one of those into an error that names the file, the field, the
offending value and the fix, before the builder writes anything.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

ON_MISMATCH = ("error", "intersect")
_MAX_LISTED = 5


def listed(items: Iterable, n: int = _MAX_LISTED) -> str:
    """``'a', 'b', 'c' (+7 more)``: the first few items of a list for an error message."""
    items = list(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(repr(x) for x in items[:n]) + more


def safe_sample_id(name: str) -> str:
    """A sample id made of letters, digits, '.', '_' and '-' (it names the shard files)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._-") or "section"


def find_one(folder: Path, patterns: Sequence[str], what: str, fix: str) -> Path:
    """The single file in ``folder`` matching the first pattern that matches anything."""
    for pattern in patterns:
        hits = sorted(folder.glob(pattern))
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ValueError(f"{folder}: several {what} files match {pattern!r}: {listed(h.name for h in hits)}. "
                             f"Fix: {fix}")
    raise FileNotFoundError(f"{folder}: no {what} file (looked for {listed(patterns)}). Fix: {fix}")


def decode_ids(values) -> np.ndarray:
    """Cell ids as an object array of ``str`` (Parquet/HDF5 may store them as bytes or integers)."""
    arr = np.asarray(values, dtype=object)
    return np.array([v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v) for v in arr], dtype=object)


_CSV_ERRORS = (OSError, EOFError, UnicodeDecodeError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError)


def read_csv(path: Path, fix: str = "re-copy or re-export the file (it looks truncated or corrupt)",
             **kwargs) -> pd.DataFrame:
    """``pd.read_csv`` whose parse errors (empty file, broken quoting, bytes that are not UTF-8) become one
    ``ValueError`` naming the file."""
    try:
        return pd.read_csv(path, **kwargs)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist. Fix: check the path (and the export's layout)") from None
    except _CSV_ERRORS as err:
        raise ValueError(f"{path}: cannot be read as CSV ({type(err).__name__}: {err}). Fix: {fix}") from None


def integer_column(values: pd.Series, source: str, column: str) -> np.ndarray:
    """A column of integer ids (CosMx ``fov``, ``cell_ID``) as int64; anything else is a clear error."""
    num = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(num) | (num != np.round(num)) | (np.abs(num) > 2**53)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{source}: column {column!r} holds {values.iloc[first]!r} (row {first}), expected integer "
                         "ids. Fix: pass the instrument's unmodified export")
    return num.astype(np.int64)


def numeric_column(values: pd.Series, source: str, column: str) -> np.ndarray:
    """A column of finite numbers (coordinates, offsets) as float64; anything else is a clear error."""
    num = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(num)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{source}: column {column!r} holds {values.iloc[first]!r} (row {first}), expected a finite "
                         "number. Fix: pass the instrument's unmodified export")
    return num


def check_columns(have: Iterable[str], required: Sequence[str], source: str, fix: str) -> None:
    have = [str(c) for c in have]
    missing = [c for c in required if c not in have]
    if missing:
        raise ValueError(f"{source}: column(s) {listed(missing)} missing (columns are {listed(have, 12)}). Fix: {fix}")


def read_cell_table(path: Path, required: Sequence[str], fix: str) -> pd.DataFrame:
    """A per-cell table from Parquet or (gzipped) CSV, with ``required`` columns checked first."""
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            check_columns(pq.read_schema(path).names, required, str(path), fix)
            return pq.read_table(path).to_pandas()
        header = pd.read_csv(path, nrows=0)
        check_columns(header.columns, required, str(path), fix)
        return pd.read_csv(path, low_memory=False)
    except (OSError, EOFError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"{path}: cannot be read ({type(err).__name__}: {err}). Fix: re-copy or re-export the "
                         "file (it looks truncated or corrupt)") from None
    except Exception as err:  # pyarrow.ArrowInvalid and friends
        if type(err).__module__.startswith("pyarrow"):
            raise ValueError(f"{path}: not a readable Parquet file ({err}). Fix: re-copy or re-export the file") \
                from None
        raise


@dataclass
class CountTable:
    """Cells x genes counts read from a wide CSV, with control columns removed and counted."""

    counts: sp.csr_matrix
    genes: list[str]
    keys: pd.DataFrame  # the id columns, one row per kept cell
    dropped_features: dict[str, int]  # prefix -> number of columns dropped
    dropped_feature_counts: dict[str, float]  # prefix -> total counts in those columns
    n_rows_dropped: int  # rows removed by ``drop_rows``
    counts_in_dropped_rows: float


def read_count_csv(path: Path, id_columns: Sequence[str], control_prefixes: Sequence[str], *,
                   drop_rows=None, chunk_rows: int = 20_000, fix: str = "") -> CountTable:
    """Stream a wide ``cells x (ids + genes)`` CSV into CSR, ``chunk_rows`` rows at a time.

    Args:
        path: the CSV (``.csv`` or ``.csv.gz``).
        id_columns: columns that identify a cell (kept as strings in ``keys``).
        control_prefixes: gene columns starting with one of these are dropped and counted
            (CosMx ``NegPrb``/``SystemControl``, MERSCOPE ``Blank-``).
        drop_rows: optional ``f(keys_chunk) -> bool mask`` of rows to drop (CosMx background cell 0).
    """
    header = list(read_csv(path, nrows=0).columns)
    check_columns(header, id_columns, str(path), fix or "pass the instrument's unmodified export")
    features = [c for c in header if c not in id_columns]
    control = {p: [c for c in features if str(c).startswith(p)] for p in control_prefixes}
    is_control = {c for cols in control.values() for c in cols}
    genes = [c for c in features if c not in is_control]
    gene_pos = np.array([features.index(g) for g in genes], dtype=np.int64)
    ctrl_pos = {p: np.array([features.index(c) for c in cols], dtype=np.int64) for p, cols in control.items()}
    dtypes = {c: str for c in id_columns}
    blocks, keys = [], []
    ctrl_total = {p: 0.0 for p in control_prefixes}
    n_dropped, dropped_total = 0, 0.0
    try:
        reader = pd.read_csv(path, dtype=dtypes, chunksize=chunk_rows, low_memory=False)
        for chunk in reader:
            k = chunk[list(id_columns)].reset_index(drop=True)
            try:
                values = chunk[features].to_numpy(dtype=np.float64)
            except (TypeError, ValueError):
                bad = [c for c in features if not pd.api.types.is_numeric_dtype(chunk[c])]
                raise ValueError(f"{path}: count column(s) {listed(bad)} are not numeric. Fix: pass the raw "
                                 "count export (one numeric column per gene)") from None
            if np.isnan(values).any():
                col = features[int(np.flatnonzero(np.isnan(values).any(axis=0))[0])]
                raise ValueError(f"{path}: column {col!r} has empty/NaN counts. Fix: re-export the file (it looks "
                                 "truncated)")
            if drop_rows is not None:
                drop = np.asarray(drop_rows(k), dtype=bool)
                n_dropped += int(drop.sum())
                dropped_total += float(values[drop].sum())
                values, k = values[~drop], k[~drop].reset_index(drop=True)
            for p, pos in ctrl_pos.items():
                ctrl_total[p] += float(values[:, pos].sum()) if len(pos) else 0.0
            g = values[:, gene_pos]
            ints = np.round(g)
            blocks.append(sp.csr_matrix(ints.astype(np.int32) if np.array_equal(ints, g) else g.astype(np.float32)))
            keys.append(k)
    except (OSError, EOFError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"{path}: cannot be read ({type(err).__name__}: {err}). Fix: re-copy the file (it looks "
                         "truncated or corrupt)") from None
    if not blocks:
        raise ValueError(f"{path}: no cells (only a header). Fix: pass a non-empty export")
    counts = sp.vstack(blocks, format="csr") if len(blocks) > 1 else blocks[0]
    return CountTable(counts.tocsr(), [str(g) for g in genes], pd.concat(keys, ignore_index=True),
                      {p: len(c) for p, c in control.items() if c}, {p: v for p, v in ctrl_total.items() if control[p]},
                      n_dropped, dropped_total)


def align_ids(matrix_ids: Sequence[str], table_ids: Sequence[str], matrix_src: str, table_src: str,
              on_mismatch: str = "error") -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Row positions pairing the count matrix's cells with the metadata's, in matrix order.

    Args:
        on_mismatch: "error" (default) if the two files list different cells, or "intersect"
            (keep cells present in both; the others are counted in the returned dict).
    Returns:
        (matrix_rows, table_rows, dropped) where ``dropped`` counts cells found in only one file.
    """
    if on_mismatch not in ON_MISMATCH:
        raise ValueError(f"on_mismatch={on_mismatch!r}: expected one of {ON_MISMATCH}")
    m = pd.Index(np.asarray(matrix_ids, dtype=object))
    t = pd.Index(np.asarray(table_ids, dtype=object))
    for idx, src in ((m, matrix_src), (t, table_src)):
        if not idx.is_unique:
            dups = idx[idx.duplicated()].unique()
            raise ValueError(f"{src}: duplicate cell ids {listed(dups)}. Fix: re-export the file; cell ids must be "
                             "unique within a section")
    pos = t.get_indexer(m)
    only_m = m[pos < 0]
    only_t = t.difference(m, sort=False)
    dropped = {}
    if len(only_m) or len(only_t):
        if on_mismatch == "error":
            raise ValueError(
                f"cell ids differ between {matrix_src} ({len(m)} cells) and {table_src} ({len(t)} cells): "
                f"{len(only_m)} only in the matrix (first: {listed(only_m)}), {len(only_t)} only in the metadata "
                f"(first: {listed(only_t)}). Fix: pass files of the same run, or on_mismatch='intersect' "
                "(CLI: --on-mismatch intersect) to keep the cells present in both")
        dropped = {"cells_only_in_matrix": int(len(only_m)), "cells_only_in_metadata": int(len(only_t))}
    keep = np.flatnonzero(pos >= 0)
    return keep, pos[keep], dropped


def check_image_covers(centroids_px: np.ndarray, shape: Sequence[int], image_src: str, cell_ids: Sequence[str],
                       *, fix: str) -> None:
    """Raise naming the image when cell centroids (through the µm -> px map) fall off it."""
    _, h, w = (int(v) for v in shape)
    xy = np.asarray(centroids_px, dtype=np.float64)
    off = ~((xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h))
    if off.any():
        first = [cell_ids[i] for i in np.flatnonzero(off)[:_MAX_LISTED]]
        span = f"x {xy[:, 0].min():.0f}..{xy[:, 0].max():.0f} px, y {xy[:, 1].min():.0f}..{xy[:, 1].max():.0f} px"
        raise ValueError(f"{image_src}: {int(off.sum())} of {len(xy)} cell centroids lie outside the {w} x {h} px "
                         f"image (centroids span {span}; first: {listed(first)}). Fix: {fix}, or pass "
                         "outside='drop' (CLI: --outside drop) to drop and count those cells")


def load_labels(path: str | Path, cell_ids: Sequence[str], *, id_column: str | None = None) -> pd.DataFrame:
    """Per-cell labels from a CSV (a cell-id column plus label columns), aligned to ``cell_ids``.

    The id column is ``id_column`` or the first column; cells absent from the file get NaN. Used for
    cell types / clusters exported next to the instrument output (e.g. Xenium's ``clusters.csv``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} does not exist. Fix: pass a CSV with a cell id column")
    df = read_csv(path, "pass a CSV with a cell id column", dtype=str)
    key = id_column or str(df.columns[0])
    check_columns(df.columns, [key], str(path), "name the cell id column with --labels-id-column")
    df = df.drop_duplicates(subset=key).set_index(key)
    hits = df.index.isin(pd.Index(cell_ids))
    if not hits.any():
        raise ValueError(f"{path}: none of its {len(df)} ids (first: {listed(df.index)}) match the section's cell ids "
                         f"(first: {listed(cell_ids)}). Fix: pass the labels of this section")
    out = df.reindex(pd.Index(cell_ids, dtype=object))
    out.columns = [str(c) for c in out.columns]
    return out


def make_unique(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Names made unique like ``AnnData.var_names_make_unique`` (``A, A-1, A-2``); also the renamed ones."""
    out, seen, renamed = [], {}, []
    taken = set(names)
    for n in names:
        if n not in seen:
            seen[n] = 0
            out.append(n)
            continue
        k = seen[n]
        while True:
            k += 1
            cand = f"{n}-{k}"
            if cand not in taken:
                break
        seen[n] = k
        taken.add(cand)
        out.append(cand)
        renamed.append(cand)
    return out, renamed


def info(message: str) -> None:
    """One line on stderr saying what a reader decided for the user (e.g. where a transform came from)."""
    print(f"spatia: {message}", file=sys.stderr)


def warn(message: str) -> None:
    """One line on stderr (readers run inside CLI commands and notebooks alike)."""
    print(f"spatia: warning: {message}", file=sys.stderr)


def parse_section_labels(items: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--section-label {item!r}: expected KEY=VALUE, e.g. condition=disease")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def add_common_cli_arguments(parser, *, what: str) -> None:
    """Flags every instrument reader shares (sample id, labels, section labels, vocabulary report)."""
    parser.add_argument("--sample-id", nargs="+", help=f"sample id per {what} (default: from the run metadata or the "
                                                        "folder name)")
    parser.add_argument("--labels", nargs="+", metavar="CSV",
                        help="per-cell labels CSV per section (first column = cell id; other columns become labels)")
    parser.add_argument("--labels-id-column", help="cell id column of --labels (default: the first column)")
    parser.add_argument("--on-mismatch", choices=ON_MISMATCH, default="error",
                        help="cells listed in only one of counts / metadata: error (default) or keep the intersection")
    parser.add_argument("--section-label", action="append", metavar="KEY=VALUE",
                        help="section-level label for every section (repeatable), e.g. tissue=lung")
    parser.add_argument("--vocabulary", metavar="PATH",
                        help="gene vocabulary to report panel coverage against: a model folder (config.json), a "
                             "dataset folder (gene_panel.json), a JSON list or a text file with one gene per line")


def per_section(values, n: int, flag: str, per: str = "input") -> list:
    """One value per section from a CLI list (one value for all, or exactly one per section)."""
    if values is None:
        return [None] * n
    if len(values) == 1:
        return list(values) * n
    if len(values) != n:
        raise ValueError(f"{flag}: {len(values)} values for {n} sections. Fix: give one value, or one per {per}")
    return list(values)


def sample_ids(values: Sequence[str] | None, n: int, inputs: str, per: str) -> list:
    """``--sample-id`` values: none (each reader picks its default) or exactly one per input."""
    sids = values or [None] * n
    if len(sids) != n:
        raise ValueError(f"--sample-id: {len(sids)} ids for {n} {inputs}. Fix: one id per {per}")
    return sids


def common_reader_kwargs(args, n: int) -> list[dict]:
    """Per input folder, the reader keyword arguments of the flags :func:`add_common_cli_arguments`
    adds (plus ``convert``'s ``--outside`` / ``--no-progress``): the glue every instrument CLI shares."""
    sids = sample_ids(args.sample_id, n, "folders", "folder")
    labels = per_section(args.labels, n, "--labels")
    section_labels = parse_section_labels(args.section_label)
    return [dict(sample_id=sid, on_mismatch=args.on_mismatch, labels=lab, labels_id_column=args.labels_id_column,
                 section_labels=section_labels, vocabulary=args.vocabulary,
                 check_bounds=getattr(args, "outside", "error") == "error", quiet=getattr(args, "no_progress", False))
            for sid, lab in zip(sids, labels)]


def attach_labels_and_coverage(section, *, labels: str | Path | None = None, labels_id_column: str | None = None,
                               vocabulary=None, quiet: bool = False):
    """Add per-cell labels from a CSV to ``section.obs`` / ``label_keys`` and, when a vocabulary is
    given, its panel coverage report to ``section.uns["panel_coverage"]`` (printed unless ``quiet``)."""
    if labels is not None:
        lab = load_labels(labels, section.cell_ids, id_column=labels_id_column)
        obs = section.obs if section.obs is not None else pd.DataFrame(index=pd.Index(section.cell_ids, dtype=object))
        clash = [c for c in lab.columns if c in obs.columns]
        if clash:
            raise ValueError(f"{labels}: label column(s) {listed(clash)} already exist in the cell metadata. Fix: "
                             "rename them in the labels CSV")
        lab.index = obs.index
        section.obs = pd.concat([obs, lab], axis=1)
        section.label_keys = list(section.label_keys) + [c for c in lab.columns if c not in section.label_keys]
        section.uns["labels_file"] = str(labels)
        section.uns["labels_missing"] = {c: int(lab[c].isna().sum()) for c in lab.columns}
    if vocabulary is not None:
        from ..gene_panel import panel_coverage

        cov = panel_coverage(section.genes, vocabulary, gene_ids=section.gene_ids, counts=section.counts,
                             dropped=section.dropped)
        section.uns["panel_coverage"] = cov.to_json()
        if not quiet:
            print(f"{section.sample_id}: {cov.summary()}", file=sys.stderr)
    return section
