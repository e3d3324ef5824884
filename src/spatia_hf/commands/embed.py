"""``spatia embed``: SPATIA embeddings and spatial domains written into an AnnData."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from spatia_hf.commands._common import add_device_and_seed
from spatia_hf.utils.devices import resolve_device
from spatia_hf.utils.io import atomic_path

EXAMPLE = """example (a model you pretrained; `make demo` writes one to runs/demo/hub/model, but its vocabulary
is the synthetic panel, so it refuses real genes):
  spatia embed --model runs/mine/pretrained --adata section.h5ad --image morphology.ome.tif \\
      --pixel-size 0.2125 --spatial-units um --out section_spatia.h5ad
writes obsm["X_spatia"] (cell), obsm["X_spatia_niche"] (each cell's neighbourhood: its composition over the
model's cell states), obsm["X_spatia_niche_token"] (the niche transformer's pooled token), obs["spatia_domain"]
(Leiden, refined to the domain centres; --n-domains searches the resolution) and uns["spatia"] (parameters,
gene-panel coverage); everything else in the input is kept."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "embed", help="add SPATIA embeddings and spatial domains to an AnnData (.h5ad)",
        description="Embed every cell of an AnnData (raw counts + obsm['spatial']) with a SPATIA model, "
                    "using the section's morphology image.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="SPATIA checkpoint folder or Hub id")
    parser.add_argument("--adata", required=True, help="input .h5ad (raw counts in X or --layer)")
    parser.add_argument("--image", required=True, help="morphology image (.tif / .ome.tif), (C, H, W)")
    parser.add_argument("--pixel-size", type=float, default=None, help="µm per image pixel (default: from the file)")
    parser.add_argument("--out", required=True, help="output .h5ad (written atomically)")
    parser.add_argument("--spatial-key", default="spatial", help="obsm key of the centroids (default spatial)")
    parser.add_argument("--spatial-units", choices=("px", "um"), default="px",
                        help="units of obsm[--spatial-key]: pixels of --image (default; scanpy/squidpy) or µm "
                             "(spatialdata-io's Xenium/MERSCOPE tables)")
    parser.add_argument("--no-unit-check", action="store_true",
                        help="accept centroids that cover only a small corner of the image")
    parser.add_argument("--layer", default=None, help="layer with raw counts (default X)")
    domains = parser.add_mutually_exclusive_group()
    domains.add_argument("--n-domains", type=int, default=None,
                         help="target number of spatial domains (Leiden's resolution is searched for it)")
    domains.add_argument("--resolution", type=float, default=None,
                         help="Leiden resolution of the spatial domains (default 1.0 when --n-domains is not given)")
    parser.add_argument("--cluster-method", choices=("leiden", "kmeans"), default="leiden",
                        help="spatial-domain clustering: leiden (default) or kmeans (needs --n-domains)")
    parser.add_argument("--batch-size", type=int, default=64, help="cells per forward pass (default 64)")
    parser.add_argument("--min-gene-coverage", type=float, default=None,
                        help="refuse the input when less than this fraction of its genes is in the model "
                             "vocabulary (default: the model processor's, 0.5)")
    add_device_and_seed(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import anndata as ad

    from spatia_hf.tl import embed
    from spatia_hf.utils.hub_ids import resolve_folder

    for flag, path in (("--adata", args.adata), ("--image", args.image)):
        if not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path} does not exist")
    model = resolve_folder(args.model, what="--model", required=("config.json",))  # before reading the data
    out = Path(args.out)
    if out.suffix != ".h5ad":
        raise ValueError(f"--out {out}: expected a .h5ad path")
    start = time.perf_counter()
    try:
        adata = ad.read_h5ad(args.adata)
    except (OSError, KeyError, ValueError) as err:  # truncated / not HDF5
        raise ValueError(f"--adata {args.adata}: not a readable .h5ad ({type(err).__name__}: {err}). Fix: re-copy "
                         "or re-export the file") from None
    embed(adata, args.image, model, pixel_size_um=args.pixel_size, spatial_key=args.spatial_key,
          spatial_units=args.spatial_units, layer=args.layer, n_domains=args.n_domains,
          resolution=args.resolution, cluster_method=args.cluster_method,
          batch_size=args.batch_size, device=resolve_device(args.device), seed=args.seed,
          min_gene_coverage=args.min_gene_coverage, check_units=not args.no_unit_check,
          progress=not args.no_progress)
    with atomic_path(out) as tmp:
        adata.write_h5ad(tmp)
    cov = adata.uns["spatia"]["gene_coverage"]
    print(f"embedded {adata.n_obs} cells in {time.perf_counter() - start:.1f} s -> {out}")
    print(f"  obsm['X_spatia'] {adata.obsm['X_spatia'].shape}, obsm['X_spatia_niche'] "
          f"{adata.obsm['X_spatia_niche'].shape}, obs['spatia_domain'] "
          f"({adata.obs['spatia_domain'].nunique()} domains)")
    print(f"  gene panel: {cov['n_kept']}/{cov['n_panel_genes']} genes known to the model "
          f"({cov['n_unknown']} unknown)")
    return 0
