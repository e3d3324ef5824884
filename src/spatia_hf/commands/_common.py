"""Arguments and helpers shared by several sub-commands."""

from __future__ import annotations

import argparse



def add_device_and_seed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (CUDA when present)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


