"""Wall time of the 12-task baseline suite with BLAS/torch threads capped to one vs the library
defaults, run in the same process on the same prepared inputs (ratio = default / capped).

Why: the suite's matrices are small (hundreds of cells x tens to hundreds of columns), and on a
shared CPU OpenBLAS spin-waits its threads; the ratio says whether ``num_threads=1`` pays here.
Also reports the per-task seconds of the capped run and checks that both runs give the same scores
up to floating-point noise (thread counts change summation order).

    python benchmarks/bench_evaluation.py --sections 4 --cells 200
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=int, default=4)
    parser.add_argument("--cells", type=int, default=200, help="cells per section")
    parser.add_argument("--epochs", type=int, default=4, help="image-CNN epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from spatia_hf.data.synthetic import build_tiny_dataset
    from spatia_hf.evaluation.metrics import METRIC_NAMES, load_metric
    from spatia_hf.evaluation.suite import prepare_suite, run_suite

    with tempfile.TemporaryDirectory() as tmp:
        data = build_tiny_dataset(Path(tmp) / "data", n_sections=args.sections, n_cells=args.cells, seed=args.seed)
        for name in METRIC_NAMES:  # loading evaluate and the modules is a one-off cost, kept out of the timing
            load_metric(name)
        inputs = prepare_suite(data, seed=args.seed)
        timings, results = {}, {}
        for label, threads in (("capped (1 thread)", 1), ("library default", None), ("capped again", 1)):
            t0 = time.perf_counter()
            results[label], _ = run_suite(inputs, cnn_epochs=args.epochs, num_threads=threads)
            timings[label] = time.perf_counter() - t0
    capped = min(timings["capped (1 thread)"], timings["capped again"])
    print(f"{args.sections} sections x {args.cells} cells, {args.epochs} CNN epochs")
    for label, t in timings.items():
        print(f"  {label:20s} {t:7.1f} s")
    print(f"  ratio default / capped: {timings['library default'] / capped:.2f}x")
    print("  per task (capped):", {r.task: r.details["seconds"] for r in results["capped (1 thread)"]})
    a = {r.task: r.scores for r in results["capped (1 thread)"]}
    b = {r.task: r.scores for r in results["capped again"]}
    print(f"  capped runs identical: {a == b}")


if __name__ == "__main__":
    main()
