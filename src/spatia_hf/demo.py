"""The main job: SPATIA end to end on the built-in synthetic tissue, on a laptop CPU.

``run_demo(out)`` synthesises sections, builds the multi-scale datasets, pretrains, fine-tunes
annotation, trains the generator briefly, evaluates the 12 tasks against baselines, and writes a
report, model cards and Hub-ready folders. Each step writes into its own sub-folder of ``out`` and
is skipped when its output already exists, so an interrupted demo picks up where it stopped.
The last section is held out from every training step and used for evaluation.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from spatia_hf.utils.progress import respects_progress
from .utils.io import atomic_write_text, staged_dir, weight_files, write_json


@dataclass(frozen=True)
class DemoSize:
    """Sizes and budgets of one demo run.

    Training is bounded by step counts sized to fit the time goal on 2 idle CPU cores, so a run's
    results do not depend on machine load; the ``*_minutes`` are only safety caps (about 4x the
    expected time, setup included) that stop a step early on a much slower or busy machine.
    """

    sections: int
    cells: int
    genes: int
    preset: str
    pretrain_minutes: float
    pretrain_steps: int
    pretrain_batch_size: int  # niches per step (each carries up to 32 cells)
    finetune_minutes: float
    finetune_epochs: float
    generator_minutes: float
    generator_steps: int
    generator_size: str
    generator_image_size: int  # the denoiser's pixels; crops are resized to the dataset's for scoring
    generation_steps: int
    max_generation: int
    max_perturbation: int
    generation_variants: bool
    cnn_epochs: int  # epochs of the image-CNN baseline (also the FID/KID feature extractor)


# The generator works at 32 px: at 64 px its self-attention runs over 32x32 tokens and a sampler step
# costs ~6x more on a CPU (0.15 vs 0.02 s per image with guidance, 1 thread); the 64 px quick generator
# got 2-3 training steps in its budget and tasks 11-12 took minutes. At 32 px a training step of batch
# 32 takes ~0.4-0.8 s (tiny and small) and the crops are resized to the dataset's 64 px for scoring.
# Task 12 edits 100 held-out cells (4 folds each, one batched pass per cell with its control): with 16
# cells its per-fold shifts rested on too few pairs; 100 cells cost 5.6x the 16-cell series (measured in
# one process: 471 s vs 85 s on a heavily shared 2-core machine, ~2 minutes more on an idle one).
# Pretraining: 150 steps (cap 4.5 minutes). Cell-centred neighbourhoods carry ~240 member cells per batch of 8,
# ~90 of them distinct (encoded once): ~1.45 s a step on 2 idle cores vs ~1 s for the old grid tiles. The
# generator: 400 steps (~0.4 s each). With the evaluation's seeds, intervals and 100-cell task 12 the whole demo
# must stay near 10 minutes on 2 cores.
FULL = DemoSize(sections=4, cells=1200, genes=120, preset="small", pretrain_minutes=4.5, pretrain_steps=150,
                pretrain_batch_size=8,
                finetune_minutes=4.0, finetune_epochs=1.0, generator_minutes=6.0, generator_steps=400,
                generator_size="small", generator_image_size=32, generation_steps=12, max_generation=48,
                max_perturbation=100, generation_variants=True, cnn_epochs=4)
QUICK = DemoSize(sections=3, cells=400, genes=80, preset="tiny", pretrain_minutes=2.0, pretrain_steps=100,
                 pretrain_batch_size=16,
                 finetune_minutes=1.0, finetune_epochs=4.0, generator_minutes=1.5, generator_steps=40,
                 generator_size="tiny", generator_image_size=32, generation_steps=8, max_generation=32,
                 max_perturbation=12, generation_variants=False, cnn_epochs=3)


@dataclass
class DemoResult:
    """Where everything went and how long each step took (seconds)."""

    out_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


class _Steps:
    """Runs named steps in order, timing them and skipping those whose output exists."""

    def __init__(self, result: DemoResult, total: int, echo: Callable[[str], None]):
        self.result, self.total, self.echo, self.k = result, total, echo, 0

    def run(self, name: str, done: Path, fn: Callable[[], Any]) -> Any:
        self.k += 1
        if done.exists():
            self.echo(f"[{self.k}/{self.total}] {name}: already done ({done})")
            self.result.timings[name] = 0.0
            return None
        self.echo(f"[{self.k}/{self.total}] {name} ...")
        start = time.perf_counter()
        out = fn()
        self.result.timings[name] = round(time.perf_counter() - start, 1)
        self.echo(f"[{self.k}/{self.total}] {name}: {self.result.timings[name]:.1f} s")
        return out


@respects_progress
def run_demo(out_dir: str | Path = "runs/demo", *, quick: bool = False, seed: int = 0, device: str = "auto",
             progress: bool = True, echo: Callable[[str], None] = print) -> DemoResult:
    """Run the whole demo into ``out_dir`` (see the module docstring); returns what it did."""
    import torch

    from .utils.devices import resolve_device

    size = QUICK if quick else FULL
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    use_cpu = resolve_device(device).type == "cpu"
    result = DemoResult(out_dir=out)
    p = {name: out / name for name in ("synthetic", "dataset", "pretrained", "finetuned", "generator", "report", "hub")}
    result.paths = {k: str(v) for k, v in p.items()}
    steps = _Steps(result, total=7, echo=echo)

    steps.run("synthesise tissue", p["synthetic"] / "synthetic.json", lambda: _synthesise(p["synthetic"], size, seed,
                                                                                            progress))
    steps.run("build multi-scale datasets", p["dataset"] / "gene_panel.json",
              lambda: _build(p["synthetic"], p["dataset"], progress))
    held_out = _last_section(p["dataset"])
    steps.run("pretrain SPATIA", p["pretrained"] / "config.json",
              lambda: _pretrain(p["dataset"], p["pretrained"], size, seed, held_out, use_cpu, progress))
    steps.run("fine-tune cell-type annotation", p["finetuned"] / "config.json",
              lambda: _finetune(p["dataset"], p["pretrained"], p["finetuned"], size, seed, held_out, use_cpu,
                                progress))
    steps.run("train the generator", p["generator"] / "pipeline" / "model_index.json",
              lambda: _train_generator(p["dataset"], p["pretrained"], p["generator"], size, seed, held_out, use_cpu,
                                       progress))
    steps.run("evaluate the 12 tasks", p["report"] / "results.json",
              lambda: _evaluate(p, size, seed, device, progress))
    steps.run("write model cards and Hub-ready folders", p["hub"] / "model" / "README.md",
              lambda: _hub_folders(p))
    result.summary = _summary(p)
    write_json(out / "demo_summary.json", {"timings_s": result.timings, "paths": result.paths,
                                            "size": asdict(size), "seed": seed, "held_out_section": held_out,
                                            **result.summary})
    return result


# ----------------------------------------------------------------------------- steps
def _synthesise(folder: Path, size: DemoSize, seed: int, progress: bool) -> None:
    from spatia_hf.data.synthetic import write_synthetic

    write_synthetic(folder, size.sections, size.cells, seed, n_genes=size.genes, progress=progress, overwrite=True)


def _build(synthetic: Path, dataset: Path, progress: bool) -> None:
    from spatia_hf.data.builder import build_multiscale_dataset
    from spatia_hf.data.readers.anndata_reader import read_synthetic_dir

    build_multiscale_dataset(read_synthetic_dir(synthetic), dataset, progress=progress, overwrite=True)


def _last_section(dataset: Path) -> str:
    from spatia_hf.data.builder import load_sections_info

    info = load_sections_info(dataset)
    sections = info.get("sections", info) if isinstance(info, dict) else info
    ids = [s["sample_id"] if isinstance(s, dict) else str(s) for s in sections]
    return sorted(ids)[-1]


def _pretrain(dataset: Path, out: Path, size: DemoSize, seed: int, held_out: str, use_cpu: bool,
              progress: bool) -> None:
    from spatia_hf.training.pretrain import pretrain

    pretrain(dataset, out, preset=size.preset, max_steps=size.pretrain_steps, max_minutes=size.pretrain_minutes,
             batch_size=size.pretrain_batch_size, learning_rate=1e-3, seed=seed, eval_sections=held_out,
             progress=progress, use_cpu=use_cpu, do_eval=False)


def _finetune(dataset: Path, pretrained: Path, out: Path, size: DemoSize, seed: int, held_out: str, use_cpu: bool,
              progress: bool) -> None:
    from spatia_hf.training.finetune import finetune

    finetune(dataset, out, "annotation", model_name_or_path=str(pretrained), num_train_epochs=size.finetune_epochs,
             max_minutes=size.finetune_minutes, batch_size=32, learning_rate=1e-3, seed=seed, eval_sections=held_out,
             progress=progress, use_cpu=use_cpu)


def _train_generator(dataset: Path, pretrained: Path, out: Path, size: DemoSize, seed: int, held_out: str,
                     use_cpu: bool, progress: bool) -> None:
    from spatia_hf.training.generator import train_generator

    train_generator(dataset, out, size=size.generator_size, image_size=size.generator_image_size,
                    max_steps=size.generator_steps, max_minutes=size.generator_minutes,
                    warmup_steps=max(1, size.generator_steps // 10), spatia_model=str(pretrained),
                    eval_sections=[held_out], seed=seed, cpu=use_cpu, progress=progress, checkpoint_every=0)


def _evaluate(p: dict[str, Path], size: DemoSize, seed: int, device: str, progress: bool) -> None:
    from spatia_hf.evaluation.evaluate import evaluate

    evaluate(p["pretrained"], p["dataset"], p["report"], pipeline=p["generator"] / "pipeline",
             finetuned=p["finetuned"], seed=seed, device=device, num_inference_steps=size.generation_steps,
             generation_variants=size.generation_variants, max_generation=size.max_generation,
             max_perturbation=size.max_perturbation, cnn_epochs=size.cnn_epochs, progress=progress)


def _hub_folders(p: dict[str, Path]) -> None:
    """Hub-ready copies: model (+processor, card with the evaluation), pipeline, dataset (+card)."""
    from .data.builder import stale_shard
    from .hub.cards import render_dataset_card, render_pipeline_card, write_model_card
    from .models.modeling_spatia import SpatiaModel
    from .models.processing_spatia import SpatiaProcessor

    results = p["report"] / "results.json"
    eval_results = results if results.exists() else None
    model = SpatiaModel.from_pretrained(p["pretrained"])
    weights = weight_files("model", "diffusion_pytorch_model")

    def stale(rel: Path) -> bool:  # weights of an earlier save; shards of sections the new dataset lacks
        return weights(rel) or (rel.parts[0] == "dataset" and stale_shard(Path(*rel.parts[1:])))

    with staged_dir(p["hub"], stale=stale) as tmp:
        model.save_pretrained(tmp / "model")
        SpatiaProcessor.from_pretrained(p["pretrained"]).save_pretrained(tmp / "model")
        write_model_card(tmp / "model", model, eval_results=eval_results)
        shutil.copytree(p["generator"] / "pipeline", tmp / "pipeline")
        atomic_write_text(tmp / "pipeline" / "README.md", str(render_pipeline_card(tmp / "pipeline",
                                                                                    eval_results=eval_results)))
        shutil.copytree(p["dataset"], tmp / "dataset")
        atomic_write_text(tmp / "dataset" / "README.md", str(render_dataset_card(tmp / "dataset")))


def _summary(p: dict[str, Path]) -> dict[str, Any]:
    """Per task: the primary metric, SPATIA's best variant and the best baseline."""
    results = p["report"] / "results.json"
    if not results.exists():
        return {}
    from spatia_hf.evaluation.report import load_results, summary_rows

    tasks, _ = load_results(results)
    rows = [{k: v for k, v in row.items() if k != "ran"} for row in summary_rows(tasks) if row["ran"]]
    return {"report": str(p["report"] / "report.md"), "tasks": rows}


def format_summary(result: DemoResult) -> str:
    """The one-screen summary printed at the end of ``spatia demo``."""
    lines = [f"SPATIA demo finished in {sum(result.timings.values()):.0f} s -> {result.out_dir}", ""]
    lines += [f"  {name:<42} {sec:7.1f} s" for name, sec in result.timings.items()]
    tasks = result.summary.get("tasks", [])
    if tasks:
        from spatia_hf.evaluation.report import format_value

        lines += ["", f"  {'#':>2}  {'task':<44} {'metric':<20} {'SPATIA [95% CI]':>22} {'best baseline':>22}  winner"]
        for r in tasks:
            head = f"  {r['task']:>2}  {r['title'][:44]:<44} {r['metric'][:20]:<20}"
            if r.get("not_estimable"):
                lines.append(f"{head} {'not estimable':>22}")
                continue
            lines.append(f"{head} {format_value(r['spatia'], r.get('spatia_interval')):>22} "
                         f"{format_value(r['best_baseline'], r.get('baseline_interval')):>22}  {r.get('winner') or ''}")
    lines += ["", f"  report:   {result.summary.get('report', '(not written)')}",
              f"  model:    {result.paths['hub']}/model   (SpatiaModel.from_pretrained)",
              f"  pipeline: {result.paths['hub']}/pipeline   (SpatiaGenerationPipeline.from_pretrained)",
              f"  dataset:  {result.paths['hub']}/dataset   (datasets.load_dataset(path, 'cells'))",
              f"  publish:  spatia push model {result.paths['hub']}/model --repo-id ORG/NAME"]
    return "\n".join(lines)


