"""``spatia`` command line: one sub-command per module in ``spatia_hf.commands``.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed ``argparse.Namespace``.

Only the command being run is registered in full (``spatia convert`` loads every reader to build its
flags); the others get a one-line entry, so ``spatia --help`` stays fast. ``--no-progress`` on any
command hides every progress bar, including those of datasets, transformers, diffusers and
huggingface_hub (see ``spatia_hf.utils.progress``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings
from types import ModuleType

COMMANDS = ("demo", "synth", "convert", "pretrain", "finetune", "embed", "generate", "evaluate", "push")


class _Registered(BaseException):
    """Raised by ``_SummaryOnly.add_parser`` to stop a ``register`` once its one-line help is known
    (a BaseException, so an ``except Exception`` inside a ``register`` cannot swallow it)."""


class _SummaryOnly:
    """Stands in for the sub-parsers object to read a command's ``help=`` without running the rest of
    its ``register`` (which may import readers, pandas, ...)."""

    def __init__(self) -> None:
        self.help: str | None = None

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        self.help = kwargs.get("help")
        raise _Registered(name)


def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"spatia_hf.commands.{name}")
    except ModuleNotFoundError as err:  # a command not built yet
        if err.name != f"spatia_hf.commands.{name}":
            raise
        return None


def _summary(module: ModuleType) -> str | None:
    recorder = _SummaryOnly()
    with contextlib.suppress(_Registered):
        module.register(recorder)
    return recorder.help


def _chosen_command(argv: list[str]) -> str | None:
    """The sub-command named on the command line (the top-level parser takes no option values)."""
    for token in argv:
        if token == "--":
            return None
        if not token.startswith("-"):
            return token if token in COMMANDS else None
    return None


def _add_no_progress(parser: argparse.ArgumentParser) -> None:
    """Every command accepts ``--no-progress`` (those that define it keep their own; a command with
    sub-commands, like ``convert``, leaves it to them)."""
    if parser._subparsers is None and "--no-progress" not in parser._option_string_actions:
        parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``spatia`` parser. With ``argv``, only the command named there is registered in full;
    without, every command is (slower: each may import its dependencies)."""
    parser = argparse.ArgumentParser(
        prog="spatia",
        description="SPATIA: multi-scale multimodal models for image-based spatial transcriptomics.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"spatia-hf {_version()}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also accepted after the command)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen_command(argv) if argv is not None else None
    for name in COMMANDS:
        if argv is not None and chosen is not None and name != chosen:
            subparsers.add_parser(name)  # known name, never parsed: no need to load it
            continue
        module = _load(name)
        if module is None:
            continue
        if argv is not None and name != chosen:
            subparsers.add_parser(name, help=_summary(module))
            continue
        module.register(subparsers)
        _add_no_progress(subparsers.choices[name])
    return parser


def _version() -> str:
    from spatia_hf.utils.version import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, argv = _take_debug(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    quiet = bool(getattr(args, "no_progress", False))
    from spatia_hf.utils.allocator import bound_heap_growth

    bound_heap_growth()  # long runs give freed activations back to the OS (see utils/allocator.py)
    with warnings.catch_warnings():
        if not debug:  # library warnings as one line each, not file:line + source
            warnings.showwarning = _one_line_warning
        try:
            with _progress(quiet):
                result = args.func(args)
        except EXPECTED_ERRORS as err:
            if debug:
                raise
            print(f"spatia {args.command}: error: {_one_line(err)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"spatia {args.command}: interrupted", file=sys.stderr)
            return 130
    return int(result or 0)


# Failures a user can cause and fix (bad paths, values, files, network, a missing optional package):
# one line on stderr and exit code 1. Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (OSError, ValueError, ImportError)


def _take_debug(argv: list[str]) -> tuple[bool, list[str]]:
    """``--debug`` anywhere before ``--`` (or SPATIA_DEBUG=1): tracebacks instead of one-line errors."""
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end] or os.environ.get("SPATIA_DEBUG", "") not in ("", "0")
    return debug, [a for i, a in enumerate(argv) if not (a == "--debug" and i < end)]


def _one_line(err: BaseException) -> str:
    """The error's message on one line: ours already are; others keep their first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    text = lines[0] if len(lines) == 1 else f"{lines[0]} (run with --debug for the full message)"
    return text if isinstance(err, (ValueError, FileNotFoundError)) else f"{type(err).__name__}: {text}"


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split())
    print(f"spatia: warning: {text}", file=sys.stderr if file is None else file)


def _progress(quiet: bool) -> contextlib.AbstractContextManager:
    if not quiet:
        return contextlib.nullcontext()
    from spatia_hf.utils.progress import progress_bars

    return progress_bars(False)


if __name__ == "__main__":
    sys.exit(main())
