"""``spatia pretrain``: multi-scale SPATIA pretraining on a built dataset (the code of examples/pretrain.py)."""

from __future__ import annotations

import argparse

from ._training import add_training_arguments, parse_into, print_result, resume_value, training_dict


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain", help="pretrain SPATIA (masked genes, masked image, contrastive, niche masked cells)",
        description="Pretrain a SPATIA model with transformers.Trainer on a dataset directory. A new model is "
                    "built from --preset with the dataset's gene panel, or training resumes with --resume. "
                    "For several GPUs or nodes use examples/pretrain.py under accelerate launch / torchrun.",
    )
    add_training_arguments(parser)
    parser.add_argument("--schedule", default="niche", choices=("niche", "grid", "cell"),
                        help="niche: batches of nearby cell-centred neighbourhoods whose cells carry every cell "
                             "objective plus the niche and tissue objectives (default); grid: the same on grid-tile "
                             "niches, no tissue objective; cell: batches of cells, no niche objective")
    parser.add_argument("--streaming", action="store_true",
                        help="stream the cells shards (datasets IterableDataset: bounded memory, shuffle buffer, one "
                             "stream per rank, stream state in checkpoints); needs --max-steps; no final evaluation")
    parser.add_argument("--shuffle-buffer", type=int, default=256,
                        help="--streaming: examples in the shuffle buffer (default 256; memory grows with it)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spatia_hf.training.arguments import DataArguments, ModelArguments, SpatiaTrainingArguments
    from spatia_hf.training.pretrain import run_pretraining

    d = training_dict(args)
    d["schedule"] = args.schedule
    d["streaming"] = bool(args.streaming)
    d["shuffle_buffer_size"] = args.shuffle_buffer
    model_args, data_args, training_args = parse_into((ModelArguments, DataArguments, SpatiaTrainingArguments), d)
    result = run_pretraining(model_args, data_args, training_args,
                             resume_from_checkpoint=resume_value(args.resume))
    print_result(result, "pretrained")
    return 0
