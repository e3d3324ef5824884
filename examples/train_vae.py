#!/usr/bin/env python
"""Train the stain-image ``AutoencoderKL`` a latent generator (>= 128 px crops) denoises in.

L1 reconstruction + a small KL term, AdamW with warm-up, accelerate (``accelerate launch`` works
unchanged); at the end the scaling factor (1 / std of the latents) is stored in the VAE config and
held-out reconstruction PSNR and nucleus-area agreement are written to ``OUT/vae_training.json``::

    spatia synth --out runs/synth --pixel-size 0.25
    spatia convert synthetic runs/synth --out runs/data128 --crop-px 128
    python examples/train_vae.py --dataset_dir runs/data128 --out_dir runs/vae --size small --max_minutes 30
    python examples/train_generator.py --dataset_dir runs/data128 --out_dir runs/gen128 --vae runs/vae \
        --max_minutes 60

Every field of ``VaeTrainingArguments`` is a flag (``--kl_weight``, ``--reconstruction_loss mse``,
``--image_size``, ``--mixed_precision bf16`` on GPUs, ...). A JSON file with the same keys works too:
``python examples/train_vae.py args.json``.
"""

import json
import os
import sys

from transformers import HfArgumentParser

from spatia_hf.evaluation.generation import vae_reconstruction_metrics
from spatia_hf.training.vae import VaeTrainingArguments, run_vae_training


def main() -> None:
    parser = HfArgumentParser(VaeTrainingArguments)
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        (args,) = parser.parse_json_file(sys.argv[1])
    else:
        (args,) = parser.parse_args_into_dataclasses()
    result = run_vae_training(args, measure=vae_reconstruction_metrics)
    if int(os.environ.get("RANK", "0")) != 0:  # metrics live on the main process; one summary per run
        return
    vae = result.metrics.get("vae", {})
    print(json.dumps({"vae": str(result.vae_dir), "steps": result.global_step, "stopped_by": result.stopped_by,
                      "minutes": round(result.elapsed_s / 60, 2), "scaling_factor": result.scaling_factor,
                      "heldout_psnr_db": vae.get("psnr_db"),
                      "heldout_nucleus_area_pearson": vae.get("nucleus_area_pearson")}, indent=1))


if __name__ == "__main__":
    main()
