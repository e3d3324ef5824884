"""Convert CosMx flat-file exports into a SPATIA multi-scale dataset.

Input: *_exprMat_file.csv, *_metadata_file.csv, CellComposite/ per-FOV images.

A thin front end of ``spatia convert cosmx``: same flags, same output (Parquet shards + card with the
``cells``, ``niches`` and ``tissues`` configs). Example::

    python dataset_scripts/convert_cosmx.py flatFiles/Run5_S1 --out data/cosmx_s1 --pixel-size 0.12028

Run with ``--help`` for every flag.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from spatia_hf.cli import main as spatia

    return spatia(["convert", "cosmx", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
