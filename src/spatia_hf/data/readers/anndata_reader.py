"""AnnData (``.h5ad``) plus a morphology image -> ``Section``.

Expected input (what ``spatia synth`` writes, and what most pipelines can export):
raw integer counts in ``X`` (or a layer / ``adata.raw``), gene symbols as ``var_names``,
centroids in ``obsm["spatial"]`` (pixels of the image by default; ``spatial_units="um"`` for µm),
the pixel size in µm either given or in ``uns["spatial_pixel_size_um"]`` (or the OME-TIFF
metadata), and a morphology image opened lazily as ``(C, H, W)`` by the shared
``readers.images.open_image`` (memory map or tifffile + zarr; ``.npy``), so whole-slide images
are never loaded.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..section import Section
from ._errors import clear_reader_errors

PIXEL_SIZE_KEY = "spatial_pixel_size_um"
GROUND_TRUTH_KEY = "synthetic_ground_truth"
MAX_LABEL_CATEGORIES = 1000


def _counts_matrix(adata, layer: str | None):
    if layer is None:
        return adata.X, list(map(str, adata.var_names)), adata.var
    if layer == "raw":
        if adata.raw is None:
            raise ValueError("layer='raw' but adata.raw is None. Fix: pass the layer holding raw counts")
        return adata.raw.X, list(map(str, adata.raw.var_names)), adata.raw.var
    if layer not in adata.layers:
        raise ValueError(f"layer {layer!r} not in adata.layers (have {list(adata.layers)}). Fix: pass one of "
                         "them, 'raw' for adata.raw, or nothing for X")
    return adata.layers[layer], list(map(str, adata.var_names)), adata.var


def _check_integer_counts(x, source: str) -> None:
    import scipy.sparse as sp

    data = x.data if sp.issparse(x) else np.asarray(x).ravel()
    sample = np.asarray(data[: 200_000])
    if sample.size and np.issubdtype(sample.dtype, np.floating):
        finite = sample[np.isfinite(sample)]
        frac = finite[np.abs(finite - np.round(finite)) > 1e-6]
        if frac.size:
            raise ValueError(f"{source} holds non-integer values (e.g. {frac[0]:.4g}); it looks normalised. Fix: "
                             "pass raw counts (--layer counts or --layer raw), or allow_non_integer=True "
                             "(--allow-non-integer) if these really are counts")


def _default_label_keys(obs) -> list[str]:
    import pandas as pd

    keys = []
    for c in obs.columns:
        col = obs[c]
        if isinstance(col.dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(col) or col.dtype == object:
            if col.nunique(dropna=True) <= MAX_LABEL_CATEGORIES:
                keys.append(str(c))
    return keys


def _safe_sample_id(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-") or "section"


@clear_reader_errors("AnnData .h5ad with its image")
def read_anndata(
    adata_or_path,
    image,
    pixel_size_um: float | None = None,
    *,
    sample_id: str | None = None,
    spatial_key: str = "spatial",
    spatial_units: str = "px",
    layer: str | None = None,
    label_keys: Sequence[str] | None = None,
    section_labels: dict[str, str] | None = None,
    channel_names: Sequence[str] | None = None,
    um_to_px: np.ndarray | None = None,
    allow_non_integer: bool = False,
    check_units: bool = True,
) -> Section:
    """An AnnData and its morphology image as a ``Section``.

    Args:
        adata_or_path: an ``AnnData`` or a path to ``.h5ad``.
        image: path to the image (``.tif``/``.ome.tif``/``.npy``) or a ``(C, H, W)`` array-like.
        pixel_size_um: µm per image pixel; default ``uns["spatial_pixel_size_um"]``, then the OME
            metadata. A value that disagrees with either is an error.
        spatial_key: ``obsm`` key of the centroids (x, y).
        spatial_units: ``"px"`` (pixels of ``image``: scanpy/squidpy's Visium and CosMx readers, and
            ``spatia synth``) or ``"um"`` (spatialdata-io's Xenium and MERSCOPE tables). Centroids that
            fall off the image, or crowd into a small corner of it where the other unit would fit, are
            refused with the other unit named (see ``readers.units``).
        layer: where raw counts are: None for ``X``, a ``layers`` key, or ``"raw"``.
        label_keys: ``obs`` columns carried as labels (default ``uns["label_keys"]``, else the
            categorical / string columns with at most 1000 categories).
        section_labels: section-level labels added to ``uns["section_labels"]``.
        check_units: False skips the unit check (cells that really occupy a small corner of the image).
    """
    import anndata as ad
    import pandas as pd

    source = "AnnData"
    if isinstance(adata_or_path, (str, Path)):
        path = Path(adata_or_path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist. Fix: pass an existing .h5ad (--adata)")
        source = str(path)
        try:
            adata = ad.read_h5ad(path)
        except (OSError, KeyError, ValueError) as err:  # h5py: truncated / not HDF5; anndata: missing groups
            raise ValueError(f"{path}: not a readable .h5ad ({type(err).__name__}: {err}). Fix: re-copy or re-export "
                             "the file (it looks truncated or corrupt)") from None
    else:
        adata = adata_or_path
    if spatial_units not in ("px", "um"):
        raise ValueError(f"spatial_units={spatial_units!r}: expected 'px' or 'um'")

    meta_px, meta_names, image_info = None, None, None
    if isinstance(image, (str, Path)):
        from .images import open_image

        image, info = open_image(image)
        meta_px, meta_names, image_info = info.pixel_size_um, info.channel_names, info.to_json()
    uns_px = adata.uns.get(PIXEL_SIZE_KEY)
    candidates = {"argument": pixel_size_um, f"uns[{PIXEL_SIZE_KEY!r}]": uns_px, "OME metadata": meta_px}
    given = {k: float(v) for k, v in candidates.items() if v is not None}
    if not given:
        raise ValueError(f"{source}: pixel size unknown (no argument, no uns[{PIXEL_SIZE_KEY!r}], no OME "
                         "PhysicalSizeX). Fix: pass pixel_size_um (--pixel-size UM)")
    px = next(iter(given.values()))
    for name, v in given.items():
        if not np.isclose(v, px, rtol=0.01):
            raise ValueError(f"{source}: pixel sizes disagree: {given}. Fix: pass the right value with "
                             "--pixel-size, or correct the file")

    if spatial_key not in adata.obsm:
        raise ValueError(f"{source}: obsm[{spatial_key!r}] is missing (obsm has {list(adata.obsm)}). Fix: store "
                         "cell centroids (x, y) there, or name the key with --spatial-key")
    xy = adata.obsm[spatial_key]
    xy = xy.to_numpy() if hasattr(xy, "to_numpy") else np.asarray(xy)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ValueError(f"{source}: obsm[{spatial_key!r}] has shape {xy.shape}. Fix: store an (n_cells, 2) "
                         "array of x, y")
    try:
        xy = np.asarray(xy[:, :2], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: obsm[{spatial_key!r}] is not numeric (dtype {xy.dtype}). Fix: store float "
                         "x, y centroids") from None
    if check_units and um_to_px is None:
        from .units import check_spatial_units

        check_spatial_units(xy, spatial_units, px, tuple(image.shape[-2:]), source=source, key=spatial_key)
    centroids_um = xy * px if spatial_units == "px" else xy

    counts, genes, var = _counts_matrix(adata, layer)
    if not allow_non_integer:
        _check_integer_counts(counts, f"{source} {'X' if layer is None else layer}")
    gene_ids = [str(v) for v in var["gene_ids"]] if "gene_ids" in var.columns else None

    obs = adata.obs.copy()
    obs.index = obs.index.astype(str)
    if label_keys is None:
        stored = adata.uns.get("label_keys")
        label_keys = [str(k) for k in stored] if stored is not None else _default_label_keys(obs)
    labels = {str(k): str(v) for k, v in dict(adata.uns.get("section_labels", {}) or {}).items()}
    labels.update({str(k): str(v) for k, v in (section_labels or {}).items()})
    names = channel_names or (list(map(str, adata.uns["channel_names"])) if "channel_names" in adata.uns else None) \
        or meta_names
    if names is not None and len(names) != image.shape[0]:
        names = None
    sid = sample_id or (str(adata.uns["sample_id"]) if "sample_id" in adata.uns else None) or \
        (_safe_sample_id(Path(source).name.split(".")[0]) if source != "AnnData" else "section")
    uns: dict[str, Any] = {"source": source}
    if image_info is not None:
        uns["image"] = image_info
    if GROUND_TRUTH_KEY in adata.uns:
        gt = adata.uns[GROUND_TRUTH_KEY]
        uns[GROUND_TRUTH_KEY] = json.loads(gt) if isinstance(gt, str) else gt
    technology = str(adata.uns.get("technology", "anndata"))
    return Section(
        sample_id=sid, counts=counts, genes=genes, cell_ids=list(obs.index), centroids_um=centroids_um,
        image=image, pixel_size_um=px, um_to_px=um_to_px, channel_names=names, gene_ids=gene_ids,
        obs=pd.DataFrame(obs), label_keys=list(label_keys), section_labels=labels, technology=technology, uns=uns,
    )


# ----------------------------------------------------------------------------- CLI


def _split_keys(value: str | None) -> list[str] | None:
    return None if value is None else [k.strip() for k in value.split(",") if k.strip()]


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adata", nargs="+", required=True, metavar="H5AD", help="one .h5ad per section")
    parser.add_argument("--image", nargs="+", required=True, metavar="IMG",
                        help="morphology image per section (.tif/.ome.tif, read lazily; or .npy), same order")
    parser.add_argument("--pixel-size", type=float, nargs="+", metavar="UM",
                        help="µm per image pixel (one value for all, or one per section); default: "
                             "uns['spatial_pixel_size_um'] or the OME metadata")
    parser.add_argument("--sample-id", nargs="+", help="sample id per section (default: uns['sample_id'] or file name)")
    parser.add_argument("--spatial-key", default="spatial", help="obsm key of the centroids (default spatial)")
    parser.add_argument("--spatial-units", choices=("px", "um"), default="px",
                        help="units of obsm[spatial-key]: pixels of --image (default; scanpy/squidpy) or µm "
                             "(spatialdata-io's Xenium/MERSCOPE tables)")
    parser.add_argument("--no-unit-check", action="store_true",
                        help="accept centroids that cover only a small corner of the image")
    parser.add_argument("--layer", help="raw counts layer ('raw' for adata.raw; default X)")
    parser.add_argument("--allow-non-integer", action="store_true", help="accept non-integer counts")
    parser.add_argument("--section-label", action="append", metavar="KEY=VALUE",
                        help="section-level label for every section (repeatable), e.g. condition=disease")


def sections_from_args(args: argparse.Namespace) -> Iterator[Section]:
    """Sections of ``spatia convert anndata`` (one AnnData in memory at a time)."""
    from . import _common as C  # here, not at import: pandas/scipy load only when converting

    n = len(args.adata)
    if len(args.image) != n:
        raise ValueError(f"--image: {len(args.image)} images for {n} --adata files. Fix: one image per section")
    pxs = C.per_section(args.pixel_size, n, "--pixel-size", per="--adata")
    sids = C.sample_ids(args.sample_id, n, "sections", "--adata")
    labels = C.parse_section_labels(args.section_label)
    keys = _split_keys(getattr(args, "label_keys", None))
    for path, img, px, sid in zip(args.adata, args.image, pxs, sids):
        yield read_anndata(path, img, px, sample_id=sid, spatial_key=args.spatial_key,
                           spatial_units=args.spatial_units, layer=args.layer, label_keys=keys,
                           section_labels=labels, allow_non_integer=args.allow_non_integer,
                           check_units=not args.no_unit_check)


def add_synthetic_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("synth_dir", metavar="SYNTH_DIR", help="folder written by `spatia synth`")


def read_synthetic_dir(synth_dir: str | Path) -> Iterator[Section]:
    """Sections of a ``spatia synth`` folder, through the AnnData reader (as a user's files would be)."""
    root = Path(synth_dir)
    manifest = root / "synthetic.json"
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} does not exist. Fix: pass a folder written by `spatia synth`")
    try:
        listed = json.loads(manifest.read_text(encoding="utf-8"))["sections"]
        if not isinstance(listed, list) or not listed:
            raise TypeError(f"'sections' is {listed!r}, expected a non-empty list")
        entries = [(root / e["h5ad"], root / e["image"], float(e["pixel_size_um"]), str(e["sample_id"]))
                   for e in listed]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{manifest}: not a `spatia synth` manifest ({type(err).__name__}: {err}). Fix: re-copy the "
                         "folder or write it again with `spatia synth`") from None
    for h5ad, image, pixel_size_um, sample_id in entries:
        yield read_anndata(h5ad, image, pixel_size_um, sample_id=sample_id)


def synthetic_sections_from_args(args: argparse.Namespace) -> Iterator[Section]:
    return read_synthetic_dir(args.synth_dir)
