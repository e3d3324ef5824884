"""SpatialData reader, and cross-checks of the instrument readers against spatialdata-io.

spatialdata / spatialdata-io are an optional extra (on Python 3.11 they downgrade python-dateutil,
so they usually live in a separate environment); the tests that need them are skipped without them.
Run them with e.g. ``/tmp/sdvenv/bin/python -m pytest tests/test_readers_spatialdata.py`` where that
venv has spatialdata + spatialdata-io and sees this package.
"""

import json
import sys
import warnings

import numpy as np
import pytest

from instrument_fixtures import CROP_PX, cell_image, crop_args, marker_offset, write_cosmx, write_merscope, write_xenium
from spatia_hf.cli import main


def test_missing_extra_is_a_clear_error(monkeypatch, tmp_path, capsys):
    from spatia_hf.data.readers.spatialdata_reader import MissingExtraError, read_spatialdata

    monkeypatch.setitem(sys.modules, "spatialdata", None)  # import spatialdata -> ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'spatia-hf\[spatialdata\]'"):
        read_spatialdata(tmp_path / "x.zarr")
    assert main(["convert", "spatialdata", str(tmp_path / "x.zarr"), "--out", str(tmp_path / "ds"),
                 "--no-progress"]) == 1
    assert "spatia-hf[spatialdata]" in capsys.readouterr().err and not (tmp_path / "ds").exists()


@pytest.fixture
def sdio():
    pytest.importorskip("spatialdata")
    warnings.filterwarnings("ignore")
    return pytest.importorskip("spatialdata_io")


def test_spatialdata_store_in_um_converts_with_the_marker_centred(sdio, tmp_path):
    import anndata as ad
    import spatialdata as sd
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Scale

    from spatia_hf.data.builder import build_multiscale_dataset
    from spatia_hf.data.readers.spatialdata_reader import read_spatialdata

    rng = np.random.default_rng(0)
    px = 0.5
    img = rng.integers(100, 400, size=(2, 200, 240)).astype(np.uint16)
    xy = np.c_[rng.uniform(10, 110, 30), rng.uniform(10, 90, 30)]
    xy[4] = (np.floor(xy[4] / px) + 0.5) * px
    col, row = (xy[4] / px).astype(int)
    img[0, row - 1 : row + 2, col - 1 : col + 2] = 60000
    image = Image2DModel.parse(img, dims=("c", "y", "x"), c_coords=["DAPI", "PolyT"],
                               transformations={"global": Scale([px, px], axes=("x", "y"))})
    circles = ShapesModel.parse(xy, geometry=0, radius=np.full(30, 3.0), index=np.arange(30))
    counts = rng.poisson(1.0, size=(30, 8)).astype(np.float32)
    table = ad.AnnData(counts, obs={"region": ["cells"] * 30, "cell_id": np.arange(30),
                                    "cell_type": ["T", "B", "NK"] * 10})
    table.obs["region"] = table.obs["region"].astype("category")
    table.obs["cell_type"] = table.obs["cell_type"].astype("category")
    table.obs_names = [f"c{k}" for k in range(30)]
    table.var_names = [f"G{k}" for k in range(8)]
    table = TableModel.parse(table, region="cells", region_key="region", instance_key="cell_id")
    sd.SpatialData(images={"stains": image}, shapes={"cells": circles}, tables={"table": table}).write(
        tmp_path / "s.zarr")

    s = read_spatialdata(tmp_path / "s.zarr", um_per_unit=1.0)
    assert s.pixel_size_um == pytest.approx(px) and s.channel_names == ["DAPI", "PolyT"]
    np.testing.assert_allclose(s.centroids_um, xy)
    np.testing.assert_array_equal(np.asarray(s.counts), counts)
    assert s.label_keys == ["cell_type"]
    out = build_multiscale_dataset([s], tmp_path / "ds", **crop_args(px))
    assert np.abs(marker_offset(cell_image(out, "c4"))).max() == 0


def test_xenium_reader_agrees_with_spatialdata_io(sdio, tmp_path):
    import zarr

    from spatia_hf.data.readers.spatialdata_reader import read_spatialdata
    from spatia_hf.data.readers.xenium import read_xenium

    folder = tmp_path / "outs"
    write_xenium(folder, layout="v1", shuffle_matrix=False, pixel_size_um=0.5)
    exp = json.loads((folder / "experiment.xenium").read_text())
    exp["analysis_sw_version"] = "xenium-1.0.2"  # spatialdata-io then needs no cell segmentation arrays
    (folder / "experiment.xenium").write_text(json.dumps(exp))
    zarr.open_group(zarr.storage.ZipStore(folder / "cells.zarr.zip", mode="w"), mode="w").store.close()
    sdata = sdio.xenium(folder, cells_boundaries=False, nucleus_boundaries=False, cells_as_circles=True,
                        cells_labels=False, nucleus_labels=False, transcripts=False, morphology_mip=False,
                        aligned_images=False)
    ours = read_xenium(folder)
    table = sdata.tables["table"]
    order = [list(table.obs_names).index(c) for c in ours.cell_ids]
    assert ours.genes == list(table.var_names)
    assert (ours.counts != table.X[order]).nnz == 0
    np.testing.assert_allclose(ours.centroids_um, table.obsm["spatial"][order])
    sdata.write(tmp_path / "x.zarr")
    back = read_spatialdata(tmp_path / "x.zarr")  # µm per unit read from the circles' µm -> pixel transform
    assert back.pixel_size_um == pytest.approx(0.5)
    o = [back.cell_ids.index(c) for c in ours.cell_ids]
    np.testing.assert_allclose(back.centroids_um[o], ours.centroids_um)
    np.testing.assert_allclose(back.centroids_px()[o], ours.centroids_px())
    np.testing.assert_array_equal(back.image[:, 40:90, 60:150], ours.image[:, 40:90, 60:150])


def test_merscope_reader_agrees_with_spatialdata_io(sdio, tmp_path):
    from spatia_hf.data.readers.merscope import read_merscope
    from spatia_hf.data.readers.spatialdata_reader import read_spatialdata

    folder = tmp_path / "region_0"
    write_merscope(folder, shuffle_metadata=False)
    sdata = sdio.merscope(folder, transcripts=False, cells_boundaries=False)
    ours = read_merscope(folder)
    table = sdata.tables["table"]
    order = [list(table.obs_names).index(c) for c in ours.cell_ids]
    assert ours.genes == list(table.var_names)
    np.testing.assert_array_equal(ours.counts.toarray(), np.asarray(table.X[order]))
    np.testing.assert_allclose(ours.centroids_um, table.obsm["spatial"][order])
    from spatialdata import get_pyramid_levels

    (name,) = sdata.images.keys()
    theirs = get_pyramid_levels(sdata.images[name], n=0)
    for k, ch in enumerate(ours.uns["stains"]):
        np.testing.assert_array_equal(ours.image[k], np.asarray(theirs.sel(c=ch).data))
    sdata.write(tmp_path / "m.zarr")
    with pytest.raises(ValueError, match="not in the store.*spatia convert xenium\\|cosmx\\|merscope"):
        read_spatialdata(tmp_path / "m.zarr")


def test_cosmx_mosaic_agrees_with_spatialdata_io_placement(sdio, tmp_path):
    """Every pixel of spatialdata-io's flipped, affinely placed FOV images equals our mosaic there."""
    import tifffile
    from spatialdata.transformations import get_transformation

    from spatia_hf.data.readers.cosmx import read_cosmx

    folder = tmp_path / "flat"
    write_cosmx(folder, pixel_size_um=0.5, image_format="png")
    (folder / "CellLabels").mkdir()
    for f in range(1, 5):
        tifffile.imwrite(folder / "CellLabels" / f"CellLabels_F{f:03d}.tif", np.zeros((96, 96), np.uint32))
    sdata = sdio.cosmx(folder, dataset_id="Run5_S1", transcripts=False)
    ours = read_cosmx(folder, pixel_size_um=0.5)
    table = sdata.tables["table"]
    order = [list(table.obs_names).index(c) for c in ours.cell_ids]
    genes = [list(table.var_names).index(g) for g in ours.genes]
    np.testing.assert_array_equal(ours.counts.toarray(), np.asarray(table.X[order][:, genes].todense()))
    np.testing.assert_allclose(ours.centroids_um, table.obsm["global"][order] * 0.5)
    x0, y0 = ours.uns["mosaic_origin_global_px"]
    v, u = np.mgrid[0:96, 0:96]
    for fov in range(1, 5):
        el = sdata.images[f"{fov}_image"]
        m = get_transformation(el, to_coordinate_system="global").to_affine_matrix(("x", "y"), ("x", "y"))
        g = np.c_[u.ravel() + 0.5, v.ravel() + 0.5, np.ones(u.size)] @ np.asarray(m).T
        cols, rows = np.floor(g[:, 0] - x0).astype(int), np.floor(g[:, 1] - y0).astype(int)
        mosaic = np.asarray(ours.image[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1])
        got = mosaic[:, rows - rows.min(), cols - cols.min()]
        np.testing.assert_array_equal(got, np.asarray(el.data).reshape(3, -1))


def test_convert_spatialdata_cli(sdio, tmp_path, capsys):
    import zarr

    folder = tmp_path / "outs"
    truth = write_xenium(folder, layout="v1", shuffle_matrix=False, pixel_size_um=0.5)
    exp = json.loads((folder / "experiment.xenium").read_text())
    exp["analysis_sw_version"] = "xenium-1.0.2"
    (folder / "experiment.xenium").write_text(json.dumps(exp))
    zarr.open_group(zarr.storage.ZipStore(folder / "cells.zarr.zip", mode="w"), mode="w").store.close()
    sdio.xenium(folder, cells_boundaries=False, nucleus_boundaries=False, cells_as_circles=True, cells_labels=False,
                nucleus_labels=False, transcripts=False, morphology_mip=False, aligned_images=False
                ).write(tmp_path / "x.zarr")
    args = ["convert", "spatialdata", str(tmp_path / "x.zarr"), "--out", str(tmp_path / "ds"), "--no-progress",
            "--crop-um", str(CROP_PX * 0.5), "--crop-px", str(CROP_PX), "--niche-px", "16", "--thumb-px", "32"]
    assert main(args) == 0, capsys.readouterr().err
    assert np.abs(marker_offset(cell_image(tmp_path / "ds", truth.marker_cell))).max() == 0
