"""Arguments and helpers shared by several sub-commands."""

from __future__ import annotations

import argparse


def add_device_and_seed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (CUDA when present)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def resolve_device(name: str = "auto"):
    """'auto' picks CUDA, then MPS, then CPU; anything else is passed to torch.device."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)
