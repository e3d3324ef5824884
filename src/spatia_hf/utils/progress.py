"""Show or hide every progress bar for the length of a block: ``with progress_bars(False): ...``.

SPATIA's own loops take a ``progress`` argument, but the libraries underneath draw their own bars:
``datasets`` (map, from_generator, Parquet writing), ``transformers`` (checkpoint loading),
``huggingface_hub`` (uploads, downloads), ``diffusers`` (component loading, and each pipeline's
denoising loop). ``progress_bars`` switches all of them and puts every switch back on exit, so
``progress=False`` in the Python API leaves no global state changed. A library that is not imported
yet is not imported for this (``diffusers`` alone takes seconds): if it is first imported inside
the block, a post-import hook switches it then, and the exit returns it to its own default.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

from .import_hooks import add_post_import_hook, remove_post_import_hook


@dataclass(frozen=True)
class _Switch:
    """How to read and set one library's global progress-bar switch (module: where the switch lives)."""

    module: str
    get: Callable[[Any], Any]  # module -> state to restore later
    set: Callable[[Any, bool], None]  # (module, enabled) -> None
    restore: Callable[[Any, Any], None]  # (module, state from get) -> None


def _hub_get(m: Any) -> dict:
    return dict(m.progress_bar_states)  # global switch plus per-group switches


def _hub_set(m: Any, enabled: bool) -> None:
    (m.enable_progress_bars if enabled else m.disable_progress_bars)()


def _hub_restore(m: Any, states: dict) -> None:
    m.progress_bar_states.clear()
    m.progress_bar_states.update(states)


def _flag_switch(module: str, is_enabled: str, enable: str, disable: str) -> _Switch:
    def set_(m: Any, enabled: bool) -> None:
        if bool(getattr(m, is_enabled)()) != enabled:
            getattr(m, enable if enabled else disable)()

    return _Switch(module, lambda m: bool(getattr(m, is_enabled)()), set_, set_)


SWITCHES: tuple[_Switch, ...] = (
    _Switch("huggingface_hub.utils.tqdm", _hub_get, _hub_set, _hub_restore),
    _flag_switch("transformers.utils.logging", "is_progress_bar_enabled", "enable_progress_bar",
                 "disable_progress_bar"),
    _flag_switch("datasets.utils.tqdm", "is_progress_bar_enabled", "enable_progress_bars", "disable_progress_bars"),
    _flag_switch("diffusers.utils.logging", "is_progress_bar_enabled", "enable_progress_bar", "disable_progress_bar"),
)
_lock = threading.RLock()


def _quietly(fn: Callable[..., None], *args: Any) -> None:
    """Libraries warn when an environment variable (HF_HUB_DISABLE_PROGRESS_BARS=...) overrides a switch;
    the variable wins, as the user asked, and the warning would only be noise here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(*args)


@contextlib.contextmanager
def progress_bars(enabled: bool = True, pipelines: Iterable[Any] = ()) -> Iterator[None]:
    """Within the block, show (``enabled=True``) or hide every progress bar of huggingface_hub,
    transformers, datasets and diffusers, and of the given diffusers ``pipelines`` (their denoising
    loop); on exit every switch is put back as it was.

    The switches are process-wide: another thread drawing bars during the block is affected too.
    """
    saved: list[tuple[_Switch, Any, Any]] = []  # (switch, module, state to restore)
    loaded_inside: list[_Switch] = []

    def switch_late(name: str) -> None:  # a library first imported inside the block
        for switch in SWITCHES:
            if switch.module == name:
                with _lock:
                    loaded_inside.append(switch)
                _quietly(switch.set, sys.modules[name], enabled)

    with _lock:
        for switch in SWITCHES:
            module = sys.modules.get(switch.module)
            if module is not None:
                saved.append((switch, module, switch.get(module)))
                _quietly(switch.set, module, enabled)
    add_post_import_hook(lambda name: name in {s.module for s in SWITCHES}, switch_late)
    pipes = list(pipelines)
    pipe_configs = [dict(getattr(p, "_progress_bar_config", None) or {}) for p in pipes]
    for pipe, config in zip(pipes, pipe_configs):
        pipe.set_progress_bar_config(**{**config, "disable": not enabled})
    try:
        yield
    finally:
        remove_post_import_hook(switch_late)
        for pipe, config in zip(pipes, pipe_configs):
            pipe.set_progress_bar_config(**config)
        with _lock:
            for switch, module, state in reversed(saved):
                _quietly(switch.restore, module, state)
            for switch in loaded_inside:  # back to the library's default: on unless its env variable says off
                module = sys.modules.get(switch.module)
                if module is not None:
                    _quietly(switch.set, module, _default_enabled(switch))


# the environment variable that turns a library's bars off at its import (diffusers has none)
_DEFAULT_OFF_ENV = {"huggingface_hub.utils.tqdm": "HF_HUB_DISABLE_PROGRESS_BARS",
                    "transformers.utils.logging": "HF_HUB_DISABLE_PROGRESS_BARS",
                    "datasets.utils.tqdm": "HF_DATASETS_DISABLE_PROGRESS_BARS"}


def _default_enabled(switch: _Switch) -> bool:
    env = _DEFAULT_OFF_ENV.get(switch.module)
    return env is None or os.environ.get(env, "").upper() not in {"1", "ON", "YES", "TRUE"}


F = TypeVar("F", bound=Callable[..., Any])


def respects_progress(func: F) -> F:
    """Decorate a public function with a ``progress`` argument: ``progress=False`` also hides the bars
    of the libraries it calls (for the call only)."""
    signature = inspect.signature(func)
    default = signature.parameters["progress"].default

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind_partial(*args, **kwargs)
        if bound.arguments.get("progress", default) is False:
            with progress_bars(False):
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
