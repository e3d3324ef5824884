"""Embeddings of a whole built dataset at every scale: cells, context-aware cells, niches, sections.

Niches here are of two kinds (see :mod:`spatia_hf.data.neighbourhoods`): every cell gets a
cell-centred neighbourhood (its ``num_neighbours`` nearest cells), whose composition over the
model's cell states (or, without them, pooled niche token) is ``cell_niches``
(``obsm["X_spatia_niche"]``) and whose centre token is the cell's context-aware embedding
``cells_in_niche``; the grid tiles of the ``niches`` config give ``niches`` and the
section's tissue tokens (``tissues``).

One function, :func:`embed_dataset`, serves ``spatia embed`` (AnnData users), the evaluation
suite and the demo, so every consumer sees the same numbers. Two choices make the result
independent of batch size and chunking: the zero-count genes sampled for each cell come from a
generator seeded by the cell's id (not by its position in a batch), and padding is masked.

Memory does not grow with the section beyond the outputs: the cells are read from the Parquet
shards batch by batch (:class:`~spatia_hf.data.shard_reader.ConfigShards`, no memory-mapped Arrow
cache), neighbourhoods are searched batch by batch, every output is filled in place, and with
``out_dir`` the per-cell outputs themselves are ``.npy`` files filled as they are made
(:class:`OutputArrays`).
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from spatia_hf.data import schema
from .models.cell_states import SpatiaCellStates
from .models.modeling_spatia import SpatiaModel
from .models.processing_spatia import SpatiaProcessor
from spatia_hf.utils.progress import respects_progress

logger = logging.getLogger(__name__)

MODALITIES = ("fused", "image", "expression")
# cell batches between two returns of freed heap to the OS (utils.allocator.release_free_heap; ~1 ms each)
_TRIM_EVERY_BATCHES = 32


@dataclass
class DatasetEmbeddings:
    """Arrays aligned with the rows of the ``cells`` / ``niches`` / ``tissues`` configs that were embedded.

    ``cells[m]`` holds the cell model's embedding with modality ``m`` (``fused``: image + expression,
    ``image``: image branch only, ``expression``: expression branch only); ``cell_niches`` the
    niche embedding of each cell's own neighbourhood: its composition over the model's cell states
    when the model has them (``num_cell_states``; ``cell_states`` holds them and
    ``cell_state_source`` says whether they came with the checkpoint or were fitted on the embedded
    cells), else the pooled niche token, which is in ``cell_niche_tokens`` either way;
    ``cells_in_niche`` the niche model's context-aware embedding of each cell (its centre token);
    all aligned with ``cell_ids``;
    ``niches`` one row per grid niche; ``tissues`` one row per section.
    """

    cell_ids: np.ndarray
    cell_sample_ids: np.ndarray
    cells: dict[str, np.ndarray] = field(default_factory=dict)
    cells_in_niche: np.ndarray | None = None
    cell_niches: np.ndarray | None = None
    cell_niche_tokens: np.ndarray | None = None
    cell_states: SpatiaCellStates | None = None
    cell_state_source: str | None = None
    niche_ids: np.ndarray | None = None
    niche_sample_ids: np.ndarray | None = None
    niche_positions_um: np.ndarray | None = None
    niches: np.ndarray | None = None
    tissue_sample_ids: np.ndarray | None = None
    tissues: np.ndarray | None = None
    gene_coverage: dict = field(default_factory=dict)


def cell_seed(cell_id: str, seed: int = 0) -> int:
    """A stable per-cell seed (same cell, same sampled genes, whatever the batch)."""
    return (zlib.crc32(str(cell_id).encode()) + 1_000_003 * int(seed)) % (2**32)


def encode_cells(processor: SpatiaProcessor, rows: dict, modality: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of the ``cells`` config (dict of columns) -> model inputs for one modality, seeded per cell."""
    if modality not in MODALITIES:
        raise ValueError(f"modality={modality!r}: use one of {MODALITIES}")
    inputs: dict[str, torch.Tensor] = {}
    if modality in ("fused", "image"):
        inputs["pixel_values"] = processor.preprocess_images(np.asarray(rows[schema.IMAGE]))
    if modality in ("fused", "expression"):
        cells = [
            processor.encode_cell(idx, cnt, np.random.default_rng(cell_seed(cid, seed)))
            for cid, idx, cnt in zip(rows[schema.CELL_ID], rows[schema.GENE_INDICES], rows[schema.GENE_COUNTS])
        ]
        length = max([len(c["gene_ids"]) for c in cells] + [1])
        ids = np.zeros((len(cells), length), dtype=np.int64)
        values = np.zeros((len(cells), length), dtype=np.float32)
        for r, c in enumerate(cells):
            ids[r, : len(c["gene_ids"])] = c["gene_ids"]
            values[r, : len(c["gene_values"])] = c["gene_values"]
        inputs["gene_ids"] = torch.from_numpy(ids)
        inputs["gene_values"] = torch.from_numpy(values)
        inputs["gene_attention_mask"] = torch.from_numpy(ids != 0).long()
    return inputs


def row_batches(rows, columns: Sequence[str], batch_size: int) -> Iterator[dict]:
    """Numpy columns of ``batch_size`` rows at a time, in order, from a map-style ``datasets.Dataset``
    (Arrow slices) or a :class:`~spatia_hf.data.shard_reader.ConfigShards` (streamed from the shards)."""
    from .data.datasets import arrow_columns
    from .data.shard_reader import ConfigShards

    if isinstance(rows, ConfigShards):
        yield from rows.batches(columns, batch_size)
        return
    view = rows.select_columns(list(columns)).with_format("arrow")
    for start in range(0, len(rows), batch_size):
        yield arrow_columns(view[start : start + batch_size])


def _filled(out: np.ndarray | None, n: int, width: int, what: str) -> np.ndarray:
    if out is None:
        return np.zeros((n, width), np.float32)
    if tuple(out.shape) != (n, width):
        raise ValueError(f"out: expected an array of shape {(n, width)} for the {what}, got {tuple(out.shape)}")
    return out


@torch.no_grad()
def embed_cells_config(model: SpatiaModel, processor: SpatiaProcessor, cells, *, modality: str = "fused",
                       batch_size: int = 64, seed: int = 0, progress: bool = True,
                       out: np.ndarray | None = None) -> np.ndarray:
    """Cell embeddings ``[n_cells, D]`` of a ``cells`` config (a ``datasets.Dataset`` or a
    :class:`~spatia_hf.data.shard_reader.ConfigShards`) for one modality, filled into ``out`` when
    given (e.g. a memory-mapped file)."""
    from .utils.allocator import release_free_heap

    out = _filled(out, len(cells), model.config.cell_config.hidden_size, f"{modality} cell embeddings")
    columns = [schema.CELL_ID] + ([schema.IMAGE] if modality != "expression" else []) \
        + ([schema.GENE_INDICES, schema.GENE_COUNTS] if modality != "image" else [])  # the rest is never read
    start = 0
    with tqdm(total=len(out), desc=f"cell embeddings ({modality})", disable=not progress) as bar:
        for i, rows in enumerate(row_batches(cells, columns, batch_size)):
            emb = model.embed_cells(**encode_cells(processor, rows, modality, seed), batch_size=batch_size,
                                    return_tensors="np")
            out[start : start + len(emb)] = emb
            start += len(emb)
            bar.update(len(emb))
            if i % _TRIM_EVERY_BATCHES == _TRIM_EVERY_BATCHES - 1:
                release_free_heap()  # freed crops would otherwise stay mapped: memory grew with the section
    return out


@torch.no_grad()
def expression_profiles_config(model: SpatiaModel, processor: SpatiaProcessor, cells, *, batch_size: int = 256,
                               seed: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """Expression profiles ``[n_cells, D]`` (:meth:`SpatiaModel.expression_profiles`) of a ``cells``
    config, with the same per-cell seeded gene sampling as the cell embeddings (into ``out`` when given)."""
    out = _filled(out, len(cells), model.config.cell_config.hidden_size, "expression profiles")
    device = model.device
    start = 0
    for rows in row_batches(cells, [schema.CELL_ID, schema.GENE_INDICES, schema.GENE_COUNTS], batch_size):
        inputs = encode_cells(processor, rows, "expression", seed)
        prof = model.expression_profiles(**{k: v.to(device) for k, v in inputs.items()}).float().cpu().numpy()
        out[start : start + len(prof)] = prof
        start += len(prof)
    return out


class CellNiches(NamedTuple):
    """What :func:`embed_cell_niches` returns, one row per cell."""

    tokens: np.ndarray  # the pooled niche token of the cell's neighbourhood [n, niche hidden]
    centres: np.ndarray  # the niche model's context-aware embedding of the cell itself [n, niche hidden]
    compositions: np.ndarray | None  # the neighbourhood's composition over cell states [n, states], or None


@torch.no_grad()
def embed_cell_niches(model: SpatiaModel, cell_embeddings: np.ndarray, xy_um: np.ndarray,
                      cell_sample_ids: np.ndarray, *, cell_profiles: np.ndarray | None = None,
                      num_neighbours: int | None = None, radius_um: float | None = None, batch_size: int = 64,
                      cell_states: SpatiaCellStates | None = None, progress: bool = True,
                      allocate: Callable[[str, tuple[int, ...]], np.ndarray] | None = None) -> CellNiches:
    """The niche embedding of every cell's own neighbourhood and its context-aware embedding.

    Each cell's ``num_neighbours`` nearest cells of its section (within ``radius_um`` when given;
    defaults: the model's ``niche_config``), positions relative to it, go through the niche model in
    batches of ``batch_size`` neighbourhoods; each batch's neighbourhoods are searched when it runs
    (one k-d tree per section), so nothing of size ``n_cells x k`` is ever held.
    With ``cell_states`` (fitted; default: the niche model's own when fitted) each cell's composition
    over them comes out too, over its ``cell_states.neighbours`` nearest cells (a larger
    neighbourhood than the niche model's when they count more; the same radius applies).
    ``allocate(name, shape)`` makes the output arrays (default: :class:`OutputArrays` without a folder,
    i.e. zeros in memory; with one it gives memory-mapped files).
    """
    from scipy.spatial import cKDTree

    from spatia_hf.data.neighbourhoods import cell_neighbourhoods

    cfg = model.config.niche_config
    k = int(num_neighbours or cfg.num_neighbours)
    radius = radius_um if radius_um is not None else cfg.neighbour_radius_um
    use_profiles = cfg.use_expression_profiles and cell_profiles is not None
    if cell_states is None and model.niche.has_fitted_cell_states:
        cell_states = model.niche.cell_states
    n, width = len(cell_embeddings), cfg.hidden_size
    allocate = OutputArrays() if allocate is None else allocate
    niche_out = allocate("cell_niche_tokens", (n, width))
    centre_out = allocate("cells_in_niche", (n, width))
    comp_out = None if cell_states is None else allocate("cell_niche_compositions", (n, cell_states.num_states))
    # the composition may count more cells than the niche model reads: one search serves both (nearest first)
    k_hood = k if cell_states is None else max(k, int(cell_states.neighbours or k))
    sections = np.asarray(cell_sample_ids).astype(str)
    device = model.device
    bar = tqdm(total=n, desc="cell niches", disable=not progress)
    for sid in np.unique(sections):
        rows = np.flatnonzero(sections == sid)
        xy = np.asarray(xy_um, np.float64)[rows]
        tree = cKDTree(xy)
        for start in range(0, len(rows), batch_size):
            hoods = cell_neighbourhoods(xy, k_hood, radius, centres=np.arange(start, min(start + batch_size, len(rows))),
                                        tree=tree)
            idx, offsets = hoods.index, hoods.offsets_um
            real = idx >= 0
            members = rows[np.where(real, idx, 0)]
            emb = np.where(real[..., None], cell_embeddings[members], 0.0).astype(np.float32)
            prof = (torch.from_numpy(np.where(real[:, :k, None], cell_profiles[members[:, :k]], 0.0).astype(np.float32))
                    if use_profiles else None)
            out = model.niche(torch.from_numpy(emb[:, :k]).to(device), torch.from_numpy(offsets[:, :k]).to(device),
                              torch.from_numpy(real[:, :k]).to(device),
                              cell_profiles=None if prof is None else prof.to(device), return_dict=True)
            centres = rows[start : start + len(idx)]
            niche_out[centres] = out.niche_embeds.float().cpu().numpy()
            centre_out[centres] = out.cell_embeds[:, 0].float().cpu().numpy()
            if comp_out is not None:
                at = cell_states.centres.device
                comp = cell_states.composition(torch.from_numpy(emb).to(at), torch.from_numpy(offsets).to(at),
                                               torch.from_numpy(real).to(at))
                comp_out[centres] = comp.cpu().numpy()
            bar.update(len(idx))
    bar.close()
    return CellNiches(niche_out, centre_out, comp_out)


class CellRowIndex:
    """Row of every cell keyed by ``(sample_id, cell_id)``, looked up in bulk: sorted keys and
    ``np.searchsorted`` (a dict of 100k tuple keys held ~25 MB; this ~1/3 of it).

    Cell ids repeat across sections (every instrument numbers its cells from 1), so a niche's members
    are looked up within its own section. Without ``cell_sample_ids`` the ids alone are keys, which is
    only allowed when they are unique.
    """

    def __init__(self, cell_ids: np.ndarray, cell_sample_ids: np.ndarray | None = None):
        ids = np.asarray(cell_ids).astype(str)
        self.by_section = cell_sample_ids is not None
        if self.by_section:
            if len(cell_sample_ids) != len(ids):
                raise ValueError(f"cell_sample_ids has {len(cell_sample_ids)} entries for {len(ids)} cell_ids. Fix: "
                                 "pass the sample_id column of the same cells rows")
            keys = self._keys(np.asarray(cell_sample_ids).astype(str), ids)
        else:
            keys = ids
        self._order = np.argsort(keys, kind="stable")
        self._sorted = keys[self._order]
        if not self.by_section and len(keys) > 1 and (self._sorted[1:] == self._sorted[:-1]).any():
            raise ValueError("cell_sample_ids=None but cell_ids repeat (cells of several sections share ids). Fix: "
                             "pass cell_sample_ids (the cells' sample_id column) so niches are matched within "
                             "their section")

    @staticmethod
    def _keys(sample_ids: np.ndarray, cell_ids: np.ndarray) -> np.ndarray:
        return np.char.add(np.char.add(sample_ids, "\x1f"), cell_ids)

    def rows(self, sample_id: str | None, cell_ids: Sequence[str]) -> np.ndarray:
        """Rows of ``cell_ids`` of section ``sample_id`` (ignored without sample ids); -1 where unknown."""
        ids = np.asarray(cell_ids).astype(str)
        if ids.size == 0:
            return np.zeros(0, np.int64)
        keys = self._keys(np.full(ids.shape, str(sample_id)), ids) if self.by_section else ids
        at = np.clip(np.searchsorted(self._sorted, keys), 0, max(len(self._sorted) - 1, 0))
        found = (self._sorted[at] == keys) if len(self._sorted) else np.zeros(ids.shape, bool)
        return np.where(found, self._order[at] if len(self._sorted) else -1, -1).astype(np.int64)

    def get(self, key: tuple[str | None, str], default: int = -1) -> int:
        """``dict.get``-style lookup of one ``(sample_id, cell_id)``."""
        row = int(self.rows(key[0], [key[1]])[0])
        return default if row < 0 else row


def cell_row_index(cell_ids: np.ndarray, cell_sample_ids: np.ndarray | None) -> CellRowIndex:
    """Row of every cell keyed by ``(sample_id, cell_id)`` (:class:`CellRowIndex`; ``.get((sid, cid), -1)``)."""
    return CellRowIndex(cell_ids, cell_sample_ids)


@torch.no_grad()
def embed_niches_config(model: SpatiaModel, niches, cell_ids: np.ndarray, cell_embeddings: np.ndarray, *,
                        cell_sample_ids: np.ndarray | None = None, cell_profiles: np.ndarray | None = None,
                        batch_size: int = 16, progress: bool = True,
                        return_cell_embeddings: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Embeddings ``[n_niches, D]`` of the grid niches (tissue tokens) of a ``niches`` config (a
    ``datasets.Dataset`` or a :class:`~spatia_hf.data.shard_reader.ConfigShards`) and, with
    ``return_cell_embeddings`` (else None), context-aware cell embeddings aligned with ``cell_ids``;
    ``cell_profiles`` (aligned with ``cell_ids``) feed the niche model's expression-profile tokens.

    Every member of a niche is used (no sampling): a cell's context embedding comes from the niche
    it belongs to. Members are matched by ``(sample_id, cell_id)`` when ``cell_sample_ids`` is given
    (required when ids repeat across sections). Cells that no niche lists keep their cell embedding.
    """
    position = CellRowIndex(cell_ids, cell_sample_ids)
    in_niche = np.array(cell_embeddings, np.float32) if return_cell_embeddings else None
    width = model.config.niche_config.hidden_size
    niche_out = np.zeros((len(niches), width), np.float32)
    columns = [schema.SAMPLE_ID, schema.CELL_IDS, schema.CELL_REL_X_UM, schema.CELL_REL_Y_UM]
    start = 0
    with tqdm(total=len(niches), desc="niche embeddings", disable=not progress) as bar:
        for rows in row_batches(niches, columns, batch_size):
            members = [position.rows(sid, ids) for sid, ids in zip(rows[schema.SAMPLE_ID], rows[schema.CELL_IDS])]
            n_max = max([int((m >= 0).sum()) for m in members] + [1])
            emb = np.zeros((len(members), n_max, cell_embeddings.shape[1]), np.float32)
            pos = np.zeros((len(members), n_max, 2), np.float32)
            mask = np.zeros((len(members), n_max), bool)
            prof = None if cell_profiles is None else np.zeros_like(emb)
            kept = []
            for b, (m, rx, ry) in enumerate(zip(members, rows[schema.CELL_REL_X_UM], rows[schema.CELL_REL_Y_UM])):
                keep = m >= 0
                idx = m[keep]
                kept.append(idx)
                emb[b, : idx.size] = cell_embeddings[idx]
                if prof is not None:
                    prof[b, : idx.size] = cell_profiles[idx]
                pos[b, : idx.size, 0] = np.asarray(rx, np.float32)[keep]
                pos[b, : idx.size, 1] = np.asarray(ry, np.float32)[keep]
                mask[b, : idx.size] = True
            out = model.embed_niches(cell_positions=pos, cell_embeddings=emb, cell_attention_mask=mask,
                                     cell_profiles=prof, batch_size=batch_size,
                                     return_cell_embeddings=return_cell_embeddings)
            niche_emb = out[0] if return_cell_embeddings else out
            niche_out[start : start + len(members)] = niche_emb
            start += len(members)
            bar.update(len(members))
            if in_niche is not None:
                for b, idx in enumerate(kept):
                    in_niche[idx] = out[1][b, : idx.size]
    return niche_out, in_niche


@torch.no_grad()
def embed_sections(model: SpatiaModel, niche_embeddings: np.ndarray, niche_positions_um: np.ndarray,
                   niche_sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One tissue embedding per section from its niches (the tissue model with token merging)."""
    sample_ids = np.unique(niche_sample_ids)
    rows = []
    for sid in sample_ids:
        sel = niche_sample_ids == sid
        rows.append(model.embed_tissue(niche_embeddings[sel][None], niche_positions_um[sel][None],
                                       np.ones((1, int(sel.sum())), bool)))
    width = model.config.tissue_config.hidden_size
    return sample_ids, (np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, width), np.float32))


class OutputArrays:
    """Where :func:`embed_dataset` puts its per-cell arrays: in memory (``out_dir=None``), or as ``.npy``
    files filled as they are made (``numpy.lib.format.open_memmap``), so a section of any size holds
    about one batch of its outputs in the process's own memory (what was written is file cache the
    kernel can drop). The files are written in a hidden folder beside ``out_dir`` and moved into it
    only when embedding finished (:func:`spatia_hf.utils.io.publish`: other files in ``out_dir``
    stay), then reopened read-only; ``scratch`` arrays (inputs of a later stage) are never published.
    """

    def __init__(self, out_dir: str | Path | None = None):
        self.out_dir = None if out_dir is None else Path(out_dir)
        if self.out_dir is not None and self.out_dir.exists() and not self.out_dir.is_dir():
            raise FileExistsError(f"out_dir={str(out_dir)!r} exists and is not a folder. Fix: pass a folder (new or "
                                  "existing) for the embeddings' .npy files")
        self._stage: Path | None = None
        self._scratch: set[str] = set()

    def __call__(self, name: str, shape: tuple[int, ...], scratch: bool = False) -> np.ndarray:
        """A float32 array of zeros ``shape`` called ``name`` (``name.npy`` in ``out_dir``)."""
        if self.out_dir is None:
            return np.zeros(shape, np.float32)
        from .utils.io import new_stage

        if self._stage is None:
            self._stage = new_stage(self.out_dir)
        if scratch:
            self._scratch.add(name)
        path = self._stage / f"{name}.npy"
        if path.exists():
            raise ValueError(f"OutputArrays: {name!r} was allocated twice")
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=tuple(shape))

    def publish(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Flush, move the non-scratch files into ``out_dir`` and return ``arrays`` with every published
        one reopened read-only from there (in memory: ``arrays`` unchanged)."""
        if self._stage is None:
            return arrays
        from .utils.io import publish

        for name in self._scratch:
            (self._stage / f"{name}.npy").unlink(missing_ok=True)
        for name, arr in arrays.items():
            if isinstance(arr, np.memmap):
                arr.flush()
            elif name not in self._scratch and not (self._stage / f"{name}.npy").exists():
                np.save(self._stage / f"{name}.npy", np.asarray(arr), allow_pickle=False)
        publish(self._stage, self.out_dir)
        self._stage = None
        return {name: np.load(self.out_dir / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                for name in arrays if name not in self._scratch}

    def discard(self) -> None:
        """Remove what was staged (embedding failed): ``out_dir`` is left as it was."""
        import shutil

        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
            self._stage = None


@respects_progress
def embed_dataset(model: SpatiaModel, processor: SpatiaProcessor, dataset_dir: str | Path, *,
                  sample_ids: Sequence[str] | None = None, modalities: Sequence[str] = ("fused",),
                  niche_aware: bool = True, tissue: bool = True, batch_size: int = 64, seed: int = 0,
                  progress: bool = True, min_gene_coverage: float | None = None,
                  out_dir: str | Path | None = None) -> DatasetEmbeddings:
    """Embed a dataset directory written by the builder, at every scale the arguments ask for.

    Args:
        model: a :class:`SpatiaModel` (or a task model's ``.spatia``).
        processor: its processor; the dataset's gene panel is mapped onto the model vocabulary here.
        dataset_dir: directory with the ``cells`` / ``niches`` / ``tissues`` configs and ``gene_panel.json``
            (or a Hub dataset id, downloaded once).
        sample_ids: restrict to these sections (default: all).
        modalities: cell-embedding variants to compute (``fused``, ``image``, ``expression``).
        niche_aware: also run the niche model on every cell's own neighbourhood (``cell_niches``,
            ``cells_in_niche``).
        tissue: also embed the grid niches (``niches``) and run the tissue model on them (one
            embedding per section); needs ``niche_aware``.
        min_gene_coverage: refuse a dataset panel of which less than this fraction is in the model
            vocabulary (default: the processor's ``min_coverage``); the report is ``gene_coverage``.
        out_dir: write every per-cell array as it is made into ``.npy`` files in this folder
            (``cells_fused.npy``, ``cells_in_niche.npy``, ``cell_niche_tokens.npy``,
            ``cell_niche_compositions.npy``, ``cell_ids.npy``, ...; published when embedding finished)
            and return them memory-mapped: for sections too large to hold their outputs in memory.
    """
    from .data.datasets import resolve_dataset_dir
    from .data.shard_reader import ConfigShards

    dataset_dir = resolve_dataset_dir(dataset_dir)
    coverage = processor.map_dataset_panel(dataset_dir, min_coverage=min_gene_coverage).report()
    cells = ConfigShards(dataset_dir, "cells", sample_ids)  # read batch by batch: no Arrow cache kept mapped
    index = cells.read([schema.CELL_ID, schema.SAMPLE_ID, schema.X_UM, schema.Y_UM])
    result = DatasetEmbeddings(cell_ids=index[schema.CELL_ID].astype(str),
                               cell_sample_ids=index[schema.SAMPLE_ID].astype(str), gene_coverage=coverage)
    arrays = OutputArrays(out_dir)
    width = model.config.cell_config.hidden_size
    try:
        for m in dict.fromkeys(list(modalities) + (["fused"] if niche_aware else [])):
            result.cells[m] = embed_cells_config(model, processor, cells, modality=m, batch_size=batch_size,
                                                 seed=seed, progress=progress,
                                                 out=arrays(f"cells_{m}", (len(cells), width)))
        profiles = None
        if niche_aware:
            if model.config.niche_config.use_expression_profiles:
                profiles = expression_profiles_config(model, processor, cells, seed=seed,
                                                      out=arrays("expression_profiles", (len(cells), width), True))
            xy = np.stack([index[schema.X_UM].astype(np.float64), index[schema.Y_UM].astype(np.float64)], 1)
            result.cell_states, result.cell_state_source = cell_states_for(model, result.cells["fused"], seed)
            hoods = embed_cell_niches(model, result.cells["fused"], xy, result.cell_sample_ids,
                                      cell_profiles=profiles, batch_size=batch_size, cell_states=result.cell_states,
                                      progress=progress, allocate=arrays)
            result.cell_niche_tokens, result.cells_in_niche = hoods.tokens, hoods.centres
            result.cell_niches = hoods.compositions if hoods.compositions is not None else hoods.tokens
        if niche_aware and tissue:
            niches = ConfigShards(dataset_dir, "niches", sample_ids)
            result.niches, _ = embed_niches_config(
                model, niches, result.cell_ids, result.cells["fused"], cell_sample_ids=result.cell_sample_ids,
                cell_profiles=profiles, batch_size=max(1, batch_size // 4), progress=progress,
                return_cell_embeddings=False)
            grid = niches.read([schema.NICHE_ID, schema.SAMPLE_ID, schema.X_UM, schema.Y_UM])
            result.niche_ids = grid[schema.NICHE_ID].astype(str)
            result.niche_sample_ids = grid[schema.SAMPLE_ID].astype(str)
            result.niche_positions_um = np.stack([grid[schema.X_UM], grid[schema.Y_UM]], axis=1).astype(np.float32)
            result.tissue_sample_ids, result.tissues = embed_sections(
                model, result.niches, result.niche_positions_um, result.niche_sample_ids)
        if out_dir is not None:
            _publish_outputs(result, arrays)
    except BaseException:
        arrays.discard()
        raise
    return result


def _publish_outputs(result: DatasetEmbeddings, arrays: OutputArrays) -> None:
    """Publish ``result``'s per-cell arrays (and its ids, for reading the files back) into ``arrays.out_dir``
    and point ``result`` at the published, read-only files."""
    named = {f"cells_{m}": a for m, a in result.cells.items()}
    named.update(cell_ids=result.cell_ids, cell_sample_ids=result.cell_sample_ids)
    for key in ("cells_in_niche", "cell_niche_tokens"):
        if getattr(result, key) is not None:
            named[key] = getattr(result, key)
    composed = result.cell_niches is not None and result.cell_niches is not result.cell_niche_tokens
    if composed:
        named["cell_niche_compositions"] = result.cell_niches
    done = arrays.publish(named)
    result.cells = {m: done[f"cells_{m}"] for m in result.cells}
    result.cell_ids, result.cell_sample_ids = np.asarray(done["cell_ids"]), np.asarray(done["cell_sample_ids"])
    for key in ("cells_in_niche", "cell_niche_tokens"):
        if key in done:
            setattr(result, key, done[key])
    result.cell_niches = done["cell_niche_compositions"] if composed else result.cell_niche_tokens


def describe_niche_embedding(niche_config, cell_state_source: str | None) -> str:
    """What ``cell_niches`` (``obsm["X_spatia_niche"]``) holds, in words, for reports and ``uns``."""
    if cell_state_source is None:
        return f"pooled niche token of the {niche_config.num_neighbours} nearest cells"
    counted = niche_config.cell_state_neighbours
    weights = ("" if niche_config.cell_state_bandwidth is None else
               f", Gaussian-weighted by distance (sigma {niche_config.cell_state_bandwidth:g} of the farthest's)")
    return (f"composition of the {counted} nearest cells{weights} over {niche_config.num_cell_states} cell states "
            f"(fitted on: {cell_state_source})")


def cell_states_for(model: SpatiaModel, cell_embeddings: np.ndarray, seed: int = 0
                    ) -> tuple[SpatiaCellStates | None, str | None]:
    """The cell states to describe neighbourhoods with, and where they come from: the model's own
    (``"checkpoint"``), or, for a model whose states were never fitted (a checkpoint trained outside
    ``spatia pretrain``), states fitted on these cell embeddings (``"embedded cells"``; the model is
    left unchanged). ``(None, None)`` for a model without cell states."""
    niche = model.niche
    if niche.cell_states is None:
        return None, None
    if niche.cell_states.is_fitted:
        return niche.cell_states, "checkpoint"
    logger.warning("the model's cell states were never fitted: fitting them on the %d embedded cells (fit them once "
                   "with model.niche.fit_cell_states(...) and save, so other datasets use the same states)",
                   len(cell_embeddings))
    cfg = model.config.niche_config
    states = SpatiaCellStates(cfg.num_cell_states, cfg.cell_embed_dim, cfg.cell_state_temperature,
                              cfg.cell_state_neighbours, cfg.cell_state_bandwidth)
    return states.fit(cell_embeddings, seed=seed), "embedded cells"
