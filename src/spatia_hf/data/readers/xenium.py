"""10x Xenium output bundle -> ``Section``.

A Xenium bundle (one region of one slide) holds:

- ``cell_feature_matrix.h5``: 10x HDF5, genes x cells CSC (``matrix/{data,indices,indptr,shape,barcodes}``
  and ``matrix/features/{id,name,feature_type}``). Only ``feature_type == "Gene Expression"`` is
  kept; control probes / codewords are dropped and counted per type.
- ``cells.parquet`` (or ``cells.csv.gz``): ``cell_id``, ``x_centroid``, ``y_centroid`` in µm, plus
  per-cell QC (``transcript_counts``, ``cell_area``, ...), carried as ``obs``.
- ``experiment.xenium`` (JSON): ``pixel_size`` (µm per image pixel at full resolution).
- morphology: ``morphology_focus/*.ome.tif`` (>= 2.0: one file per stain, pyramidal, JPEG 2000),
  else ``morphology_focus.ome.tif`` or ``morphology_mip.ome.tif`` (< 2.0), else the z-stack
  ``morphology.ome.tif`` (max-projected lazily). Level 0 of each pyramid is read lazily.

Geometry: centroids are µm and pixel = µm / pixel_size with no offset (spatialdata-io's convention),
so ``Section.um_to_px`` is a pure scale.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..section import Section
from ._errors import clear_reader_errors
from . import _common as C
from .images import ChannelSelect, ChannelStack, ome_pixels, open_tiff

GENE_EXPRESSION = "Gene Expression"
MATRIX_FILE = "cell_feature_matrix.h5"
CELLS_FILES = ("cells.parquet", "cells.csv.gz", "cells.csv")
EXPERIMENT_FILE = "experiment.xenium"
CELL_COLUMNS = ("cell_id", "x_centroid", "y_centroid")
# Xenium >= 2.0 stains, in file order (analysis_summary.html of 10x's multimodal segmentation runs)
FOCUS_CHANNELS = ("DAPI", "ATP1A1/CD45/E-Cadherin", "18S", "AlphaSMA/Vimentin")
IMAGE_CHOICES = ("auto", "focus", "mip", "zstack")


def read_10x_h5(path: str | Path) -> tuple[sp.csr_matrix, np.ndarray, list[str], list[str], list[str]]:
    """A 10x ``cell_feature_matrix.h5`` as (cells x features CSR, barcodes, feature ids, names, types).

    The file stores genes x cells in CSC form, which is exactly cells x genes in CSR form, so the
    arrays are used as they are (no transpose copy). Structural problems (truncated file, missing
    dataset, inconsistent lengths) raise ``ValueError`` naming the file and the HDF5 field.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist. Fix: pass a Xenium output folder (it holds {MATRIX_FILE})")
    field = "matrix"
    try:
        with h5py.File(path, "r") as f:
            if "matrix" not in f:
                raise ValueError(f"{path}: no 'matrix' group (groups: {list(f.keys())}). Fix: pass the 10x HDF5 "
                                 "feature-barcode matrix (Cell Ranger >= 3 / Xenium layout)")
            g = f["matrix"]
            arrays = {}
            for field in ("data", "indices", "indptr", "shape", "barcodes", "features/id", "features/name",
                          "features/feature_type"):
                if field not in g:
                    raise ValueError(f"{path}: HDF5 field matrix/{field} is missing. Fix: pass an unmodified "
                                     f"{MATRIX_FILE} (10x feature-barcode matrix, v3 layout)")
                arrays[field] = g[field][()]
    except ValueError as err:
        if "Fix:" in str(err):
            raise
        raise ValueError(f"{path}: cannot read HDF5 field matrix/{field} ({err}). Fix: re-copy the file; it looks "
                         "truncated or corrupt") from None
    except (OSError, KeyError, RuntimeError, TypeError) as err:  # h5py's errors on damaged files
        raise ValueError(f"{path}: cannot read HDF5 field matrix/{field} ({type(err).__name__}: {err}). Fix: re-copy "
                         "the file; it looks truncated or corrupt") from None
    _check_10x_arrays(path, arrays)
    n_features, n_cells = (int(v) for v in arrays["shape"][:2])
    barcodes = C.decode_ids(arrays["barcodes"])
    ids, names, types = (list(C.decode_ids(arrays[f"features/{k}"])) for k in ("id", "name", "feature_type"))
    indptr, indices, data = arrays["indptr"], arrays["indices"], arrays["data"]
    problems = []
    if len(barcodes) != n_cells:
        problems.append(f"matrix/barcodes has {len(barcodes)} entries but matrix/shape says {n_cells} cells")
    if not (len(ids) == len(names) == len(types) == n_features):
        problems.append(f"matrix/features has {len(ids)} ids, {len(names)} names, {len(types)} types but "
                        f"matrix/shape says {n_features} features")
    if len(indptr) != n_cells + 1:
        problems.append(f"matrix/indptr has {len(indptr)} entries, expected n_cells + 1 = {n_cells + 1}")
    elif int(indptr[-1]) != len(data) or len(data) != len(indices):
        problems.append(f"matrix/indptr ends at {int(indptr[-1])} but matrix/data has {len(data)} and "
                        f"matrix/indices {len(indices)} entries")
    elif len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= n_features):
        problems.append(f"matrix/indices range {int(indices.min())}..{int(indices.max())} exceeds {n_features} features")
    if problems:
        raise ValueError(f"{path}: inconsistent 10x matrix: {'; '.join(problems)}. Fix: re-copy or re-export the file")
    counts = sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_features))
    return counts, barcodes, ids, names, types


def _check_10x_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Each field of a 10x matrix is a 1-D array of the right kind (numbers / strings)."""
    for field, value in arrays.items():
        value = np.asarray(value)
        numeric = field in ("data", "indices", "indptr", "shape")
        ok = value.ndim == 1 and (np.issubdtype(value.dtype, np.number) if numeric
                                  else value.dtype.kind in "SUO")
        if field == "shape":
            ok = ok and len(value) >= 2 and np.issubdtype(value.dtype, np.integer) and bool((value[:2] >= 0).all())
        elif field in ("indices", "indptr"):
            ok = ok and np.issubdtype(value.dtype, np.integer)
        if not ok:
            kind = "integer" if field in ("indices", "indptr", "shape") else ("numeric" if numeric else "string")
            raise ValueError(f"{path}: HDF5 field matrix/{field} is not a 1-D {kind} array (dtype {value.dtype}, "
                             f"shape {value.shape}). Fix: re-copy or re-export the file")


def _read_experiment(folder: Path) -> dict[str, Any]:
    path = folder / EXPERIMENT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {EXPERIMENT_FILE}. Fix: pass the Xenium output folder itself (it holds "
                                f"{EXPERIMENT_FILE}, {MATRIX_FILE}, cells.parquet), or give pixel_size_um")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}). Fix: re-copy the file") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object with 'pixel_size', got {type(meta).__name__}. Fix: re-copy "
                         "the file, or pass pixel_size_um")
    return meta


def _pixel_size(meta: dict, given: float | None, folder: Path) -> float:
    px = given if given is not None else meta.get("pixel_size")
    try:
        px = float(px)
    except (TypeError, ValueError):
        px = float("nan")
    if not np.isfinite(px) or px <= 0:
        raise ValueError(f"{folder / EXPERIMENT_FILE}: field 'pixel_size' is {meta.get('pixel_size')!r}, expected µm "
                         "per pixel (0.2125 on Xenium). Fix: correct the file or pass pixel_size_um (--pixel-size)")
    return px


def _focus_files(folder: Path) -> list[Path]:
    d = folder / "morphology_focus"
    files = sorted(d.glob("*.ome.tif")) if d.is_dir() else []
    return files


def _channel_name(path: Path, index: int, ome_names: list[str] | None) -> str:
    if ome_names and len(ome_names) == 1:
        return ome_names[0]
    m = re.match(r"ch\d+_(.+)\.ome\.tif$", path.name)  # Xenium >= 4.0: ch0000_dapi.ome.tif
    if m:
        return m.group(1)
    return FOCUS_CHANNELS[index] if index < len(FOCUS_CHANNELS) else f"channel_{index}"


def open_xenium_image(folder: str | Path, image: str = "auto", *, level: int = 0) -> tuple[Any, list[str], dict]:
    """The morphology image of a Xenium bundle as a lazy ``(C, H, W)`` image, its channel names and
    provenance. ``image``: "auto" (focus, then MIP, then z-stack), "focus", "mip", "zstack" or a path."""
    folder = Path(folder)
    if image not in IMAGE_CHOICES:
        img, info = open_tiff(image, level=level)
        names = info.channel_names or [f"channel_{i}" for i in range(img.shape[0])]
        return img, names, {"images": [info.to_json()]}
    focus_dir = _focus_files(folder)
    candidates: list[tuple[str, list[Path]]] = []
    if image in ("auto", "focus"):
        if focus_dir:
            candidates.append(("focus", focus_dir))
        if (folder / "morphology_focus.ome.tif").is_file():
            candidates.append(("focus", [folder / "morphology_focus.ome.tif"]))
    if image in ("auto", "mip") and (folder / "morphology_mip.ome.tif").is_file():
        candidates.append(("mip", [folder / "morphology_mip.ome.tif"]))
    if image in ("auto", "zstack") and (folder / "morphology.ome.tif").is_file():
        candidates.append(("zstack", [folder / "morphology.ome.tif"]))
    if not candidates:
        raise FileNotFoundError(f"{folder}: no morphology image for image={image!r} (looked for morphology_focus/*.ome.tif"
                                ", morphology_focus.ome.tif, morphology_mip.ome.tif, morphology.ome.tif). Fix: pass "
                                "the Xenium output folder, or an image path (--image PATH)")
    kind, files = candidates[0]
    project = "Z" if kind == "zstack" else None
    # one stain per file (Xenium >= 2.0): each file carries the OME-XML of the whole set, so read
    # every file's own planes (ome=False) and take the names and pixel size from the set's XML
    multi = len(files) > 1
    opened = [open_tiff(f, level=level, project=project, ome=not multi) for f in files]
    infos = [info for _, info in opened]
    if multi:
        px, set_names = ome_pixels(files[0])
        infos[0].pixel_size_um = px
        if set_names and len(set_names) == len(files) and all(i.shape[0] == 1 for i in infos):
            for info, name in zip(infos, set_names):
                info.channel_names = [name]
    if len(opened) == 1:
        img = opened[0][0]
        names = infos[0].channel_names or ([_channel_name(files[0], 0, None)] if img.shape[0] == 1 else
                                           [FOCUS_CHANNELS[i] if i < len(FOCUS_CHANNELS) else f"channel_{i}"
                                            for i in range(img.shape[0])])
    else:
        img = ChannelStack([o[0] for o in opened], [str(f) for f in files])
        names = []
        for i, (f, info) in enumerate(zip(files, infos)):
            names.extend([_channel_name(f, i, info.channel_names)] if info.shape[0] == 1 else
                         (info.channel_names or [f"{f.name}:{j}" for j in range(info.shape[0])]))
    return img, names, {"image_kind": kind, "images": [i.to_json() for i in infos]}


def _select_channels(image, names: list[str], channels: Sequence[str | int] | None, source: str):
    if channels is None:
        return image, names
    idx = []
    lower = [n.lower() for n in names]
    for ch in channels:
        if isinstance(ch, (int, np.integer)) or (isinstance(ch, str) and ch.isdigit()):
            i = int(ch)
            if not 0 <= i < len(names):
                raise ValueError(f"{source}: channel {i} out of range (the image has {len(names)}: {names}). Fix: pick "
                                 "channels by index 0..C-1 or by name")
        elif str(ch).lower() in lower:
            i = lower.index(str(ch).lower())
        else:
            raise ValueError(f"{source}: channel {ch!r} not found (channels: {names}). Fix: pick channels by name or index")
        idx.append(i)
    if isinstance(image, ChannelStack) and all(im.shape[0] == 1 for im in image.images):
        return ChannelStack([image.images[i] for i in idx], [image.sources[i] for i in idx]), [names[i] for i in idx]
    return ChannelSelect(image, idx), [names[i] for i in idx]


@clear_reader_errors("Xenium output folder")
def read_xenium(
    path: str | Path,
    *,
    sample_id: str | None = None,
    image: str = "auto",
    channels: Sequence[str | int] | None = None,
    level: int = 0,
    pixel_size_um: float | None = None,
    on_mismatch: str = "error",
    labels: str | Path | None = None,
    labels_id_column: str | None = None,
    section_labels: dict[str, str] | None = None,
    vocabulary=None,
    check_bounds: bool = True,
    quiet: bool = False,
) -> Section:
    """A Xenium output folder as a ``Section`` (counts in memory, image lazy).

    Args:
        path: the Xenium output folder (``outs/`` of one region).
        sample_id: section name (default: ``region_name`` of ``experiment.xenium``, else the folder name).
        image: "auto" | "focus" | "mip" | "zstack" | a path to an OME-TIFF (see :func:`open_xenium_image`).
        channels: stains to keep, by name (case-insensitive) or index (default: all).
        level: pyramid level (0 = full resolution; level k has the pixel size scaled accordingly).
        pixel_size_um: override ``experiment.xenium``'s ``pixel_size``.
        on_mismatch: cells listed in only one of matrix / cells table: "error" or "intersect".
        labels: optional CSV of per-cell labels (first column cell id), e.g. a clusters export.
        section_labels: section-level labels (tissue, condition, donor).
        vocabulary: a gene vocabulary (model/dataset folder, list or file) to report coverage against.
        check_bounds: raise (naming the image file) when centroids fall off the image.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder. Fix: pass the Xenium output folder (with {MATRIX_FILE})")
    meta = _read_experiment(folder)
    px0 = _pixel_size(meta, pixel_size_um, folder)

    counts, barcodes, ids, names, types = read_10x_h5(folder / MATRIX_FILE)
    types_arr = np.asarray(types, dtype=object)
    keep = np.flatnonzero(types_arr == GENE_EXPRESSION)
    dropped = {f"features:{t}": int(n) for t, n in zip(*np.unique(types_arr[types_arr != GENE_EXPRESSION],
                                                                   return_counts=True))}
    if not len(keep):
        raise ValueError(f"{folder / MATRIX_FILE}: no feature has feature_type {GENE_EXPRESSION!r} (types: "
                         f"{sorted(set(types))}). Fix: pass a gene expression matrix")
    control_counts = {f"features:{t}": float(counts[:, np.flatnonzero(types_arr == t)].sum())
                      for t in sorted(set(types) - {GENE_EXPRESSION})}
    counts = counts[:, keep].tocsr()
    genes, renamed = C.make_unique([names[i] for i in keep])
    gene_ids = [ids[i] for i in keep]

    cells_path = C.find_one(folder, CELLS_FILES, "cells table", "pass the Xenium output folder (cells.parquet)")
    cells = C.read_cell_table(cells_path, CELL_COLUMNS, "pass the Xenium cells table (cell_id, x_centroid, "
                              "y_centroid in µm)")
    cell_ids = C.decode_ids(cells["cell_id"].to_numpy())
    rows_m, rows_t, mismatch = C.align_ids(barcodes, cell_ids, f"{folder / MATRIX_FILE} (matrix/barcodes)",
                                           f"{cells_path} (cell_id)", on_mismatch)
    dropped.update(mismatch)
    counts = counts[rows_m] if len(rows_m) != counts.shape[0] else counts
    cells = cells.iloc[rows_t].reset_index(drop=True)
    ids_kept = [str(b) for b in barcodes[rows_m]]
    try:
        xy = cells[["x_centroid", "y_centroid"]].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{cells_path}: x_centroid / y_centroid are not numeric. Fix: pass µm centroids") from None

    img, chan_names, img_prov = open_xenium_image(folder, image, level=level)
    img, chan_names = _select_channels(img, chan_names, channels, f"{folder} morphology")
    px = px0 * float(img_prov["images"][0].get("downsample", 1.0))  # level k: coarser pixels
    ome_px = img_prov["images"][0].get("pixel_size_um")
    if ome_px and level == 0 and not np.isclose(ome_px, px, rtol=0.01):
        C.warn(f"{folder}: OME PhysicalSizeX {ome_px} µm differs from experiment.xenium pixel_size {px} µm; using "
               "experiment.xenium")

    obs = cells.drop(columns=list(CELL_COLUMNS)).copy()
    obs.index = pd.Index(ids_kept, dtype=object)
    obs = obs[[c for c in obs.columns if pd.api.types.is_numeric_dtype(obs[c]) and not pd.api.types.is_bool_dtype(obs[c])]]
    sid = sample_id or C.safe_sample_id(str(meta.get("region_name") or folder.name))
    section = Section(
        sample_id=sid, counts=counts, genes=genes, cell_ids=ids_kept, centroids_um=xy, image=img,
        pixel_size_um=px, channel_names=chan_names, gene_ids=gene_ids, obs=obs, label_keys=[],
        section_labels=dict(section_labels or {}), dropped=dropped, technology="xenium",
        uns={"source": str(folder), "reader": "spatia_hf.data.readers.xenium",
             "instrument": {k: meta.get(k) for k in ("run_name", "region_name", "panel_name", "panel_num_targets_predesigned",
                                                     "analysis_sw_version", "instrument_sw_version", "num_cells",
                                                     "pixel_size") if k in meta},
             "control_feature_counts": control_counts, "renamed_duplicate_genes": renamed, **img_prov},
    )
    if check_bounds:
        C.check_image_covers(section.centroids_px(), img.shape, f"{folder} morphology image "
                             f"({img_prov['images'][0]['path']})", ids_kept,
                             fix="check that the image belongs to this run and experiment.xenium's pixel_size")
    return C.attach_labels_and_coverage(section, labels=labels, labels_id_column=labels_id_column,
                                        vocabulary=vocabulary, quiet=quiet)


# ----------------------------------------------------------------------------- CLI


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="+", metavar="XENIUM_DIR", help="Xenium output folder(s), one per section")
    parser.add_argument("--image", default="auto",
                        help="morphology image: auto (focus, then mip, then z-stack max projection), focus, mip, "
                             "zstack, or a path to an OME-TIFF (default auto)")
    parser.add_argument("--channels", help="comma-separated stains to keep, by name or index (default: all)")
    parser.add_argument("--level", type=int, default=0, help="pyramid level to read (default 0 = full resolution)")
    parser.add_argument("--pixel-size", type=float, help="µm per pixel (default: experiment.xenium pixel_size)")
    C.add_common_cli_arguments(parser, what="folder")


def sections_from_args(args: argparse.Namespace) -> Iterator[Section]:
    """Sections of ``spatia convert xenium`` (one bundle in memory at a time)."""
    common = C.common_reader_kwargs(args, len(args.input))
    chans = [c.strip() for c in args.channels.split(",")] if args.channels else None
    for folder, kwargs in zip(args.input, common):
        yield read_xenium(folder, image=args.image, channels=chans, level=args.level, pixel_size_um=args.pixel_size,
                          **kwargs)
