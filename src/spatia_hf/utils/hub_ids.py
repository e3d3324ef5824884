"""One way from "a local folder or a Hub id" to a local folder, with failures a user can act on.

Every place that takes a checkpoint, pipeline or dataset (``SpatiaProcessor.from_pretrained``,
``SpatiaGenerationPipeline.from_pretrained``, ``spatia_hf.tl``, ``spatia embed / generate / evaluate``)
calls :func:`resolve_folder` (``huggingface_hub.snapshot_download``) or :func:`resolve_file`
(``hf_hub_download``): a folder on disk is returned as it is; an ``ORG/NAME`` id is downloaded once
into the Hub cache and read from there afterwards (also with ``HF_HUB_OFFLINE=1``). When the id is
neither on disk nor in the cache and the Hub cannot be reached, the error is ONE line with the fix,
instead of huggingface_hub's and transformers' paragraphs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

# Pickle-based weight files are never fetched (safetensors only).
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class HubUnavailableError(FileNotFoundError):
    """A Hub id that is not in the local cache while the Hub cannot be reached (offline or unreachable)."""


def is_hub_id(text: str | os.PathLike) -> bool:
    """True for ``ORG/NAME`` (not an absolute path, not ``./x``, not an existing file or folder)."""
    s = os.fspath(text)
    return bool(_HUB_ID.match(s)) and not Path(s).exists()


def hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE=1``, read when it was imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _download_hint(repo_id: str, repo_type: str) -> str:
    kind = "" if repo_type == "model" else f" --repo-type {repo_type}"
    return f"`hf download {repo_id}{kind}`"


def _translate(err: Exception, repo_id: str, what: str, repo_type: str) -> Exception:
    """huggingface_hub's exceptions -> one line naming the id and the fix."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, LocalEntryNotFoundError):
        why = "the Hub is offline (HF_HUB_OFFLINE=1)" if hub_offline() else "the Hub cannot be reached"
        return HubUnavailableError(
            f"{what} {repo_id!r} is not a local folder, not in the Hub cache, and {why}. Fix: download it with "
            f"{_download_hint(repo_id, repo_type)} on a machine with network (then copy the cache or the folder "
            "here), or pass a local folder")
    if isinstance(err, GatedRepoError):
        return PermissionError(f"{what} {repo_id!r} is gated on the Hub. Fix: accept its conditions on the Hub page "
                               "and log in with `hf auth login` (or set HF_TOKEN)")
    if isinstance(err, RepositoryNotFoundError):
        return FileNotFoundError(f"{what} {repo_id!r} is neither a local folder nor a {repo_type} repo on the Hub "
                                 "(or it is private). Fix: check the path or id, or log in with `hf auth login`")
    if isinstance(err, RevisionNotFoundError):
        return FileNotFoundError(f"{what} {repo_id!r}: revision not found on the Hub. Fix: pass an existing branch, "
                                 "tag or commit")
    if isinstance(err, HFValidationError):
        return FileNotFoundError(f"{what} {repo_id!r} is neither a local folder nor a valid Hub id ORG/NAME. Fix: "
                                 "check the path")
    return err


def _not_found(path_or_id: str, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what} {path_or_id!r}: no such folder, and not a Hub id of the form ORG/NAME. Fix: "
                             "check the path")


def resolve_folder(path_or_id: str | os.PathLike, *, what: str = "model", repo_type: str = "model",
                   required: Sequence[str] = (), revision: str | None = None, token: str | bool | None = None,
                   cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                   force_download: bool = False, allow_patterns: Sequence[str] | None = None) -> Path:
    """A local folder for a path or a Hub id (``snapshot_download``; pickled weights are never fetched).

    Args:
        path_or_id: a folder, or ``ORG/NAME`` on the Hub.
        what: how the error names it (``"model"``, ``"--pipeline"``, ...).
        repo_type: ``"model"`` (checkpoints and pipelines) or ``"dataset"``.
        required: files the folder must hold (e.g. ``config.json``); checked for local folders too.
        allow_patterns: download only these files (e.g. just the processor JSON).
    """
    text = os.fspath(path_or_id)
    path = Path(text)
    if path.is_dir():
        folder = path
    elif not _HUB_ID.match(text) or path.exists():
        raise _not_found(text, what)
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(
                text, repo_type=repo_type, revision=revision, token=token, cache_dir=cache_dir,
                local_files_only=local_files_only, force_download=force_download,
                allow_patterns=None if allow_patterns is None else list(allow_patterns),
                ignore_patterns=list(PICKLE_PATTERNS)))
        except Exception as err:
            new = _translate(err, text, what, repo_type)
            if new is err:
                raise
            raise new from None
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{what} {text!r} has no {', '.join(missing)} (in {folder}). Fix: pass the folder "
                                "or Hub id a SPATIA model / pipeline was saved to")
    return folder


def resolve_file(path_or_id: str | os.PathLike, filename: str, *, what: str = "model", repo_type: str = "model",
                 revision: str | None = None, token: str | bool | None = None,
                 cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> Path | None:
    """``filename`` in a local folder or a Hub repo (``hf_hub_download``); None when the folder or repo
    does not have it. Hub unreachable without a cached copy: :class:`HubUnavailableError`."""
    text = os.fspath(path_or_id)
    path = Path(text)
    if path.is_dir():
        return path / filename if (path / filename).is_file() else None
    if not _HUB_ID.match(text) or path.exists():
        raise _not_found(text, what)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(text, filename, repo_type=repo_type, revision=revision, token=token,
                                    cache_dir=cache_dir, local_files_only=local_files_only))
    except EntryNotFoundError as err:
        if not isinstance(err, LocalEntryNotFoundError):
            return None  # the repo exists but has no such file
        new = _translate(err, text, what, repo_type)
    except Exception as err:
        new = _translate(err, text, what, repo_type)
        if new is err:
            raise
    raise new from None
