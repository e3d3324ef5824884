"""``evaluate``: SPATIA checkpoints scored on the 12 tasks next to the baselines, in one call.

The Python API behind ``spatia evaluate`` and the demo's evaluation step:

1. :func:`~spatia_hf.evaluation.suite.prepare_suite` fixes the splits and per-task choices;
2. the sections scored by section-split tasks are checked against the sections each checkpoint
   recorded as trained on (``spatia_training.json`` / ``generator_training.json``); an overlap is
   a warning in the console and in the report;
3. :func:`~spatia_hf.evaluation.spatia_methods.spatia_methods` computes SPATIA's outputs on those
   exact rows;
4. :func:`~spatia_hf.evaluation.suite.run_suite` runs the baselines and scores everything;
5. :func:`~spatia_hf.evaluation.report.write_report` writes ``report.md``, ``results.json`` and the
   pictures (``results.json`` feeds the model card, :mod:`spatia_hf.hub`).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .tasks import TASKS, TaskResult
from spatia_hf.utils.progress import respects_progress

SUMMARY_FILES = ("spatia_training.json", "generator_training.json")


@dataclass
class EvaluationResult:
    """What :func:`evaluate` produced.

    Attributes:
        tasks: one :class:`~spatia_hf.evaluation.tasks.TaskResult` per task that ran.
        report: path of ``report.md`` (``results.json`` and ``figures/`` are next to it).
        warnings: training/evaluation section overlaps and other caveats (also in the report).
        seconds: wall-clock time per stage.
    """

    tasks: list[TaskResult]
    report: Path
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary_rows(self) -> list[dict[str, Any]]:
        """Per task (all 12): headline metric, best SPATIA variant and best baseline (None when not run)."""
        by_number = {r.task: r for r in self.tasks}
        rows = []
        for number, spec in TASKS.items():
            r = by_number.get(number)
            s_name, s_val = r.best("spatia") if r else (None, math.nan)
            b_name, b_val = r.best("baseline") if r else (None, math.nan)
            rows.append({"task": number, "title": spec.title, "metric": spec.primary, "spatia": s_val,
                         "spatia_method": s_name, "best_baseline": b_val, "baseline_method": b_name, "ran": r is not None})
        return rows

    def format_table(self) -> str:
        """The summary as aligned text (what ``spatia evaluate`` prints)."""
        def num(v: float) -> str:
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

        lines = [f"{'#':>2}  {'task':<46} {'metric':<20} {'SPATIA':>7}  {'baseline':>8}  best baseline / SPATIA variant"]
        for row in self.summary_rows():
            if not row["ran"]:
                lines.append(f"{row['task']:>2}  {row['title'][:46]:<46} {row['metric'][:20]:<20} {'not run':>7}")
                continue
            who = f"{row['baseline_method'] or '-'} / {row['spatia_method'] or 'not run'}"
            lines.append(f"{row['task']:>2}  {row['title'][:46]:<46} {row['metric'][:20]:<20} {num(row['spatia']):>7}  "
                         f"{num(row['best_baseline']):>8}  {who}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- training-section checks
def training_record(path: str | Path) -> dict | None:
    """The training summary saved with a checkpoint (its folder or, for a pipeline, the folder above)."""
    path = Path(path)
    for folder in (path, path.parent):
        for name in SUMMARY_FILES:
            f = folder / name
            if f.is_file():
                try:
                    return json.loads(f.read_text())
                except json.JSONDecodeError:
                    return None
    return None


def section_overlap_warnings(checkpoints: dict[str, str | Path], evaluated: Sequence[str],
                             dataset_sections: Sequence[str]) -> list[str]:
    """Warnings for checkpoints whose recorded training sections include an evaluated section.

    A record with ``train_sections`` is checked directly; one with only ``eval_sections`` (the
    fine-tuning summary) trained on every other section of the dataset; no record is reported too,
    since the split cannot be checked.
    """
    out = []
    evaluated = sorted(set(evaluated))
    for role, path in checkpoints.items():
        rec = training_record(path)
        if rec is None or ("train_sections" not in rec and "eval_sections" not in rec):
            out.append(f"{role} checkpoint {path} does not record its training sections: cannot check that the "
                       f"evaluated sections {evaluated} were held out of its training")
            continue
        if "train_sections" in rec:
            trained = set(map(str, rec["train_sections"]))
        else:
            trained = set(map(str, dataset_sections)) - set(map(str, rec["eval_sections"]))
        overlap = sorted(trained & set(evaluated))
        if overlap:
            out.append(f"{role} checkpoint {path} was trained on {overlap}, which this evaluation holds out and "
                       "scores: its held-out scores are optimistic. Fix: retrain with --eval_sections "
                       f"{','.join(evaluated)} or evaluate with --held-out set to its eval sections "
                       f"{rec.get('eval_sections')}")
    return out


# ----------------------------------------------------------------------------- held-out breakdown (tasks 7-8)
def held_out_breakdown(result: TaskResult, inputs) -> None:
    """Tasks 7-8 score cells held out *within* every section, and pretraining saw the training
    sections' cells (all genes, self-supervised). Adds each method's mean Pearson on the scored cells
    of the held-out sections only (never seen by any training) to ``details`` and a note."""
    from .metrics import compute_metric

    preds, truth = result.artifacts.get("predictions"), result.artifacts.get("truth")
    if preds is None or truth is None:
        return
    test = inputs.cell_split.test
    rows = np.isin(inputs.cells.sample_ids[test], list(inputs.section_split.held_out_sections))
    if rows.sum() < 3:
        return
    genes = result.details.get("genes", [str(j) for j in range(truth.shape[1])])
    scores = {}
    for name, p in preds.items():
        out = compute_metric("per_gene_correlation", predictions=np.asarray(p, np.float64)[rows],
                             references=np.asarray(truth, np.float64)[rows], gene_names=list(genes))
        scores[name] = out["pearson_mean"]
    result.details["pearson_held_out_sections"] = scores
    base = [(v, m) for m, v in scores.items() if v is not None and not math.isnan(v)
            and result.method_kinds.get(m) == "baseline"]
    best = max(base) if base else (math.nan, None)
    spatia = {m: v for m, v in scores.items() if result.method_kinds.get(m) == "spatia"}
    text = ", ".join(f"{m} {v:.3f}" for m, v in spatia.items() if v is not None and not math.isnan(v))
    result.notes.append(f"on the {int(rows.sum())} scored cells of the held-out section(s) only (no model saw them): "
                        f"{text or 'no SPATIA method'}; best baseline {best[1]} {best[0]:.3f}")


# ----------------------------------------------------------------------------- the API
def _pipeline_dir(path: str | Path) -> Path:
    """The pipeline folder (``model_index.json``) of ``path``, of the generator output ``path/pipeline``,
    or of a Hub id (downloaded once into the Hub cache)."""
    from ..utils.hub_ids import resolve_folder

    folder = resolve_folder(path, what="pipeline")
    if not (folder / "model_index.json").is_file() and (folder / "pipeline" / "model_index.json").is_file():
        folder = folder / "pipeline"
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"pipeline={str(path)!r}: no model_index.json. Fix: pass the folder written by "
                                "train_generator / examples/train_generator.py (OUT/pipeline), or its Hub id")
    return folder


def _load_pipeline(path: str | Path, device):
    from ..pipelines.pipeline_spatia import SpatiaGenerationPipeline

    path = _pipeline_dir(path)
    return SpatiaGenerationPipeline.from_pretrained(str(path)).to(device), path


@respects_progress
def evaluate(model: str | Path, dataset_dir: str | Path, out_dir: str | Path, pipeline: str | Path | None = None,
             finetuned: str | Path | Sequence[str | Path] | None = None, seed: int = 0, *,
             concat_model: str | Path | None = None, device: str = "auto", tasks: Sequence[int] | None = None,
             held_out: Sequence[str] | None = None, batch_size: int = 64, num_inference_steps: int = 20,
             guidance_scale: float | None = None, generation_variants: bool = True, cnn_epochs: int = 8,
             num_threads: int | None = 1, progress: bool = True, **prepare_kwargs: Any) -> EvaluationResult:
    """Score a SPATIA checkpoint on the 12 tasks next to the baselines and write the report.

    Args:
        model: the pretrained checkpoint (``spatia pretrain`` output; any SPATIA checkpoint works, a
            ``SpatiaForPretraining`` one adds the zero-shot heads of tasks 7, 8 and 10).
        dataset_dir: the built dataset (``cells`` / ``niches`` / ``tissues`` configs).
        out_dir: report folder (``report.md``, ``results.json``, ``figures/``).
        pipeline: a generation pipeline folder (tasks 11-12; without it SPATIA is "not run" there).
        finetuned: fine-tuned checkpoint(s): ``SpatiaForCellClassification`` (task 3),
            ``SpatiaForGeneImputation`` (task 7), ``SpatiaForExpressionPrediction`` (task 9).
        seed: fixes every split, probe, clustering and noise.
        concat_model: a separately trained ``fusion="concat"`` checkpoint for the no-cross-attention
            ablation (default: concatenate SPATIA's image-only and expression-only embeddings).
        device: "auto", "cpu", "cuda", ...
        tasks: task numbers to run (default all 12).
        held_out: sections scored by the section-split tasks (default: the training default, the
            last section by name).
        num_inference_steps / guidance_scale / generation_variants: generation settings (tasks 11-12).
        cnn_epochs: epochs of the image-CNN baseline.
        num_threads: BLAS threads of the scoring (1 is fastest for these small matrices).
        prepare_kwargs: passed to :func:`~spatia_hf.evaluation.suite.prepare_suite` (``max_generation``, ...).
    """
    import torch

    from ..utils.devices import resolve_device
    from ..data.datasets import resolve_dataset_dir
    from ..utils.hub_ids import resolve_folder

    from . import plots
    from .report import FIGURES_DIR, write_report
    from .spatia_methods import checkpoint_architecture, load_checkpoint, spatia_methods
    from .suite import prepare_suite, run_suite

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    dev = resolve_device(device)
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    unknown = sorted(set(tasks or ()) - set(TASKS))
    if unknown:
        raise ValueError(f"tasks={list(tasks)}: {unknown} are not task numbers. Fix: use numbers from 1 to 12")
    finetuned = [] if finetuned is None else [finetuned] if isinstance(finetuned, (str, Path)) else list(finetuned)
    # folders or Hub ids -> local folders (downloaded once), before minutes of work on a wrong path
    model = resolve_folder(model, what="model", required=("config.json",))
    finetuned = [resolve_folder(f, what="fine-tuned model", required=("config.json",)) for f in finetuned]
    if concat_model is not None:
        concat_model = resolve_folder(concat_model, what="concat model", required=("config.json",))
    for path in [model, *finetuned, *([concat_model] if concat_model is not None else [])]:
        checkpoint_architecture(path)
    if pipeline is not None:
        pipeline = _pipeline_dir(pipeline)
    dataset_dir = resolve_dataset_dir(dataset_dir)

    inputs = prepare_suite(dataset_dir, seed=seed, held_out=held_out, **prepare_kwargs)
    checkpoints = {"pretrained": model, **{f"fine-tuned ({Path(f).name})": f for f in finetuned}}
    if concat_model is not None:
        checkpoints["concat-fusion"] = concat_model
    if pipeline is not None:
        checkpoints["generator"] = pipeline
    caveats = section_overlap_warnings(checkpoints, inputs.section_split.held_out_sections,
                                       inputs.sections.sample_ids)
    for text in caveats:
        warnings.warn(text, UserWarning, stacklevel=2)
    seconds["prepare"] = time.perf_counter() - t0

    t = time.perf_counter()
    ckpt = load_checkpoint(model, dataset_dir, dev)
    tuned = [load_checkpoint(f, dataset_dir, dev, fallback_processor=ckpt.processor) for f in finetuned]
    concat = load_checkpoint(concat_model, dataset_dir, dev) if concat_model is not None else None
    pipe = None
    if pipeline is not None:
        pipe, pipeline = _load_pipeline(pipeline, dev)
    with torch.inference_mode():
        spatia = spatia_methods(ckpt, inputs, dataset_dir, finetuned=tuned, concat=concat, pipeline=pipe, tasks=tasks,
                                seed=seed, batch_size=batch_size, num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, generation_variants=generation_variants,
                                progress=progress)
    seconds["SPATIA outputs"] = time.perf_counter() - t

    t = time.perf_counter()
    fig_dir = out_dir / FIGURES_DIR
    results, figures = run_suite(inputs, spatia.extra, tasks, cnn_epochs, fig_dir, progress, num_threads,
                                 kinds=spatia.kinds)
    for r in results:
        r.notes.extend(spatia.notes.get(r.task, []))
        if r.task in (7, 8):
            held_out_breakdown(r, inputs)
    seconds["baselines and scoring"] = time.perf_counter() - t

    sec = inputs.section_split
    colorings = {"cell type": inputs.cells.label(inputs.cell_type_key)[sec.test]}
    if inputs.domain_key:
        colorings["domain"] = inputs.cells.label(inputs.domain_key)[sec.test]
    for key, title in (("fused", "SPATIA fused cell embedding"), ("niche_aware", "SPATIA niche-aware embedding")):
        figures[f"embedding_spatia_{key}"] = plots.plot_embedding(
            spatia.arrays[key][sec.test], colorings, fig_dir / f"embedding_spatia_{key}.png",
            f"{title} (held-out section)")

    meta = {"dataset": str(dataset_dir), **inputs.describe(), "model": str(model),
            "fine-tuned": [str(f) for f in finetuned] or "none", "pipeline": str(pipeline) if pipeline else "none",
            "concat-fusion checkpoint": str(concat_model) if concat_model else "none", "device": str(dev)}
    skipped = sorted(set(tasks or TASKS) - {r.task for r in results})
    if skipped:
        meta["skipped tasks (data lacks what they need)"] = skipped
    meta["training/evaluation section check"] = caveats or "every checkpoint records training sections disjoint " \
                                                           "from the evaluated ones"
    seconds["total"] = time.perf_counter() - t0
    meta["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    meta["seconds of SPATIA stages"] = spatia.seconds
    report = write_report(results, out_dir, meta, figures)
    return EvaluationResult(results, report, caveats, seconds)


__all__ = ["EvaluationResult", "evaluate", "training_record", "section_overlap_warnings", "held_out_breakdown"]
