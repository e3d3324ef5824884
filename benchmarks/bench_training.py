#!/usr/bin/env python
"""Training throughput of SPATIA pretraining, and whether the data loader keeps up.

For each preset (tiny: 32 px crops, small: 64 px crops), on a synthetic dataset built here:

1. model: forward + backward + AdamW step of ``SpatiaForPretraining`` on pre-collated niche batches
   (the ``niche`` schedule), in cells/s and niches/s;
2. loader: the training input pipeline alone (``NicheCellsDataset`` Arrow reads + ``NicheCollator``:
   panel mapping, normalisation, gene-token selection, padding) through a ``torch`` DataLoader with
   ``--workers`` worker processes, in cells/s (rows of the cells config);
3. Trainer end to end: ``SpatiaTrainer.train`` for the same steps (data + model + logging).

The goal is loader >= 5x what training consumes (ratio printed), so data never starves the model.
Everything runs in one process with the same batches; ratios, not absolute times, are the result.

    python benchmarks/bench_training.py --presets tiny small --steps 20 --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _dataset(root: Path, crop_px: int, n_sections: int, n_cells: int) -> Path:
    from spatia_hf.data.synthetic import build_tiny_dataset

    return build_tiny_dataset(root / f"synth_{crop_px}px", n_sections=n_sections, n_cells=n_cells, seed=0,
                              crop_px=crop_px, niche_px=crop_px, thumb_px=64)


def _setup(data_dir: Path, preset: str, max_cells: int, seed: int = 0):
    from spatia_hf.training.arguments import DataArguments, ModelArguments
    from spatia_hf.data.datasets import load_spatia_dataset
    from spatia_hf.training.pretrain import build_pretraining_data, load_pretraining_model
    from spatia_hf.training.setup import build_processor

    dataset = load_spatia_dataset(data_dir, ("cells", "niches"))
    model_args = ModelArguments(preset=preset)
    data_args = DataArguments(dataset_dir=str(data_dir), max_cells_per_niche=max_cells, eval_sections="")
    model = load_pretraining_model(model_args, data_args, dataset, seed)
    processor = build_processor(model_args, model.config, dataset, seed)
    train, _, collator = build_pretraining_data(data_args, dataset, processor, model, seed)
    return model, train, collator, model_args, data_args, dataset


def _batches(train, batch_size: int, n: int) -> list[list[int]]:
    order = np.random.default_rng(0).permutation(len(train))
    out = []
    while len(out) < n:
        for s in range(0, len(order) - batch_size + 1, batch_size):
            out.append(order[s : s + batch_size].tolist())
            if len(out) == n:
                break
    return out


def bench_model(model, train, collator, batch_size: int, steps: int, warmup: int = 2) -> dict:
    batches = [collator(train.__getitems__(ix)) for ix in _batches(train, batch_size, steps + warmup)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    cells = niches = 0
    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            cells += int(batch["cell_attention_mask"].sum())
            niches += int(batch["cell_attention_mask"].shape[0])
    dt = time.perf_counter() - start
    return {"cells_per_s": cells / dt, "niches_per_s": niches / dt, "s_per_step": dt / steps}


def bench_loader(train, collator, batch_size: int, steps: int, workers: int) -> dict:
    loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=collator,
                                         num_workers=workers, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    cells = niches = 0
    it = iter(loader)
    next(it)  # start-up (worker spawn) is not throughput
    start = time.perf_counter()
    for _ in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        cells += int(batch["cell_attention_mask"].sum())
        niches += int(batch["cell_attention_mask"].shape[0])
    dt = time.perf_counter() - start
    return {"cells_per_s": cells / dt, "niches_per_s": niches / dt}


def bench_trainer(model_args, data_args, dataset, batch_size: int, steps: int, out: Path) -> dict:
    from spatia_hf.training.arguments import SpatiaTrainingArguments
    from spatia_hf.training.pretrain import run_pretraining

    args = SpatiaTrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch_size,
                                   logging_steps=max(1, steps // 4), save_strategy="no", report_to="none",
                                   use_cpu=True, disable_tqdm=True, optim="adamw_torch", seed=0)
    result = run_pretraining(model_args, data_args, args, dataset=dataset)
    runtime = next(h["train_runtime"] for h in result.log_history if "train_runtime" in h)
    return {"niches_per_s": steps * batch_size / runtime, "s_per_step": runtime / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=20, help="measured optimiser steps per preset")
    parser.add_argument("--batch-size", type=int, default=8, help="niches per step")
    parser.add_argument("--max-cells", type=int, default=16, help="cells per niche at most")
    parser.add_argument("--sections", type=int, default=2)
    parser.add_argument("--cells", type=int, default=600, help="cells per section")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                        help="DataLoader worker counts for the loader benchmark (default 0 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--data-root", default=None, help="reuse/build the synthetic datasets here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch_size} niches x <= "
          f"{args.max_cells} cells; {args.steps} steps; loader workers {args.workers}")
    if args.threads == 1:
        # worker processes inherit it through the environment only
        import os

        os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_root or tmp)
        rows = []
        for preset in args.presets:
            crop = 32 if preset == "tiny" else 64
            data_dir = root / f"synth_{crop}px"
            if not (data_dir / "README.md").is_file():
                _dataset(root, crop, args.sections, args.cells)
            model, train, collator, model_args, data_args, dataset = _setup(data_dir, preset, args.max_cells)
            n_params = sum(p.numel() for p in model.parameters())
            m = bench_model(model, train, collator, args.batch_size, args.steps)
            loaders = {w: bench_loader(train, collator, args.batch_size, args.steps, w) for w in args.workers}
            tr = bench_trainer(model_args, data_args, dataset, args.batch_size, args.steps, Path(tmp) / f"run_{preset}")
            print(f"\n[{preset}] {n_params / 1e6:.2f} M parameters, {crop} px crops, {len(train)} training niches")
            print(f"  model fwd+bwd+step  : {m['cells_per_s']:8.1f} cells/s  {m['niches_per_s']:7.1f} niches/s  "
                  f"{m['s_per_step'] * 1e3:7.1f} ms/step")
            for w, ld in loaders.items():
                ratio = ld["cells_per_s"] / m["cells_per_s"]
                rows.append((preset, n_params, m, w, ld, tr, ratio))
                print(f"  loader ({w} workers)  : {ld['cells_per_s']:8.1f} cells/s  {ld['niches_per_s']:7.1f} niches/s"
                      f"  = {ratio:.1f}x the model (goal >= 5x) {'OK' if ratio >= 5 else 'BELOW GOAL'}")
            print(f"  Trainer end to end  : {tr['niches_per_s']:8.1f} niches/s  {tr['s_per_step'] * 1e3:7.1f} ms/step")
    print("\npreset | params | model cells/s | loader workers | loader cells/s | loader/model | Trainer niches/s")
    for preset, n, m, w, ld, tr, ratio in rows:
        print(f"{preset} | {n / 1e6:.2f} M | {m['cells_per_s']:.0f} | {w} | {ld['cells_per_s']:.0f} | {ratio:.1f}x | "
              f"{tr['niches_per_s']:.1f}")


if __name__ == "__main__":
    main()
