"""``spatia evaluate``: SPATIA checkpoints on the 12 tasks next to the baselines, with a report."""

from __future__ import annotations

import argparse

from spatia_hf.commands._common import add_device_and_seed

EXAMPLE = """example:
  spatia evaluate --model runs/demo/pretrained --finetuned runs/demo/finetuned \\
      --pipeline runs/demo/generator/pipeline --dataset runs/demo/dataset --out runs/demo/report
writes REPORT_DIR/report.md (summary table + one section per task), results.json (every score; the
model card reads it) and figures/*.png. SPATIA is scored on the same cells, splits and seeds as the
baselines, only on held-out sections (default: the last by name, as training holds out); a checkpoint
whose recorded training sections (its base checkpoint's included) overlap them, or that records none,
is refused. Every score is a mean over seeds with a 95% interval; a winner is named only when the
intervals separate. Without --finetuned, task 3 reports SPATIA "not run"; without --pipeline, tasks
11-12 do. --peers novae,scvi adds published methods (pip install 'spatia-hf[peers]'; minutes on a CPU)."""


def _tasks(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tasks {text!r}: expected comma-separated task numbers, e.g. 1,2,7") from None
    bad = [t for t in out if not 1 <= t <= 12]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"--tasks {text!r}: task numbers run from 1 to 12")
    return out


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="score SPATIA on the 12 evaluation tasks against baselines and write a report",
        description="Score SPATIA checkpoints on the 12 tasks (annotation, clustering, domains, sections, "
                    "imputation, image->expression, retrieval, generation, perturbation) next to honest "
                    "baselines run in the same command, on held-out cells and sections.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True,
                        help="pretrained SPATIA checkpoint: folder (spatia pretrain output) or Hub id ORG/NAME")
    parser.add_argument("--finetuned", action="append", default=[], metavar="CKPT",
                        help="fine-tuned checkpoint folder or Hub id (annotation -> task 3, imputation -> 7, "
                             "image_to_expression -> 9); repeat for several")
    parser.add_argument("--pipeline", default=None, metavar="GEN_CKPT",
                        help="generation pipeline folder or Hub id (tasks 11-12)")
    parser.add_argument("--concat-model", default=None, metavar="CKPT",
                        help="a fusion='concat' checkpoint for the no-cross-attention ablation (default: "
                             "concatenate SPATIA's image-only and expression-only embeddings)")
    parser.add_argument("--dataset", required=True, help="built dataset folder (spatia convert) or Hub dataset id")
    parser.add_argument("--out", required=True, metavar="REPORT_DIR", help="report folder")
    parser.add_argument("--tasks", type=_tasks, default=None, help="comma-separated task numbers (default: all 12)")
    parser.add_argument("--held-out", default=None,
                        help="comma-separated sections to score (default: the last section, as training holds out)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps of the generator (default 20)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance of the generator (default: the pipeline's)")
    parser.add_argument("--no-generation-variants", action="store_true",
                        help="skip the token-merging and unconditional generator variants (task 11)")
    parser.add_argument("--max-generation", type=int, default=256,
                        help="held-out cells conditioning the generator in task 11 (default 256)")
    parser.add_argument("--max-perturbation", type=int, default=64,
                        help="held-out cells edited in task 12, each generated at every fold (default 64)")
    parser.add_argument("--batch-size", type=int, default=64, help="cells per forward pass (default 64)")
    parser.add_argument("--cnn-epochs", type=int, default=8, help="epochs of the image-CNN baseline (default 8)")
    parser.add_argument("--peers", default="", metavar="NAMES",
                        help="comma-separated published methods to train from scratch and score as baselines: "
                             "novae (task 5), scvi (tasks 1, 4, 7, 8); needs pip install 'spatia-hf[peers]'")
    parser.add_argument("--novae-epochs", type=int, default=20, help="epoch cap of the Novae peer (default 20, >= 3)")
    parser.add_argument("--novae-runs", type=int, default=3,
                        help="Novae training runs per configuration, one per clustering seed (default 3: its "
                             "training is not reproducible run to run)")
    parser.add_argument("--scvi-epochs", type=int, default=None,
                        help="epoch cap of the scVI peer (default: scvi-tools' own rule)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_device_and_seed(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spatia_hf.evaluation.evaluate import evaluate

    held = [s.strip() for s in args.held_out.split(",") if s.strip()] if args.held_out else None
    result = evaluate(args.model, args.dataset, args.out, pipeline=args.pipeline, finetuned=args.finetuned,
                      seed=args.seed, concat_model=args.concat_model, device=args.device, tasks=args.tasks,
                      held_out=held, batch_size=args.batch_size, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, generation_variants=not args.no_generation_variants,
                      cnn_epochs=args.cnn_epochs, progress=not args.no_progress, max_generation=args.max_generation,
                      max_perturbation=args.max_perturbation,
                      peers=[p.strip() for p in args.peers.split(",") if p.strip()], novae_epochs=args.novae_epochs,
                      scvi_epochs=args.scvi_epochs, novae_runs=args.novae_runs)
    print()
    print(result.format_table())
    for text in result.warnings:
        print(f"note: {text}")
    print(f"\nreport: {result.report}  ({result.seconds['total']:.0f} s)")
    return 0
