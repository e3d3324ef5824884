"""Run a callback right after a module finishes importing (a post-import hook), without importing it.

Used to register SPATIA with transformers' Auto classes only when transformers loads them, and to
silence a library's progress bars if it is first imported inside ``progress_bars(False)``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
import warnings
from types import ModuleType
from typing import Callable

Hook = Callable[[str], None]
_lock = threading.RLock()
_hooks: list[tuple[Callable[[str], bool], Hook]] = []  # (which module names, callback(name))


def initializing(name: str) -> bool:
    """Whether ``name`` is in ``sys.modules`` but still executing (a half-imported module)."""
    spec = getattr(sys.modules.get(name), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def _run_hooks(name: str) -> None:
    with _lock:
        hooks = [hook for wanted, hook in _hooks if wanted(name)]
    for hook in hooks:
        try:
            hook(name)
        except Exception as err:  # a hook must never break the user's import
            warnings.warn(f"spatia_hf: post-import hook {getattr(hook, '__qualname__', hook)!r} failed after "
                          f"importing {name!r}: {type(err).__name__}: {err}", RuntimeWarning, stacklevel=2)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the other finders, then wraps the module's loader to run the hooks."""

    def find_spec(self, fullname: str, path=None, target: ModuleType | None = None):
        with _lock:
            if not any(wanted(fullname) for wanted, _ in _hooks):
                return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        # A file loader is created per module, so patching the instance changes this module only.
        if isinstance(loader, (importlib.machinery.SourceFileLoader, importlib.machinery.SourcelessFileLoader)):
            exec_module = loader.exec_module

            def exec_then_hooks(module: ModuleType) -> None:
                exec_module(module)
                _run_hooks(fullname)

            loader.exec_module = exec_then_hooks
        return spec


_finder = _PostImportFinder()


def add_post_import_hook(wanted: Callable[[str], bool], hook: Hook) -> None:
    """Call ``hook(name)`` after each future import of a module for which ``wanted(name)`` is true."""
    with _lock:
        if any(h is hook for _, h in _hooks):
            return
        _hooks.append((wanted, hook))
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)


def remove_post_import_hook(hook: Hook) -> None:
    """Forget ``hook``; the finder leaves ``sys.meta_path`` when no hook is left."""
    with _lock:
        _hooks[:] = [(w, h) for w, h in _hooks if h is not hook]
        if not _hooks and _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
