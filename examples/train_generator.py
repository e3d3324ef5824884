#!/usr/bin/env python
"""Train SPATIA's expression-conditioned cell-image generator (``SpatiaGenerationPipeline``).

DDPM noise prediction with classifier-free guidance dropout, min-SNR weighting, EMA weights and
accelerate (one CPU, one or several GPUs; ``accelerate launch`` works unchanged)::

    spatia synth --out runs/synth --sections 4 --cells 1500
    spatia convert synthetic runs/synth --out runs/dataset
    python examples/train_generator.py --dataset_dir runs/dataset --out_dir runs/generator \
        --size small --batch_size 32 --max_minutes 15
    python examples/generate.py --pipeline runs/generator/pipeline --dataset runs/dataset

Every field of ``GeneratorTrainingArguments`` is a flag (``--resume_from_checkpoint latest``,
``--spatia_model runs/pretrain`` to start from a pretrained expression branch, ``--mixed_precision bf16``
on GPUs, ``--global_condition false`` for the cross-attention-only denoiser of earlier versions, ...);
the denoiser by default also takes the condition as a global vector added to its timestep embedding
(``class_embed_type="projection"``): the standardised expression profile, so a single gene's edit reaches
every ResNet block. A JSON file with the same keys works too: ``python examples/train_generator.py args.json``.
"""

import json
import os
import sys

from transformers import HfArgumentParser

from spatia_hf.training.generator import GeneratorTrainingArguments, run_training


def main() -> None:
    parser = HfArgumentParser(GeneratorTrainingArguments)
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        (args,) = parser.parse_json_file(sys.argv[1])
    else:
        (args,) = parser.parse_args_into_dataclasses()
    result = run_training(args)
    if int(os.environ.get("RANK", "0")) != 0:  # one summary per launched run, not one per process
        return
    print(json.dumps({"pipeline": str(result.pipeline_dir), "steps": result.global_step,
                      "stopped_by": result.stopped_by, "minutes": round(result.elapsed_s / 60, 2),
                      "final_loss": sum(result.losses[-50:]) / max(len(result.losses[-50:]), 1),
                      "eval_sections": result.eval_sections}, indent=1))


if __name__ == "__main__":
    main()
