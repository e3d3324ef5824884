"""One rule for what leaves a reader: the package's clear errors, never a dependency's exception.

Kept free of heavy imports so every reader module can use it at import time.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable


def _is_clear(err: BaseException) -> bool:
    return "Fix:" in str(err) and type(err).__module__.split(".")[0] in ("builtins", "spatia_hf")


def clear_reader_errors(what: str) -> Callable:
    """Decorator of a reader entry point: an exception of a dependency (h5py, pyarrow, pandas, tifffile,
    numpy, ...) that no specific check caught leaves as one ``ValueError`` naming the input and a fix,
    never as a traceback from inside the dependency. The package's own errors pass unchanged."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def reader(source: Any, *args, **kwargs):
            try:
                return fn(source, *args, **kwargs)
            except Exception as err:
                if _is_clear(err):
                    raise
                name = source if isinstance(source, (str, Path)) else f"the {type(source).__name__} given"
                raise ValueError(f"{name}: cannot be read ({what}; {type(err).__name__}: {err}). Fix: check that the "
                                 f"input is an unmodified {what} (re-copy or re-export it)") from None

        return reader

    return wrap
