"""Arguments shared by ``spatia pretrain`` and ``spatia finetune``, mapped onto the same
dataclasses the example scripts parse (``spatia_hf.training.arguments``), so CLI and scripts run
the same code."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ._common import add_device_and_seed


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset directory (from `spatia synth` / `spatia convert`)")
    parser.add_argument("--out", required=True, help="output directory (checkpoints, final model, metrics)")
    parser.add_argument("--preset", default="tiny", help="size of a new model: tiny, small, base, large (default tiny)")
    parser.add_argument("--max-steps", type=int, default=-1, help="optimiser steps (default: --epochs)")
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs when --max-steps is not set (default 1)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this many minutes")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per device and step (default 8)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    parser.add_argument("--eval-sections", default=None,
                        help="comma-separated sample_ids held out (default: the last section)")
    parser.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps (default 500)")
    parser.add_argument("--logging-steps", type=int, default=10, help="log every N steps (default 10)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    parser.add_argument("--resume", nargs="?", const="true", default=None, metavar="CHECKPOINT",
                        help="resume from CHECKPOINT, or from the latest checkpoint in --out when given alone")
    parser.add_argument("--push-to-hub", action="store_true", help="push the final model (needs --hub-model-id)")
    parser.add_argument("--hub-model-id", default=None, help="ORG/NAME on the Hub")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other ModelArguments / DataArguments / TrainingArguments field "
                             "(e.g. --set gradient_accumulation_steps=2 --set gene_mask_ratio=0.2); repeatable")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is often fastest for tiny models)")
    parser.add_argument("--no-eval", action="store_true", help="skip the final evaluation on held-out sections")
    parser.add_argument("--no-gradient-checkpointing", action="store_true",
                        help="keep every activation for the backward pass instead of recomputing each block's "
                             "(faster by about one forward per step, but the peak memory grows with the cells "
                             "of a batch: 2.2 GB instead of ~1 GB at the small preset, batch 8 niches)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_and_seed(parser)


def apply_threads(threads: int | None) -> None:
    """``--threads``: torch's intra-op CPU threads for this process."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads {threads}: expected a positive number of threads")
    import torch

    torch.set_num_threads(threads)


def apply_device(device: str) -> dict[str, Any]:
    """TrainingArguments for ``--device``: 'cpu' -> use_cpu; 'cuda:N' -> only GPU N visible (must
    run before CUDA is initialised); 'auto'/'cuda'/'mps' -> accelerate's default choice."""
    if device == "cpu":
        return {"use_cpu": True}
    if device.startswith("cuda:"):
        index = device.split(":", 1)[1]
        if not index.isdigit():
            raise ValueError(f"--device {device!r}: expected cuda:N with N a GPU index")
        os.environ["CUDA_VISIBLE_DEVICES"] = index
    elif device not in ("auto", "cuda", "mps"):
        raise ValueError(f"--device {device!r}: expected auto, cpu, cuda, cuda:N or mps")
    if device.startswith("cuda"):  # after CUDA_VISIBLE_DEVICES is set; else training would fall back to the CPU
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: no CUDA GPU is available here. Fix: use --device cpu or auto")
    return {}


def training_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The flat dict of dataclass fields ``HfArgumentParser.parse_dict`` takes."""
    d: dict[str, Any] = {
        "dataset_dir": args.data,
        "output_dir": args.out,
        "preset": args.preset,
        "max_steps": args.max_steps,
        "num_train_epochs": args.epochs,
        "max_minutes": args.max_minutes,
        "per_device_train_batch_size": args.batch_size,
        "per_device_eval_batch_size": args.batch_size,
        "learning_rate": args.lr,
        "warmup_steps": args.warmup_steps,
        "eval_sections": args.eval_sections,
        "save_steps": args.save_steps,
        "logging_steps": args.logging_steps,
        "logging_first_step": True,
        "dataloader_num_workers": args.workers,
        "seed": args.seed,
        "disable_tqdm": bool(args.no_progress),
        "report_to": "none",
        "push_to_hub": bool(args.push_to_hub),
        "hub_model_id": args.hub_model_id,
        "do_eval": not args.no_eval,
        _checkpointing_field(): not args.no_gradient_checkpointing,
    }
    d.update(apply_device(args.device))
    apply_threads(args.threads)
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        d[key.strip()] = _parse_value(value.strip())
    return d


def _checkpointing_field() -> str:
    """TrainingArguments' name for activation checkpointing: ``activation_checkpointing`` since transformers 5.2x
    (``gradient_checkpointing`` is its deprecated alias there and warned on every run), else the old name."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_into(dataclass_types: tuple, d: dict[str, Any]) -> tuple:
    """``HfArgumentParser.parse_dict`` with a clear error naming unknown keys."""
    from transformers import HfArgumentParser

    known = set()
    for t in dataclass_types:
        known |= set(t.__dataclass_fields__)
    unknown = sorted(k for k in d if k not in known)
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}. Fix: use fields of "
                         f"{', '.join(t.__name__ for t in dataclass_types)}")
    return HfArgumentParser(dataclass_types).parse_dict(d)


def resume_value(resume: str | None) -> str | bool | None:
    if resume is None:
        return None
    return True if resume == "true" else resume


def print_result(result, what: str) -> None:
    print(f"{what}: {result.global_step} steps in {result.train_seconds:.1f} s -> {result.output_dir}")
    for name, (first, last) in sorted(result.objective_first_last().items()):
        print(f"  {name}: {first:.4f} -> {last:.4f}")
    for k, v in sorted(result.eval_metrics.items()):
        if isinstance(v, float):
            print(f"  {k}: {v:.4f}")
