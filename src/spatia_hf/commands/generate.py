"""``spatia generate``: cell images from expression with a trained ``SpatiaGenerationPipeline``.

Expression comes from a file (``--expression``: ``.h5ad``, ``.csv``/``.tsv`` with gene columns, or
``.npy`` with ``--gene-names``) or from the cells of a built dataset (``--dataset``). Writes to
``--out`` (assembled in a temporary folder, moved into place when complete; other files in OUT are kept):

```
OUT/images.npy            uint8 (N, C, H, W) generated crops (np.load(..., allow_pickle=False))
OUT/perturbed.npy         the same cells after --perturb, same noise (only with --perturb)
OUT/grid.png              RGB contact sheet (DAPI blue, boundary green); control | perturbed pairs
OUT/generation.json       pipeline, inputs, cell ids, seed, steps, guidance, unknown genes
```
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from ..utils.devices import resolve_device
from ..utils.io import staged_dir, write_json
from ._common import add_device_and_seed


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate cell images from expression with a trained generation pipeline",
        description="Generate cell images (stain channels) conditioned on expression. Example: spatia generate "
                    "--pipeline runs/demo/generator/pipeline --dataset runs/demo/dataset --cells 32 --perturb NUCSIZE=4 "
                    "--out runs/generated",
    )
    parser.add_argument("--pipeline", required=True,
                        help="folder or Hub id (ORG/NAME) of a saved SpatiaGenerationPipeline")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--expression", help="counts file: .h5ad, .csv/.tsv (cells x genes, header = genes) or .npy")
    source.add_argument("--dataset", help="built dataset folder: condition on its cells")
    parser.add_argument("--out", required=True, help="output folder (images.npy, grid.png, generation.json)")
    parser.add_argument("--gene-names", help="text file, one gene per line (for .npy expression; default: the "
                                             "pipeline's panel order)")
    parser.add_argument("--sections", nargs="*", help="with --dataset: only these sample_ids")
    parser.add_argument("--cells", type=int, default=16, help="at most this many cells (default 16; 0 = all)")
    parser.add_argument("--perturb", action="append", default=[], metavar="GENE=FOLD",
                        help="also generate with GENE's counts x FOLD from the same noise (repeatable)")
    parser.add_argument("--steps", type=int, default=30, help="sampler steps (default 30)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: "
                                                                           "the pipeline's)")
    parser.add_argument("--perturbation-guidance", type=float, default=None,
                        help="with --perturb: extra guidance along each edit, w_p x (eps(edited) - eps(unedited)) "
                             "(default: the pipeline's)")
    parser.add_argument("--images-per-cell", type=int, default=1, help="images per cell (default 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="cells per pipeline call (default 32)")
    parser.add_argument("--token-merging", type=float, default=None, help="token merging ratio in the denoiser's "
                                                                          "self-attention (default: as saved)")
    parser.add_argument("--min-gene-coverage", type=float, default=0.0,
                        help="refuse expression of which less than this fraction of genes is in the pipeline's "
                             "panel (default 0: any overlap)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out if it exists (only this command's files are replaced)")
    add_device_and_seed(parser)
    parser.set_defaults(func=run)


def parse_perturbation(items: list[str]) -> dict[str, float] | None:
    """``["GENE=4", "OTHER=0.5"]`` -> ``{"GENE": 4.0, "OTHER": 0.5}``."""
    out: dict[str, float] = {}
    for item in items:
        gene, sep, fold = item.partition("=")
        try:
            value = float(fold)
        except ValueError:
            value = math.nan
        if not sep or not gene or not math.isfinite(value):
            raise ValueError(f"--perturb {item!r}: expected GENE=FOLD with a number, e.g. --perturb NUCSIZE=4")
        out[gene] = value
    return out or None


def _read_expression(args) -> tuple[object, list[str] | None, list[str]]:
    """(expression matrix, gene names or None, cell ids)."""
    import numpy as np

    path = Path(args.expression)
    if not path.is_file():
        raise FileNotFoundError(f"--expression {path}: no such file")
    names = None
    if args.gene_names:
        names = [g.strip() for g in Path(args.gene_names).read_text().splitlines() if g.strip()]
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        import anndata as ad

        adata = ad.read_h5ad(path)
        return adata.X, names or [str(g) for g in adata.var_names], [str(c) for c in adata.obs_names]
    if suffix in (".csv", ".tsv", ".txt"):
        import pandas as pd

        df = pd.read_csv(path, sep="\t" if suffix != ".csv" else ",", index_col=0)
        return df.to_numpy(), names or [str(c) for c in df.columns], [str(i) for i in df.index]
    if suffix == ".npy":
        x = np.load(path, allow_pickle=False)
        x = x[None] if x.ndim == 1 else x
        return x, names, [f"cell_{i}" for i in range(len(x))]
    raise ValueError(f"--expression {path}: unsupported file type {suffix!r}. Fix: use .h5ad, .csv, .tsv or .npy")


def _read_dataset(args) -> tuple[object, list[str], list[str]]:
    import numpy as np

    from spatia_hf.data import schema
    from ..data.datasets import load_spatia_dataset
    from spatia_hf.training.loop import dense_counts

    data = load_spatia_dataset(args.dataset, ["cells"])
    cells = data["cells"]
    if args.sections:
        sample = np.asarray(cells[schema.SAMPLE_ID]).astype(str)
        unknown = sorted(set(args.sections) - set(sample.tolist()))
        if unknown:
            raise ValueError(f"--sections {unknown}: not in {args.dataset}; its sections are {sorted(set(sample))}")
        cells = cells.select(np.flatnonzero(np.isin(sample, args.sections)))
    n = len(cells) if args.cells == 0 else min(args.cells, len(cells))
    rows = np.sort(np.random.default_rng(args.seed).permutation(len(cells))[:n])
    sub = cells.with_format("numpy", columns=[schema.CELL_ID, schema.GENE_INDICES, schema.GENE_COUNTS])[rows]
    counts = dense_counts(sub[schema.GENE_INDICES], sub[schema.GENE_COUNTS], len(data.genes)).numpy()
    return counts, list(data.genes), [str(c) for c in sub[schema.CELL_ID]]


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from spatia_hf.evaluation.generation import save_rgb_png, tile_rgb
    from ..pipelines.image_processing import render_rgb
    from ..pipelines.pipeline_spatia import (DEFAULT_GUIDANCE_SCALE, DEFAULT_PERTURBATION_GUIDANCE,
                                             SpatiaGenerationPipeline)
    from ..utils.hub_ids import resolve_folder

    start = time.perf_counter()
    pipeline_dir = resolve_folder(args.pipeline, what="--pipeline", required=("model_index.json",))
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out {out} exists. Fix: choose another folder or pass --overwrite")
    perturbation = parse_perturbation(args.perturb)
    pipe = SpatiaGenerationPipeline.from_pretrained(pipeline_dir).to(resolve_device(args.device))
    pipe.set_progress_bar_config(disable=True)
    if args.token_merging is not None:
        pipe.set_token_merging(args.token_merging)
    expression, names, cell_ids = _read_expression(args) if args.expression else _read_dataset(args)
    if hasattr(expression, "toarray"):
        expression = expression.toarray()
    expression = np.asarray(expression)
    if expression.ndim == 1:
        expression = expression[None]
    if args.expression and args.cells:
        expression, cell_ids = expression[: args.cells], cell_ids[: args.cells]

    kwargs = {k: v for k, v in (("guidance_scale", args.guidance_scale),
                                ("perturbation_guidance", args.perturbation_guidance)) if v is not None}
    images, perturbed, unknown = [], [], []
    batches = range(0, len(expression), args.batch_size)
    for k, s in enumerate(tqdm(batches, desc="generating", unit="batch")):
        result = pipe(expression[s : s + args.batch_size], gene_names=names, perturbation=perturbation,
                      num_inference_steps=args.steps, num_images_per_expression=args.images_per_cell,
                      generator=torch.Generator().manual_seed(args.seed + k), output_type="pt",
                      min_gene_coverage=args.min_gene_coverage, **kwargs)
        images.append(result.images)
        unknown = result.unknown_genes or unknown
        if perturbation:
            perturbed.append(result.perturbed_images)

    def to_uint8(parts):
        return (torch.cat(parts).clamp(0, 1) * 255).round().to(torch.uint8).numpy()

    # over an earlier --out: only this command's files are replaced (perturbed.npy of an earlier perturbation run
    # is stale when this one has none)
    with staged_dir(out, stale=lambda rel: str(rel) == "perturbed.npy") as tmp:
        control = to_uint8(images)
        np.save(tmp / "images.npy", control)
        rgb = render_rgb(control / 255.0, pipe.config.channel_names)
        if perturbation:
            edited = to_uint8(perturbed)
            np.save(tmp / "perturbed.npy", edited)
            rgb_p = render_rgb(edited / 255.0, pipe.config.channel_names)
            rows = [[rgb[i], rgb_p[i]] for i in range(len(rgb))]
            per_row = 4
            rows = [sum(rows[i : i + per_row], []) for i in range(0, len(rows), per_row)]
        else:
            rows = [list(rgb[i : i + 8]) for i in range(0, len(rgb), 8)]
        save_rgb_png(tile_rgb(rows), tmp / "grid.png")
        meta = {"pipeline": str(args.pipeline), "source": args.expression or args.dataset, "n_cells": len(expression),
                "images_per_cell": args.images_per_cell, "cell_ids": cell_ids, "perturbation": perturbation,
                "steps": args.steps, "guidance_scale": kwargs.get("guidance_scale", DEFAULT_GUIDANCE_SCALE),
                "perturbation_guidance": kwargs.get("perturbation_guidance", DEFAULT_PERTURBATION_GUIDANCE)
                if perturbation else None, "seed": args.seed,
                "token_merging_ratio": pipe.config.token_merging_ratio, "channel_names": pipe.config.channel_names,
                "image_shape": list(control.shape[1:]), "unknown_genes": unknown}
        write_json(tmp / "generation.json", meta)
    what = f" + {len(control)} perturbed ({perturbation})" if perturbation else ""
    print(f"generated {len(control)} images{what} ({control.shape[1]}x{control.shape[2]}x{control.shape[3]}) in "
          f"{time.perf_counter() - start:.1f} s -> {out / 'images.npy'}, {out / 'grid.png'}")
    return 0
