"""``evaluate``: SPATIA checkpoints scored on the 12 tasks next to the baselines, in one call.

The Python API behind ``spatia evaluate`` and the demo's evaluation step:

1. :func:`~spatia_hf.evaluation.suite.prepare_suite` fixes the splits and per-task choices;
2. the scored (held-out) sections are checked against the sections each checkpoint recorded as
   trained on (``spatia_training.json`` / ``generator_training.json``, base checkpoints included):
   an overlap, or a checkpoint without a record, stops the evaluation with
   :class:`SectionOverlapError`; the report lists which sections trained what;
3. :func:`~spatia_hf.evaluation.spatia_methods.spatia_methods` computes SPATIA's outputs on those
   exact rows;
4. :func:`~spatia_hf.evaluation.suite.run_suite` runs the baselines and scores everything;
5. :func:`~spatia_hf.evaluation.report.write_report` writes ``report.md``, ``results.json`` and the
   pictures (``results.json`` feeds the model card, :mod:`spatia_hf.hub`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


from .tasks import TASKS, TaskResult
from spatia_hf.utils.progress import respects_progress

SUMMARY_FILES = ("spatia_training.json", "generator_training.json")


@dataclass
class EvaluationResult:
    """What :func:`evaluate` produced.

    Attributes:
        tasks: one :class:`~spatia_hf.evaluation.tasks.TaskResult` per task that ran.
        report: path of ``report.md`` (``results.json`` and ``figures/`` are next to it).
        warnings: caveats, e.g. tasks the data cannot decide ("not estimable", with the reason; also in the report).
        seconds: wall-clock time per stage.
    """

    tasks: list[TaskResult]
    report: Path
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary_rows(self) -> list[dict[str, Any]]:
        """Per task (all 12): see :func:`~spatia_hf.evaluation.report.summary_rows`."""
        from .report import summary_rows

        return summary_rows(self.tasks)

    def format_table(self) -> str:
        """The summary as aligned text (what ``spatia evaluate`` prints): mean [95% interval] and the
        winner, named only when the intervals separate."""
        from .report import format_value

        lines = [f"{'#':>2}  {'task':<40} {'metric':<12} {'SPATIA':>22}  {'best baseline':>22}  winner: best baseline "
                 "/ SPATIA variant"]
        for row in self.summary_rows():
            head = f"{row['task']:>2}  {row['title'][:40]:<40} {row['metric'][:12]:<12}"
            if not row["ran"]:
                lines.append(f"{head} {'not run':>22}")
                continue
            if row["not_estimable"]:
                lines.append(f"{head} {'not estimable':>22}  {'':>22}  {row['not_estimable'][:90]}")
                continue
            who = f"{row['baseline_method'] or '-'} / {row['spatia_method'] or 'not run'}"
            lines.append(f"{head} {format_value(row['spatia'], row['spatia_interval']):>22}  "
                         f"{format_value(row['best_baseline'], row['baseline_interval']):>22}  {row['winner']}: {who}")
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


class SectionOverlapError(ValueError):
    """A checkpoint trained on (or does not record whether it trained on) a section the evaluation scores."""


def trained_sections(path: str | Path, dataset_sections: Sequence[str]) -> list[str] | None:
    """The sections that trained a checkpoint, from its record: ``train_sections`` (which includes its
    base checkpoint's, see :func:`spatia_hf.training.setup.section_lineage`), or for an older record
    with only ``eval_sections`` every other section of the dataset; None when nothing is recorded."""
    rec = training_record(path)
    if rec is None or ("train_sections" not in rec and "eval_sections" not in rec):
        return None
    if rec.get("base_model_unrecorded"):
        return None
    if "train_sections" in rec:
        return sorted(map(str, rec["train_sections"]))
    return sorted(set(map(str, dataset_sections)) - set(map(str, rec["eval_sections"])))


def training_sections_table(checkpoints: dict[str, str | Path], dataset_sections: Sequence[str]) -> dict[str, Any]:
    """Per checkpoint role: its path and the sections that trained it (None: not recorded)."""
    return {role: {"path": str(path), "train_sections": trained_sections(path, dataset_sections)}
            for role, path in checkpoints.items()}


def check_training_sections(checkpoints: dict[str, str | Path], evaluated: Sequence[str],
                            dataset_sections: Sequence[str]) -> dict[str, Any]:
    """Refuse to score ``evaluated`` sections that any checkpoint trained on, or with a checkpoint that
    does not record its training sections; returns :func:`training_sections_table` when all is clean."""
    table = training_sections_table(checkpoints, dataset_sections)
    evaluated = sorted(set(map(str, evaluated)))
    problems = []
    for role, row in table.items():
        if row["train_sections"] is None:
            problems.append(f"{role} checkpoint {row['path']} does not record the sections that trained it (nor its "
                            "base checkpoint's), so the scored sections cannot be shown unseen. Fix: retrain it with "
                            "this version (it writes train_sections into spatia_training.json / "
                            "generator_training.json) or add the record by hand")
            continue
        overlap = sorted(set(row["train_sections"]) & set(evaluated))
        if overlap:
            problems.append(f"{role} checkpoint {row['path']} was trained on {overlap}, which this evaluation would "
                            f"score. Fix: evaluate with --held-out set to sections none of the checkpoints trained on, "
                            f"or retrain with --eval_sections {','.join(evaluated)}")
    if problems:
        raise SectionOverlapError("refusing to score sections a model trained on:\n- " + "\n- ".join(problems))
    return table


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
             num_threads: int | None = 1, progress: bool = True, peers: Sequence[str] = (),
             novae_epochs: int = 20, scvi_epochs: int | None = None, novae_runs: int = 3,
             **prepare_kwargs: Any) -> EvaluationResult:
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
        peers: published methods to train from scratch and score as baselines ("novae", "scvi"; see
            :mod:`~spatia_hf.evaluation.peers`); one that is not installed is skipped with a note.
        novae_epochs / scvi_epochs: the peers' epoch caps (Novae's default 20, at least 3; scVI's own
            default rule when None).
        novae_runs: Novae training runs per configuration (seeds ``seed, seed + 1, ...``; task 5's
            clustering seed j scores run j): its training is not reproducible run to run.
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
    trained = check_training_sections(checkpoints, inputs.section_split.held_out_sections, inputs.sections.sample_ids)
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

    from .peers import PEERS, run_peers

    unknown_peers = sorted(set(peers) - set(PEERS))
    if unknown_peers:
        raise ValueError(f"peers={list(peers)}: {unknown_peers} unknown. Fix: choose from {list(PEERS)}")
    t = time.perf_counter()
    peer_out = run_peers(inputs, peers, seed=seed, novae_epochs=novae_epochs, scvi_epochs=scvi_epochs,
                         novae_runs=novae_runs)
    for key, methods in peer_out.extra.items():
        for name, value in methods.items():
            spatia.add(key, name, value, kind=peer_out.kinds.get(key, {}).get(name))
    for task, texts in peer_out.notes.items():
        spatia.notes.setdefault(task, []).extend(texts)
    if peers:
        seconds["peers"] = time.perf_counter() - t

    t = time.perf_counter()
    fig_dir = out_dir / FIGURES_DIR
    results, figures = run_suite(inputs, spatia.extra, tasks, cnn_epochs, fig_dir, progress, num_threads,
                                 kinds=spatia.kinds)
    for r in results:
        r.notes.extend(spatia.notes.get(r.task, []))
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
    meta["sections that trained each checkpoint"] = {role: row["train_sections"] for role, row in trained.items()}
    meta["training/evaluation section check"] = (f"passed: no checkpoint trained on the scored sections "
                                                 f"{list(inputs.section_split.held_out_sections)}")
    seconds["total"] = time.perf_counter() - t0
    meta["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    meta["seconds of SPATIA stages"] = spatia.seconds
    meta["peers"] = ({name: f"{sec} s" for name, sec in peer_out.seconds.items()} or
                     f"none ran (requested: {list(peers) or 'none'}; spatia evaluate --peers novae,scvi)")
    report = write_report(results, out_dir, meta, figures)
    caveats = [f"task {r.task} ({r.title}) not estimable: {r.not_estimable}" for r in results if r.not_estimable]
    return EvaluationResult(results, report, caveats, seconds)


__all__ = ["EvaluationResult", "SectionOverlapError", "evaluate", "training_record", "trained_sections",
           "training_sections_table", "check_training_sections"]
