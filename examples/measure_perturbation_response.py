#!/usr/bin/env python
"""Measure how a trained generator's cells respond to gene edits, and write the JSON results file.

For ``--n_pairs`` held-out cells, the morphology gene (default: the ground truth's, ``NUCSIZE``) is
scaled by each of ``--folds`` and a control gene without a morphology effect by ``--control_fold``,
all from the same noise; the report has the nucleus-area ratio per edit with a bootstrap 95% CI, the
fraction of pairs moving the right way, the true ratio and the goals met
(``spatia_hf.evaluation.perturbation_response``)::

    python examples/measure_perturbation_response.py --pipeline runs/gen/pipeline \
        --dataset_dir runs/demo/dataset --eval_sections synth_s03 --n_pairs 200 --out docs/response.json

``--strip docs/strip.png`` also draws the labelled picture strip (original, folds, control) of six cells.
"""

import argparse
import json
import shlex
import sys

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", required=True, help="SpatiaGenerationPipeline folder")
    p.add_argument("--dataset_dir", required=True, help="built (synthetic) dataset with a ground truth")
    p.add_argument("--eval_sections", nargs="*", default=None, help="held-out sections (default: the last)")
    p.add_argument("--n_pairs", type=int, default=200)
    p.add_argument("--folds", type=float, nargs="+", default=[0.5, 2.0, 4.0])
    p.add_argument("--gene", default=None)
    p.add_argument("--control_gene", default=None)
    p.add_argument("--control_fold", type=float, default=4.0)
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=None)
    p.add_argument("--perturbation_library", default="unedited", choices=["unedited", "edited"],
                   help="normalise an edited cell by its unedited library (default) or its edited total")
    p.add_argument("--perturbation_guidance", type=float, default=None,
                   help="extra guidance along the edit (default: the pipeline's)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--strip", default=None, help="also write the labelled picture strip (PNG) here")
    args = p.parse_args()

    from spatia_hf.evaluation.perturbation_response import (
        measure_perturbation_response,
        write_response,
    )
    from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline

    torch.manual_seed(args.seed)
    pipe = SpatiaGenerationPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    common = dict(gene=args.gene, control_gene=args.control_gene, folds=args.folds, control_fold=args.control_fold,
                  eval_sections=args.eval_sections, num_inference_steps=args.num_inference_steps,
                  guidance_scale=args.guidance_scale, batch_size=args.batch_size, seed=args.seed,
                  perturbation_library=args.perturbation_library, perturbation_guidance=args.perturbation_guidance)
    report = measure_perturbation_response(pipe, args.dataset_dir, n_pairs=args.n_pairs, **common)
    if args.strip:
        from spatia_hf.evaluation.perturbation_response import response_strip

        report["strip"] = str(response_strip(pipe, args.dataset_dir, args.strip, **common))
    path = write_response(report, args.out, command=" ".join(shlex.quote(a) for a in ["python", *sys.argv]))
    print(json.dumps({"out": str(path), "edits": [{k: e[k] for k in ("gene", "fold", "area_ratio", "area_ratio_ci95")}
                                                  for e in report["edits"]]}, indent=1))


if __name__ == "__main__":
    main()
