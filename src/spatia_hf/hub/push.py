"""Publishing SPATIA models, generation pipelines and datasets on the Hugging Face Hub.

``push_model``, ``push_pipeline``, ``push_dataset`` (and ``spatia push``) check the repo id and the token
before any network call, create the repo (and branch), then make ONE commit with ``HfApi.create_commit``:
the files of the checkpoint or dataset folder as they are, plus the freshly rendered card
(:mod:`spatia_hf.hub.cards`). Local files are only read, so a push that fails half-way leaves them
untouched (nothing is renamed, rewritten or staged in place). Pickled weights are refused (safetensors
only). A dataset folder is uploaded as built (Parquet shards + card + ``gene_panel.json`` +
``sections.json``) rather than re-sharded by ``DatasetDict.push_to_hub``, so the gene panel travels with
the data and ``load_dataset("org/name", "cells")`` reads it; an in-memory ``DatasetDict`` goes through
its own ``push_to_hub``.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi

from ..utils.columns import GENE_PANEL_FILE
from ..utils.hub_ids import PICKLE_PATTERNS  # never uploaded, never fetched: safetensors only
from .cards import render_dataset_card, render_model_card, render_pipeline_card

if TYPE_CHECKING:  # pragma: no cover
    import datasets


SKIPPED_PATTERNS = (".*", "*/.*", "__pycache__/*", "*/__pycache__/*", "checkpoint-*/*", "runs/*", "*.tmp*",
                    "training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state*.pth", "scaler.pt",
                    "trainer_state.json", "README.md")


MANAGED_PATTERNS = {"model": ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json"),
                    "pipeline": ("*.safetensors", "*.safetensors.index.json", "*/config.json", "*_config.json",
                                 "model_index.json"),
                    "dataset": ("*.parquet", "gene_panel.json", "sections.json")}


_REPO_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?$")


def validate_repo_id(repo_id: str) -> str:
    """Check that ``repo_id`` is ``ORG/NAME`` with characters the Hub accepts; return it unchanged."""
    example = "e.g. 'my-lab/spatia-tiny'"
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"repo_id={repo_id!r} is not of the form ORG/NAME. Fix: pass the namespace (user or "
                         f"organisation) and the repo name, {example}")
    for part, what in zip(repo_id.split("/"), ("namespace", "name")):
        if not _REPO_PART.match(part) or ".." in part or "--" in part or len(part) > 96:
            raise ValueError(
                f"repo_id={repo_id!r}: the {what} {part!r} is invalid. Fix: use letters, digits, '-', '_' and '.' "
                f"(no leading/trailing '-' or '.', no '--' or '..', at most 96 characters), {example}")
    if repo_id.endswith(".git"):
        raise ValueError(f"repo_id={repo_id!r} ends with '.git'. Fix: drop the suffix")
    return repo_id


def resolve_token(token: str | None = None) -> str:
    """The token to push with: ``token``, else ``HF_TOKEN``, else the one saved by ``hf auth login``."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise ValueError("no Hugging Face token: pushing needs a token with write access. Fix: pass --token / "
                         "token=..., set the HF_TOKEN environment variable, or run `hf auth login`")
    return token


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in patterns)


def folder_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Files of ``folder`` to publish (``path_in_repo -> local path``): hidden files, Trainer state and the
    README (re-rendered) are skipped; pickled weights raise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{os.fspath(folder)!r} is not a folder. Fix: pass the folder written by "
                                f"save_pretrained or by the dataset builder")
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    files = {k: v for k, v in files.items() if not _matches(k, SKIPPED_PATTERNS)}
    pickled = [k for k in files if _matches(k, PICKLE_PATTERNS)]
    if pickled:
        raise ValueError(f"{os.fspath(folder)!r} holds pickled weights {pickled[:5]}; spatia-hf publishes "
                         f"safetensors only. Fix: re-save with save_pretrained(safe_serialization=True) and "
                         f"remove the pickle files")
    return files


def _check_folder(kind: str, files: Mapping[str, Path], folder: Path) -> None:
    where = os.fspath(folder)
    if kind == "model":
        if "config.json" not in files:
            raise FileNotFoundError(f"{where!r} has no config.json. Fix: pass a folder written by "
                                    f"model.save_pretrained(...)")
        if not any(k.endswith(".safetensors") for k in files):
            raise FileNotFoundError(f"{where!r} has no *.safetensors weights. Fix: save with "
                                    f"model.save_pretrained(folder) (safetensors is the default)")
    elif kind == "pipeline":
        if "model_index.json" not in files:
            raise FileNotFoundError(f"{where!r} has no model_index.json. Fix: pass a folder written by "
                                    f"pipeline.save_pretrained(...)")
    elif kind == "dataset":
        if GENE_PANEL_FILE not in files:
            raise FileNotFoundError(f"{where!r} has no {GENE_PANEL_FILE}. Fix: pass a folder written by the "
                                    f"dataset builder (`spatia convert ...`)")
        if not any(k.endswith(".parquet") for k in files):
            raise FileNotFoundError(f"{where!r} has no Parquet shards. Fix: pass a built dataset folder")


def _commit(kind: str, repo_id: str, files: Mapping[str, Path | bytes], *, token: str, private: bool | None,
            revision: str | None, commit_message: str | None, commit_description: str | None = None,
            create_pr: bool = False) -> CommitInfo:
    """Create the repo (and branch), then commit ``files`` in one go, deleting stale managed files."""
    repo_type = "dataset" if kind == "dataset" else "model"
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    branch = revision or "main"
    if branch != "main":
        api.create_branch(repo_id, branch=branch, repo_type=repo_type, exist_ok=True)
    remote = api.list_repo_files(repo_id, repo_type=repo_type, revision=branch)
    stale = [p for p in remote if p not in files and _matches(p, MANAGED_PATTERNS[kind])]
    operations: list = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=src if isinstance(src, bytes)
                                           else os.fspath(src)) for p, src in files.items()]
    operations += [CommitOperationDelete(path_in_repo=p) for p in stale]
    message = commit_message or f"Upload SPATIA {kind} with spatia-hf"
    return api.create_commit(repo_id, operations, commit_message=message, commit_description=commit_description,
                             repo_type=repo_type, revision=branch, create_pr=create_pr)


def push_model(model_or_dir: Any, repo_id: str, *, token: str | None = None, private: bool | None = None,
               revision: str | None = None, commit_message: str | None = None,
               commit_description: str | None = None, create_pr: bool = False, keep_card: bool = False,
               **card_kwargs) -> CommitInfo:
    """Push a model (object, saved in a temporary folder first) or a checkpoint folder with its card.

    The repo id and token are checked before any network call. ``revision`` is the branch to commit
    to (created from ``main`` if missing). The card is rendered for ``repo_id`` (``card_kwargs`` go to
    ``render_model_card``, e.g. ``eval_results``); ``keep_card=True`` uploads the folder's own
    README.md instead. Returns the ``CommitInfo``.
    """
    validate_repo_id(repo_id)
    token = resolve_token(token)
    if isinstance(model_or_dir, (str, os.PathLike)):
        return _push_folder("model", Path(model_or_dir), repo_id, token=token, private=private, revision=revision,
                            commit_message=commit_message, commit_description=commit_description,
                            create_pr=create_pr, keep_card=keep_card, card_kwargs=card_kwargs)
    with tempfile.TemporaryDirectory(prefix="spatia-push-") as tmp:
        model_or_dir.save_pretrained(tmp, **({"model_card": False} if _accepts(model_or_dir.save_pretrained,
                                                                                "model_card") else {}))
        card = render_model_card(model_or_dir, repo_id=repo_id, **card_kwargs)
        return _push_folder("model", Path(tmp), repo_id, token=token, private=private, revision=revision,
                            commit_message=commit_message, commit_description=commit_description,
                            create_pr=create_pr, card=card)


def push_pipeline(pipeline_or_dir: Any, repo_id: str, *, token: str | None = None, private: bool | None = None,
                  revision: str | None = None, commit_message: str | None = None,
                  commit_description: str | None = None, create_pr: bool = False, keep_card: bool = False,
                  **card_kwargs) -> CommitInfo:
    """Push a diffusers pipeline (object or ``save_pretrained`` folder) with its card; see ``push_model``."""
    validate_repo_id(repo_id)
    token = resolve_token(token)
    if isinstance(pipeline_or_dir, (str, os.PathLike)):
        return _push_folder("pipeline", Path(pipeline_or_dir), repo_id, token=token, private=private,
                            revision=revision, commit_message=commit_message,
                            commit_description=commit_description, create_pr=create_pr, keep_card=keep_card,
                            card_kwargs=card_kwargs)
    with tempfile.TemporaryDirectory(prefix="spatia-push-") as tmp:
        pipeline_or_dir.save_pretrained(tmp, safe_serialization=True)
        return _push_folder("pipeline", Path(tmp), repo_id, token=token, private=private, revision=revision,
                            commit_message=commit_message, commit_description=commit_description,
                            create_pr=create_pr, card_kwargs=card_kwargs)


def push_dataset(dataset: "str | os.PathLike | datasets.DatasetDict", repo_id: str, *, token: str | None = None,
                 private: bool | None = None, revision: str | None = None, commit_message: str | None = None,
                 commit_description: str | None = None, create_pr: bool = False, keep_card: bool = False,
                 gene_panel: str | os.PathLike | Mapping | None = None, **card_kwargs) -> CommitInfo:
    """Push a built dataset folder as it is (one commit), or a ``DatasetDict`` with its ``push_to_hub``.

    For a ``DatasetDict``, ``gene_panel`` (a ``gene_panel.json`` path or its content) is uploaded beside
    the data in a second commit, since ``push_to_hub`` knows nothing of it.
    """
    validate_repo_id(repo_id)
    token = resolve_token(token)
    if isinstance(dataset, (str, os.PathLike)):
        return _push_folder("dataset", Path(dataset), repo_id, token=token, private=private, revision=revision,
                            commit_message=commit_message, commit_description=commit_description,
                            create_pr=create_pr, keep_card=keep_card, card_kwargs=card_kwargs)
    info = dataset.push_to_hub(repo_id, token=token, private=private, revision=revision, create_pr=create_pr,
                               commit_message=commit_message or "Upload SPATIA dataset with spatia-hf",
                               commit_description=commit_description)
    if gene_panel is None:
        return info
    content = Path(gene_panel).read_bytes() if isinstance(gene_panel, (str, os.PathLike)) else \
        json.dumps(gene_panel, indent=1).encode()
    return HfApi(token=token).create_commit(
        repo_id, [CommitOperationAdd(GENE_PANEL_FILE, content)], commit_message=f"Add {GENE_PANEL_FILE}",
        repo_type="dataset", revision=revision or "main", create_pr=create_pr)


def _push_folder(kind: str, folder: Path, repo_id: str, *, token: str, private: bool | None, revision: str | None,
                 commit_message: str | None, commit_description: str | None, create_pr: bool,
                 keep_card: bool = False, card: Any = None, card_kwargs: Mapping | None = None) -> CommitInfo:
    files: dict[str, Path | bytes] = dict(folder_files(folder))
    _check_folder(kind, files, folder)
    own_readme = folder / "README.md"
    if keep_card and own_readme.is_file():
        files["README.md"] = own_readme
    else:
        if card is None:
            render = {"model": render_model_card, "pipeline": render_pipeline_card,
                      "dataset": render_dataset_card}[kind]
            card = render(folder, repo_id=repo_id, **(card_kwargs or {}))
        files["README.md"] = str(card).encode("utf-8")
    return _commit(kind, repo_id, files, token=token, private=private, revision=revision,
                   commit_message=commit_message, commit_description=commit_description, create_pr=create_pr)


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def snapshot_pipeline(repo_id: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                      token: str | bool | None = None, local_files_only: bool = False,
                      force_download: bool = False) -> str:
    """Local snapshot folder of a pipeline repo (downloaded once into the Hub cache; offline afterwards;
    not cached while the Hub is unreachable: one-line ``HubUnavailableError`` with the fix)."""
    from ..utils.hub_ids import resolve_folder

    return str(resolve_folder(repo_id, what="pipeline", revision=revision, cache_dir=cache_dir, token=token,
                              local_files_only=local_files_only, force_download=force_download,
                              required=("model_index.json",)))

