"""The GPU figures in one run (called by ``benchmarks/gpu_check.sh``; ``--device cpu`` runs the same code
paths at a tiny size, which the test suite does).

1. Pretraining throughput: ``SpatiaForPretraining`` at ``--preset`` (base: 224 px crops, SDPA attention),
   bf16 autocast on CUDA, AdamW, niche batches of a synthetic section built here; cells/s over the
   timed steps and peak GPU memory (``torch.cuda.max_memory_allocated``).
2. Generation throughput: ``SpatiaGenerationPipeline`` (UNet denoiser, random weights) at ``--gen-px``
   px, images/s of ``--gen-steps`` sampler steps, with token merging off and at ``--merge-ratio``.
3. With 2+ GPUs (and not ``--no-ddp``): one 2-process DDP pretraining run (``torchrun
   examples/pretrain.py``, bf16, a few steps), its world size read back from the run summary.
4. On CUDA (and not ``--no-fsdp``): FSDP2 through the Trainer with ``examples/accelerate_configs/fsdp.yaml``
   (one process per GPU, bf16, 3 steps), the saved full state dict loaded back with ``from_pretrained``.

Prints one ``RESULT {json}`` line per figure; ``--json`` also writes them all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def report(name: str, **values) -> dict:
    row = {"check": name, **values}
    print("RESULT " + json.dumps(row), flush=True)
    return row


def build_dataset(work: Path, n_cells: int, crop_px: int) -> Path:
    from spatia_hf.data.builder import build_multiscale_dataset
    from spatia_hf.data.synthetic import make_synthetic_sections

    return build_multiscale_dataset(make_synthetic_sections(1, n_cells, 0), work / "data", crop_px=crop_px,
                                    niche_px=min(crop_px, 128), thumb_px=256, overwrite=True, progress=False)


def check_pretraining(args, data: Path, device: torch.device) -> dict:
    from spatia_hf.data.datasets import load_spatia_dataset
    from spatia_hf.training.arguments import DataArguments, ModelArguments
    from spatia_hf.training.pretrain import build_pretraining_data, load_pretraining_model
    from spatia_hf.training.setup import build_processor

    dataset = load_spatia_dataset(data, ("cells", "niches"))
    model_args = ModelArguments(preset=args.preset, attn_implementation="sdpa")
    data_args = DataArguments(dataset_dir=str(data), eval_sections="", max_cells_per_niche=args.cells_per_niche)
    model = load_pretraining_model(model_args, data_args, dataset, 0).to(device)
    processor = build_processor(model_args, model.config, dataset, 0)
    train, _, collator = build_pretraining_data(data_args, dataset, processor, model, 0)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    order = np.random.default_rng(0).permutation(len(train))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cells = 0
    took = 0.0
    for step in range(args.warmup + args.steps):
        idx = [int(order[(step * args.batch + k) % len(order)]) for k in range(args.batch)]
        batch = {k: v.to(device, non_blocking=True) for k, v in collator(train.__getitems__(idx)).items()}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(**batch).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            took += time.perf_counter() - start
            cells += int(batch["cell_attention_mask"].sum())
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return report("pretraining", preset=args.preset, dtype="bf16" if use_bf16 else "fp32",
                  attn=model.config._attn_implementation, batch_niches=args.batch,
                  cells_per_step=cells / max(args.steps, 1), steps=args.steps, cells_per_s=cells / took,
                  peak_gpu_memory_gb=peak, loss=float(loss.detach()), finite=bool(torch.isfinite(loss)))


def check_generation(args, device: torch.device) -> list[dict]:
    from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline

    genes = [f"G{i}" for i in range(args.gen_genes)]
    torch.manual_seed(0)
    pipe = SpatiaGenerationPipeline.from_genes(genes, image_size=args.gen_px, size=args.gen_preset, denoiser="unet")
    pipe.set_progress_bar_config(disable=True)
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    pipe = pipe.to(device=device, dtype=dtype)
    expression = np.random.default_rng(0).poisson(1.0, size=(args.gen_batch, len(genes))).astype(np.float32)
    rows = []
    for ratio in (0.0, args.merge_ratio):
        pipe.set_token_merging(ratio)
        pipe(expression, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = pipe(expression, num_inference_steps=args.gen_steps, output_type="np",
                   generator=torch.Generator().manual_seed(0))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        took = time.perf_counter() - start
        rows.append(report("generation", px=args.gen_px, preset=args.gen_preset, dtype=str(dtype).split(".")[-1],
                           token_merging_ratio=ratio, batch=args.gen_batch, steps=args.gen_steps,
                           images_per_s=args.gen_batch / took, finite=bool(np.isfinite(out.images).all())))
    rows[-1]["speedup_vs_no_merging"] = rows[-1]["images_per_s"] / rows[0]["images_per_s"]
    print(f"token merging {args.merge_ratio}: {rows[-1]['speedup_vs_no_merging']:.2f}x images/s", flush=True)
    return rows


def example_pretrain(args, data: Path, out: Path) -> list[str]:
    """``examples/pretrain.py`` and its arguments for the launch checks: 3 bf16 steps of ``--ddp-preset``."""
    return [str(REPO / "examples" / "pretrain.py"), "--dataset_dir", str(data), "--output_dir", str(out), "--preset",
            args.ddp_preset, "--max_steps", "3", "--per_device_train_batch_size", "2", "--bf16", "--save_strategy",
            "no", "--report_to", "none", "--logging_steps", "1", "--disable_tqdm", "true", "--eval_sections", ""]


def check_ddp(args, data: Path, work: Path) -> dict:
    out = work / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *example_pretrain(args, data, out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        return report("ddp", ok=False, error=proc.stderr[-2000:])
    summary = json.loads((out / "spatia_training.json").read_text())
    return report("ddp", ok=summary["world_size"] == 2, world_size=summary["world_size"],
                  global_step=summary["global_step"], seconds=time.perf_counter() - start)


def check_fsdp(args, data: Path, work: Path, n_gpus: int) -> dict:
    """FSDP2 through the Trainer with the shipped accelerate config (one process per GPU), then the saved
    full state dict loaded back with ``from_pretrained``."""
    out = work / "fsdp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "examples" / "accelerate_configs" / "fsdp.yaml"), "--num_processes", str(n_gpus),
           "--main_process_port", "29517", *example_pretrain(args, data, out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        return report("fsdp", ok=False, error=(proc.stdout + proc.stderr)[-3000:])
    summary = json.loads((out / "spatia_training.json").read_text())
    from spatia_hf import SpatiaForPretraining

    reloaded = SpatiaForPretraining.from_pretrained(out)
    finite = all(bool(torch.isfinite(p).all()) for p in reloaded.parameters())
    return report("fsdp", ok=summary["world_size"] == n_gpus and finite, world_size=summary["world_size"],
                  global_step=summary["global_step"], reloaded_parameters=sum(p.numel() for p in reloaded.parameters()),
                  logit_scale_shape=list(reloaded.logit_scale.shape), seconds=time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a tiny dry run of the same code)")
    p.add_argument("--preset", default="base")
    p.add_argument("--crop-px", type=int, default=224)
    p.add_argument("--cells", type=int, default=3000, help="cells of the synthetic section")
    p.add_argument("--batch", type=int, default=8, help="niches per step")
    p.add_argument("--cells-per-niche", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--gen-px", type=int, default=128)
    p.add_argument("--gen-preset", default="small")
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--gen-steps", type=int, default=20)
    p.add_argument("--gen-genes", type=int, default=200)
    p.add_argument("--merge-ratio", type=float, default=0.5)
    p.add_argument("--ddp-preset", default="small")
    p.add_argument("--no-ddp", action="store_true")
    p.add_argument("--no-fsdp", action="store_true", help="skip the FSDP2 launch (examples/accelerate_configs/fsdp.yaml)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--json", help="also write all results here")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU (torch.cuda.is_available() is False). Fix: run on a GPU "
                         "machine with a CUDA build of torch, or pass --device cpu for a dry run")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"GPU: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}",
              flush=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="spatia_gpu_check_"))
    start = time.perf_counter()
    data = build_dataset(work, args.cells, args.crop_px)
    results = [report("dataset", cells=args.cells, crop_px=args.crop_px, seconds=time.perf_counter() - start)]
    results.append(check_pretraining(args, data, device))
    results.extend(check_generation(args, device))
    if not args.no_ddp and device.type == "cuda" and torch.cuda.device_count() >= 2:
        results.append(check_ddp(args, data, work))
    else:
        results.append(report("ddp", skipped=f"{torch.cuda.device_count() if device.type == 'cuda' else 0} GPU(s)"))
    if not args.no_fsdp and device.type == "cuda":
        results.append(check_fsdp(args, data, work, torch.cuda.device_count()))
    else:
        results.append(report("fsdp", skipped="no GPU" if device.type != "cuda" else "--no-fsdp"))
    print(f"gpu_check done in {time.perf_counter() - start:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if not all(r.get("finite", True) and r.get("ok", True) for r in results):
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
