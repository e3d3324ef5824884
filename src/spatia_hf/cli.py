"""``spatia`` command line: one sub-command per module in ``spatia_hf.commands``.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed ``argparse.Namespace``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "synth", "convert", "pretrain", "finetune", "embed", "generate", "evaluate", "push")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spatia",
        description="SPATIA: multi-scale multimodal models for image-based spatial transcriptomics.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"spatia-hf {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"spatia_hf.commands.{name}")
        except ModuleNotFoundError as err:  # a command not built yet
            if err.name != f"spatia_hf.commands.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def _version() -> str:
    from spatia_hf import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError) as err:  # user errors: one line, no traceback
        print(f"spatia {args.command}: error: {err}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
