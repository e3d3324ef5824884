#!/usr/bin/env python
"""Multi-scale SPATIA pretraining with ``transformers.Trainer``.

Runs unchanged on one CPU, under ``torchrun`` and under ``accelerate launch`` (DDP, FSDP or
DeepSpeed; see ``examples/accelerate_configs/``)::

    python examples/pretrain.py --dataset_dir runs/tiny-data --output_dir runs/pretrain \
        --preset tiny --max_steps 200 --per_device_train_batch_size 8 --logging_steps 10 --use_cpu
    torchrun --nproc_per_node 2 examples/pretrain.py ... --use_cpu --ddp_backend gloo
    python examples/pretrain.py ... --streaming --shuffle_buffer_size 256 --max_steps 200   # stream the shards

Arguments: ``ModelArguments`` / ``DataArguments`` (``spatia_hf.training.arguments``) and every
``TrainingArguments`` flag (``--resume_from_checkpoint``, ``--push_to_hub``, ``--bf16``, ...), plus
``--max_minutes``. A JSON file with the same keys works too: ``python examples/pretrain.py args.json``.
"""

import sys

from transformers import HfArgumentParser

from spatia_hf.training.arguments import DataArguments, ModelArguments, SpatiaTrainingArguments
from spatia_hf.training.pretrain import run_pretraining


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, SpatiaTrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(sys.argv[1])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    run_pretraining(model_args, data_args, training_args)


if __name__ == "__main__":
    main()
