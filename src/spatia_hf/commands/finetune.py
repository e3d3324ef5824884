"""``spatia finetune``: fine-tune SPATIA on a downstream task (the code of examples/finetune.py)."""

from __future__ import annotations

import argparse

from ._training import add_training_arguments, parse_into, print_result, resume_value, training_dict


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune", help="fine-tune SPATIA: annotation, imputation, image_to_expression, tissue_classification",
        description="Fine-tune from a pretrained checkpoint (--model) or from scratch (--preset) with "
                    "transformers.Trainer; evaluation on held-out sections with the package's metrics.",
    )
    parser.add_argument("--task", required=True,
                        choices=("annotation", "imputation", "image_to_expression", "tissue_classification"))
    parser.add_argument("--model", default=None, help="pretrained checkpoint directory or Hub id (default: new model)")
    parser.add_argument("--label-column", default=None,
                        help="label column (default cell_type for annotation, condition for tissue_classification)")
    parser.add_argument("--freeze-backbone", action="store_true", help="train only the task head")
    add_training_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spatia_hf.training.arguments import (
        DataArguments,
        FinetuneArguments,
        ModelArguments,
        SpatiaTrainingArguments,
    )
    from spatia_hf.training.finetune import run_finetuning

    d = training_dict(args)
    d.update(task=args.task, model_name_or_path=args.model, label_column=args.label_column,
             freeze_backbone=bool(args.freeze_backbone))
    d.setdefault("eval_strategy", "epoch" if args.max_steps < 0 else "no")
    model_args, data_args, task_args, training_args = parse_into(
        (ModelArguments, DataArguments, FinetuneArguments, SpatiaTrainingArguments), d)
    result = run_finetuning(model_args, data_args, task_args, training_args,
                            resume_from_checkpoint=resume_value(args.resume))
    print_result(result, f"fine-tuned ({args.task})")
    return 0
