"""Streaming vs map-style pretraining loaders, and how they compare with what training consumes.

In one process (so the ratios hold on a shared CPU): the ``niche`` (or ``cell``) schedule's examples
are read and collated by

- ``map``: the default map-style path (``load_spatia_dataset`` + ``NicheCellsDataset`` / ``ArrowRows``);
- ``stream``: ``--streaming`` (``datasets`` IterableDataset over the cells shards, shuffle buffer);

for ``--batches`` batches each (after one warm-up batch), giving examples/s and cells/s. Then
``--train-steps`` optimiser steps of the model at ``--preset`` (gradient checkpointing as
``spatia pretrain`` runs it by default) on batches of the same loader give the cells/s that
training consumes; the report is each loader's cells/s divided by it (> 1: the loader keeps up
with one process reading in the training loop, ``dataloader_num_workers=0``).

    python benchmarks/bench_streaming.py --data DATASET_DIR --preset small --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import DataLoader


def _cells_in(batch: dict) -> int:
    mask = batch.get("cell_attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["pixel_values"].shape[0])


def time_loader(loader, batches: int) -> dict:
    it = iter(loader)
    next(it)  # warm-up (file opening, first shuffle-buffer fill)
    cells, start = 0, time.perf_counter()
    for _ in range(batches):
        cells += _cells_in(next(it))
    took = time.perf_counter() - start
    return {"batches": batches, "seconds": took, "examples_per_s": batches * loader.batch_size / took,
            "cells_per_s": cells / took}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset directory (spatia convert / synth)")
    p.add_argument("--preset", default="small")
    p.add_argument("--schedule", default="niche", choices=("niche", "cell"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=30, help="batches timed per loader")
    p.add_argument("--train-steps", type=int, default=3, help="optimiser steps timed (training consumption)")
    p.add_argument("--shuffle-buffer", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from spatia_hf.data.datasets import load_spatia_dataset
    from spatia_hf.training.arguments import DataArguments, ModelArguments, SpatiaTrainingArguments
    from spatia_hf.training.pretrain import (build_pretraining_data, build_streaming_data, load_pretraining_model)
    from spatia_hf.training.setup import build_processor

    model_args = ModelArguments(preset=args.preset)
    data_args = DataArguments(dataset_dir=args.data, schedule=args.schedule, streaming=True,
                              shuffle_buffer_size=args.shuffle_buffer)
    targs = SpatiaTrainingArguments(output_dir="/tmp/bench_streaming_unused", per_device_train_batch_size=args.batch_size,
                                    use_cpu=True, report_to="none")
    configs = ("cells",) if args.schedule == "cell" else ("cells", "niches")
    t0 = time.perf_counter()
    dataset = load_spatia_dataset(args.data, configs)
    load_s = time.perf_counter() - t0
    model = load_pretraining_model(model_args, data_args, dataset, 0)
    processor = build_processor(model_args, model.config, dataset, 0)

    train, _, collator = build_pretraining_data(data_args, dataset, processor, model, 0)
    sampler = torch.utils.data.RandomSampler(train, generator=torch.Generator().manual_seed(0))
    map_loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, collate_fn=collator)
    results = {"map": {**time_loader(map_loader, args.batches), "load_dataset_s": load_s}}
    stream, stream_collator = build_streaming_data(data_args, dataset, processor, model, targs)
    stream_loader = DataLoader(stream, batch_size=args.batch_size, collate_fn=stream_collator)
    results["stream"] = time_loader(stream_loader, args.batches)

    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    it = iter(map_loader)
    cells, took = 0, 0.0
    for step in range(args.train_steps + 1):
        batch = next(it)
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        if step > 0:  # step 0 warms up
            took += time.perf_counter() - start
            cells += _cells_in(batch)
    results["train"] = {"steps": args.train_steps, "seconds": took, "cells_per_s": cells / took}
    for name in ("map", "stream"):
        results[name]["ratio_to_training"] = results[name]["cells_per_s"] / results["train"]["cells_per_s"]
    results["config"] = vars(args)
    for name in ("map", "stream"):
        r = results[name]
        print(f"{name:>6}: {r['examples_per_s']:.1f} {args.schedule}s/s, {r['cells_per_s']:.0f} cells/s "
              f"({r['ratio_to_training']:.1f}x what training consumes)", flush=True)
    print(f" train: {results['train']['cells_per_s']:.1f} cells/s at the {args.preset} preset, batch {args.batch_size} "
          f"{args.schedule}s ({args.train_steps} steps, {took:.1f} s)", flush=True)
    print(f"stream / map: {results['stream']['cells_per_s'] / results['map']['cells_per_s']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
