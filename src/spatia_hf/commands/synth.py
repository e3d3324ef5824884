"""``spatia synth``: write the synthetic tissue (h5ad + OME-TIFF per section, with ground truth)."""

from __future__ import annotations

import argparse
import time


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth", help="write a synthetic tissue with ground truth (.h5ad + 2-channel OME-TIFF per section)",
        description="Synthetic sections with cell types (marker genes + morphology), spatial domains, "
                    "neighbour-induced genes, a morphology-driving gene and tissue/condition labels. "
                    "Convert them with `spatia convert synthetic DIR --out DATASET` or `spatia convert anndata`.",
    )
    parser.add_argument("--out", required=True, help="folder to create")
    parser.add_argument("--sections", type=int, default=2, help="number of sections (default 2)")
    parser.add_argument("--cells", type=int, default=2000, help="cells per section (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--genes", type=int, default=200, help="gene panel size (default 200)")
    parser.add_argument("--cell-types", type=int, default=6, help="number of cell types, 5-8 (default 6)")
    parser.add_argument("--domains", type=int, default=3, help="spatial domains per section (default 3)")
    parser.add_argument("--domain-geometry", choices=("blobs", "bands"), default="blobs",
                        help="shape of the spatial domains: warped blobs (default) or parallel wavy bands (layers)")
    parser.add_argument("--pixel-size", type=float, default=0.5, help="µm per image pixel (default 0.5)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out if it exists (only this command's files are replaced)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spatia_hf.data.synthetic import write_synthetic

    start = time.perf_counter()
    try:
        entries = write_synthetic(
            args.out, args.sections, args.cells, args.seed, overwrite=args.overwrite,
            progress=not args.no_progress, n_genes=args.genes, n_cell_types=args.cell_types,
            n_domains=args.domains, domain_geometry=args.domain_geometry, pixel_size_um=args.pixel_size,
        )
    except FileExistsError as err:
        raise ValueError(str(err)) from None
    out = Path(args.out)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s ({len(entries)} sections, seed {args.seed}):")
    for e in entries:
        c, h, w = e["image_shape"]
        labels = ", ".join(f"{k}={v}" for k, v in e["section_labels"].items())
        print(f"  {e['sample_id']}: {e['n_cells']} cells -> {out / e['h5ad']}, {c}x{h}x{w} uint16 image "
              f"({e['pixel_size_um']:g} µm/px) -> {out / e['image']}  [{labels}]")
    print(f"  manifest and ground truth -> {out / 'synthetic.json'}")
    print(f"next: spatia convert synthetic {out} --out {out}-dataset")
    return 0
