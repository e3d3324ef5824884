"""SPATIA fine-tuning with ``transformers.Trainer``: ``run_finetuning`` and ``finetune``.

Tasks (``FinetuneArguments.task``), each on held-out sections, scored with the package's
``evaluate`` metric modules (:func:`spatia_hf.evaluation.metrics.load_metric`):

- ``annotation``: cell type (``label_column``, default ``cell_type``) from image + expression with
  :class:`~spatia_hf.SpatiaForCellClassification`; macro-F1 and accuracy.
- ``imputation``: held-out genes from the measured ones (:class:`~spatia_hf.SpatiaForGeneImputation`).
  Training hides a random fraction of each cell's genes; evaluation hides one fixed, seeded set
  of panel genes in every held-out cell and scores per-gene Pearson / Spearman across cells.
- ``image_to_expression``: every panel gene from the image alone
  (:class:`~spatia_hf.SpatiaForExpressionPrediction`); per-gene Pearson / Spearman.
- ``tissue_classification``: a section label (``label_column``, default ``condition``) from the
  tissue model over niche embeddings (:class:`~spatia_hf.SpatiaForTissueClassification`). Niche
  embeddings come from the (pretrained, frozen) cell + niche models once, before training; the
  tissue model and classifier are trained on random square windows of the training sections
  and evaluated on whole held-out sections.

Labels are mapped with a ``label2id`` stored in the model config (with ``id2label``), so the saved
model predicts names. Bad input fails before training: a dataset without the task's labels, a
checkpoint of another model type, a gene panel that does not overlap the model vocabulary.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from transformers import TrainerCallback, TrainingArguments

from spatia_hf.data import schema
from ..models.modeling_heads import (
    SpatiaForCellClassification,
    SpatiaForExpressionPrediction,
    SpatiaForGeneImputation,
    SpatiaForTissueClassification,
)

from .arguments import DataArguments, FinetuneArguments, ModelArguments, SpatiaTrainingArguments
from ..data.collators import (
    IGNORE_INDEX,
    CellCollator,
    ExpressionTargetCollator,
    ImputationCollator,
    NicheCollator,
    TissueCollator,
)
from ..data.datasets import (
    ArrowRows,
    NicheCellsDataset,
    SpatiaDataset,
    example_key,
    load_spatia_dataset,
    split_by_section,
    truncate,
)
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
from .cell_states import fit_cell_states_after_training
from .trainer import EpochSeedCallback, SpatiaTrainer, TimeBudgetCallback
from ..utils.allocator import bound_heap_growth
from spatia_hf.utils.progress import respects_progress
from ..utils.io import write_json

logger = logging.getLogger(__name__)

TASK_MODELS = {
    "annotation": SpatiaForCellClassification,
    "imputation": SpatiaForGeneImputation,
    "image_to_expression": SpatiaForExpressionPrediction,
    "tissue_classification": SpatiaForTissueClassification,
}
TASK_CONFIGS = {
    "annotation": ("cells",),
    "imputation": ("cells",),
    "image_to_expression": ("cells",),
    "tissue_classification": ("cells", "niches", "tissues"),
}
BASE_COLUMNS = (schema.CELL_ID, schema.SAMPLE_ID, schema.IMAGE, schema.GENE_INDICES, schema.GENE_COUNTS)


# ----------------------------------------------------------------------------- labels
def label_vocabulary(dataset: SpatiaDataset, config: str, column: str, train_rows, task: str) -> dict[str, int]:
    """``label2id`` over every labelled row of ``config`` (train and held-out), sorted by name.

    Fails when the column is absent, or when the training rows hold fewer than two classes.
    """
    ds = dataset[config]
    if column not in ds.column_names:
        string_cols = [c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"
                       and c not in (schema.CELL_ID, schema.SAMPLE_ID, schema.NICHE_ID)]
        raise ValueError(
            f"task {task!r} needs the label column {column!r} in the {config!r} config of "
            f"{str(dataset.dataset_dir)!r}, which has none. Fix: pass --label_column with one of {string_cols} "
            "or rebuild the dataset with that label (label_keys / section labels)"
        )
    values = [v for v in ds[column] if v is not None and str(v) != ""]
    if not values:
        raise ValueError(f"{config}.{column}: every row is unlabelled. Fix: pick a labelled column or label the data")
    classes = sorted({str(v) for v in values})
    train_classes = {str(v) for v in train_rows[column] if v is not None and str(v) != ""}
    if len(train_classes) < 2:
        raise ValueError(
            f"{config}.{column}: the training sections hold {len(train_classes)} class(es) {sorted(train_classes)}; a "
            f"classifier needs at least two. Fix: hold out other sections (--eval_sections) or add sections"
        )
    return {c: i for i, c in enumerate(classes)}


# ----------------------------------------------------------------------------- metrics
def classification_metrics(eval_pred) -> dict[str, float]:
    """macro-F1 and accuracy of argmax predictions (labels -100 ignored), with scikit-learn."""
    from sklearn.metrics import accuracy_score, f1_score

    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    labels = np.asarray(eval_pred.label_ids).reshape(-1)
    preds = np.asarray(logits).reshape(-1, np.asarray(logits).shape[-1]).argmax(-1)
    keep = labels != IGNORE_INDEX
    preds, labels = preds[keep].tolist(), labels[keep].tolist()
    return {"macro_f1": float(f1_score(labels, preds, average="macro")), "accuracy": float(accuracy_score(labels, preds))}


def expression_metrics(eval_pred) -> dict[str, float]:
    """Per-gene Pearson / Spearman across cells (mean and median over genes) of dense predictions."""
    from ..utils.stats import mean_and_median, per_column_pearson, per_column_spearman

    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    pred = np.asarray(logits, dtype=np.float64)
    ref = np.asarray(eval_pred.label_ids, dtype=np.float64)
    ok = np.isfinite(ref).all(axis=1)
    pred, ref = pred[ok], ref[ok]
    pearson = per_column_pearson(pred, ref)
    return {**mean_and_median(pearson, "pearson"), **mean_and_median(per_column_spearman(pred, ref), "spearman"),
            "n_genes": float(pred.shape[1]), "n_genes_undefined": float(np.isnan(pearson).sum())}


def _first_output(logits, labels):
    """Keep only the logits of a model output tuple (drop embeddings) before gathering them."""
    return logits[0] if isinstance(logits, tuple) else logits


# ----------------------------------------------------------------------------- tissues
class TissueWindows(torch.utils.data.Dataset):
    """Section examples for tissue classification: ``repeats`` examples per section (each gets its own
    random window from :class:`TissueCollator`), over precomputed niche embeddings."""

    def __init__(self, sections: list[dict], repeats: int = 1) -> None:
        self.sections = sections
        self.repeats = int(repeats)

    def __len__(self) -> int:
        return len(self.sections) * self.repeats

    def __getitem__(self, i: int) -> dict:
        s = self.sections[i % len(self.sections)]
        return {**s, "key": example_key(s["sample_id"], i // len(self.sections))}


@torch.no_grad()
def embed_sections(model, dataset: SpatiaDataset, processor, sample_ids: list[str], batch_size: int = 16,
                   max_cells: int = 64, seed: int = 0) -> dict[str, dict]:
    """Niche embeddings ``[M, D]`` and µm positions ``[M, 2]`` of every niche of the given sections,
    from the model's cell + niche scales (no gradients)."""
    niches = dataset["niches"]
    sids = np.asarray(niches[schema.SAMPLE_ID]).astype(str)
    rows = np.flatnonzero(np.isin(sids, sample_ids))
    sub = niches.select(rows)
    data = NicheCellsDataset(sub, dataset["cells"], max_cells=max_cells, seed=seed, cell_columns=BASE_COLUMNS)
    collate = NicheCollator(CellCollator(processor, seed=seed))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for start in range(0, len(data), batch_size):
            batch = collate(data.__getitems__(list(range(start, min(start + batch_size, len(data))))))
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model.spatia(**{k: v for k, v in batch.items() if k not in ("gene_counts", "size_factors")},
                               return_dict=True)
            chunks.append(out.niche_embeds.float().cpu().numpy())
    finally:
        model.train(was_training)
    emb = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    xy = np.stack([np.asarray(sub[schema.X_UM], np.float32), np.asarray(sub[schema.Y_UM], np.float32)], axis=1)
    sub_sids = sids[rows]
    return {s: {"embeddings": emb[sub_sids == s], "positions": xy[sub_sids == s]} for s in sample_ids}


# ----------------------------------------------------------------------------- model
def load_finetuning_model(model_args: ModelArguments, task_args: FinetuneArguments, dataset: SpatiaDataset,
                          seed: int, label2id: dict[str, int] | None):
    """The task head, from the checkpoint (head re-initialised when new) or a new preset model."""
    cls = TASK_MODELS[task_args.task]
    label_kwargs: dict[str, Any] = {}
    if label2id is not None:
        label_kwargs = {"num_labels": len(label2id), "label2id": dict(label2id),
                        "id2label": {i: c for c, i in label2id.items()}}
    seed_everything(seed)
    if model_args.model_name_or_path:
        config = check_checkpoint(model_args.model_name_or_path)
        check_geometry(config, dataset)
        kwargs: dict[str, Any] = dict(label_kwargs)
        if label_kwargs:
            kwargs["ignore_mismatched_sizes"] = True
        if model_args.attn_implementation:
            kwargs["attn_implementation"] = model_args.attn_implementation
        model = cls.from_pretrained(model_args.model_name_or_path, **kwargs)
    else:
        model = cls(new_config(model_args, dataset, **label_kwargs))
        if model_args.attn_implementation:
            model.set_attn_implementation(model_args.attn_implementation)
    if task_args.freeze_backbone or task_args.task == "tissue_classification":
        # tissue classification trains the tissue scale on frozen niche embeddings
        frozen = (model.spatia if task_args.freeze_backbone else
                  torch.nn.ModuleList([model.spatia.cell, model.spatia.niche]))
        for p in frozen.parameters():
            p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- data
def build_task_data(task_args: FinetuneArguments, data_args: DataArguments, dataset: SpatiaDataset, processor,
                    model, label2id: dict[str, int] | None, seed: int):
    """(train dataset, eval dataset or None, train collator, eval collator, compute_metrics) of a task."""
    task = task_args.task
    sections = data_args.eval_section_list()
    if task == "tissue_classification":
        return _tissue_data(task_args, data_args, dataset, processor, model, label2id, seed)
    cells_train, cells_eval = split_by_section(dataset["cells"], sections)
    cells_train = truncate(cells_train, data_args.max_train_samples, seed)
    cells_eval = truncate(cells_eval, data_args.max_eval_samples, seed)
    columns = list(BASE_COLUMNS)
    if task == "annotation":
        column = task_args.resolved_label_column()
        columns.append(column)
        collator = CellCollator(processor, seed=seed, label_column=column, label2id=label2id, with_counts=False)
        eval_collator, metrics = collator, classification_metrics
    elif task == "imputation":
        collator = ImputationCollator(processor, mask_ratio=task_args.imputation_mask_ratio, seed=seed)
        held = holdout_genes(processor, cells_eval if cells_eval is not None else cells_train, seed)
        eval_collator = ImputationCollator(processor, holdout_gene_ids=held, seed=seed)
        metrics = expression_metrics
    else:  # image_to_expression
        collator = ExpressionTargetCollator(processor)
        eval_collator, metrics = collator, expression_metrics
    train = ArrowRows(cells_train, columns)
    evaluation = ArrowRows(cells_eval, columns) if cells_eval is not None else None
    return train, evaluation, collator, eval_collator, metrics


def holdout_genes(processor, cells, seed: int, fraction: float = 0.1, min_detection: float = 0.05,
                  max_genes: int = 50) -> np.ndarray:
    """Vocabulary ids of the genes imputation evaluation hides: a seeded ``fraction`` of the panel
    genes the model knows that are detected in at least ``min_detection`` of the scored cells."""
    panel = processor._require_panel()
    detected = np.zeros(len(panel.genes), dtype=np.int64)
    for idx, cnt in zip(cells[schema.GENE_INDICES], cells[schema.GENE_COUNTS]):
        idx = np.asarray(idx, dtype=np.int64)
        detected[idx[np.asarray(cnt) > 0]] += 1
    candidates = np.flatnonzero((panel.vocab_ids >= 0) & (detected >= max(1, min_detection * len(cells))))
    if candidates.size < 2:
        raise ValueError("imputation: fewer than 2 panel genes are detected in the evaluation cells. Fix: use "
                         "more cells or sections")
    k = int(min(max_genes, max(1, round(fraction * candidates.size))))
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(candidates, size=k, replace=False))
    return panel.vocab_ids[chosen]


def _tissue_data(task_args, data_args, dataset, processor, model, label2id, seed):
    tissues = dataset["tissues"]
    column = task_args.resolved_label_column()
    sids = np.asarray(tissues[schema.SAMPLE_ID]).astype(str).tolist()
    labels = dict(zip(sids, (str(v) for v in tissues[column])))
    train_t, eval_t = split_by_section(tissues, data_args.eval_section_list())
    train_ids = np.asarray(train_t[schema.SAMPLE_ID]).astype(str).tolist()
    eval_ids = np.asarray(eval_t[schema.SAMPLE_ID]).astype(str).tolist() if eval_t is not None else []
    embedded = embed_sections(model, dataset, processor, train_ids + eval_ids, seed=seed,
                              max_cells=data_args.max_cells_per_niche)

    def examples(ids):
        return [{"sample_id": s, "label": label2id[labels[s]], **embedded[s]} for s in ids]

    extent = max(float(np.ptp(embedded[s]["positions"], axis=0).max()) for s in train_ids)
    train = TissueWindows(examples(train_ids), repeats=64)
    evaluation = TissueWindows(examples(eval_ids), repeats=1) if eval_ids else None
    collator = TissueCollator(window_um=0.5 * extent if extent > 0 else None, seed=seed)
    eval_collator = TissueCollator(window_um=None, seed=seed)
    return train, evaluation, collator, eval_collator, classification_metrics


class _EvalCollatorTrainer(SpatiaTrainer):
    """Uses a different collator for evaluation (imputation scores a fixed gene set)."""

    def __init__(self, *args, eval_data_collator: Callable | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_data_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator = self.data_collator
        self.data_collator = self.eval_data_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator


# ----------------------------------------------------------------------------- entry points
def run_finetuning(
    model_args: ModelArguments,
    data_args: DataArguments,
    task_args: FinetuneArguments,
    training_args: TrainingArguments,
    *,
    resume_from_checkpoint: str | bool | None = None,
    callbacks: list[TrainerCallback] | None = None,
    dataset: SpatiaDataset | None = None,
) -> TrainingResult:
    """Fine-tune a SPATIA head on ``task_args.task``, evaluate on held-out sections, save to ``output_dir``.

    Returns a :class:`TrainingResult` (``eval_metrics`` hold ``eval_macro_f1`` / ``eval_accuracy`` or
    ``eval_pearson_mean`` / ...), also written to ``output_dir/spatia_training.json``. The held-out
    sections are evaluated at the end when ``training_args.do_eval`` (``--do_eval``, or any
    ``--eval_strategy`` but "no").
    """
    start = time.perf_counter()
    bound_heap_growth()
    seed = training_args.seed
    task = task_args.task
    dataset = dataset or load_spatia_dataset(data_args.dataset_dir, TASK_CONFIGS[task])
    label2id = None
    if task in ("annotation", "tissue_classification"):
        config_name = "cells" if task == "annotation" else "tissues"
        train_rows, _ = split_by_section(dataset[config_name], data_args.eval_section_list())
        label2id = label_vocabulary(dataset, config_name, task_args.resolved_label_column(), train_rows, task)
    model = load_finetuning_model(model_args, task_args, dataset, seed, label2id)
    processor = build_processor(model_args, model.config, dataset, seed)
    train, evaluation, collator, eval_collator, compute_metrics = build_task_data(
        task_args, data_args, dataset, processor, model, label2id, seed)
    training_args = prepare_training_args(training_args, self_supervised=False)
    training_args.label_names = ["labels"]
    if evaluation is None and training_args.eval_strategy != "no":
        logger.warning("no held-out section: evaluation is off")
        training_args.eval_strategy = "no"

    all_callbacks = [EpochSeedCallback(collator, eval_collator), *(callbacks or [])]
    budget = None
    max_minutes = getattr(training_args, "max_minutes", None)
    if max_minutes:
        budget = TimeBudgetCallback(max_minutes)
        all_callbacks.append(budget)
    trainer = _EvalCollatorTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collator,
        eval_data_collator=eval_collator if eval_collator is not collator else None,
        processing_class=processor,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=_first_output,
        callbacks=all_callbacks,
    )
    resume = resume_from_checkpoint if resume_from_checkpoint is not None else training_args.resume_from_checkpoint
    output = trainer.train(resume_from_checkpoint=resolve_resume(resume, training_args.output_dir))
    fit_cell_states_after_training(trainer, processor, dataset, data_args.eval_section_list(), seed)
    trainer.save_model()
    eval_metrics: dict[str, Any] = trainer.evaluate() if evaluation is not None and training_args.do_eval else {}
    result = TrainingResult(
        output_dir=Path(training_args.output_dir),
        global_step=trainer.state.global_step,
        train_seconds=time.perf_counter() - start,
        world_size=training_args.world_size,
        log_history=list(trainer.state.log_history),
        eval_metrics=eval_metrics,
        stopped_by_time_budget=bool(budget is not None and budget.stopped_at_step is not None),
        extra={"task": task, "train_loss": output.training_loss, "label2id": label2id,
               **section_record(dataset, data_args.eval_section_list(), model_args.model_name_or_path),
               "eval_sections": sorted(set(_sections_of(evaluation))) if evaluation is not None else [],
               "n_train_examples": len(train)},
    )
    if trainer.is_world_process_zero():
        trainer.save_state()
        write_json(Path(training_args.output_dir) / SUMMARY_FILE, result.to_json())
    if training_args.push_to_hub:  # every process calls it; the Trainer uploads from process zero
        trainer.push_to_hub(commit_message=f"SPATIA {result.extra['task']}: step {result.global_step}")
    return result


def _sections_of(evaluation) -> list[str]:
    if isinstance(evaluation, ArrowRows):
        return [str(s) for s in evaluation.ds.with_format(None)[schema.SAMPLE_ID]]
    if isinstance(evaluation, TissueWindows):
        return [s["sample_id"] for s in evaluation.sections]
    return []


@respects_progress
def finetune(
    dataset_dir: str | Path,
    output_dir: str | Path,
    task: str = "annotation",
    *,
    model_name_or_path: str | None = None,
    preset: str = "tiny",
    label_column: str | None = None,
    num_train_epochs: float = 3.0,
    max_steps: int = -1,
    max_minutes: float | None = None,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    seed: int = 0,
    eval_sections: str | None = None,
    freeze_backbone: bool = False,
    progress: bool = True,
    **training_kwargs: Any,
) -> TrainingResult:
    """Fine-tuning in one call with an epoch, step and/or time budget (the demo's fast path).

    Extra keyword arguments go to :class:`SpatiaTrainingArguments`.
    """
    model_args = ModelArguments(model_name_or_path=model_name_or_path, preset=preset)
    data_args = DataArguments(dataset_dir=str(dataset_dir), eval_sections=eval_sections)
    task_args = FinetuneArguments(task=task, label_column=label_column, freeze_backbone=freeze_backbone)
    defaults = dict(logging_steps=10, save_strategy="no", report_to="none", optim="adamw_torch",
                    eval_strategy="no", warmup_steps=10, do_eval=True)
    training_args = SpatiaTrainingArguments(
        output_dir=str(output_dir), num_train_epochs=num_train_epochs, max_steps=max_steps, max_minutes=max_minutes,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size, learning_rate=learning_rate,
        seed=seed, disable_tqdm=not progress, **{**defaults, **training_kwargs},
    )
    return run_finetuning(model_args, data_args, task_args, training_args)
