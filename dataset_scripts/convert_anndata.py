"""AnnData (.h5ad) + morphology image(s) -> a multi-scale dataset (cells / niches / tissues).

    python dataset_scripts/convert_anndata.py --adata a.h5ad b.h5ad --image a.ome.tif b.ome.tif \
        --pixel-size 0.2125 --label-keys cell_type --out data/my-dataset

A thin front end of ``spatia convert anndata`` (run ``--help`` for every flag).
"""

from __future__ import annotations

import sys

from spatia_hf.cli import main as spatia

if __name__ == "__main__":
    sys.exit(spatia(["convert", "anndata", *sys.argv[1:]]))
