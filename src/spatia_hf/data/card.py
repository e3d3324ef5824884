"""The dataset card (``README.md``) of a built multi-scale dataset.

Its YAML front matter lists the three configs with their ``data_files``, which is what lets
``datasets.load_dataset(DIR, "cells")`` read the folder offline, and what ``push_to_hub``
expects on the Hub. The body documents units, sizes and provenance for people.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData

from . import schema

_SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                    (10_000_000, "1M<n<10M")]


def _size_category(n: int) -> str:
    for bound, name in _SIZE_CATEGORIES:
        if n < bound:
            return name
    return "n>10M"


def data_files_configs() -> list[dict]:
    """``configs`` entries of the card: one ``train`` split per config, all shards of that folder."""
    return [{"config_name": c, "data_files": [{"split": "train", "path": f"{c}/*.parquet"}]}
            for c in schema.CONFIGS]


def render_card(info: dict) -> DatasetCard:
    """Card from the build summary (``sections.json`` content plus gene panel size)."""
    build = info["build"]
    sections = info["sections"]
    n_cells = sum(s["n_cells"] for s in sections)
    n_niches = sum(s["n_niches"] for s in sections)
    data = DatasetCardData(
        configs=data_files_configs(),
        pretty_name=build.get("pretty_name") or "SPATIA multi-scale spatial transcriptomics dataset",
        tags=["spatial-transcriptomics", "biology", "spatia-hf"],
        size_categories=[_size_category(n_cells)],
    )
    rows = "\n".join(
        f"| {s['sample_id']} | {s['technology']} | {s['n_cells']} | {s['n_niches']} | {s['pixel_size_um']:g} | "
        f"{', '.join(f'{k}={v}' for k, v in s['section_labels'].items()) or '-'} |"
        for s in sections
    )
    labels = ", ".join(build["label_keys"]) or "none"
    values = ", ".join(build["value_keys"]) or "none"
    body = f"""
# {data.pretty_name}

Built by `spatia_hf.data.builder.build_multiscale_dataset` (spatia-hf {build['spatia_hf_version']}) from
{len(sections)} section(s): {n_cells} cells, {n_niches} niches, {build['n_genes']} genes.

## Configs

| config | one row per | image |
|---|---|---|
| `cells` | cell | `{build['crop_px']}` px crop of {build['crop_um']:g} µm centred on the centroid |
| `niches` | {build['niche_um']:g} µm grid tile with >= 1 cell | `{build['niche_px']}` px crop of the tile |
| `tissues` | section | `{build['thumb_px']}` px thumbnail (aspect kept, zero-padded bottom/right) |

- Images are `(C, H, W)` uint8 (`Array3D`), channels {build['channel_names']}, normalised per section with the
  {build['percentiles'][0]:g} / {build['percentiles'][1]:g} percentiles of each stain (never per crop);
  `pixel_size_um` is the µm per pixel of the stored image.
- Expression is sparse raw counts: `gene_indices` index `gene_panel.json["genes"]`, `gene_counts` the counts.
  Niche and tissue expression are sums over member cells.
- Positions (`x_um`, `y_um`, `cell_rel_*_um`, `niche_*_um`) are in µm; niche positions are tile centres.
- Cell labels: {labels}. Per-cell values: {values}. Niche labels are majorities of their cells.
- Rows of a section are ordered by image tile, then by the input cell order.

## Sections

| sample_id | technology | cells | niches | µm/px | labels |
|---|---|---|---|---|---|
{rows}

`gene_panel.json` lists the genes and everything dropped or unmapped per section; `sections.json` the
build parameters, per-section normalisation and provenance (including synthetic ground truth).

## Use

```python
from datasets import load_dataset
cells = load_dataset("path/to/this/folder", "cells", split="train").with_format("torch")
```
"""
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_card(out_dir: str | Path, info: dict) -> Path:
    from ..utils.io import atomic_write_text

    return atomic_write_text(Path(out_dir) / "README.md", str(render_card(info)))
