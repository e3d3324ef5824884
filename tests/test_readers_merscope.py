"""MERSCOPE reader: blanks dropped, the µm -> mosaic affine places cells, mosaics memory-mapped."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from instrument_fixtures import CROP_PX, aligned_counts, cell_image, crop_args, marker_offset, reorder, write_merscope
from spatia_hf.cli import main
from spatia_hf.data.builder import build_multiscale_dataset, load_sections_info
from spatia_hf.data.readers.merscope import read_merscope

UM_PER_PX = 0.5


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    folder = tmp_path_factory.mktemp("merscope") / "region_0"
    return folder, write_merscope(folder, um_per_px=UM_PER_PX)


def test_counts_blanks_affine_and_memmap(region):
    folder, truth = region
    s = read_merscope(folder)
    assert sorted(s.cell_ids) == sorted(truth.cell_ids) and s.genes == truth.genes
    assert s.cell_ids[0] == "1000000000000000000"  # 19-digit ids survive (no float round trip)
    assert (s.counts != aligned_counts(truth, s)).nnz == 0
    np.testing.assert_allclose(s.centroids_um, truth.centroids_um[reorder(truth, s.cell_ids)])
    np.testing.assert_allclose(s.um_to_px, truth.extra["um_to_px"])
    assert s.pixel_size_um == pytest.approx(UM_PER_PX)
    assert s.dropped == {"features:Blank-": 4}
    assert s.channel_names == ["DAPI_z3", "PolyT_z3"] and s.uns["z"] == 3
    assert all(i["access"] == "memmap" for i in s.uns["images"])
    assert {"fov", "volume"} <= set(s.obs.columns) and "center_x" not in s.obs.columns


def test_marker_lands_at_crop_centre_through_the_affine(region, tmp_path):
    folder, truth = region
    out = build_multiscale_dataset([read_merscope(folder)], tmp_path / "ds", **crop_args(UM_PER_PX))
    crop = cell_image(out, truth.marker_cell)
    assert crop.shape == (2, CROP_PX, CROP_PX)
    assert np.abs(marker_offset(crop)).max() == 0
    info = load_sections_info(out)["sections"][0]
    assert info["technology"] == "merscope" and info["dropped"] == {"features:Blank-": 4}


def test_z_and_stain_selection(region):
    folder, truth = region
    s = read_merscope(folder, stains=["PolyT"], z=2)
    assert s.channel_names == ["PolyT_z2"] and s.image.shape[0] == 1
    with pytest.raises(ValueError, match=r"no mosaic at z=5 \(z planes: \[2, 3\]\)"):
        read_merscope(folder, z=5)
    with pytest.raises(ValueError, match="no mosaic for stain.*Cellbound1"):
        read_merscope(folder, stains=["Cellbound1"])


def _copy(region, tmp_path) -> Path:
    import shutil

    dst = tmp_path / "region_0"
    shutil.copytree(region[0], dst)
    return dst


def _fails(folder: Path, out: Path, capsys, *needles: str) -> None:
    code = main(["convert", "merscope", str(folder), "--out", str(out), "--crop-um", "8", "--crop-px", "16",
                 "--niche-px", "16", "--thumb-px", "32", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_bad_transform_missing_column_small_image_and_mismatch(region, tmp_path, capsys):
    folder = _copy(region, tmp_path)
    tf = folder / "images" / "micron_to_mosaic_pixel_transform.csv"
    good = tf.read_text()
    tf.write_text("2 0 1\n0 2 1\n")
    _fails(folder, tmp_path / "ds", capsys, "micron_to_mosaic_pixel_transform.csv", "3x3 affine")
    tf.write_text(good.replace("-150.250000", "-1500.250000"))  # cells now left of the mosaic
    _fails(folder, tmp_path / "ds", capsys, "mosaic_DAPI_z3.tif", "lie outside the 300 x 240 px image")
    tf.write_text(good)
    meta = pd.read_csv(folder / "cell_metadata.csv", index_col=0, dtype={0: str})
    meta.drop(columns=["center_y"]).to_csv(folder / "cell_metadata.csv")
    _fails(folder, tmp_path / "ds", capsys, "cell_metadata.csv", "'center_y' missing")
    meta.iloc[1:].to_csv(folder / "cell_metadata.csv")
    _fails(folder, tmp_path / "ds", capsys, "cell ids differ", "1 only in the matrix")
    s = read_merscope(folder, on_mismatch="intersect")
    assert s.n_cells == 39 and s.dropped["cells_only_in_matrix"] == 1


def test_without_the_transform_file_the_manifest_defines_it_and_says_so(tmp_path, capsys):
    folder = tmp_path / "region_1"
    truth = write_merscope(folder, um_per_px=UM_PER_PX, transform_file=False)
    s = read_merscope(folder)
    np.testing.assert_allclose(s.um_to_px, truth.extra["um_to_px"], atol=1e-9)
    assert s.pixel_size_um == pytest.approx(UM_PER_PX) and s.uns["transform_source"].endswith("manifest.json")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no micron_to_mosaic_pixel_transform.csv; using the µm -> mosaic pixel " \
                                    "transform derived from manifest.json" in err
    out = build_multiscale_dataset([s], tmp_path / "ds", **crop_args(UM_PER_PX))
    assert np.abs(marker_offset(cell_image(out, truth.marker_cell))).max() == 0  # same crops as with the file


def test_a_manifest_that_disagrees_with_the_mosaic_or_no_transform_at_all_is_refused(tmp_path):
    folder = tmp_path / "region_2"
    write_merscope(folder, transform_file=False)
    manifest = folder / "images" / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "mosaic_width_pixels": 999}))
    with pytest.raises(ValueError, match="mosaic 999 x 240 px, but .* is 300 x 240 px"):
        read_merscope(folder, quiet=True)
    manifest.unlink()
    with pytest.raises(FileNotFoundError, match="neither micron_to_mosaic_pixel_transform.csv nor manifest.json"):
        read_merscope(folder)


def test_tifffile_ome_parse_errors_stay_out_of_the_terminal(tmp_path, capfd, caplog):
    folder = tmp_path / "region_3"
    write_merscope(folder, ome_description=True)
    s = read_merscope(folder)
    assert not capfd.readouterr().err and not [r for r in caplog.records if r.name == "tifffile"]
    assert any("OME series raised ParseError" in m for m in s.uns["images"][0]["tifffile_messages"])
