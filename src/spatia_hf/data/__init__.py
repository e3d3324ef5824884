"""Readers per technology, the multi-scale builder, collators and the synthetic tissue.

Lazy (PEP 562): ``spatia_hf.data.Section`` imports pandas/scipy on first access, so light modules
such as ``spatia_hf.data.defaults`` (used by ``spatia --help``) stay light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {"Section": "section"}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:
    from .section import Section
