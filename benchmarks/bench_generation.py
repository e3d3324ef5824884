"""Benchmark generation speed with token merging: images/s of ``SpatiaGenerationPipeline`` without
merging, with spatia_hf's spatially guided merging, and with tomesd, on the same seeds.

Ratios, not seconds, are the result: the variants run in this process, round-robin, each timed by
its fastest repeat (the least disturbed by other work on a shared machine). Quality is reported as
the change each variant causes relative to the unmerged pipeline on the same noise:

* ``rel_l2``: relative L2 distance of the generated images;
* ``feature_distance_change``: relative change of the Fréchet distance, in the rotation-invariant
  morphology feature space of ``spatia_hf.evaluation.generation``, between the generated cells and
  real crops (only with ``--dataset``); and the Fréchet distance of the merged set to the unmerged
  set, relative to the distance between two halves of the real crops.

Two denoisers:

* ``--pipeline DIR``: a trained pipeline (its ``small`` UNet has self-attention at 1/2 and 1/4 of
  the resolution; merging is applied at the finest of those, ``max_downsample`` 2);
* default, no ``--pipeline``: a 64 px UNet with self-attention at full resolution (the layout where
  attention dominates and merging pays; random weights, so only ``rel_l2`` is meaningful).

    python benchmarks/bench_generation.py                                   # 64 px, full-res attention
    python benchmarks/bench_generation.py --pipeline runs/gen/pipeline --dataset runs/data --batch 16
    python benchmarks/bench_generation.py --json out.json --threads 1
    python benchmarks/bench_generation.py --denoiser transformer --threads 1  # the small DiT, 64 px

Goal (issue 4): >= 1.5x images/s at <= 5% change.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def full_resolution_pipeline(size: int, seed: int, denoiser: str = "unet"):
    """A pipeline whose UNet has self-attention at full resolution (3 levels, 32/64/128 channels), or
    the ``small`` DiT (self-attention over the patch grid in every block)."""
    from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline

    torch.manual_seed(seed)
    genes = [f"GENE{i:03d}" for i in range(64)]
    if denoiser == "transformer":
        return SpatiaGenerationPipeline.from_genes(genes, image_size=size, size="small", denoiser="transformer")
    return SpatiaGenerationPipeline.from_genes(
        genes, image_size=size, size="small",
        unet_overrides=dict(block_out_channels=(32, 64, 128),
                            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")))


def conditions(pipe, dataset: str | None, n: int, seed: int):
    """``n`` expression rows (and their gene names, real crops and pixel size when a dataset is given)."""
    if dataset is None:
        rng = np.random.default_rng(seed)
        return rng.poisson(1.0, size=(n, len(pipe.genes))).astype(np.float32), list(pipe.genes), None, None
    from spatia_hf.data import schema
    from spatia_hf.data.datasets import load_spatia_dataset
    from spatia_hf.training.loop import dense_counts

    data = load_spatia_dataset(dataset, ["cells"])
    cells = data["cells"].with_format("numpy", columns=[schema.IMAGE, schema.GENE_INDICES, schema.GENE_COUNTS,
                                                        schema.PIXEL_SIZE_UM])
    rows = np.sort(np.random.default_rng(seed).permutation(len(cells))[: 2 * n])
    sub = cells[rows]
    counts = dense_counts(sub[schema.GENE_INDICES][:n], sub[schema.GENE_COUNTS][:n], len(data.genes)).numpy()
    real = np.asarray(sub[schema.IMAGE]).astype(np.uint8)
    return counts, list(data.genes), real, float(sub[schema.PIXEL_SIZE_UM][0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", help="trained pipeline folder (default: a 64 px full-resolution-attention UNet)")
    p.add_argument("--dataset", help="dataset folder for conditions and real crops (feature distance)")
    p.add_argument("--size", type=int, default=64, help="image side without --pipeline (default 64)")
    p.add_argument("--denoiser", choices=("unet", "transformer"), default="unet",
                   help="denoiser without --pipeline: the full-resolution UNet or the small DiT (no tomesd column)")
    p.add_argument("--batch", type=int, default=8, help="images per call (default 8)")
    p.add_argument("--steps", type=int, default=5, help="sampler steps per call (default 5)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="1 = no CFG (default)")
    p.add_argument("--ratio", type=float, default=0.5, help="merge ratio for both methods (default 0.5)")
    p.add_argument("--max-downsample", type=int, default=None,
                   help="merge at most this coarse (default: finest level with attention)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline

    if args.pipeline:
        pipe = SpatiaGenerationPipeline.from_pretrained(args.pipeline)
        pipe.set_token_merging(0.0)
    else:
        pipe = full_resolution_pipeline(args.size, args.seed, args.denoiser)
    pipe.set_progress_bar_config(disable=True)
    level = args.max_downsample or pipe.finest_attention_downsample()
    counts, genes, real, px = conditions(pipe, args.dataset, args.batch, args.seed)

    def generate() -> torch.Tensor:
        return pipe(counts, gene_names=genes, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                    generator=torch.Generator().manual_seed(args.seed), output_type="pt").images

    def with_ours():
        pipe.set_token_merging(args.ratio, level)
        return lambda: pipe.set_token_merging(0.0)

    variants = {"none": lambda: (lambda: None), "spatia_hf": with_ours}
    try:
        import tomesd

        def with_tomesd():
            tomesd.apply_patch(pipe.unet, ratio=args.ratio, max_downsample=level, use_rand=False)
            return lambda: tomesd.remove_patch(pipe.unet)

        if pipe.unet is not None:
            variants["tomesd"] = with_tomesd
        else:
            print("tomesd patches UNets only: its column is skipped for a transformer")
    except ImportError:
        print("tomesd not installed (pip install tomesd==0.1.3): its column is skipped")

    import warnings

    warnings.simplefilter("ignore", UserWarning)
    outputs, best = {}, {k: float("inf") for k in variants}
    for name, setup in variants.items():  # warm-up, and the outputs to compare
        undo = setup()
        outputs[name] = generate()
        undo()
    for _ in range(args.repeats):
        for name, setup in variants.items():
            undo = setup()
            start = time.perf_counter()
            generate()
            best[name] = min(best[name], time.perf_counter() - start)
            undo()

    base = outputs["none"]
    random = (f"random {args.size}px small DiT" if args.denoiser == "transformer"
              else f"random {args.size}px UNet, full-resolution attention")
    results = {"setup": {"pipeline": args.pipeline or random,
                         "image_size": pipe.image_size, "batch": args.batch, "steps": args.steps,
                         "guidance_scale": args.guidance_scale, "ratio": args.ratio, "max_downsample": level,
                         "threads": torch.get_num_threads(), "repeats": args.repeats, "seed": args.seed},
               "variants": {}}
    feats = {}
    if real is not None:
        from spatia_hf.evaluation.generation import _to_uint8, at_resolution, frechet_distance
        from spatia_hf.evaluation.morphology import morphology_features

        # compared at the crops' size and the generator's resolution, as evaluate_generator does (a 32 px
        # image measured with the 64 px crops' pixel size would be half the size in µm)
        crop_px = int(real.shape[-1])
        real = at_resolution(real, pipe.image_size)
        feats["real_a"] = morphology_features(real[: args.batch], px)
        feats["real_b"] = morphology_features(real[args.batch :], px)
        for name, out in outputs.items():
            feats[name] = morphology_features(_to_uint8([out], crop_px), px)
        real_gap = frechet_distance(feats["real_a"], feats["real_b"], feats["real_a"])
    for name, out in outputs.items():
        row = {"seconds": round(best[name], 3), "images_per_s": round(args.batch / best[name], 3),
               "speedup": round(best["none"] / best[name], 3),
               "rel_l2": round(float((out - base).norm() / base.norm()), 4)}
        if feats:
            fd0 = frechet_distance(feats["real_a"], feats["none"], feats["real_a"])
            fd = frechet_distance(feats["real_a"], feats[name], feats["real_a"])
            row["fd_to_real"] = round(fd, 3)
            row["feature_distance_change"] = round(abs(fd - fd0) / fd0, 4)
            row["fd_to_unmerged_over_real_gap"] = round(
                frechet_distance(feats["none"], feats[name], feats["real_a"]) / real_gap, 4)
        results["variants"][name] = row
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
