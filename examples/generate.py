#!/usr/bin/env python
"""Generate cells from expression with a trained pipeline, edit a gene, and score the result.

    python examples/generate.py --pipeline runs/generator/pipeline --dataset runs/dataset \
        --out docs --gene NUCSIZE --fold 4

1. ``SpatiaGenerationPipeline.from_pretrained`` (only ``import spatia_hf`` is needed);
2. a few held-out cells' expression -> images, and the same cells with ``--gene`` x ``--fold`` from
   the same noise (``perturbation=``);
3. ``spatia_hf.evaluation.generation.evaluate_generator``: a classifier trained on real crops labels
   the generated cells (accuracy vs chance), and the nucleus-area ratio of the edit is compared with
   the synthetic tissue's ground truth; figures ``generation_grid.png`` / ``perturbation_strip.png``
   and ``generation_report.json`` go to ``--out``.
"""

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

import spatia_hf  # noqa: F401  (registers the SPATIA classes)
from spatia_hf import SpatiaGenerationPipeline
from spatia_hf.evaluation.generation import evaluate_generator
from spatia_hf.utils.io import write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", default="docs")
    p.add_argument("--gene", default=None, help="gene to perturb (default: the ground truth's morphology gene)")
    p.add_argument("--fold", type=float, default=4.0)
    p.add_argument("--n-per-type", type=int, default=40)
    p.add_argument("--n-perturb", type=int, default=64,
                   help="cells edited for the quick x fold check (0: none; examples/measure_perturbation_response.py "
                        "is the full measure)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = SpatiaGenerationPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    print(f"pipeline: {len(pipe.genes)} genes, {pipe.image_size} px, channels {pipe.config.channel_names}")

    # the contract in two lines: expression in, images out (an edited copy from the same noise)
    x = np.zeros(len(pipe.genes))
    x[: min(8, len(x))] = 5.0
    gene = args.gene or pipe.genes[0]
    out = pipe(x, perturbation={gene: args.fold} if args.gene else None, num_inference_steps=args.steps,
               generator=torch.Generator().manual_seed(args.seed))
    print(f"one cell -> {len(out.images)} PIL image(s) of size {out.images[0].size}")

    report = evaluate_generator(pipe, args.dataset, n_per_type=args.n_per_type, n_perturb=args.n_perturb,
                                fold=args.fold, gene=args.gene, num_inference_steps=args.steps,
                                guidance_scale=args.guidance_scale, seed=args.seed, figures_dir=args.out)
    report = {"command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]), **report}  # how it was made
    write_json(Path(args.out) / "generation_report.json", report)
    t = report["type_accuracy"]
    print(f"type accuracy of generated cells: {t['accuracy']:.3f} (chance {t['chance_uniform']:.3f}, majority "
          f"{t['chance_majority']:.3f}; real held-out crops {t['real_held_out_accuracy']:.3f}; n={t['n']})")
    if "perturbation" in report:
        r = report["perturbation"]
        print(f"{r['gene']} x{r['fold']:g}: nucleus area ratio {r['measured_ratio']:.3f} measured vs "
              f"{r.get('true_ratio', float('nan')):.3f} true ({r['n_pairs']} pairs, "
              f"{100 * r['fraction_increased']:.0f}% increased)")


if __name__ == "__main__":
    main()
