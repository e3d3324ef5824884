"""Write the synthetic tissue and (optionally) build its multi-scale dataset in one go.

    python dataset_scripts/make_synthetic.py --out data/synth --sections 2 --cells 2000 --seed 0 \
        --dataset data/synth-dataset

Same as ``spatia synth --out data/synth ...`` followed by
``spatia convert synthetic data/synth --out data/synth-dataset``.
"""

from __future__ import annotations

import argparse
import sys

from spatia_hf.cli import main as spatia


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the .h5ad + .ome.tif files")
    p.add_argument("--sections", type=int, default=2)
    p.add_argument("--cells", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--genes", type=int, default=200)
    p.add_argument("--dataset", help="also build the multi-scale dataset into this folder")
    p.add_argument("--overwrite", action="store_true")
    args, builder_args = p.parse_known_args(argv)
    extra = ["--overwrite"] if args.overwrite else []
    rc = spatia(["synth", "--out", args.out, "--sections", str(args.sections), "--cells", str(args.cells),
                 "--seed", str(args.seed), "--genes", str(args.genes), *extra])
    if rc or not args.dataset:
        return rc
    return spatia(["convert", "synthetic", args.out, "--out", args.dataset, *extra, *builder_args])


if __name__ == "__main__":
    sys.exit(main())
