"""NanoString/Bruker CosMx flat-file export -> ``Section``.

Files of one slide (prefix ``<slide>_``), all CSV (optionally ``.gz``):

- ``*_exprMat_file.csv``: ``fov``, ``cell_ID``, one column per target. ``NegPrb*`` / ``Negative*``
  and ``SystemControl*`` / ``FalseCode*`` columns are dropped and counted; ``cell_ID == 0`` is the
  background of each FOV (transcripts outside every cell) and is dropped and counted. Streamed in
  chunks, so a 1,000-plex panel over 10^6 cells never exists as a dense table.
- ``*_metadata_file.csv``: ``fov``, ``cell_ID``, ``CenterX_global_px``, ``CenterY_global_px``
  (+ ``CenterX_local_px``, ``CenterY_local_px`` and morphology QC, carried as ``obs``).
- ``*_fov_positions_file.csv``: ``fov`` or ``FOV``, ``x_global_px``, ``y_global_px`` (or ``*_mm``).
- ``CellComposite/*_F<NNN>.jpg`` (or ``Morphology2D/*_F<NNN>.TIF``): one image per FOV.

Cell ids are ``"<cell_ID>_<fov>"`` (spatialdata-io's convention); positions are the global pixel
centroids times the pixel size (0.12028 µm/px by default).

**One image for the section.** The per-FOV files become a :class:`~.images.FovMosaic`: a virtual
mosaic in the global pixel frame that serves each window from the FOV files it overlaps, so
nothing is stitched on disk and memory stays bounded. Where each FOV sits is estimated from its
own cells (``global = a * local + b`` per axis, least squares, ``a`` must be +-1) and falls back
to the FOV positions file for FOVs without local coordinates. As in spatialdata-io, FOV images are
taken to be flipped in y relative to the local coordinates (``flip_y=True``): the image row of a
cell is ``H - y_local``. The mosaic's origin (the smallest FOV corner) goes into ``um_to_px``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from ..section import Section
from ._errors import clear_reader_errors
from . import _common as C
from .images import TIFF_SUFFIXES, FovMosaic, FovTile

DEFAULT_PIXEL_SIZE_UM = 0.12028
CONTROL_PREFIXES = ("NegPrb", "Negative", "SystemControl", "FalseCode")
META_COLUMNS = ("fov", "cell_ID", "CenterX_global_px", "CenterY_global_px")
LOCAL_COLUMNS = ("CenterX_local_px", "CenterY_local_px")
FOV_FILE_RE = re.compile(r"_F(\d+)", re.IGNORECASE)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png") + TIFF_SUFFIXES
MISSING_POLICIES = ("error", "drop")


def _files(folder: Path, dataset_id: str | None) -> dict[str, Path]:
    prefix = f"{dataset_id}_" if dataset_id else "*"
    fix = ("pass the folder holding the flat files of one slide" if not dataset_id else
           f"check --dataset-id {dataset_id!r} (the files' common prefix)")
    out = {}
    for key, suffix in (("expr", "exprMat_file"), ("meta", "metadata_file"), ("fov", "fov_positions_file")):
        try:
            out[key] = C.find_one(folder, [f"{prefix}{suffix}.csv", f"{prefix}{suffix}.csv.gz"], suffix,
                                  fix + " (several slides in one folder: pass --dataset-id SLIDE)")
        except FileNotFoundError:
            if key != "fov":  # the FOV positions are only a fallback
                raise
    return out


def _fov_column(columns: Sequence[str], source: Path) -> str:
    for c in ("fov", "FOV", "Fov"):
        if c in columns:
            return c
    raise ValueError(f"{source}: no 'fov' / 'FOV' column (columns: {C.listed(columns, 10)}). Fix: pass the CosMx "
                     "flat-file export")


def _image_files(folder: Path, image_dir: str) -> dict[int, Path]:
    d = Path(image_dir) if Path(image_dir).is_absolute() else folder / image_dir
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: image folder not found. Fix: pass --image-dir (CellComposite or Morphology2D "
                                "inside the export)")
    out: dict[int, Path] = {}
    for f in sorted(d.iterdir()):
        m = FOV_FILE_RE.search(f.stem)
        if f.suffix.lower() in IMAGE_SUFFIXES and m:
            fov = int(m.group(1))
            if fov in out:
                raise ValueError(f"{d}: two images for FOV {fov}: {out[fov].name}, {f.name}. Fix: keep one per FOV")
            out[fov] = f
    if not out:
        raise FileNotFoundError(f"{d}: no per-FOV images named *_F<NNN>.(jpg|png|tif). Fix: pass the CosMx image "
                                "folder (--image-dir)")
    return out


def _image_header(path: Path) -> tuple[int, int, int, np.dtype]:
    """(C, H, W, dtype) of a FOV image without decoding it."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        from .images import open_tiff

        img, _ = open_tiff(path)
        return (*img.shape, img.dtype)
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            bands = len(im.getbands())
            dtype = np.dtype(np.uint16) if im.mode.startswith("I;16") else np.dtype(np.uint8)
    except Exception as err:
        raise ValueError(f"{path}: not a readable image ({type(err).__name__}: {err}). Fix: re-copy the file") from None
    return bands, h, w, dtype


def _cell_ids(table: pd.DataFrame, cell_col: str, fov_col: str, source: str) -> np.ndarray:
    """``"<cell_ID>_<fov>"`` per row (the CosMx cell key), from integer id columns."""
    cell = C.integer_column(table[cell_col], source, cell_col).astype(str).astype(object)
    fov = C.integer_column(table[fov_col], source, fov_col).astype(str).astype(object)
    return (cell + "_" + fov).astype(object)


def _fit_axis(local: np.ndarray, glob: np.ndarray, fov: int, axis: str, source: str) -> tuple[int, float]:
    """``global = a * local + b`` with ``a`` = +-1, from a FOV's cells (least squares, then snapped)."""
    if len(local) >= 2 and np.ptp(local) > 1e-6:
        a = float(np.polyfit(local, glob, 1)[0])
        if abs(abs(a) - 1.0) > 0.02:
            raise ValueError(f"{source}: FOV {fov}: Center{axis}_global_px / Center{axis}_local_px scale is {a:.4f}, "
                             "expected +-1 (global = local + FOV offset). Fix: check the metadata export")
        sign = 1 if a > 0 else -1
    else:
        sign = 1
    return sign, float(np.median(glob - sign * local))


def _placements(meta: pd.DataFrame, fov_col: str, fov_pos: pd.DataFrame | None, meta_src: str,
                pos_src: str) -> dict[int, tuple[int, float, int, float]]:
    """Per FOV: (a_x, b_x, a_y, b_y) of global = a * local + b, in global pixels."""
    out = {}
    has_local = all(c in meta.columns for c in LOCAL_COLUMNS)
    meta = meta.assign(**{c: C.numeric_column(meta[c], meta_src, c) for c in ("CenterX_global_px", "CenterY_global_px")})
    for c in LOCAL_COLUMNS:  # unreadable local centroids count as missing: the FOV positions file places the FOV
        if c in meta.columns:
            meta = meta.assign(**{c: pd.to_numeric(meta[c], errors="coerce").replace([np.inf, -np.inf], np.nan)})
    for fov, g in meta.groupby(fov_col, sort=True):
        fov = int(fov)
        if has_local and g[list(LOCAL_COLUMNS)].notna().all().all():
            ax, bx = _fit_axis(g[LOCAL_COLUMNS[0]].to_numpy(float), g["CenterX_global_px"].to_numpy(float), fov, "X",
                               meta_src)
            ay, by = _fit_axis(g[LOCAL_COLUMNS[1]].to_numpy(float), g["CenterY_global_px"].to_numpy(float), fov, "Y",
                               meta_src)
            if ax != 1:
                raise ValueError(f"{meta_src}: FOV {fov}: x runs opposite between local and global coordinates. Fix: "
                                 "this export layout is not supported; convert it with spatialdata-io and use "
                                 "`spatia convert spatialdata`")
        elif fov_pos is not None and fov in fov_pos.index:
            ax, bx, ay, by = 1, float(fov_pos.loc[fov, "x_px"]), 1, float(fov_pos.loc[fov, "y_px"])
        else:
            raise ValueError(f"FOV {fov}: no local centroids in {meta_src} and no row in {pos_src}. Fix: pass the full "
                             "export (metadata with CenterX_local_px/CenterY_local_px, or the FOV positions file)")
        out[fov] = (ax, bx, ay, by)
    return out


def _read_fov_positions(path: Path | None, pixel_size_um: float) -> pd.DataFrame | None:
    if path is None:
        return None
    df = C.read_csv(path)
    col = _fov_column(list(df.columns), path)
    if {"x_global_px", "y_global_px"} <= set(df.columns):
        x, y = (C.numeric_column(df[c], str(path), c) for c in ("x_global_px", "y_global_px"))
    elif {"x_global_mm", "y_global_mm"} <= set(df.columns):
        x, y = (C.numeric_column(df[c], str(path), c) * 1000 / pixel_size_um for c in ("x_global_mm", "y_global_mm"))
    else:
        raise ValueError(f"{path}: columns x_global_px/y_global_px (or x_global_mm/y_global_mm) missing (columns: "
                         f"{C.listed(df.columns, 10)}). Fix: pass the CosMx FOV positions file")
    fov = C.integer_column(df[col], str(path), col)
    if len(set(fov.tolist())) != len(fov):
        raise ValueError(f"{path}: column {col!r} lists a FOV twice. Fix: pass the CosMx FOV positions file unmodified")
    return pd.DataFrame({"x_px": x, "y_px": y}, index=fov)


def build_mosaic(placements: dict[int, tuple[int, float, int, float]], images: dict[int, Path], *,
                 flip_y: bool = True, cache_bytes: int = 512 * 2**20) -> tuple[FovMosaic, np.ndarray, dict]:
    """The virtual mosaic of the FOVs in ``placements`` and the global-pixel origin (x0, y0) of its
    pixel (0, 0). See the module docstring for the geometry."""
    fovs = sorted(placements)
    headers = {f: _image_header(images[f]) for f in fovs}
    chans = {h[0] for h in headers.values()}
    dtypes = {h[3] for h in headers.values()}
    if len(chans) > 1 or len(dtypes) > 1:
        raise ValueError(f"FOV images differ in channels {sorted(chans)} or dtype {sorted(map(str, dtypes))}. Fix: use "
                         "one image folder (same stains for every FOV)")
    corners = {}
    for f in fovs:
        _, bx, ay, by = placements[f]
        _, h, w, _ = headers[f]
        corners[f] = (bx, by if ay > 0 else by - h)  # global (x, y) of the tile's top-left corner
    x0 = min(c[0] for c in corners.values())
    y0 = min(c[1] for c in corners.values())
    tiles = []
    for f in fovs:
        _, _, ay, _ = placements[f]
        _, h, w, _ = headers[f]
        tiles.append(FovTile(fov=f, path=str(images[f]), row0=int(round(corners[f][1] - y0)),
                             col0=int(round(corners[f][0] - x0)), height=h, width=w, flip_y=bool(flip_y) ^ (ay < 0)))
    mosaic = FovMosaic(tiles, n_channels=chans.pop(), dtype=dtypes.pop(), cache_bytes=cache_bytes)
    prov = {"fov_tiles": {str(t.fov): {"row0": t.row0, "col0": t.col0, "flip_y": t.flip_y, "file": Path(t.path).name}
                          for t in tiles}, "mosaic_origin_global_px": [x0, y0], "flip_y": bool(flip_y)}
    return mosaic, np.array([x0, y0]), prov


def _check_cells_on_their_fov(cpx: np.ndarray, fov_of_cell: np.ndarray, mosaic: FovMosaic,
                              cell_ids: Sequence[str]) -> None:
    """Each cell's centroid must fall on its own FOV's image (else that image is too small or misplaced)."""
    for t in mosaic.tiles:
        idx = np.flatnonzero(fov_of_cell == t.fov)
        if not len(idx):
            continue
        c, r = cpx[idx, 0] - t.col0, cpx[idx, 1] - t.row0
        off = ~((c >= 0) & (c < t.width) & (r >= 0) & (r < t.height))
        if off.any():
            first = [cell_ids[i] for i in idx[off][:5]]
            raise ValueError(f"{t.path}: {int(off.sum())} of the {len(idx)} cells of FOV {t.fov} lie outside this "
                             f"{t.width} x {t.height} px image (first: {C.listed(first)}). Fix: pass the full-size FOV "
                             "images of this export (--image-dir), or outside='drop' (CLI: --outside drop) to drop "
                             "and count those cells")


@clear_reader_errors("CosMx flat-file export")
def read_cosmx(
    path: str | Path,
    *,
    dataset_id: str | None = None,
    sample_id: str | None = None,
    image_dir: str = "CellComposite",
    pixel_size_um: float = DEFAULT_PIXEL_SIZE_UM,
    flip_y: bool = True,
    fovs: Sequence[int] | None = None,
    missing_images: str = "error",
    control_prefixes: Sequence[str] = CONTROL_PREFIXES,
    on_mismatch: str = "error",
    labels: str | Path | None = None,
    labels_id_column: str | None = None,
    section_labels: dict[str, str] | None = None,
    vocabulary=None,
    channel_names: Sequence[str] | None = None,
    cache_bytes: int = 512 * 2**20,
    chunk_rows: int = 20_000,
    check_bounds: bool = True,
    quiet: bool = False,
) -> Section:
    """A CosMx flat-file export as a ``Section`` (counts in memory, image a virtual FOV mosaic).

    Args:
        path: the folder of the flat files.
        dataset_id: the files' prefix (``<dataset_id>_exprMat_file.csv``); needed only when the
            folder holds several slides.
        image_dir: per-FOV image folder, relative to ``path`` (``CellComposite``: RGB JPEG;
            ``Morphology2D``: multi-channel 16-bit TIFF).
        pixel_size_um: µm per pixel (0.12028 on CosMx SMI; check your instrument).
        flip_y: FOV images are flipped in y relative to local coordinates (spatialdata-io's reading).
        fovs: keep only these FOVs.
        missing_images: cells of FOVs without an image: "error" or "drop" (counted).
        control_prefixes: target-name prefixes dropped as controls.
        cache_bytes: decoded JPEG/PNG FOV images kept in memory (LRU).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder. Fix: pass the CosMx flat-file folder")
    if missing_images not in MISSING_POLICIES:
        raise ValueError(f"missing_images={missing_images!r}: expected one of {MISSING_POLICIES}")
    files = _files(folder, dataset_id)

    expr_header = list(C.read_csv(files["expr"], nrows=0).columns)
    efov = _fov_column(expr_header, files["expr"])
    expr_src = str(files["expr"])
    table = C.read_count_csv(files["expr"], [efov, "cell_ID"], control_prefixes,
                             drop_rows=lambda k: C.integer_column(k["cell_ID"], expr_src, "cell_ID") == 0,
                             chunk_rows=chunk_rows,
                             fix="pass the CosMx expression matrix (fov, cell_ID, one column per target)")
    keys = table.keys
    expr_ids = _cell_ids(keys, "cell_ID", efov, expr_src)

    meta_header = list(C.read_csv(files["meta"], nrows=0).columns)
    mfov = _fov_column(meta_header, files["meta"])
    need = [mfov] + [c for c in META_COLUMNS if c != "fov"]
    meta = C.read_cell_table(files["meta"], need, "pass the CosMx cell metadata (fov, cell_ID, CenterX_global_px, "
                             "CenterY_global_px)")
    meta = meta[C.integer_column(meta["cell_ID"], str(files["meta"]), "cell_ID") != 0].reset_index(drop=True)
    meta_ids = _cell_ids(meta, "cell_ID", mfov, str(files["meta"]))
    rows_e, rows_m, mismatch = C.align_ids(expr_ids, meta_ids, f"{files['expr']} (fov, cell_ID)",
                                           f"{files['meta']} (fov, cell_ID)", on_mismatch)
    counts = table.counts[rows_e]
    meta = meta.iloc[rows_m].reset_index(drop=True)
    cell_ids = [str(i) for i in expr_ids[rows_e]]
    dropped = {f"features:{p}": n for p, n in table.dropped_features.items()}
    dropped["cells:background (cell_ID 0)"] = table.n_rows_dropped
    dropped.update(mismatch)

    fov_of_cell = C.integer_column(meta[mfov], str(files["meta"]), mfov)
    keep = np.ones(len(meta), dtype=bool)
    if fovs is not None:
        keep &= np.isin(fov_of_cell, np.asarray(list(fovs), dtype=int))
        dropped["cells:other FOVs"] = int((~keep).sum())
    images = _image_files(folder, image_dir)
    no_image = sorted(set(fov_of_cell[keep].tolist()) - set(images))
    if no_image:
        if missing_images == "error":
            raise ValueError(f"{folder / image_dir}: no image for FOV(s) {C.listed(no_image)} "
                             f"({int(np.isin(fov_of_cell, no_image).sum())} cells). Fix: add the images, pass --fovs, or "
                             "--missing-images drop to drop those cells")
        miss = keep & np.isin(fov_of_cell, no_image)
        dropped["cells:FOV without image"] = int(miss.sum())
        keep &= ~miss
    if not keep.all():
        idx = np.flatnonzero(keep)
        counts, meta = counts[idx], meta.iloc[idx].reset_index(drop=True)
        cell_ids = [cell_ids[i] for i in idx]

    fov_pos = _read_fov_positions(files.get("fov"), pixel_size_um)
    placements = _placements(meta, mfov, fov_pos, str(files["meta"]), str(files.get("fov")))
    mosaic, origin, prov = build_mosaic(placements, images, flip_y=flip_y, cache_bytes=cache_bytes)
    s = 1.0 / pixel_size_um
    um_to_px = np.array([[s, 0.0, -origin[0]], [0.0, s, -origin[1]], [0.0, 0.0, 1.0]])
    xy_um = meta[["CenterX_global_px", "CenterY_global_px"]].to_numpy(dtype=np.float64) * pixel_size_um

    drop_cols = {mfov, "cell_ID", "CenterX_global_px", "CenterY_global_px", *LOCAL_COLUMNS}
    obs = meta[[c for c in meta.columns if c not in drop_cols]].copy()
    obs = obs[[c for c in obs.columns if pd.api.types.is_numeric_dtype(obs[c]) and not pd.api.types.is_bool_dtype(obs[c])]]
    obs.insert(0, "fov", fov_of_cell[keep])
    obs.index = pd.Index(cell_ids, dtype=object)
    n_ch = mosaic.shape[0]
    names = list(channel_names) if channel_names else (["R", "G", "B"] if n_ch == 3 and "Composite" in image_dir
                                                       else [f"channel_{i}" for i in range(n_ch)])
    sid = sample_id or C.safe_sample_id(dataset_id or files["expr"].name.split("_exprMat_file")[0])
    section = Section(
        sample_id=sid, counts=counts, genes=table.genes, cell_ids=cell_ids, centroids_um=xy_um, image=mosaic,
        pixel_size_um=pixel_size_um, um_to_px=um_to_px, channel_names=names, obs=obs, label_keys=[],
        section_labels=dict(section_labels or {}), dropped=dropped, technology="cosmx",
        uns={"source": str(folder), "reader": "spatia_hf.data.readers.cosmx", "files": {k: str(v) for k, v in files.items()},
             "control_feature_counts": {f"features:{k}": v for k, v in table.dropped_feature_counts.items()},
             "background_counts": table.counts_in_dropped_rows, "image_dir": image_dir, **prov},
    )
    if check_bounds:
        _check_cells_on_their_fov(section.centroids_px(), obs["fov"].to_numpy(), mosaic, cell_ids)
    return C.attach_labels_and_coverage(section, labels=labels, labels_id_column=labels_id_column,
                                        vocabulary=vocabulary, quiet=quiet)


# ----------------------------------------------------------------------------- CLI


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="+", metavar="COSMX_DIR", help="CosMx flat-file folder(s), one per section")
    parser.add_argument("--dataset-id", help="file prefix of the slide (when a folder holds several slides)")
    parser.add_argument("--image-dir", default="CellComposite",
                        help="per-FOV image folder inside the export (default CellComposite; or Morphology2D)")
    parser.add_argument("--pixel-size", type=float, default=DEFAULT_PIXEL_SIZE_UM,
                        help=f"µm per pixel (default {DEFAULT_PIXEL_SIZE_UM})")
    parser.add_argument("--no-flip-y", action="store_true",
                        help="FOV images are NOT flipped in y relative to local coordinates")
    parser.add_argument("--fovs", help="comma-separated FOV numbers to keep (default: all)")
    parser.add_argument("--missing-images", choices=MISSING_POLICIES, default="error",
                        help="cells of FOVs without an image: error (default) or drop and count them")
    parser.add_argument("--channel-names", help="comma-separated names of the image channels")
    C.add_common_cli_arguments(parser, what="folder")


def sections_from_args(args: argparse.Namespace) -> Iterator[Section]:
    """Sections of ``spatia convert cosmx``."""
    common = C.common_reader_kwargs(args, len(args.input))
    fovs = [int(f) for f in args.fovs.split(",")] if args.fovs else None
    names = [c.strip() for c in args.channel_names.split(",")] if args.channel_names else None
    for folder, kwargs in zip(args.input, common):
        yield read_cosmx(folder, dataset_id=args.dataset_id, image_dir=args.image_dir, pixel_size_um=args.pixel_size,
                         flip_y=not args.no_flip_y, fovs=fovs, missing_images=args.missing_images,
                         channel_names=names, **kwargs)
