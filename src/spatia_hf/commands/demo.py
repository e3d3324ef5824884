"""``spatia demo``: the whole of SPATIA on the built-in synthetic tissue, on a laptop CPU."""

from __future__ import annotations

import argparse

from spatia_hf.commands._common import add_device_and_seed

EXAMPLE = """example:
  spatia demo --out runs/demo          # about 10 minutes on 2 CPU cores
  spatia demo --quick --out runs/quick # about 2 minutes (tiny sizes)
Steps: synthesise sections -> build cells/niches/tissues datasets -> pretrain -> fine-tune annotation ->
train the generator -> evaluate the 12 tasks against baselines -> model cards and Hub-ready folders.
A step whose output exists is skipped, so an interrupted demo resumes."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run SPATIA end to end on the synthetic tissue (report, cards, Hub-ready folders)",
        description="SPATIA end to end on the built-in synthetic tissue with ground truth.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, about 2 minutes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_device_and_seed(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spatia_hf.demo import format_summary, run_demo

    result = run_demo(args.out, quick=args.quick, seed=args.seed, device=args.device,
                      progress=not args.no_progress)
    print()
    print(format_summary(result))
    return 0
