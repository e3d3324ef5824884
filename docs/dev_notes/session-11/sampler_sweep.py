#!/usr/bin/env python
"""Type accuracy, feature FID (with its per-feature breakdown) and the NUCSIZE response of one trained
generator at several sampler settings (guidance scale x steps x guidance_rescale x
perturbation guidance), on the held-out section.

    python docs/dev_notes/session-11/sampler_sweep.py PIPELINE OUT.json --guidance 2 3 4 --steps 12 \
        [--dataset /tmp/demo7/dataset] [--held synth_s03] [--n_pairs 200] [--guidance_rescale 0 0.7]

Every setting uses the evaluation's own functions (evaluate_generator with n_perturb=0 and
measure_perturbation_response, seed 0), as docs/dev_notes/session-8/measure_generator.sh does at guidance 4.
"""

import argparse
import itertools
import json
import shlex
import sys
import time

import torch

from spatia_hf import SpatiaGenerationPipeline
from spatia_hf.evaluation.generation import evaluate_generator
from spatia_hf.evaluation.perturbation_response import measure_perturbation_response
from spatia_hf.utils.io import write_json


class RescaledPipeline(SpatiaGenerationPipeline):
    """The pipeline with ``guidance_rescale`` fixed (the evaluation functions do not pass it)."""

    phi = 0.0

    def __call__(self, *args, **kwargs):
        return super().__call__(*args, guidance_rescale=self.phi, **kwargs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("pipeline")
    p.add_argument("out")
    p.add_argument("--dataset", default="/tmp/demo7/dataset")
    p.add_argument("--held", default="synth_s03")
    p.add_argument("--guidance", type=float, nargs="+", default=[4.0])
    p.add_argument("--steps", type=int, nargs="+", default=[12])
    p.add_argument("--n_pairs", type=int, default=200)
    p.add_argument("--guidance_rescale", type=float, nargs="+", default=[0.0])
    p.add_argument("--perturbation_guidance", type=float, nargs="+", default=[0.0])
    args = p.parse_args()

    rows = []
    for g, steps, phi, wp in itertools.product(args.guidance, args.steps, args.guidance_rescale,
                                               args.perturbation_guidance):
        pipe = RescaledPipeline.from_pretrained(args.pipeline)
        pipe.set_progress_bar_config(disable=True)
        pipe.phi = phi
        t0 = time.time()
        gen = evaluate_generator(pipe, args.dataset, eval_sections=[args.held], n_per_type=30, n_perturb=0,
                                 num_inference_steps=steps, guidance_scale=g, seed=0)
        resp = measure_perturbation_response(pipe, args.dataset, n_pairs=args.n_pairs, eval_sections=[args.held],
                                             num_inference_steps=steps, guidance_scale=g, seed=0,
                                             perturbation_guidance=wp)
        shifts = gen["feature_shift"]
        worst = sorted(shifts, key=lambda k: -abs(shifts[k]["mean_shift_sd"]))[:6]
        row = {"guidance_scale": g, "steps": steps, "guidance_rescale": phi, "perturbation_guidance": wp, "type_accuracy": gen["type_accuracy"]["accuracy"],
               "fid": gen["feature_frechet_distance"]["generated_vs_real"],
               "fid_reference": gen["feature_frechet_distance"]["real_train_vs_real_held_out"],
               "largest_feature_shifts": {k: shifts[k] for k in worst},
               "edits": [{k: e[k] for k in ("gene", "fold", "area_ratio", "area_ratio_ci95", "fraction_right_direction", "true_ratio")
                          if k in e} for e in resp["edits"]],
               "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("guidance_scale", "steps", "guidance_rescale", "perturbation_guidance", "type_accuracy", "fid")}),
              [(e["gene"], e["fold"], round(e["area_ratio"], 3)) for e in row["edits"]], flush=True)
    write_json(args.out, {"command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
                          "pipeline": args.pipeline, "rows": rows})


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
