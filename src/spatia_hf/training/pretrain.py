"""Multi-scale SPATIA pretraining with ``transformers.Trainer``: ``run_pretraining`` and ``pretrain``.

The schedule (``DataArguments.schedule``):

- ``"niche"`` (default): every example is a cell-centred neighbourhood (a cell and its
  ``niche_config.num_neighbours`` nearest cells, :class:`CellNicheDataset`), and a batch holds
  nearby neighbourhoods of one section (:class:`LocalBlockSampler`). One forward of
  ``SpatiaForPretraining`` runs the cell objectives on every member cell (masked gene modelling,
  masked image modelling, image-expression contrastive across all cells of the batch), the niche
  objectives (masked-cell prediction from the other cells; the pooled niche embedding predicting
  its neighbourhood's mean expression) and the tissue objective (the batch's neighbourhoods as a
  small tissue: masked niche modelling through the tissue model with token merging): each
  optimiser step trains every scale, with one weighted loss (weights in the model config).
- ``"grid"``: the same on the dataset's grid-tile niches (up to ``max_cells_per_niche`` cells each),
  without the tissue objective: the pre-issue-16 schedule, kept as an ablation.
- ``"cell"``: every example is a cell (no niche objective): the cell-scale-only ablation.

Masks: the model draws them itself unless its ``forward`` accepts ``gene_value_mask`` /
``image_patch_mask`` / ``niche_cell_mask``, in which case the collators draw them per example (seeded).
Either way an interrupted run resumed with ``resume_from_checkpoint`` continues exactly: the
Trainer restores the global RNG before the first resumed step and the collators do not use it.
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback, TrainingArguments

from spatia_hf.data import schema
from ..models.modeling_heads import SpatiaForPretraining

from .arguments import DataArguments, ModelArguments, SpatiaTrainingArguments
from ..data.collators import CellCollator, NicheCollator
from ..data.datasets import (ArrowRows, CellNicheDataset, NicheCellsDataset, SpatiaDataset,
                             load_spatia_dataset, read_gene_panel, split_by_section,
                             truncate)
from .setup import (
    SUMMARY_FILE,
    TrainingResult,
    build_processor,
    check_checkpoint,
    check_geometry,
    new_config,
    prepare_training_args,
    resolve_resume,
    section_record,
    seed_everything,
)
from .streaming import (StreamingExamples, StreamStateCallback, held_out_sections, niche_example, open_cell_stream,
                        pretraining_stream, restore_stream_state, section_ids)
from .cell_states import fit_cell_states_after_training, training_cells
from .trainer import EpochSeedCallback, SpatiaTrainer, TimeBudgetCallback
from ..utils.allocator import bound_heap_growth
from spatia_hf.utils.progress import respects_progress
from ..utils.io import write_json

logger = logging.getLogger(__name__)

CELL_COLUMNS = (schema.CELL_ID, schema.SAMPLE_ID, schema.IMAGE, schema.GENE_INDICES, schema.GENE_COUNTS)
_MASK_INPUTS = ("gene_value_mask", "image_patch_mask", "niche_cell_mask")


def _forward_params(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def load_pretraining_model(model_args: ModelArguments, data_args: DataArguments, dataset: SpatiaDataset,
                           seed: int) -> SpatiaForPretraining:
    """A new model from the preset (vocabulary = dataset panel) or the checkpoint, mask ratios applied."""
    seed_everything(seed)
    if model_args.model_name_or_path:
        config = check_checkpoint(model_args.model_name_or_path)
        check_geometry(config, dataset)
        kwargs = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
        model = SpatiaForPretraining.from_pretrained(model_args.model_name_or_path, **kwargs)
    else:
        config = new_config(model_args, dataset)
        model = SpatiaForPretraining(config)
        if model_args.attn_implementation:
            model.set_attn_implementation(model_args.attn_implementation)
    for arg, key in (("gene_mask_ratio", "mgm_mask_ratio"), ("image_mask_ratio", "mim_mask_ratio"),
                     ("niche_mask_ratio", "niche_mask_ratio")):
        value = getattr(data_args, arg)
        if value is not None:
            setattr(model.config, key, float(value))
    return model


def init_value_biases(model: SpatiaForPretraining, processor, dataset: SpatiaDataset,
                      eval_sections: list[str] | None, seed: int, max_cells: int = 2000,
                      streaming: bool = False) -> None:
    """Start the gene-value heads of a new model at the per-gene means of (up to ``max_cells``)
    training cells, so the regression objectives do not collapse the embeddings (see
    :meth:`SpatiaForPretraining.init_gene_value_biases`). With ``streaming``, the cells are the
    first ``max_cells`` of the shuffled training stream."""
    expression = [schema.GENE_INDICES, schema.GENE_COUNTS]
    columns = training_cells(dataset, eval_sections, seed, max_cells, streaming, expression).with_format("numpy")[:]
    ids, values, log_rates = processor.gene_value_statistics(columns[schema.GENE_INDICES],
                                                             columns[schema.GENE_COUNTS], seed=seed)
    model.init_gene_value_biases(ids, values, log_rates)


def build_pretraining_data(data_args: DataArguments, dataset: SpatiaDataset, processor, model, seed: int):
    """(train dataset, eval dataset or None, collator) for the chosen schedule."""
    cfg = model.config
    accepts = _forward_params(model)
    cell_collator, collator = _collators(data_args, processor, model, seed)
    cells_train, cells_eval = split_by_section(dataset["cells"], data_args.eval_section_list())
    if data_args.schedule == "cell":
        train = ArrowRows(truncate(cells_train, data_args.max_train_samples, seed), CELL_COLUMNS)
        evaluation = ArrowRows(truncate(cells_eval, data_args.max_eval_samples, seed), CELL_COLUMNS) \
            if cells_eval is not None else None
        return train, evaluation, cell_collator
    if data_args.schedule == "niche":
        niche_mask = cfg.niche_mask_ratio if ("niche_cell_mask" in accepts and cfg.niche_weight > 0) else None
        return _cell_niche_data(data_args, cfg, cells_train, cells_eval, cell_collator, niche_mask, accepts, seed)
    niches_train, niches_eval = split_by_section(dataset["niches"], data_args.eval_section_list())
    train = NicheCellsDataset(truncate(niches_train, data_args.max_train_samples, seed), cells_train,
                              data_args.max_cells_per_niche, seed, CELL_COLUMNS)
    evaluation = None
    if niches_eval is not None:
        evaluation = NicheCellsDataset(truncate(niches_eval, data_args.max_eval_samples, seed), cells_eval,
                                       data_args.max_cells_per_niche, seed, CELL_COLUMNS)
    return train, evaluation, collator


def load_streaming_dataset(dataset_dir: str) -> SpatiaDataset:
    """The gene panel and the ``cells`` config as a stream (its features give the crop geometry):
    what building a model needs, without reading the shards."""
    panel = read_gene_panel(dataset_dir)
    return SpatiaDataset(Path(dataset_dir), list(panel["genes"]), panel.get("gene_ids"),
                         {"cells": open_cell_stream(dataset_dir)}, panel)


def build_streaming_data(data_args: DataArguments, dataset: SpatiaDataset, processor, model,
                         training_args: TrainingArguments) -> tuple[StreamingExamples, Any]:
    """(stream of this rank's training examples, collator) for ``--streaming``."""
    seed = training_args.seed
    cell_collator, niche_collator = _collators(data_args, processor, model, seed)
    held = held_out_sections(dataset.dataset_dir, data_args.eval_section_list())
    stream = pretraining_stream(dataset.dataset_dir, schedule=data_args.schedule, exclude_sections=held,
                                cell_columns=CELL_COLUMNS, seed=seed, buffer_size=data_args.shuffle_buffer_size,
                                rank=training_args.process_index, world_size=training_args.world_size)
    collator = niche_collator if data_args.schedule == "niche" else cell_collator
    if data_args.schedule == "niche":
        max_cells = data_args.max_cells_per_niche

        def to_example(row):
            return niche_example(row, max_cells, seed)
    else:
        def to_example(row):
            return row

    def set_epoch(epoch: int) -> None:
        for c in (collator, getattr(collator, "cell_collator", None)):
            if c is not None:
                c.epoch = epoch

    examples = StreamingExamples(stream, to_example, training_args.per_device_train_batch_size, on_epoch=set_epoch)
    return examples, collator


def _collators(data_args: DataArguments, processor, model, seed: int):
    """(cell collator, niche collator) with the masks the model's forward lets the collators draw."""
    cfg = model.config
    accepts = _forward_params(model)
    collator_masks = all(m in accepts for m in _MASK_INPUTS[:2])
    cell_collator = CellCollator(
        processor, seed=seed,
        gene_mask_ratio=cfg.mgm_mask_ratio if collator_masks and cfg.mgm_weight > 0 else None,
        image_mask_ratio=cfg.mim_mask_ratio if collator_masks and cfg.mim_weight > 0 else None,
        num_patches=model.spatia.cell.num_patches,
    )
    niche_mask = cfg.niche_mask_ratio if ("niche_cell_mask" in accepts and cfg.niche_weight > 0) else None
    return cell_collator, NicheCollator(cell_collator, niche_mask_ratio=niche_mask,
                                        with_cell_uids="cell_uids" in accepts)


def _check_streaming_args(training_args: TrainingArguments) -> None:
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise ValueError("--streaming needs --max_steps (a stream has no length to count epochs by). "
                         "Fix: pass --max_steps N")
    if training_args.dataloader_num_workers > 0:
        raise ValueError(f"--streaming with --dataloader_num_workers {training_args.dataloader_num_workers}: the "
                         "stream state is checkpointed from the main process. Fix: --dataloader_num_workers 0")
    # Every rank reads its own stream (split_dataset_by_node): accelerate must not dispatch rank 0's batches.
    training_args.accelerator_config.dispatch_batches = False
    if training_args.do_eval:
        logger.warning("--streaming: no end-of-training evaluation; the held-out sections stayed out of training "
                       "(score them with `spatia evaluate`)")
        training_args.do_eval = False


def _cell_niche_data(data_args, cfg, cells_train, cells_eval, cell_collator, niche_mask, accepts, seed):
    """The ``niche`` schedule: cell-centred neighbourhoods of the training sections (every cell a
    centre), batched as nearby neighbourhoods; the tissue objective's inputs when the model takes them."""
    niche_cfg = cfg.niche_config
    centres = "niche_centres_um" in accepts and "niche_groups" in accepts
    collator = NicheCollator(cell_collator, niche_mask_ratio=niche_mask, with_centres=centres,
                             with_cell_uids="cell_uids" in accepts)

    def hoods(cells):
        return CellNicheDataset(truncate(cells, None, seed), niche_cfg.num_neighbours, niche_cfg.neighbour_radius_um,
                                CELL_COLUMNS + (schema.X_UM, schema.Y_UM))

    train = hoods(cells_train)
    evaluation = None
    if cells_eval is not None:  # evaluation centres: a seeded subset of the held-out cells, all neighbours kept
        evaluation = hoods(cells_eval)
        if data_args.max_eval_samples is not None and data_args.max_eval_samples < len(evaluation):
            keep = np.sort(np.random.default_rng(seed).choice(len(evaluation), data_args.max_eval_samples,
                                                              replace=False))
            evaluation = torch.utils.data.Subset(evaluation, keep.tolist())
    return train, evaluation, collator


def run_pretraining(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    *,
    resume_from_checkpoint: str | bool | None = None,
    callbacks: list[TrainerCallback] | None = None,
    dataset: SpatiaDataset | None = None,
) -> TrainingResult:
    """Pretrain SPATIA on ``data_args.dataset_dir`` and save the model + processor to ``output_dir``.

    Args:
        model_args / data_args / training_args: the parsed dataclasses (``TrainingArguments`` or
            :class:`SpatiaTrainingArguments`, whose ``max_minutes`` bounds the wall-clock time).
        resume_from_checkpoint: a checkpoint directory, or True for the latest in ``output_dir``
            (defaults to ``training_args.resume_from_checkpoint``).
        callbacks: extra ``TrainerCallback``s.
        dataset: an already loaded dataset (skips loading ``dataset_dir``).

    Returns:
        a :class:`TrainingResult`; the same summary is written to ``output_dir/spatia_training.json``.
        The held-out sections are evaluated at the end when ``training_args.do_eval`` (set by
        ``--do_eval`` or any ``--eval_strategy`` but "no").
    """
    start = time.perf_counter()
    bound_heap_growth()
    seed = training_args.seed
    configs = ("cells",) if data_args.schedule == "cell" else ("cells", "niches")
    streaming = data_args.streaming
    if streaming:
        _check_streaming_args(training_args)
        dataset = dataset or load_streaming_dataset(data_args.dataset_dir)
    else:
        dataset = dataset or load_spatia_dataset(data_args.dataset_dir, configs)
    model = load_pretraining_model(model_args, data_args, dataset, seed)
    processor = build_processor(model_args, model.config, dataset, seed)
    if not model_args.model_name_or_path:
        init_value_biases(model, processor, dataset, data_args.eval_section_list(), seed, streaming=streaming)
    stream_callbacks: list[TrainerCallback] = []
    if streaming:
        train, collator = build_streaming_data(data_args, dataset, processor, model, training_args)
        evaluation = None
        stream_callbacks.append(StreamStateCallback(train, training_args.process_index))
    else:
        train, evaluation, collator = build_pretraining_data(data_args, dataset, processor, model, seed)
    training_args = prepare_training_args(training_args, self_supervised=True)
    resume = resume_from_checkpoint if resume_from_checkpoint is not None else training_args.resume_from_checkpoint
    resume = resolve_resume(resume, training_args.output_dir)
    if streaming and resume:
        # The stream continues from the state saved with the checkpoint; the Trainer must not also skip batches.
        restore_stream_state(train, resume, training_args.process_index)
        training_args.ignore_data_skip = True

    budget = None
    max_minutes = getattr(training_args, "max_minutes", None)
    all_callbacks = [EpochSeedCallback(collator, getattr(collator, "cell_collator", None)), *stream_callbacks,
                     *(callbacks or [])]
    if max_minutes:
        budget = TimeBudgetCallback(max_minutes)
        all_callbacks.append(budget)
    trainer = SpatiaTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collator,
        processing_class=processor,
        callbacks=all_callbacks,
    )
    if trainer.is_world_process_zero():
        logger.info("pretraining: world_size=%d schedule=%s train=%s eval=%d examples", training_args.world_size,
                    data_args.schedule, "streamed" if streaming else len(train),
                    len(evaluation) if evaluation is not None else 0)
    output = trainer.train(resume_from_checkpoint=resume)
    fit_cell_states_after_training(trainer, processor, dataset, data_args.eval_section_list(), seed,
                                   streaming=streaming)
    trainer.save_model()
    eval_metrics: dict[str, Any] = {}
    if evaluation is not None and training_args.do_eval:
        eval_metrics = trainer.evaluate()
    result = TrainingResult(
        output_dir=Path(training_args.output_dir),
        global_step=trainer.state.global_step,
        train_seconds=time.perf_counter() - start,
        world_size=training_args.world_size,
        log_history=list(trainer.state.log_history),
        eval_metrics=eval_metrics,
        stopped_by_time_budget=bool(budget is not None and budget.stopped_at_step is not None),
        extra={"task": "pretraining", "schedule": data_args.schedule, "train_loss": output.training_loss,
               "n_train_examples": None if streaming else len(train), "streaming": streaming,
               "gene_panel": processor.panel.report() if processor.panel else None,
               **section_record(dataset, data_args.eval_section_list(), model_args.model_name_or_path,
                                present=section_ids(dataset.dataset_dir) if streaming else None)},
    )
    if trainer.is_world_process_zero():
        trainer.save_state()
        write_json(Path(training_args.output_dir) / SUMMARY_FILE, result.to_json())
    if training_args.push_to_hub:  # every process calls it; the Trainer uploads from process zero
        trainer.push_to_hub(commit_message=f"SPATIA {result.extra['task']}: step {result.global_step}")
    return result


@respects_progress
def pretrain(
    dataset_dir: str | Path,
    output_dir: str | Path,
    *,
    preset: str = "tiny",
    model_name_or_path: str | None = None,
    max_steps: int = 200,
    max_minutes: float | None = None,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    seed: int = 0,
    schedule: str = "niche",
    eval_sections: str | None = None,
    streaming: bool = False,
    progress: bool = True,
    **training_kwargs: Any,
) -> TrainingResult:
    """Pretraining in one call with a step and/or time budget (the demo's fast path).

    Extra keyword arguments go to :class:`SpatiaTrainingArguments` (e.g. ``logging_steps``,
    ``use_cpu``, ``save_steps``).
    """
    model_args = ModelArguments(model_name_or_path=model_name_or_path, preset=preset)
    data_args = DataArguments(dataset_dir=str(dataset_dir), schedule=schedule, eval_sections=eval_sections,
                              streaming=streaming)
    defaults = dict(logging_steps=max(1, min(10, max_steps // 10)), save_strategy="no", report_to="none",
                    warmup_steps=max(0, min(20, max_steps // 10)), optim="adamw_torch", do_eval=True)
    training_args = SpatiaTrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, max_minutes=max_minutes,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size, learning_rate=learning_rate,
        seed=seed, disable_tqdm=not progress, **{**defaults, **training_kwargs},
    )
    return run_pretraining(model_args, data_args, training_args)
