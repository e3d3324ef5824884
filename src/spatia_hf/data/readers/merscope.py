"""Vizgen MERSCOPE region folder -> ``Section``.

One region (``region_N/``) holds:

- ``cell_by_gene.csv``: a cell id column (``cell`` or ``EntityID``), one column per gene;
  ``Blank-*`` codeword columns are dropped and counted. Streamed in chunks.
- ``cell_metadata.csv``: cell id (first column), ``center_x``, ``center_y`` in µm (+ ``fov``,
  ``volume``, bounds: carried as ``obs``).
- ``images/mosaic_<stain>_z<N>.tif``: one whole-region mosaic per stain and z plane, usually
  uncompressed (read through a memory map), and
- ``images/micron_to_mosaic_pixel_transform.csv``: the 3x3 affine µm -> mosaic pixel, used as
  ``Section.um_to_px`` as it is (scale and offset; the pixel size is its inverse scale). Exports without
  it still have ``images/manifest.json``, whose ``bbox_microns`` (x0, y0, x1, y1) spans the mosaic of
  ``mosaic_width_pixels`` x ``mosaic_height_pixels``: the same affine is derived from it (and said so).
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
from .images import ChannelStack, open_tiff

CELL_BY_GENE = "cell_by_gene.csv"
CELL_METADATA = "cell_metadata.csv"
TRANSFORM_FILE = "micron_to_mosaic_pixel_transform.csv"
MANIFEST_FILE = "manifest.json"
BLANK_PREFIXES = ("Blank-",)
MOSAIC_RE = re.compile(r"^mosaic_(.+)_z(\d+)\.tiff?$")
ID_COLUMNS = ("cell", "EntityID", "entity_id", "cell_id")
STAIN_ORDER = ("DAPI", "PolyT")


def read_transform(path: Path) -> np.ndarray:
    """The 3x3 µm -> pixel affine of ``micron_to_mosaic_pixel_transform.csv`` (whitespace- or comma-separated)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist. Fix: pass a MERSCOPE region folder (images/{TRANSFORM_FILE})")
    try:
        rows = [[float(v) for v in re.split(r"[,\s]+", ln.strip())] for ln in path.read_text().splitlines() if ln.strip()]
        m = np.array(rows, dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{path}: not a numeric 3x3 matrix ({err}). Fix: pass the MERSCOPE transform file") from None
    if m.shape != (3, 3) or not np.isfinite(m).all() or not np.allclose(m[2], [0, 0, 1]):
        raise ValueError(f"{path}: expected a 3x3 affine with last row 0 0 1, got shape {m.shape}: {m.tolist()}. "
                         "Fix: pass the MERSCOPE transform file")
    det = float(np.linalg.det(m[:2, :2]))
    if abs(det) < 1e-12:
        raise ValueError(f"{path}: the affine is singular (det {det}). Fix: pass the MERSCOPE transform file")
    return m


def transform_from_manifest(path: Path) -> np.ndarray:
    """The 3x3 µm -> mosaic pixel affine implied by ``images/manifest.json``: ``bbox_microns`` [x0, y0, x1, y1]
    maps onto the ``mosaic_width_pixels`` x ``mosaic_height_pixels`` mosaic (scale W / (x1 - x0), offset
    -x0 * scale; likewise in y)."""
    import json

    try:
        data = json.loads(path.read_text())
        x0, y0, x1, y1 = (float(v) for v in data["bbox_microns"])
        w, h = float(data["mosaic_width_pixels"]), float(data["mosaic_height_pixels"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: cannot derive the µm -> mosaic pixel transform ({type(err).__name__}: {err}); it "
                         "needs bbox_microns [x0, y0, x1, y1], mosaic_width_pixels and mosaic_height_pixels. Fix: "
                         f"put the region's {TRANSFORM_FILE} into images/") from None
    if not (x1 > x0 and y1 > y0 and w > 0 and h > 0):
        raise ValueError(f"{path}: bbox_microns {[x0, y0, x1, y1]} / mosaic {w:g} x {h:g} px is empty. Fix: put the "
                         f"region's {TRANSFORM_FILE} into images/")
    sx, sy = w / (x1 - x0), h / (y1 - y0)
    return np.array([[sx, 0.0, -x0 * sx], [0.0, sy, -y0 * sy], [0.0, 0.0, 1.0]])


def region_transform(images_dir: Path, quiet: bool = False) -> tuple[np.ndarray, str]:
    """(µm -> mosaic pixel affine, where it came from): the transform file, else the manifest."""
    path = images_dir / TRANSFORM_FILE
    if path.is_file():
        return read_transform(path), str(path)
    manifest = images_dir / MANIFEST_FILE
    if not manifest.is_file():
        raise FileNotFoundError(f"{images_dir}: neither {TRANSFORM_FILE} nor {MANIFEST_FILE} is there, so µm cannot "
                                "be placed on the mosaics. Fix: pass a MERSCOPE region folder with its images/ "
                                "folder as exported")
    m = transform_from_manifest(manifest)
    if not quiet:
        C.info(f"{images_dir}: no {TRANSFORM_FILE}; using the µm -> mosaic pixel transform derived from "
               f"{MANIFEST_FILE} (bbox_microns, mosaic size): {m[0, 0]:.4f} px/µm, offset ({m[0, 2]:.1f}, "
               f"{m[1, 2]:.1f}) px")
    return m, str(manifest)


def find_mosaics(images_dir: Path) -> dict[tuple[str, int], Path]:
    """``{(stain, z): path}`` of the ``mosaic_<stain>_z<N>.tif`` files."""
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir} does not exist. Fix: pass a MERSCOPE region folder (with images/)")
    out = {}
    for f in sorted(images_dir.iterdir()):
        m = MOSAIC_RE.match(f.name)
        if m:
            out[(m.group(1), int(m.group(2)))] = f
    if not out:
        raise FileNotFoundError(f"{images_dir}: no mosaic_<stain>_z<N>.tif images. Fix: pass a MERSCOPE region folder")
    return out


def _choose(mosaics: dict[tuple[str, int], Path], stains: Sequence[str] | None, z: int | None,
            images_dir: Path) -> tuple[list[str], int]:
    zs = sorted({k[1] for k in mosaics})
    if z is None:
        z = 3 if 3 in zs else zs[len(zs) // 2]
    elif z not in zs:
        raise ValueError(f"{images_dir}: no mosaic at z={z} (z planes: {zs}). Fix: pick --z among them")
    at_z = [s for (s, zz) in mosaics if zz == z]
    if stains is None:
        stains = [s for s in STAIN_ORDER if s in at_z] + sorted(s for s in at_z if s not in STAIN_ORDER)
    missing = [s for s in stains if (s, z) not in mosaics]
    if missing:
        raise ValueError(f"{images_dir}: no mosaic for stain(s) {missing} at z={z} (stains there: {sorted(at_z)}). Fix: "
                         "pick --stains among them")
    return list(stains), z


def _check_manifest_size(manifest: Path, image_shape: Sequence[int], mosaic: Path) -> None:
    import json

    data = json.loads(manifest.read_text())
    want = (int(data["mosaic_height_pixels"]), int(data["mosaic_width_pixels"]))
    have = tuple(int(v) for v in image_shape[-2:])
    if want != have:
        raise ValueError(f"{manifest}: mosaic {want[1]} x {want[0]} px, but {mosaic} is {have[1]} x {have[0]} px, so "
                         f"the transform derived from it would misplace cells. Fix: put the region's {TRANSFORM_FILE} "
                         "into images/")


def _id_column(columns: Sequence[str], source: Path) -> str:
    for c in ID_COLUMNS:
        if c in columns:
            return c
    first = str(columns[0])
    if first == "" or first.startswith("Unnamed"):
        return first
    raise ValueError(f"{source}: no cell id column (looked for {ID_COLUMNS} or an unnamed first column; columns: "
                     f"{C.listed(columns, 10)}). Fix: pass the MERSCOPE export")


@clear_reader_errors("MERSCOPE region folder")
def read_merscope(
    path: str | Path,
    *,
    sample_id: str | None = None,
    stains: Sequence[str] | None = None,
    z: int | None = None,
    blank_prefixes: Sequence[str] = BLANK_PREFIXES,
    on_mismatch: str = "error",
    labels: str | Path | None = None,
    labels_id_column: str | None = None,
    section_labels: dict[str, str] | None = None,
    vocabulary=None,
    chunk_rows: int = 20_000,
    check_bounds: bool = True,
    quiet: bool = False,
) -> Section:
    """A MERSCOPE region folder as a ``Section`` (counts in memory, mosaics memory-mapped).

    Args:
        path: the region folder (``cell_by_gene.csv``, ``cell_metadata.csv``, ``images/``).
        stains: mosaic stains to stack as channels (default: every stain at ``z``, DAPI and PolyT first).
        z: z plane of the mosaics (default 3 when present, else the middle plane).
        blank_prefixes: gene-column prefixes dropped as blank codewords.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder. Fix: pass a MERSCOPE region folder")
    cbg_path, meta_path = folder / CELL_BY_GENE, folder / CELL_METADATA
    for p in (cbg_path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist. Fix: pass a MERSCOPE region folder (it holds {CELL_BY_GENE} "
                                    f"and {CELL_METADATA})")
    header = list(C.read_csv(cbg_path, nrows=0).columns)
    cid = _id_column(header, cbg_path)
    table = C.read_count_csv(cbg_path, [cid], blank_prefixes, chunk_rows=chunk_rows,
                             fix="pass the MERSCOPE cell_by_gene.csv (cell id column, one column per gene)")
    ids = table.keys[cid].astype(str).to_numpy(object)

    mheader = list(C.read_csv(meta_path, nrows=0).columns)
    mid = _id_column(mheader, meta_path)
    C.check_columns(mheader, ["center_x", "center_y"], str(meta_path), "pass the MERSCOPE cell_metadata.csv "
                    "(center_x, center_y in µm)")
    meta = C.read_csv(meta_path, dtype={mid: str})
    rows_c, rows_m, mismatch = C.align_ids(ids, meta[mid].astype(str).to_numpy(object), f"{cbg_path} ({cid})",
                                           f"{meta_path} ({mid or 'first column'})", on_mismatch)
    counts = table.counts[rows_c]
    meta = meta.iloc[rows_m].reset_index(drop=True)
    cell_ids = [str(i) for i in ids[rows_c]]
    try:
        xy = meta[["center_x", "center_y"]].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{meta_path}: center_x / center_y are not numeric. Fix: pass µm centroids") from None

    images_dir = folder / "images"
    mosaics = find_mosaics(images_dir)
    m, transform_source = region_transform(images_dir, quiet=quiet)
    stains, z = _choose(mosaics, stains, z, images_dir)
    opened = [open_tiff(mosaics[(s, z)]) for s in stains]
    if transform_source.endswith(MANIFEST_FILE):
        _check_manifest_size(images_dir / MANIFEST_FILE, opened[0][0].shape, mosaics[(stains[0], z)])
    image = opened[0][0] if len(opened) == 1 else ChannelStack([o[0] for o in opened],
                                                               [str(mosaics[(s, z)]) for s in stains])
    px = float(1.0 / np.sqrt(abs(np.linalg.det(m[:2, :2]))))

    obs = meta.drop(columns=[c for c in (mid, "center_x", "center_y") if c in meta.columns]).copy()
    obs = obs[[c for c in obs.columns if pd.api.types.is_numeric_dtype(obs[c]) and not pd.api.types.is_bool_dtype(obs[c])]]
    obs.index = pd.Index(cell_ids, dtype=object)
    dropped = {f"features:{p}": n for p, n in table.dropped_features.items()}
    dropped.update(mismatch)
    sid = sample_id or C.safe_sample_id(folder.name)
    section = Section(
        sample_id=sid, counts=counts, genes=table.genes, cell_ids=cell_ids, centroids_um=xy, image=image,
        pixel_size_um=px, um_to_px=m, channel_names=[f"{s}_z{z}" for s in stains], obs=obs, label_keys=[],
        section_labels=dict(section_labels or {}), dropped=dropped, technology="merscope",
        uns={"source": str(folder), "reader": "spatia_hf.data.readers.merscope", "z": z, "stains": stains,
             "micron_to_mosaic_pixel_transform": m.tolist(), "transform_source": transform_source, "images": [o[1].to_json() for o in opened],
             "control_feature_counts": {f"features:{k}": v for k, v in table.dropped_feature_counts.items()}},
    )
    if check_bounds:
        C.check_image_covers(section.centroids_px(), image.shape, f"{mosaics[(stains[0], z)]}", cell_ids,
                             fix=f"check images/{TRANSFORM_FILE} and that the mosaics belong to this region")
    return C.attach_labels_and_coverage(section, labels=labels, labels_id_column=labels_id_column,
                                        vocabulary=vocabulary, quiet=quiet)


# ----------------------------------------------------------------------------- CLI


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="+", metavar="REGION_DIR", help="MERSCOPE region folder(s), one per section")
    parser.add_argument("--stains", help="comma-separated mosaic stains to stack (default: all at --z, DAPI first)")
    parser.add_argument("--z", type=int, help="z plane of the mosaics (default 3, else the middle plane)")
    C.add_common_cli_arguments(parser, what="region")


def sections_from_args(args: argparse.Namespace) -> Iterator[Section]:
    """Sections of ``spatia convert merscope``."""
    common = C.common_reader_kwargs(args, len(args.input))
    stains = [s.strip() for s in args.stains.split(",")] if args.stains else None
    for folder, kwargs in zip(args.input, common):
        yield read_merscope(folder, stains=stains, z=args.z, **kwargs)
