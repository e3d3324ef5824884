"""Tiny instrument bundles written in the real file formats, for the reader tests and the benchmark.

Each writer lays out a folder the way the instrument software does (10x HDF5 via h5py, OME-TIFF
via tifffile, Parquet via pyarrow, CSVs via pandas, JPEG/PNG via Pillow) and returns the ground
truth it used (counts, centroids in µm, the cell that carries a bright marker), so a test can
check what a reader recovers. Images are dim noise plus one bright square marker centred on the
pixel of ``marker_cell``; with ``marker_all=True`` every cell gets a small mark instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

MARKER_VALUE = 60000
XENIUM_STAINS = ("DAPI", "ATP1A1/CD45/E-Cadherin", "18S", "AlphaSMA/Vimentin")
MARKER_HALF = 1  # 3 x 3 px marker


@dataclass
class Truth:
    """What a fixture wrote: cells in file order, counts of the genes (controls excluded)."""

    cell_ids: list[str]
    centroids_um: np.ndarray
    counts: sp.csr_matrix
    genes: list[str]
    marker_cell: str
    pixel_size_um: float
    n_controls: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def _counts(rng: np.random.Generator, n_cells: int, n_genes: int) -> np.ndarray:
    lam = rng.gamma(0.6, 2.0, size=(n_cells, n_genes))
    return rng.poisson(lam).astype(np.int32)


def _draw_marker(img: np.ndarray, row: int, col: int, value: int = MARKER_VALUE) -> None:
    h, w = img.shape[-2:]
    r0, r1 = max(row - MARKER_HALF, 0), min(row + MARKER_HALF + 1, h)
    c0, c1 = max(col - MARKER_HALF, 0), min(col + MARKER_HALF + 1, w)
    img[..., r0:r1, c0:c1] = value


def _noise(rng, shape, dtype=np.uint16, high: int = 400) -> np.ndarray:
    return rng.integers(100, high, size=shape, dtype=np.int64).astype(dtype)


def write_ome_tiff(path: Path, image: np.ndarray, axes: str, pixel_size_um: float, *, channel_names=None,
                   levels: int = 2, tile: int = 64, compression: str | None = "zlib") -> None:
    """A pyramidal, tiled OME-TIFF like the instruments write (level 0 + ``levels - 1`` 2x reductions)."""
    import tifffile

    meta = {"axes": axes, "PhysicalSizeX": pixel_size_um, "PhysicalSizeY": pixel_size_um,
            "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
    if channel_names is not None:
        meta["Channel"] = {"Name": list(channel_names)}
    opts = {"tile": (tile, tile), "compression": compression}
    if compression == "jpeg2000":
        opts["compressionargs"] = {"reversible": True}
    with tifffile.TiffWriter(path, ome=True, bigtiff=True) as tw:
        tw.write(image, subifds=levels - 1, metadata=meta, photometric="minisblack", **opts)
        lvl = image
        for _ in range(levels - 1):
            lvl = lvl[..., ::2, ::2]
            tw.write(lvl, subfiletype=1, photometric="minisblack", **opts)


def write_multifile_ome(folder: Path, planes: list[np.ndarray], names: list[str], pixel_size_um: float, *,
                        pattern: str = "morphology_focus_{:04d}.ome.tif", levels: int = 2, tile: int = 64,
                        compression: str | None = "zlib") -> list[Path]:
    """One stain per pyramidal OME-TIFF, every file carrying the OME-XML of the whole set (``TiffData``
    entries pointing at each file by UUID), as Xenium >= 2.0 writes ``morphology_focus/``."""
    import uuid

    import tifffile

    h, w = planes[0].shape
    files = [pattern.format(k) for k in range(len(planes))]
    uuids = [f"urn:uuid:{uuid.UUID(int=k + 1)}" for k in range(len(planes))]
    chans = "".join(f'<Channel ID="Channel:{i}" Name="{n}" SamplesPerPixel="1"/>' for i, n in enumerate(names))
    tds = "".join(f'<TiffData FirstC="{i}" FirstT="0" FirstZ="0" IFD="0" PlaneCount="1"><UUID FileName="{f}">{u}'
                  "</UUID></TiffData>" for i, (f, u) in enumerate(zip(files, uuids)))
    opts = {"tile": (tile, tile), "compression": compression, "photometric": "minisblack", "metadata": None}
    if compression == "jpeg2000":
        opts["compressionargs"] = {"reversible": True}
    for k, (plane, name) in enumerate(zip(planes, files)):
        xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
               f'UUID="{uuids[k]}"><Image ID="Image:0" Name="morphology_focus"><Pixels ID="Pixels:0" '
               f'DimensionOrder="XYZCT" Type="uint16" SizeX="{w}" SizeY="{h}" SizeC="{len(planes)}" SizeZ="1" SizeT="1" '
               f'PhysicalSizeX="{pixel_size_um}" PhysicalSizeY="{pixel_size_um}">{chans}{tds}</Pixels></Image></OME>')
        with tifffile.TiffWriter(folder / name, bigtiff=True) as tw:
            tw.write(plane, subifds=levels - 1, description=xml, **opts)
            lvl = plane
            for _ in range(levels - 1):
                lvl = lvl[::2, ::2]
                tw.write(lvl, subfiletype=1, **opts)
    return [folder / f for f in files]


def write_10x_h5(path: Path, counts: sp.spmatrix, barcodes, feature_ids, feature_names, feature_types) -> None:
    """A 10x feature-barcode matrix (v3 layout): genes x cells CSC under ``matrix/``."""
    import h5py

    csc = sp.csr_matrix(counts).T.tocsc()  # genes x cells, CSC: indptr over cells
    csc.sort_indices()
    n_features, n_cells = csc.shape
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g.create_dataset("data", data=csc.data.astype(np.int32))
        g.create_dataset("indices", data=csc.indices.astype(np.int64))
        g.create_dataset("indptr", data=csc.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array([n_features, n_cells], dtype=np.int32))
        g.create_dataset("barcodes", data=np.array([str(b).encode() for b in barcodes]))
        ft = g.create_group("features")
        ft.create_dataset("id", data=np.array([str(x).encode() for x in feature_ids]))
        ft.create_dataset("name", data=np.array([str(x).encode() for x in feature_names]))
        ft.create_dataset("feature_type", data=np.array([str(x).encode() for x in feature_types]))
        ft.create_dataset("genome", data=np.array([b"Unknown"] * n_features))
        ft.create_dataset("_all_tag_keys", data=np.array([b"genome"]))


def write_xenium(folder: Path, *, n_cells: int = 40, n_genes: int = 12, pixel_size_um: float = 0.5,
                 image_hw: tuple[int, int] = (256, 320), layout: str = "v2", cells_format: str = "parquet",
                 compression: str | None = "zlib", binary_ids: bool = False, seed: int = 0,
                 marker_cell: int = 3, margin_um: float = 12.0, shuffle_matrix: bool = True) -> Truth:
    """A Xenium output folder.

    Args:
        layout: "v2" (``morphology_focus/morphology_focus_000N.ome.tif``, one stain per file, a
            multi-file OME set), "v4" (the same named ``chNNNN_<stain>.ome.tif``),
            "v1" (``morphology_focus.ome.tif``, DAPI only) or "zstack" (``morphology.ome.tif``, Z x Y x X).
        cells_format: "parquet" or "csv.gz".
        shuffle_matrix: list the matrix's cells in another order than ``cells.parquet`` (real
            bundles share one order; the reader must not rely on it).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    h, w = image_hw
    xy = np.c_[rng.uniform(margin_um, w * pixel_size_um - margin_um, n_cells),
               rng.uniform(margin_um, h * pixel_size_um - margin_um, n_cells)]
    xy[marker_cell] = (np.floor(xy[marker_cell] / pixel_size_um) + 0.5) * pixel_size_um  # on a pixel centre
    cids = [f"cell{k:05d}-1" for k in range(n_cells)]
    genes = [f"GENE{k}" for k in range(n_genes)]
    gex = _counts(rng, n_cells, n_genes)
    controls = {"Negative Control Probe": ["NegControlProbe_00042", "NegControlProbe_00041"],
                "Negative Control Codeword": ["NegControlCodeword_0500"],
                "Unassigned Codeword": ["UnassignedCodeword_0001", "UnassignedCodeword_0002", "UnassignedCodeword_0003"]}
    names, types, fids = [], [], []
    for j, g in enumerate(genes):  # interleave controls to check the filter keeps the right columns
        names.append(g)
        types.append("Gene Expression")
        fids.append(f"ENSG{j:011d}")
    for t, cols in controls.items():
        names.extend(cols)
        types.extend([t] * len(cols))
        fids.extend(cols)
    order = rng.permutation(len(names))
    ctrl = rng.poisson(0.3, size=(n_cells, len(names) - n_genes)).astype(np.int32)
    full = np.concatenate([gex, ctrl], axis=1)[:, order]
    names, types, fids = ([x[i] for i in order] for x in (names, types, fids))
    cell_order = rng.permutation(n_cells) if shuffle_matrix else np.arange(n_cells)
    write_10x_h5(folder / "cell_feature_matrix.h5", sp.csr_matrix(full[cell_order]), [cids[i] for i in cell_order],
                 fids, names, types)

    table = {"cell_id": [c.encode() if binary_ids else c for c in cids], "x_centroid": xy[:, 0],
             "y_centroid": xy[:, 1], "transcript_counts": gex.sum(1), "control_probe_counts": ctrl.sum(1),
             "cell_area": rng.uniform(40, 90, n_cells), "nucleus_area": rng.uniform(10, 30, n_cells)}
    if cells_format == "parquet":
        pq.write_table(pa.table(table), folder / "cells.parquet")
    else:
        pd.DataFrame(table).to_csv(folder / "cells.csv.gz", index=False)
    (folder / "experiment.xenium").write_text(json.dumps({
        "major_version": 5, "run_name": "fixture run", "region_name": "region A", "panel_name": "fixture panel",
        "analysis_sw_version": "xenium-2.0.0.10", "pixel_size": pixel_size_um, "num_cells": n_cells}))

    dapi = _noise(rng, (h, w))
    col, row = (xy[marker_cell] / pixel_size_um).astype(int)
    _draw_marker(dapi, row, col)
    if layout in ("v2", "v4"):
        d = folder / "morphology_focus"
        d.mkdir(exist_ok=True)
        stains = [dapi] + [_noise(rng, (h, w)) for _ in range(3)]
        pattern = "morphology_focus_{:04d}.ome.tif" if layout == "v2" else "ch{:04d}_stain.ome.tif"
        write_multifile_ome(d, stains, list(XENIUM_STAINS), pixel_size_um, pattern=pattern, compression=compression)
    elif layout == "v1":
        write_ome_tiff(folder / "morphology_focus.ome.tif", dapi, "YX", pixel_size_um, compression=compression)
    elif layout == "zstack":
        z = np.stack([_noise(rng, (h, w)), dapi, _noise(rng, (h, w))])
        write_ome_tiff(folder / "morphology.ome.tif", z, "ZYX", pixel_size_um, compression=compression)
    else:
        raise ValueError(layout)
    return Truth(cids, xy, sp.csr_matrix(gex), genes, cids[marker_cell], pixel_size_um,
                 {t: len(c) for t, c in controls.items()}, {"image_hw": image_hw})


def write_cosmx(folder: Path, *, slide: str = "Run5_S1", grid: tuple[int, int] = (2, 2), fov_px: int = 96,
                cells_per_fov: int = 8, n_genes: int = 10, pixel_size_um: float = 0.5, y_sign: int = 1,
                image_format: str = "jpg", origin_px: tuple[float, float] = (1000.0, 2000.0), seed: int = 0,
                marker_cell: int = 5, overlap_px: int = 0) -> Truth:
    """A CosMx flat-file export: ``<slide>_exprMat_file.csv``, ``_metadata_file.csv``,
    ``_fov_positions_file.csv`` and ``CellComposite/CellComposite_F00N.<fmt>`` (RGB uint8).

    Global pixel positions follow ``global = fov_position + (x_local, y_sign * y_local)``; each FOV
    image is stored flipped in y relative to its local coordinates (file row = H - y_local), the
    convention spatialdata-io reads CosMx with.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "CellComposite").mkdir(exist_ok=True)
    n_rows, n_cols = grid
    genes = [f"Gene{k}" for k in range(n_genes)]
    controls = {"NegPrb": [f"NegPrb{k}" for k in range(1, 4)], "SystemControl": ["SystemControl1", "SystemControl2"]}
    step = fov_px - overlap_px
    fov_rows, meta_rows, expr_rows = [], [], []
    all_ids, all_xy, all_counts = [], [], []
    marker_id = None
    k_cell = 0
    for fi in range(n_rows * n_cols):
        fov = fi + 1
        r, c = divmod(fi, n_cols)
        fx = origin_px[0] + c * step
        fy = origin_px[1] + (r * step if y_sign > 0 else (n_rows - 1 - r) * step + fov_px)
        fov_rows.append({"FOV": fov, "x_global_px": fx, "y_global_px": fy,
                         "x_global_mm": fx * pixel_size_um / 1000, "y_global_mm": fy * pixel_size_um / 1000})
        img = rng.integers(10, 40, size=(fov_px, fov_px, 3), dtype=np.uint8)
        lx = rng.integers(10, fov_px - 10, cells_per_fov) + 0.5
        ly = rng.integers(10, fov_px - 10, cells_per_fov) + 0.5
        counts = _counts(rng, cells_per_fov, n_genes)
        ctrl = rng.poisson(0.5, size=(cells_per_fov, 5)).astype(np.int32)
        for j in range(cells_per_fov):
            cid = j + 1
            gx, gy = fx + lx[j], fy + y_sign * ly[j]
            cell = f"{cid}_{fov}"
            meta_rows.append({"fov": fov, "cell_ID": cid, "Area": int(rng.integers(500, 900)),
                              "AspectRatio": float(rng.uniform(0.6, 1.4)), "CenterX_local_px": lx[j],
                              "CenterY_local_px": ly[j], "CenterX_global_px": gx, "CenterY_global_px": gy,
                              "Width": 30, "Height": 28, "Mean.DAPI": float(rng.uniform(100, 900))})
            expr_rows.append([fov, cid, *counts[j], *ctrl[j]])
            all_ids.append(cell)
            all_xy.append((gx * pixel_size_um, gy * pixel_size_um))
            all_counts.append(counts[j])
            if k_cell == marker_cell:
                marker_id = cell
                _draw_marker(np.moveaxis(img, -1, 0), int(fov_px - ly[j]), int(lx[j]), value=255)
            k_cell += 1
        # background "cell" 0 of every FOV: transcripts outside any cell
        expr_rows.append([fov, 0, *rng.poisson(3.0, n_genes), *rng.poisson(1.0, 5)])
        name = f"CellComposite_F{fov:03d}.{image_format}"
        Image.fromarray(img).save(folder / "CellComposite" / name, quality=98) if image_format == "jpg" else \
            Image.fromarray(img).save(folder / "CellComposite" / name)
    cols = ["fov", "cell_ID", *genes, *controls["NegPrb"], *controls["SystemControl"]]
    expr = pd.DataFrame(expr_rows, columns=cols)
    expr = expr.sample(frac=1.0, random_state=seed)  # rows in another order than the metadata
    expr.to_csv(folder / f"{slide}_exprMat_file.csv", index=False)
    pd.DataFrame(meta_rows).to_csv(folder / f"{slide}_metadata_file.csv", index=False)
    pd.DataFrame(fov_rows).to_csv(folder / f"{slide}_fov_positions_file.csv", index=False)
    return Truth(all_ids, np.array(all_xy), sp.csr_matrix(np.array(all_counts)), genes, marker_id, pixel_size_um,
                 {k: len(v) for k, v in controls.items()}, {"n_fovs": n_rows * n_cols})


def write_merscope(folder: Path, *, n_cells: int = 40, n_genes: int = 12, n_blanks: int = 4,
                   um_per_px: float = 0.5, offset_px: tuple[float, float] = (-150.25, -80.75),
                   image_hw: tuple[int, int] = (240, 300), stains=("DAPI", "PolyT"), z_planes=(2, 3), seed: int = 0,
                   marker_cell: int = 7, shuffle_metadata: bool = True, transform_file: bool = True,
                   manifest: bool = True, ome_description: bool = False) -> Truth:
    """A MERSCOPE region folder: ``cell_by_gene.csv`` (with ``Blank-*`` codewords),
    ``cell_metadata.csv`` (``center_x``, ``center_y`` in µm), ``images/mosaic_<stain>_z<N>.tif``
    (plain uncompressed TIFFs, as the instrument writes), the 3x3 µm -> px affine (``transform_file``)
    and ``images/manifest.json`` (``bbox_microns`` + mosaic size, the same affine; ``manifest``).
    ``shuffle_metadata`` lists the metadata's cells in another order than ``cell_by_gene.csv``;
    ``ome_description`` gives the mosaics an OME description tifffile cannot parse (as real ones have)."""
    import tifffile

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    h, w = image_hw
    s = 1.0 / um_per_px
    m = np.array([[s, 0.0, offset_px[0]], [0.0, s, offset_px[1]], [0.0, 0.0, 1.0]])
    px = np.c_[rng.uniform(20, w - 20, n_cells), rng.uniform(20, h - 20, n_cells)]
    px[marker_cell] = np.floor(px[marker_cell]) + 0.5  # on a pixel centre
    um = (px - np.array(offset_px)) / s
    ids = [str(1000000000000000000 + 7919 * k) for k in range(n_cells)]  # EntityIDs are 19-digit ints
    genes = [f"G{k}" for k in range(n_genes)]
    counts = _counts(rng, n_cells, n_genes)
    blanks = rng.poisson(0.2, size=(n_cells, n_blanks))
    cbg = pd.DataFrame(np.c_[counts, blanks], columns=genes + [f"Blank-{k}" for k in range(n_blanks)])
    cbg.insert(0, "cell", ids)
    cbg.to_csv(folder / "cell_by_gene.csv", index=False)
    meta = pd.DataFrame({"fov": rng.integers(0, 4, n_cells), "volume": rng.uniform(500, 2000, n_cells),
                         "center_x": um[:, 0], "center_y": um[:, 1], "min_x": um[:, 0] - 5, "max_x": um[:, 0] + 5,
                         "min_y": um[:, 1] - 5, "max_y": um[:, 1] + 5}, index=pd.Index(ids))
    if shuffle_metadata:
        meta = meta.sample(frac=1.0, random_state=seed)
    meta.to_csv(folder / "cell_metadata.csv")
    if transform_file:
        np.savetxt(folder / "images" / "micron_to_mosaic_pixel_transform.csv", m, fmt="%.6f", delimiter=" ")
    if manifest:
        x0, y0 = -offset_px[0] / s, -offset_px[1] / s
        (folder / "images" / "manifest.json").write_text(json.dumps({
            "microns_per_pixel": um_per_px, "mosaic_width_pixels": w, "mosaic_height_pixels": h,
            "bbox_microns": [x0, y0, x0 + w / s, y0 + h / s],
            "mosaic_files": [{"stain": st, "z": z, "file_name": f"mosaic_{st}_z{z}.tif"}
                             for z in z_planes for st in stains]}))
    broken_ome = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/'
                  '2016-06"><Image ID="Image:0"><Pixels')  # cut short: tifffile's OME parser fails on it
    col, row = px[marker_cell].astype(int)
    for z in z_planes:
        for st in stains:
            img = _noise(rng, (h, w))
            if st == stains[0] and z == max(z_planes):
                _draw_marker(img, row, col)
            tifffile.imwrite(folder / "images" / f"mosaic_{st}_z{z}.tif", img,
                             **({"description": broken_ome, "metadata": None} if ome_description else {}))
    return Truth(ids, um, sp.csr_matrix(counts), genes, ids[marker_cell], um_per_px, {"Blank-": n_blanks},
                 {"um_to_px": m})


def reorder(truth: Truth, cell_ids) -> np.ndarray:
    """Positions in ``truth`` of ``cell_ids`` (readers keep the count matrix's cell order)."""
    pos = {c: i for i, c in enumerate(truth.cell_ids)}
    return np.array([pos[c] for c in cell_ids])


def aligned_counts(truth: Truth, section) -> sp.csr_matrix:
    """The fixture's counts in the section's cell and gene order."""
    g = {x: i for i, x in enumerate(truth.genes)}
    return truth.counts[reorder(truth, section.cell_ids)][:, [g[x] for x in section.genes]]


CROP_PX = 33  # odd, so a crop has a centre pixel


def crop_args(pixel_size_um: float) -> dict:
    """Builder sizes whose cell window is exactly ``CROP_PX`` image pixels (no resampling), small niches."""
    return {"crop_um": CROP_PX * pixel_size_um, "crop_px": CROP_PX, "niche_px": 16, "thumb_px": 32, "progress": False}


def cell_image(dataset_dir: Path, cell_id: str) -> np.ndarray:
    """The stored ``(C, S, S)`` crop of one cell, read back from the Parquet shards."""
    import pyarrow.parquet as pq

    for shard in sorted((Path(dataset_dir) / "cells").glob("*.parquet")):
        t = pq.read_table(shard, columns=["cell_id", "image"]).to_pydict()
        if cell_id in t["cell_id"]:
            return np.array(t["image"][t["cell_id"].index(cell_id)], dtype=np.float64)
    raise KeyError(cell_id)


def marker_offset(crop: np.ndarray, channel: int = 0) -> np.ndarray:
    """(row, col) of the bright 3 x 3 marker relative to the crop centre.

    Per-slide normalisation saturates the marker *and* the brightest noise pixels at 255, so the
    marker is found as the maximum of a 3 x 3 box mean (only a solid block reaches 255 there);
    tied maxima are averaged.
    """
    img = np.asarray(crop[channel], dtype=np.float64)
    p = np.pad(img, 1)
    box = sum(p[1 + dr : 1 + dr + img.shape[0], 1 + dc : 1 + dc + img.shape[1]]
              for dr in (-1, 0, 1) for dc in (-1, 0, 1)) / 9.0
    rr, cc = np.nonzero(box >= box.max() - 1e-6)
    centre = (np.array(img.shape) - 1) / 2.0
    return np.array([rr.mean(), cc.mean()]) - centre
