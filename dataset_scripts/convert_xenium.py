"""Convert 10x Xenium output folders into a SPATIA multi-scale dataset.

Input: cell_feature_matrix.h5, cells.parquet, experiment.xenium, morphology OME-TIFF.

A thin front end of ``spatia convert xenium``: same flags, same output (Parquet shards + card with the
``cells``, ``niches`` and ``tissues`` configs). Example::

    python dataset_scripts/convert_xenium.py outs/ --out data/xenium_lung --section-label tissue=lung

Run with ``--help`` for every flag.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from spatia_hf.cli import main as spatia

    return spatia(["convert", "xenium", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
