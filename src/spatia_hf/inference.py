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
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

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


@torch.no_grad()
def embed_cells_config(model: SpatiaModel, processor: SpatiaProcessor, cells, *, modality: str = "fused",
                       batch_size: int = 64, seed: int = 0, progress: bool = True) -> np.ndarray:
    """Cell embeddings ``[n_cells, D]`` of a ``cells`` ``datasets.Dataset`` for one modality."""
    from .utils.allocator import release_free_heap

    out = []
    columns = [schema.CELL_ID, schema.IMAGE, schema.GENE_INDICES, schema.GENE_COUNTS]
    view = cells.select_columns(columns).with_format("numpy")
    for i, start in enumerate(tqdm(range(0, len(cells), batch_size), desc=f"cell embeddings ({modality})",
                                   disable=not progress)):
        rows = view[start : start + batch_size]
        inputs = encode_cells(processor, rows, modality, seed)
        out.append(model.embed_cells(**inputs, batch_size=batch_size, return_tensors="np"))
        if i % _TRIM_EVERY_BATCHES == _TRIM_EVERY_BATCHES - 1:
            release_free_heap()  # freed crops would otherwise stay mapped: memory grew with the section
    width = model.config.cell_config.hidden_size
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, width), np.float32)


@torch.no_grad()
def expression_profiles_config(model: SpatiaModel, processor: SpatiaProcessor, cells, *, batch_size: int = 256,
                               seed: int = 0) -> np.ndarray:
    """Expression profiles ``[n_cells, D]`` (:meth:`SpatiaModel.expression_profiles`) of a ``cells``
    dataset, with the same per-cell seeded gene sampling as the cell embeddings."""
    out = []
    view = cells.select_columns([schema.CELL_ID, schema.GENE_INDICES, schema.GENE_COUNTS]).with_format("numpy")
    device = model.device
    for start in range(0, len(cells), batch_size):
        inputs = encode_cells(processor, view[start : start + batch_size], "expression", seed)
        out.append(model.expression_profiles(**{k: v.to(device) for k, v in inputs.items()}).float().cpu().numpy())
    width = model.config.cell_config.hidden_size
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, width), np.float32)


class CellNiches(NamedTuple):
    """What :func:`embed_cell_niches` returns, one row per cell."""

    tokens: np.ndarray  # the pooled niche token of the cell's neighbourhood [n, niche hidden]
    centres: np.ndarray  # the niche model's context-aware embedding of the cell itself [n, niche hidden]
    compositions: np.ndarray | None  # the neighbourhood's composition over cell states [n, states], or None


@torch.no_grad()
def embed_cell_niches(model: SpatiaModel, cell_embeddings: np.ndarray, xy_um: np.ndarray,
                      cell_sample_ids: np.ndarray, *, cell_profiles: np.ndarray | None = None,
                      num_neighbours: int | None = None, radius_um: float | None = None, batch_size: int = 64,
                      cell_states: SpatiaCellStates | None = None, progress: bool = True) -> CellNiches:
    """The niche embedding of every cell's own neighbourhood and its context-aware embedding.

    Each cell's ``num_neighbours`` nearest cells of its section (within ``radius_um`` when given;
    defaults: the model's ``niche_config``), positions relative to it, go through the niche model in
    batches of ``batch_size`` neighbourhoods; the neighbourhood search runs per section in chunks.
    With ``cell_states`` (fitted; default: the niche model's own when fitted) each cell's composition
    over them comes out too, over its ``cell_states.neighbours`` nearest cells (a larger
    neighbourhood than the niche model's when they count more; the same radius applies).
    """
    from spatia_hf.data.neighbourhoods import cell_neighbourhoods

    cfg = model.config.niche_config
    k = int(num_neighbours or cfg.num_neighbours)
    radius = radius_um if radius_um is not None else cfg.neighbour_radius_um
    use_profiles = cfg.use_expression_profiles and cell_profiles is not None
    if cell_states is None and model.niche.has_fitted_cell_states:
        cell_states = model.niche.cell_states
    n, width = len(cell_embeddings), cfg.hidden_size
    niche_out = np.zeros((n, width), np.float32)
    centre_out = np.zeros((n, width), np.float32)
    comp_out = None if cell_states is None else np.zeros((n, cell_states.num_states), np.float32)
    # the composition may count more cells than the niche model reads: one search serves both (nearest first)
    k_hood = k if cell_states is None else max(k, int(cell_states.neighbours or k))
    sections = np.asarray(cell_sample_ids).astype(str)
    device = model.device
    bar = tqdm(total=n, desc="cell niches", disable=not progress)
    for sid in np.unique(sections):
        rows = np.flatnonzero(sections == sid)
        hoods = cell_neighbourhoods(np.asarray(xy_um, np.float64)[rows], k_hood, radius)
        for start in range(0, len(rows), batch_size):
            idx = hoods.index[start : start + batch_size]
            real = idx >= 0
            members = rows[np.where(real, idx, 0)]
            emb = np.where(real[..., None], cell_embeddings[members], 0.0).astype(np.float32)
            offsets = hoods.offsets_um[start : start + batch_size]
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


def cell_row_index(cell_ids: np.ndarray, cell_sample_ids: np.ndarray | None) -> dict:
    """Row of every cell keyed by ``(sample_id, cell_id)``: cell ids repeat across sections (every
    instrument numbers its cells from 1), so a niche's members are looked up within its own section.
    Without ``cell_sample_ids`` the ids alone are keys, which is only allowed when they are unique."""
    ids = [str(c) for c in cell_ids.tolist()]
    if cell_sample_ids is None:
        if len(set(ids)) != len(ids):
            raise ValueError("cell_sample_ids=None but cell_ids repeat (cells of several sections share ids). Fix: "
                             "pass cell_sample_ids (the cells' sample_id column) so niches are matched within "
                             "their section")
        return {(None, c): i for i, c in enumerate(ids)}
    if len(cell_sample_ids) != len(ids):
        raise ValueError(f"cell_sample_ids has {len(cell_sample_ids)} entries for {len(ids)} cell_ids. Fix: pass the "
                         "sample_id column of the same cells rows")
    return {(str(s), c): i for i, (s, c) in enumerate(zip(cell_sample_ids.tolist(), ids))}


@torch.no_grad()
def embed_niches_config(model: SpatiaModel, niches, cell_ids: np.ndarray, cell_embeddings: np.ndarray, *,
                        cell_sample_ids: np.ndarray | None = None, cell_profiles: np.ndarray | None = None,
                        batch_size: int = 16,
                        progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings ``[n_niches, D]`` of the grid niches (tissue tokens) and context-aware cell
    embeddings aligned with ``cell_ids``; ``cell_profiles`` (aligned with ``cell_ids``) feed the
    niche model's expression-profile tokens.

    Every member of a niche is used (no sampling): a cell's context embedding comes from the niche
    it belongs to. Members are matched by ``(sample_id, cell_id)`` when ``cell_sample_ids`` is given
    (required when ids repeat across sections). Cells that no niche lists keep their cell embedding.
    """
    position = cell_row_index(cell_ids, cell_sample_ids)
    by_section = cell_sample_ids is not None
    in_niche = cell_embeddings.copy()
    niche_out = []
    view = niches.select_columns([schema.SAMPLE_ID, schema.CELL_IDS, schema.CELL_REL_X_UM, schema.CELL_REL_Y_UM])
    for start in tqdm(range(0, len(niches), batch_size), desc="niche embeddings", disable=not progress):
        rows = view[start : start + batch_size]
        members = [[position.get((str(sid) if by_section else None, str(c)), -1) for c in ids]
                   for sid, ids in zip(rows[schema.SAMPLE_ID], rows[schema.CELL_IDS])]
        n_max = max([len(m) for m in members] + [1])
        emb = np.zeros((len(members), n_max, cell_embeddings.shape[1]), np.float32)
        pos = np.zeros((len(members), n_max, 2), np.float32)
        mask = np.zeros((len(members), n_max), bool)
        prof = None if cell_profiles is None else np.zeros_like(emb)
        for b, (m, rx, ry) in enumerate(zip(members, rows[schema.CELL_REL_X_UM], rows[schema.CELL_REL_Y_UM])):
            keep = np.asarray(m) >= 0
            idx = np.asarray(m)[keep]
            emb[b, : idx.size] = cell_embeddings[idx]
            if prof is not None:
                prof[b, : idx.size] = cell_profiles[idx]
            pos[b, : idx.size, 0] = np.asarray(rx, np.float32)[keep]
            pos[b, : idx.size, 1] = np.asarray(ry, np.float32)[keep]
            mask[b, : idx.size] = True
        niche_emb, ctx = model.embed_niches(cell_positions=pos, cell_embeddings=emb, cell_attention_mask=mask,
                                            cell_profiles=prof, batch_size=batch_size, return_cell_embeddings=True)
        niche_out.append(niche_emb)
        for b, m in enumerate(members):
            idx = np.asarray([i for i in m if i >= 0], dtype=np.int64)
            in_niche[idx] = ctx[b, : idx.size]
    width = model.config.niche_config.hidden_size
    return (np.concatenate(niche_out).astype(np.float32) if niche_out else np.zeros((0, width), np.float32)), in_niche


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


@respects_progress
def embed_dataset(model: SpatiaModel, processor: SpatiaProcessor, dataset_dir: str | Path, *,
                  sample_ids: Sequence[str] | None = None, modalities: Sequence[str] = ("fused",),
                  niche_aware: bool = True, tissue: bool = True, batch_size: int = 64, seed: int = 0,
                  progress: bool = True, min_gene_coverage: float | None = None) -> DatasetEmbeddings:
    """Embed a dataset directory written by the builder, at every scale the arguments ask for.

    Args:
        model: a :class:`SpatiaModel` (or a task model's ``.spatia``).
        processor: its processor; the dataset's gene panel is mapped onto the model vocabulary here.
        dataset_dir: directory with the ``cells`` / ``niches`` / ``tissues`` configs and ``gene_panel.json``.
        sample_ids: restrict to these sections (default: all).
        modalities: cell-embedding variants to compute (``fused``, ``image``, ``expression``).
        niche_aware: also run the niche model on every cell's own neighbourhood (``cell_niches``,
            ``cells_in_niche``).
        tissue: also embed the grid niches (``niches``) and run the tissue model on them (one
            embedding per section); needs ``niche_aware``.
        min_gene_coverage: refuse a dataset panel of which less than this fraction is in the model
            vocabulary (default: the processor's ``min_coverage``); the report is ``gene_coverage``.
    """
    from .data.datasets import load_spatia_dataset

    data = load_spatia_dataset(dataset_dir, configs=("cells", "niches") if niche_aware and tissue else ("cells",))
    coverage = processor.map_dataset_panel(dataset_dir, min_coverage=min_gene_coverage).report()
    cells = _restrict(data.configs["cells"], sample_ids)
    result = DatasetEmbeddings(cell_ids=np.asarray(cells[schema.CELL_ID]).astype(str),
                               cell_sample_ids=np.asarray(cells[schema.SAMPLE_ID]).astype(str),
                               gene_coverage=coverage)
    for m in dict.fromkeys(list(modalities) + (["fused"] if niche_aware else [])):
        result.cells[m] = embed_cells_config(model, processor, cells, modality=m, batch_size=batch_size,
                                             seed=seed, progress=progress)
    if niche_aware:
        profiles = (expression_profiles_config(model, processor, cells, seed=seed)
                    if model.config.niche_config.use_expression_profiles else None)
        xy = np.stack([np.asarray(cells[schema.X_UM], np.float64), np.asarray(cells[schema.Y_UM], np.float64)], 1)
        result.cell_states, result.cell_state_source = cell_states_for(model, result.cells["fused"], seed)
        hoods = embed_cell_niches(model, result.cells["fused"], xy, result.cell_sample_ids, cell_profiles=profiles,
                                  batch_size=batch_size, cell_states=result.cell_states, progress=progress)
        result.cell_niche_tokens, result.cells_in_niche = hoods.tokens, hoods.centres
        result.cell_niches = hoods.compositions if hoods.compositions is not None else hoods.tokens
    if niche_aware and tissue:
        niches = _restrict(data.configs["niches"], sample_ids)
        result.niches, _ = embed_niches_config(
            model, niches, result.cell_ids, result.cells["fused"], cell_sample_ids=result.cell_sample_ids,
            cell_profiles=profiles, batch_size=max(1, batch_size // 4), progress=progress)
        result.niche_ids = np.asarray(niches[schema.NICHE_ID]).astype(str)
        result.niche_sample_ids = np.asarray(niches[schema.SAMPLE_ID]).astype(str)
        result.niche_positions_um = np.stack([np.asarray(niches[schema.X_UM], np.float32),
                                              np.asarray(niches[schema.Y_UM], np.float32)], axis=1)
        result.tissue_sample_ids, result.tissues = embed_sections(
            model, result.niches, result.niche_positions_um, result.niche_sample_ids)
    return result


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


def _restrict(ds, sample_ids: Sequence[str] | None):
    if sample_ids is None:
        return ds
    wanted = set(map(str, sample_ids))
    have = np.asarray(ds[schema.SAMPLE_ID]).astype(str)
    missing = wanted - set(have.tolist())
    if missing:
        raise ValueError(f"sample_ids: {sorted(missing)[:5]} not in the dataset (it has {sorted(set(have))[:5]}...)")
    return ds.select(np.flatnonzero(np.isin(have, list(wanted))))
