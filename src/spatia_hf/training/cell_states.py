"""Fitting the niche model's cell states once training has shaped the cell embeddings.

The states (k-means centres of fused cell embeddings, :mod:`spatia_hf.models.cell_states`) are
fitted after training rather than learned during it: they must describe the final embedding
space, and a fit on a couple of thousand training cells costs seconds. Pretraining and
fine-tuning both refit (fine-tuning moves the cell embeddings), so a saved checkpoint's states
always match its cell model.
"""

from __future__ import annotations

import logging

import pyarrow as pa

from spatia_hf.data import schema
from ..data.datasets import SpatiaDataset, split_by_section, truncate

logger = logging.getLogger(__name__)

FIT_COLUMNS = [schema.CELL_ID, schema.IMAGE, schema.GENE_INDICES, schema.GENE_COUNTS]


def fit_cell_states(model, processor, cells, *, seed: int = 0, batch_size: int = 64) -> int:
    """Fit ``model.spatia.niche``'s cell states on the fused embeddings of ``cells`` (a ``cells``
    ``datasets.Dataset``); returns the number of cells used (0 for a model without cell states)."""
    from ..inference import embed_cells_config

    niche = model.spatia.niche
    if niche.cell_states is None:
        return 0
    was_training = model.training
    model.eval()
    try:
        emb = embed_cells_config(model.spatia, processor, cells, modality="fused", batch_size=batch_size, seed=seed,
                                 progress=False)
    finally:
        model.train(was_training)
    niche.fit_cell_states(emb, seed=seed)
    return len(emb)


def training_cells(dataset: SpatiaDataset, eval_sections, seed: int, max_cells: int, streaming: bool = False,
                   columns=FIT_COLUMNS):
    """Up to ``max_cells`` cells of the training sections (a seeded sample; the first of the shuffled
    stream with ``streaming``) as a ``datasets.Dataset`` with ``columns`` (default: what the cell model reads)."""
    columns = list(columns)
    if not streaming:
        cells, _ = split_by_section(dataset["cells"], eval_sections)
        return truncate(cells, max_cells, seed).select_columns(columns)
    from datasets import Dataset
    from datasets.table import InMemoryTable

    from .streaming import held_out_sections, pretraining_stream

    held = held_out_sections(dataset.dataset_dir, eval_sections)
    stream = pretraining_stream(dataset.dataset_dir, schedule="cell", exclude_sections=held, cell_columns=columns,
                                seed=seed, buffer_size=max_cells)
    return Dataset(InMemoryTable(pa.concat_tables(stream.take(max_cells)))).select_columns(columns)


def fit_cell_states_after_training(trainer, processor, dataset: SpatiaDataset, eval_sections, seed: int, *,
                                   max_cells: int = 2048, streaming: bool = False) -> int:
    """:func:`fit_cell_states` on up to ``max_cells`` training cells. In a data-parallel run every rank
    holds the whole model and fits the same states from the same cells (so whichever rank saves, the
    states are the same); with sharded weights (FSDP, DeepSpeed) the states stay unfitted (every rank
    would have to run the embedding in step; not testable without several GPUs) and ``spatia embed``
    fits them on the cells it embeds. Returns the cells used."""
    model = trainer.model
    spatia = getattr(model, "spatia", None)
    if spatia is None or spatia.niche.cell_states is None:
        return 0
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    if sharded and trainer.args.world_size > 1:
        if trainer.is_world_process_zero():
            logger.info("cell states not fitted with sharded weights (%d processes): spatia embed fits them on the "
                        "cells it embeds (or call model.spatia.niche.fit_cell_states(cell_embeddings) and save)",
                        trainer.args.world_size)
        return 0
    n = fit_cell_states(model, processor, training_cells(dataset, eval_sections, seed, max_cells, streaming), seed=seed)
    logger.info("cell states: %d fitted on %d training cells", spatia.niche.cell_states.num_states, n)
    return n


__all__ = ["fit_cell_states", "fit_cell_states_after_training", "training_cells"]
