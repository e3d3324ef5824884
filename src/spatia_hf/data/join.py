"""Join datasets built in parts (``spatia convert ... --shard i/n`` array jobs) into one dataset.

Every part is a complete dataset folder of some sections. The join checks that the parts were
built with the same parameters, layout (channels, label / value keys) and gene panel, that no
section appears twice, then moves (or copies) their Parquet shards into one folder and writes one
``gene_panel.json``, one ``sections.json`` and one card, as a single build of all sections would.
The result is written to ``OUT.tmp-join`` and renamed into place when complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from ..utils.io import read_json, write_json
from . import schema
from .builder import SECTIONS_FILE
from .card import write_card

TMP_SUFFIX = ".tmp-join"
_PER_SECTION = ("dropped", "unknown_genes", "missing_genes")


def _read(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {path.parent} is not a dataset written by `spatia convert`. "
                                "Fix: pass the --out folders of finished convert jobs")
    return read_json(path)


def join_datasets(parts: Sequence[str | Path], out_dir: str | Path, *, move: bool = False,
                  overwrite: bool = False) -> Path:
    """Join dataset folders ``parts`` (same build parameters and gene panel) into ``out_dir``.

    Args:
        parts: dataset folders, each written by ``build_multiscale_dataset`` / ``spatia convert``.
        out_dir: the joined dataset folder (must not exist unless ``overwrite``).
        move: move the shards instead of copying them (the parts are left without shards).
        overwrite: replace an existing ``out_dir`` once the join is complete.
    """
    parts = [Path(p) for p in parts]
    if not parts:
        raise ValueError("no parts to join. Fix: pass the dataset folders of the shard jobs")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists. Fix: choose another folder or pass overwrite=True (--overwrite)")
    infos = [_read(p / SECTIONS_FILE) for p in parts]
    panels = [_read(p / schema.GENE_PANEL_FILE) for p in parts]
    build = {k: v for k, v in infos[0]["build"].items()}
    for p, info, panel in zip(parts[1:], infos[1:], panels[1:]):
        differ = sorted(k for k in set(build) | set(info["build"]) if build.get(k) != info["build"].get(k))
        if differ:
            raise ValueError(f"{p}: built with other parameters than {parts[0]} ({', '.join(differ)}). Fix: rebuild "
                             "the parts with the same convert flags")
        if panel["genes"] != panels[0]["genes"] or panel.get("gene_ids") != panels[0].get("gene_ids"):
            raise ValueError(f"{p}: gene panel differs from {parts[0]}'s. Fix: build every part with the same "
                             "--gene-panel (the shard jobs take the first section's panel; 'union' needs all "
                             "sections in each job)")
    sections, owner = [], {}
    for p, info in zip(parts, infos):
        for s in info["sections"]:
            if s["sample_id"] in owner:
                raise ValueError(f"section {s['sample_id']!r} is in both {owner[s['sample_id']]} and {p}. Fix: join "
                                 "the parts of one array job (each --shard i/n once)")
            owner[s["sample_id"]] = p
            sections.append(s)
    tmp = out.with_name(out.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for config in schema.CONFIGS:
            (tmp / config).mkdir(parents=True)
            for p in parts:
                for shard in sorted((p / config).glob("*.parquet")):
                    target = tmp / config / shard.name
                    if target.exists():
                        raise ValueError(f"{config}/{shard.name} exists in two parts. Fix: give sections unique ids")
                    (shutil.move if move else shutil.copy2)(str(shard), str(target))
        panel = {k: v for k, v in panels[0].items() if k not in (*_PER_SECTION, "sections")}
        panel["sections"] = [s["sample_id"] for s in sections]
        for key in _PER_SECTION:
            panel[key] = {k: v for pn in panels for k, v in pn.get(key, {}).items()}
        write_json(tmp / schema.GENE_PANEL_FILE, panel)
        info = {"build": build, "sections": sections}
        write_json(tmp / SECTIONS_FILE, info)
        write_card(tmp, info)
        if out.exists():
            old = out.with_name(out.name + ".old-join")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
