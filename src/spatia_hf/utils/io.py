"""The package's one way to write files: whole or not at all, and never at the cost of the user's files.

- :func:`atomic_path` / :func:`atomic_write_text` / :func:`atomic_write_bytes` / :func:`write_json`: one
  file, written to a uniquely named temporary sibling (``tempfile.mkstemp`` in the same folder, so the
  final ``os.replace`` is atomic and two writers never share a temporary) and renamed onto its target
  only when the write finished; on error the temporary is removed and the old file stays.
- :func:`staged_dir`: a folder of files (a pipeline, a checkpoint, a dataset) written into a unique
  hidden temporary sibling (``tempfile.mkdtemp(dir=parent, prefix=".NAME.")``) and then published
  (:func:`publish`): renamed whole when the target does not exist, else moved in file by file
  (``os.replace``), so an existing folder keeps every file this save does not write, like
  ``transformers``' and ``diffusers``' ``save_pretrained``. Stale files of the writer's own format that
  it can name (``stale=``, e.g. weight shards of an earlier, differently sharded save) are removed from
  the folders it wrote into; :func:`remove_own` deletes a writer's own files (checkpoint rotation).

Nothing here deletes anything it did not create in the same call: no fixed-name ``.tmp`` siblings that
could be a user's folder, no renaming of the target away. A process killed mid-write leaves at most a
hidden ``.NAME.*.tmp*`` sibling (never a half-written target file).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

STAGE_SUFFIX = ".spatia-tmp"  # every temporary folder staged_dir creates ends so (uploads skip hidden files)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path`` (same suffix, so writers that infer a format from
    the name still work); it replaces ``path`` when the block ends without error and is removed
    otherwise. The parent folder is created if needed; the file gets the usual umask permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars and arrays and paths (what results hold)."""
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 1, sort_keys: bool = False,
               allow_nan: bool = True) -> Path:
    """Write ``obj`` as JSON (numpy values converted) to ``path`` atomically, with a final newline."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=json_default, allow_nan=allow_nan)
    return atomic_write_text(path, text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Parse the JSON file at ``path``."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def weight_files(*prefixes: str) -> Callable[[Path], bool]:
    """``stale=`` rule for model weights: ``PREFIX.safetensors``, its shards ``PREFIX-00001-of-00002.safetensors``
    and their index ``PREFIX.safetensors.index.json`` (the names transformers and diffusers write)."""
    pattern = re.compile(r"^(?:%s)(?:-\d{5}-of-\d{5})?\.safetensors(?:\.index\.json)?$"
                         % "|".join(re.escape(p) for p in prefixes))
    return lambda rel: bool(pattern.match(rel.name))


def _files(root: Path) -> list[Path]:
    """Files under ``root`` (relative), deepest first, so top-level index files such as
    ``model_index.json`` land last and a reader never sees an index that names missing files."""
    found = [p.relative_to(root) for p in root.rglob("*") if p.is_file() or p.is_symlink()]
    return sorted(found, key=lambda p: (-len(p.parts), str(p)))


def new_stage(target: str | os.PathLike, suffix: str = STAGE_SUFFIX) -> Path:
    """A fresh, empty, uniquely named hidden folder beside ``target`` (``.NAME.<random><suffix>``), for a
    writer that must keep its staging across calls (a resumable build); :func:`staged_dir` otherwise."""
    target = Path(os.path.abspath(target))  # "." has no name to put in the temporary's
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix))


def publish(stage: Path, target: str | os.PathLike, stale: Callable[[Path], bool] | None = None) -> None:
    """Move the files of ``stage`` into ``target``: a rename of the whole folder when ``target`` does not
    exist, else file by file (``os.replace``, deepest first), keeping every other file of ``target``
    except, in the folders written into, those for which ``stale(relative_path)`` is true. ``stage`` is
    removed (it must be a folder this process created, e.g. by :func:`new_stage`)."""
    target = Path(target)
    _publish(stage, target, stale)
    if stage.is_dir():
        shutil.rmtree(stage)  # only empty folders are left in it


def _publish(stage: Path, target: Path, stale: Callable[[Path], bool] | None) -> None:
    if not target.exists() and not target.is_symlink():
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
        try:
            os.rename(stage, target)  # one atomic step: the folder appears complete
            return
        except OSError:
            if not target.is_dir():  # not a folder that appeared meanwhile: a real error
                raise
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder. Fix: choose another output path or move it away")
    written = _files(stage)
    for rel in written:
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_dir() and not dest.is_symlink():
            raise IsADirectoryError(f"{dest} is a folder, but this save writes a file there. Fix: move the folder "
                                    "away or save elsewhere")
        os.replace(stage / rel, dest)
    if stale is None:
        return
    names = set(written)
    for folder in {rel.parent for rel in written}:
        for p in (target / folder).iterdir():
            rel = p.relative_to(target)
            if rel not in names and (p.is_file() or p.is_symlink()) and stale(rel):
                p.unlink()


def remove_own(root: str | os.PathLike, own: Callable[[Path], bool]) -> None:
    """Delete the files under ``root`` for which ``own(relative_path)`` is true (a writer's own files, e.g. a
    rotated-out checkpoint), then the folders that became empty; any other file, and its folders, stay."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        if (p.is_file() or p.is_symlink()) and own(p.relative_to(root)):
            p.unlink()
        elif p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
            p.rmdir()
    if not any(root.iterdir()):
        root.rmdir()


@contextmanager
def staged_dir(target: str | os.PathLike, *, stale: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a fresh, empty temporary folder beside ``target``; write the files there. When the block
    ends without error they are published into ``target`` (created if needed, parents too): renamed
    whole when ``target`` does not exist, else moved in file by file, replacing only those files (plus,
    in the folders written into, files for which ``stale(relative_path)`` is true that this save did
    not write). On error ``target`` is untouched. Only the temporary created here is ever removed."""
    stage = new_stage(target)
    try:
        yield stage
        _publish(stage, Path(target), stale)
    finally:
        if stage.is_dir():
            shutil.rmtree(stage)
