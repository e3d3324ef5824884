"""Compare the generator's two denoisers: the ``small`` UNet and the ``small`` DiT (PixArt transformer).

Reports parameter counts and, as ratios against the UNet measured in the same process, the time
of one training step (``diffusion_loss`` forward + backward + AdamW step, the training loop's work
per batch) and of one sampling forward (no grad, classifier-free guidance doubles the batch). The
variants run round-robin; each is timed by its fastest repeat (the least disturbed by other work
on a shared machine). Random weights, synthetic data: this measures cost, not quality.

    python benchmarks/bench_denoisers.py --threads 1                  # 32 px, batch 32
    python benchmarks/bench_denoisers.py --threads 1 --size 64 --batch 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def build(denoiser: str, genes: list[str], size: int, preset: str, seed: int):
    from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline

    torch.manual_seed(seed)
    return SpatiaGenerationPipeline.from_genes(genes, image_size=size, size=preset, denoiser=denoiser)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32, help="image side in px (default 32)")
    p.add_argument("--batch", type=int, default=32, help="cells per training step (default 32)")
    p.add_argument("--preset", default="small", help="tiny, small or base (default small)")
    p.add_argument("--genes", type=int, default=64, help="gene panel size (default 64)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from spatia_hf.pipelines.denoisers import denoise, training_scheduler
    from spatia_hf.training.generator import diffusion_loss

    genes = [f"GENE{i:03d}" for i in range(args.genes)]
    rng = np.random.default_rng(args.seed)
    clean = torch.from_numpy(rng.uniform(-1, 1, size=(args.batch, 2, args.size, args.size)).astype(np.float32))
    counts = torch.from_numpy(rng.poisson(2.0, size=(args.batch, args.genes)).astype(np.float32))
    sched = training_scheduler()
    pipes = {name: build(name, genes, args.size, args.preset, args.seed) for name in ("unet", "transformer")}

    def train_step(pipe, opt):
        def run():
            loss = diffusion_loss(pipe.denoiser, pipe.condition_encoder, sched, clean, counts,
                                  torch.Generator().manual_seed(args.seed), 0.1, 5.0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    def sample_forward(pipe):
        cond = pipe.encode_expression(counts, do_classifier_free_guidance=True).detach()
        glob = pipe.encode_global_condition(counts, True, cond)
        x = torch.cat([clean, clean])
        t = torch.tensor(500)

        def run():
            with torch.no_grad():
                denoise(pipe.denoiser, x, t, cond, None if glob is None else glob.detach())
        return run

    work = {}
    for name, pipe in pipes.items():
        params = list(pipe.denoiser.parameters()) + list(pipe.condition_encoder.parameters())
        work[("train_step", name)] = train_step(pipe, torch.optim.AdamW(params, lr=1e-4))
        work[("sample_forward", name)] = sample_forward(pipe)
    best = {k: float("inf") for k in work}
    for fn in work.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for key, fn in work.items():
            start = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - start)

    results = {"setup": {"image_size": args.size, "batch": args.batch, "preset": args.preset, "genes": args.genes,
                         "threads": torch.get_num_threads(), "repeats": args.repeats, "seed": args.seed},
               "denoisers": {}}
    for name, pipe in pipes.items():
        cfg = pipe.denoiser.config
        results["denoisers"][name] = {
            "class": type(pipe.denoiser).__name__,
            "parameters": sum(p.numel() for p in pipe.denoiser.parameters()),
            "tokens_per_image": ((args.size // cfg.patch_size) ** 2 if name == "transformer" else None),
            "train_step_s": round(best[("train_step", name)], 4),
            "sample_forward_s": round(best[("sample_forward", name)], 4),
            "train_step_vs_unet": round(best[("train_step", name)] / best[("train_step", "unet")], 3),
            "sample_forward_vs_unet": round(best[("sample_forward", name)] / best[("sample_forward", "unet")], 3),
        }
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
