"""Convert MERSCOPE region folders into a SPATIA multi-scale dataset.

Input: cell_by_gene.csv, cell_metadata.csv, images/mosaic_*_z*.tif + transform.

A thin front end of ``spatia convert merscope``: same flags, same output (Parquet shards + card with the
``cells``, ``niches`` and ``tissues`` configs). Example::

    python dataset_scripts/convert_merscope.py region_0 --out data/merscope_r0 --stains DAPI,PolyT --z 3

Run with ``--help`` for every flag.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from spatia_hf.cli import main as spatia

    return spatia(["convert", "merscope", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
