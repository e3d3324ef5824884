"""SpatialData ``.zarr`` store -> ``Section`` (optional extra: ``pip install 'spatia-hf[spatialdata]'``).

A SpatialData object links a table (AnnData: counts, ``obs[region_key]`` / ``obs[instance_key]``)
to a region element (shapes or labels: the cells) and holds images, each with a transformation to
named coordinate systems. This reader takes, in one coordinate system (``"global"`` by default):

- counts and gene names from the table (``X`` or a layer), the cells of one annotated region;
- cell centroids from ``spatialdata.get_centroids`` of that region, matched by instance id;
- one image (multiscale: level 0), read lazily through its dask array, and its
  pixel -> coordinate-system affine, inverted into ``Section.um_to_px``.

Units. SpatialData coordinate systems carry no unit. spatialdata-io's Xenium and MERSCOPE readers
make ``global`` the morphology/mosaic *pixel* frame and store cell shapes in µm with a µm -> global
transform; for stores they wrote (``attrs["spatialdata_io_reader"]``) µm per unit is read from that
transform. Otherwise pass ``um_per_unit`` (1.0 when the system is in µm, 0.12028 for CosMx global
pixels); without it µm is assumed, with a warning. ``spatialdata`` is imported only when a store is read.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from ..section import Section
from . import _common as C
from .images import AxesView, ChannelSelect

EXTRA_HINT = ("pip install 'spatia-hf[spatialdata]' (spatialdata and spatialdata-io; on Python 3.11 these are "
              "spatialdata==0.7.3 / spatialdata-io==0.7.1, which downgrade python-dateutil, so a separate virtual "
              "environment is advisable)")


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is missing; the message names the extra to install."""


def _require_spatialdata():
    try:
        import spatialdata
    except ImportError as err:
        raise MissingExtraError(f"reading SpatialData needs the 'spatialdata' package ({err}). Fix: {EXTRA_HINT}") \
            from None
    return spatialdata


def _pick(names: Sequence[str], wanted: str | None, what: str, source: str, prefer: Sequence[str] = ()) -> str:
    names = list(names)
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"{source}: no {what} {wanted!r} (have {C.listed(names, 12)}). Fix: pick one of them")
        return wanted
    if not names:
        raise ValueError(f"{source}: no {what} in the store. Fix: pass a SpatialData store with a {what}")
    if len(names) == 1:
        return names[0]
    for p in prefer:
        hits = [n for n in names if p in n]
        if hits:
            return sorted(hits)[0]
    raise ValueError(f"{source}: several {what}s ({C.listed(names, 12)}). Fix: choose one (--{what.split()[-1]} NAME)")


SPATIALDATA_IO_PIXEL_GLOBAL = ("xenium", "merscope")  # readers whose "global" is the image pixel frame


def _um_per_unit(sdata, element, coordinate_system: str, given: float | None, source: str) -> float:
    """µm per coordinate unit: given, or from a spatialdata-io Xenium/MERSCOPE store's µm -> global
    shape transform, or 1.0 (with a warning)."""
    from spatialdata.transformations import get_transformation

    if given is not None:
        if not (isinstance(given, (int, float)) and np.isfinite(given) and given > 0):
            raise ValueError(f"um_per_unit={given!r}: expected a positive number of µm per coordinate unit")
        return float(given)
    reader = sdata.attrs.get("spatialdata_io_reader") if hasattr(sdata, "attrs") else None
    if reader in SPATIALDATA_IO_PIXEL_GLOBAL and hasattr(element, "geometry"):
        t = get_transformation(element, to_coordinate_system=coordinate_system)
        m = np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)
        return float(1.0 / np.sqrt(abs(np.linalg.det(m[:2, :2]))))  # shapes are in µm there
    C.warn(f"{source}: units of coordinate system {coordinate_system!r} unknown; assuming µm. Pass um_per_unit "
           "(--um-per-unit) if they are pixels or another unit")
    return 1.0


def _image_array(element, level: int, source: str):
    """(dask ``(c, y, x)`` array, channel names, level-k downsample) of an image element."""
    from spatialdata import get_pyramid_levels

    if getattr(element, "children", None):  # multiscale DataTree (scale0, scale1, ...)
        n = len(element.children)
        if not 0 <= level < n:
            raise ValueError(f"{source}: level={level} but the image has {n} scales")
        arr = get_pyramid_levels(element, n=level)
        factor = float(get_pyramid_levels(element, n=0).sizes["x"]) / float(arr.sizes["x"])
    else:
        if level:
            raise ValueError(f"{source}: level={level} but the image is single-scale")
        arr, factor = element, 1.0
    if tuple(arr.dims) != ("c", "y", "x"):
        raise ValueError(f"{source}: image dims {tuple(arr.dims)}; expected ('c', 'y', 'x'). Fix: pass a 2-D image")
    names = [str(c) for c in arr.coords["c"].values] if "c" in arr.coords else None
    return arr.data, names, factor


def read_spatialdata(
    sdata_or_path,
    *,
    table: str | None = None,
    region: str | None = None,
    image: str | None = None,
    coordinate_system: str = "global",
    um_per_unit: float | None = None,
    level: int = 0,
    layer: str | None = None,
    channels: Sequence[int] | None = None,
    sample_id: str | None = None,
    label_keys: Sequence[str] | None = None,
    section_labels: dict[str, str] | None = None,
    vocabulary=None,
    check_bounds: bool = True,
    quiet: bool = False,
) -> Section:
    """One table region of a SpatialData store (or object) as a ``Section``.

    Args:
        sdata_or_path: a ``.zarr`` path or a ``SpatialData`` object.
        table: table name (default: the only table, else "table").
        region: the table region (shapes/labels element) whose cells to read (default: the only one).
        image: image element (default: the only image with a transformation to ``coordinate_system``,
            preferring names with "morphology_focus", then "mosaic").
        coordinate_system: where centroids and image meet (default "global").
        um_per_unit: µm per coordinate-system unit (default: derived for spatialdata-io Xenium/MERSCOPE
            stores, else 1.0 with a warning).
        level: image pyramid level (0 = full resolution).
        layer: table layer with raw counts (default ``X``).
        channels: image channel indices to keep.
    """
    sd = _require_spatialdata()
    from spatialdata.models import get_table_keys
    from spatialdata.transformations import get_transformation

    source = str(sdata_or_path) if isinstance(sdata_or_path, (str, Path)) else "SpatialData"
    if isinstance(sdata_or_path, (str, Path)):
        path = Path(sdata_or_path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist. Fix: pass a SpatialData .zarr store")
        try:
            sdata = sd.read_zarr(path)
        except Exception as err:
            raise ValueError(f"{path}: not a readable SpatialData store ({type(err).__name__}: {err}). Fix: write it "
                             "with SpatialData.write / spatialdata-io") from None
    else:
        sdata = sdata_or_path

    tname = _pick(list(sdata.tables.keys()), table or ("table" if "table" in sdata.tables and len(sdata.tables) > 1
                                                       else None), "table", source)
    adata = sdata.tables[tname]
    regions, region_key, instance_key = get_table_keys(adata)
    regions = [regions] if isinstance(regions, str) else list(regions)
    rname = _pick(regions, region, "region", f"{source} table {tname!r}")
    rows = np.flatnonzero(adata.obs[region_key].astype(str).to_numpy() == rname)
    if not len(rows):
        raise ValueError(f"{source}: table {tname!r} has no rows for region {rname!r}. Fix: pick another --region")
    adata = adata[rows]
    if rname not in sdata:
        raise ValueError(f"{source}: table {tname!r} annotates {rname!r}, which is not in the store (no cell shapes or "
                         "labels to take centroids from). Fix: include the cell boundaries/circles when writing the "
                         "store, or convert the instrument folder directly (spatia convert xenium|cosmx|merscope)")
    element = sdata[rname]
    um_per_unit = _um_per_unit(sdata, element, coordinate_system, um_per_unit, source)

    cent = sd.get_centroids(element, coordinate_system=coordinate_system)
    cent = cent.compute() if hasattr(cent, "compute") else cent
    inst = adata.obs[instance_key].to_numpy()
    pos = pd.Index(cent.index).get_indexer(inst)
    if (pos < 0).any():
        bad = inst[pos < 0]
        raise ValueError(f"{source}: {len(bad)} table rows of region {rname!r} have no {instance_key} in the element "
                         f"(first: {C.listed(bad)}). Fix: pass a consistent store (table and shapes/labels of one run)")
    xy_cs = cent[["x", "y"]].to_numpy(dtype=np.float64)[pos]

    with_cs = [n for n, el in sdata.images.items() if coordinate_system in get_transformation(el, get_all=True)]
    iname = _pick(with_cs, image, "image", f"{source} ({coordinate_system!r})", prefer=("morphology_focus", "mosaic"))
    data, names, factor = _image_array(sdata.images[iname], level, f"{source} image {iname!r}")
    t = get_transformation(sdata.images[iname], to_coordinate_system=coordinate_system)
    img_to_cs = np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)
    img_to_cs = img_to_cs @ np.diag([factor, factor, 1.0])  # level k pixel -> level 0 pixel -> cs
    um_to_px = np.linalg.inv(img_to_cs) @ np.diag([1.0 / um_per_unit, 1.0 / um_per_unit, 1.0])
    px = float(um_per_unit * np.sqrt(abs(np.linalg.det(img_to_cs[:2, :2]))))
    img: Any = AxesView(data, "CYX", source=f"{source} image {iname!r}")
    if channels is not None:
        img = ChannelSelect(img, list(channels))
        names = [names[c] for c in channels] if names else None

    if layer is None:
        counts = adata.X
    elif layer in adata.layers:
        counts = adata.layers[layer]
    else:
        raise ValueError(f"{source}: layer {layer!r} not in table {tname!r} (layers: {list(adata.layers)}). Fix: pass "
                         "one of them or none for X")
    import scipy.sparse as sp

    counts = counts.tocsr() if sp.issparse(counts) else np.asarray(counts)
    genes = [str(g) for g in adata.var_names]
    gene_ids = [str(v) for v in adata.var["gene_ids"]] if "gene_ids" in adata.var.columns else None
    obs = adata.obs.drop(columns=[c for c in (region_key, instance_key) if c in adata.obs.columns]).copy()
    obs.index = obs.index.astype(str)
    if label_keys is None:
        label_keys = [str(c) for c in obs.columns if isinstance(obs[c].dtype, pd.CategoricalDtype)
                      and obs[c].nunique() <= 1000]
    keep_cols = [c for c in obs.columns if c in label_keys or (pd.api.types.is_numeric_dtype(obs[c])
                                                               and not pd.api.types.is_bool_dtype(obs[c]))]
    obs = obs[keep_cols]
    cell_ids = [str(i) for i in adata.obs_names]
    sid = sample_id or C.safe_sample_id(Path(source).name.split(".")[0] if source != "SpatialData" else rname)
    section = Section(
        sample_id=sid, counts=counts, genes=genes, cell_ids=cell_ids, centroids_um=xy_cs * um_per_unit, image=img,
        pixel_size_um=px, um_to_px=um_to_px, channel_names=names, gene_ids=gene_ids, obs=obs,
        label_keys=list(label_keys), section_labels=dict(section_labels or {}), technology="spatialdata",
        uns={"source": source, "reader": "spatia_hf.data.readers.spatialdata_reader", "table": tname, "region": rname,
             "image": iname, "coordinate_system": coordinate_system, "um_per_unit": um_per_unit, "level": level,
             "spatialdata_version": getattr(sd, "__version__", None)},
    )
    if check_bounds:
        C.check_image_covers(section.centroids_px(), img.shape, f"{source} image {iname!r}", cell_ids,
                             fix=f"check --um-per-unit and the image's transformation to {coordinate_system!r}")
    return C.attach_labels_and_coverage(section, vocabulary=vocabulary, quiet=quiet)


# ----------------------------------------------------------------------------- CLI


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="+", metavar="ZARR", help="SpatialData .zarr store(s), one per section")
    parser.add_argument("--table", help="table name (default: the only table, else 'table')")
    parser.add_argument("--region", help="annotated region (shapes/labels) of the cells (default: the only one)")
    parser.add_argument("--image", help="image element (default: the one in --coordinate-system)")
    parser.add_argument("--coordinate-system", default="global", help="coordinate system (default global)")
    parser.add_argument("--um-per-unit", type=float,
                        help="µm per coordinate unit (default: from spatialdata-io Xenium/MERSCOPE stores, else 1.0; "
                             "CosMx global pixels: 0.12028)")
    parser.add_argument("--level", type=int, default=0, help="image pyramid level (default 0)")
    parser.add_argument("--layer", help="table layer with raw counts (default X)")
    parser.add_argument("--sample-id", nargs="+", help="sample id per store (default: the store name)")
    parser.add_argument("--section-label", action="append", metavar="KEY=VALUE",
                        help="section-level label for every section (repeatable)")
    parser.add_argument("--vocabulary", metavar="PATH", help="gene vocabulary to report panel coverage against")


def sections_from_args(args: argparse.Namespace) -> Iterator[Section]:
    """Sections of ``spatia convert spatialdata``."""
    _require_spatialdata()
    sids = C.sample_ids(args.sample_id, len(args.input), "stores", "store")
    labels = C.parse_section_labels(args.section_label)
    keys = [k.strip() for k in args.label_keys.split(",")] if getattr(args, "label_keys", None) else None
    for store, sid in zip(args.input, sids):
        yield read_spatialdata(store, table=args.table, region=args.region, image=args.image,
                               coordinate_system=args.coordinate_system, um_per_unit=args.um_per_unit,
                               level=args.level, layer=args.layer, sample_id=sid, label_keys=keys,
                               section_labels=labels, vocabulary=args.vocabulary,
                               check_bounds=getattr(args, "outside", "error") == "error",
                               quiet=getattr(args, "no_progress", False))
