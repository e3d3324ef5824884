#!/usr/bin/env python
"""Fine-tune SPATIA on a downstream task with ``transformers.Trainer``.

Tasks: ``annotation`` (cell type), ``imputation`` (held-out genes), ``image_to_expression``,
``tissue_classification`` (section labels). Start from a pretrained checkpoint
(``--model_name_or_path runs/pretrain``) or from scratch (``--preset tiny``)::

    python examples/finetune.py --task annotation --dataset_dir runs/tiny-data \
        --model_name_or_path runs/pretrain --output_dir runs/annotation \
        --num_train_epochs 5 --eval_strategy epoch --use_cpu

Evaluation runs on held-out sections (``--eval_sections``; default: the last one) with the
package's metrics (macro-F1 and accuracy, or per-gene Pearson). Runs unchanged under
``torchrun`` / ``accelerate launch``.
"""

import sys

from transformers import HfArgumentParser

from spatia_hf.training.arguments import DataArguments, FinetuneArguments, ModelArguments, SpatiaTrainingArguments
from spatia_hf.training.finetune import run_finetuning


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, FinetuneArguments, SpatiaTrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, task_args, training_args = parser.parse_json_file(sys.argv[1])
    else:
        model_args, data_args, task_args, training_args = parser.parse_args_into_dataclasses()
    run_finetuning(model_args, data_args, task_args, training_args)


if __name__ == "__main__":
    main()
