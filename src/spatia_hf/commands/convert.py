"""``spatia convert <format> ... --out DIR``: any reader's Sections -> a multi-scale dataset.

One sub-command per entry of ``spatia_hf.data.readers.READERS``; this module adds the output and
builder flags shared by all of them, so a new format only brings its own input flags.
"""

from __future__ import annotations

import argparse
import time

from spatia_hf.data.defaults import (
    DEFAULT_CROP_PX,
    DEFAULT_CROP_UM,
    DEFAULT_NICHE_PX,
    DEFAULT_NICHE_UM,
    DEFAULT_THUMB_PX,
)
from spatia_hf.data.readers import READERS


def _keys(value: str | None) -> list[str] | None:
    return None if value is None else [k.strip() for k in value.split(",") if k.strip()]


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected 0 <= I < N")
    return i, n


def add_builder_arguments(parser: argparse.ArgumentParser) -> None:
    """Output and multi-scale builder flags (µm / px)."""
    g = parser.add_argument_group("dataset")
    g.add_argument("--out", required=True, help="dataset folder to create (Parquet shards + README.md card)")
    for flag, typ, default, what in (
        ("--crop-um", float, DEFAULT_CROP_UM, "cell crop side, µm"),
        ("--crop-px", int, DEFAULT_CROP_PX, "stored cell crop side, px"),
        ("--niche-um", float, DEFAULT_NICHE_UM, "niche grid tile side, µm"),
        ("--niche-px", int, DEFAULT_NICHE_PX, "stored niche image side, px"),
        ("--thumb-px", int, DEFAULT_THUMB_PX, "section thumbnail side, px"),
    ):
        g.add_argument(flag, type=typ, default=default, help=f"{what} (default {default:g})")
    g.add_argument("--label-keys", help="comma-separated obs columns carried as cell labels (default: the reader's)")
    g.add_argument("--value-keys", help="comma-separated numeric obs columns carried as per-cell values "
                                        "(default: all numeric obs columns)")
    g.add_argument("--gene-panel", choices=("first", "union"), default="first",
                   help="dataset genes: the first section's panel (default) or the union of all sections")
    g.add_argument("--outside", choices=("error", "drop"), default="error",
                   help="cells whose centroid is off the image: error (default) or drop and count them")
    if "--vocabulary" not in parser._option_string_actions:  # the instrument readers define it themselves
        g.add_argument("--vocabulary", metavar="PATH",
                       help="model folder (config.json) or gene list to report each section's gene coverage against")
    g.add_argument("--min-gene-coverage", type=float, default=0.0,
                   help="refuse a section when less than this fraction of its genes is in --vocabulary "
                        "(default 0: report only)")
    g.add_argument("--num-proc", type=int, default=1,
                   help="sections converted at once, each in its own one-thread process (default 1)")
    g.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                   help="convert only sections I, I+N, I+2N, ... (an array job's share, I from 0); join the N "
                        "outputs with `spatia convert join`")
    g.add_argument("--resume", action="store_true", help="reuse finished sections of an interrupted build")
    g.add_argument("--overwrite", action="store_true",
                   help="write into --out if it exists (only this command's files are replaced)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


DESCRIPTION = """Turn instrument output (or an AnnData + image) into the cells / niches / tissues dataset that
`spatia pretrain`, `spatia finetune` and `spatia evaluate` read: one cell-centred crop per cell with its
counts and position in µm, neighbourhoods around every cell, and one row per section.
Run `spatia convert FORMAT --help` for the flags of one format."""

EPILOG = """examples:
  spatia convert xenium   XENIUM_OUTPUT_DIR --out data/xenium
  spatia convert merscope MERSCOPE_REGION_DIR --out data/merscope
  spatia convert cosmx    COSMX_FLAT_FILES_DIR --out data/cosmx
  spatia convert anndata  --adata section.h5ad --image morphology.ome.tif --pixel-size 0.2125 \\
      --spatial-units um --out data/mine
then: datasets.load_dataset("data/xenium", "cells"), or spatia pretrain --data data/xenium --out runs/mine"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert instrument output / AnnData / synthetic sections into a multi-scale dataset",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    formats = parser.add_subparsers(dest="format", metavar="FORMAT")
    for name, entry in READERS.items():
        sub = formats.add_parser(name, help=entry.help, description=entry.help)
        entry.add_cli_arguments(sub)
        add_builder_arguments(sub)
        sub.set_defaults(func=run, reader=name)
    join = formats.add_parser("join", help="join the datasets of `--shard i/n` jobs into one dataset (one card, "
                                           "one gene panel)")
    join.add_argument("parts", nargs="+", help="dataset folders written by the shard jobs")
    join.add_argument("--out", required=True, help="joined dataset folder to create")
    join.add_argument("--move", action="store_true", help="move the shards instead of copying them")
    join.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    join.add_argument("--no-progress", action="store_true", help="no progress bars")
    join.set_defaults(func=run_join)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_join(args: argparse.Namespace) -> int:
    from spatia_hf.data.builder import load_sections_info
    from spatia_hf.data.join import join_datasets

    try:
        out = join_datasets(args.parts, args.out, move=args.move, overwrite=args.overwrite)
    except FileExistsError as err:
        raise ValueError(str(err)) from None
    secs = load_sections_info(out)["sections"]
    print(f"joined {len(args.parts)} part(s) into {out}: {len(secs)} section(s), "
          f"{sum(s['n_cells'] for s in secs)} cells")
    return 0


def run(args: argparse.Namespace) -> int:
    from spatia_hf.data.builder import build_multiscale_dataset, load_sections_info

    entry = READERS[args.reader]
    start = time.perf_counter()
    try:
        out = build_multiscale_dataset(
            entry.sections(args), args.out, crop_um=args.crop_um, crop_px=args.crop_px, niche_um=args.niche_um,
            niche_px=args.niche_px, thumb_px=args.thumb_px, label_keys=_keys(args.label_keys),
            value_keys=_keys(args.value_keys), gene_panel=args.gene_panel, outside=args.outside,
            resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
            vocabulary=getattr(args, "vocabulary", None), min_gene_coverage=args.min_gene_coverage,
            num_proc=args.num_proc, shard=args.shard,
        )
    except FileExistsError as err:
        raise ValueError(str(err)) from None
    info = load_sections_info(out)
    secs = info["sections"]
    n_cells = sum(s["n_cells"] for s in secs)
    took = time.perf_counter() - start
    print(f"wrote {out}: {len(secs)} section(s), {n_cells} cells, {sum(s['n_niches'] for s in secs)} niches, "
          f"{info['build']['n_genes']} genes in {took:.1f} s ({n_cells / max(took, 1e-9):.0f} cells/s)")
    for s in secs:
        dropped = ", ".join(f"{k}={v}" for k, v in s["dropped"].items()) or "none"
        print(f"  {s['sample_id']}: {s['n_cells']} cells, {s['n_niches']} niches, {s['n_crops_padded']} crops "
              f"padded at the border, dropped: {dropped}")
        if s.get("gene_coverage"):
            cov = s["gene_coverage"]
            print(f"    gene coverage: {len(cov['kept'])}/{cov['n_panel']} genes in the vocabulary, "
                  f"{len(cov['unknown'])} unknown (first: {cov['unknown'][:5]})")
    print(f'load with: datasets.load_dataset("{out}", "cells")  (configs: cells, niches, tissues)')
    return 0
