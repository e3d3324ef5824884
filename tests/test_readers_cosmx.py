"""CosMx reader: controls and background dropped, FOV mosaic placed (y flip included), clear errors."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from instrument_fixtures import CROP_PX, aligned_counts, cell_image, crop_args, marker_offset, reorder, write_cosmx
from spatia_hf.cli import main
from spatia_hf.data.builder import build_multiscale_dataset
from spatia_hf.data.readers.cosmx import read_cosmx

PX = 0.5


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cosmx") / "flat"
    return folder, write_cosmx(folder, pixel_size_um=PX)


def test_counts_positions_and_dropped_controls(export):
    folder, truth = export
    s = read_cosmx(folder, pixel_size_um=PX)
    assert sorted(s.cell_ids) == sorted(truth.cell_ids) and s.genes == truth.genes
    assert (s.counts != aligned_counts(truth, s)).nnz == 0
    np.testing.assert_allclose(s.centroids_um, truth.centroids_um[reorder(truth, s.cell_ids)])
    assert s.dropped == {"features:NegPrb": 3, "features:SystemControl": 2, "cells:background (cell_ID 0)": 4}
    assert s.uns["background_counts"] > 0 and s.technology == "cosmx" and s.sample_id == "Run5_S1"
    assert s.image.shape == (3, 192, 192) and s.channel_names == ["R", "G", "B"]
    assert {"fov", "Area", "AspectRatio", "Mean.DAPI"} <= set(s.obs.columns)
    assert "CenterX_global_px" not in s.obs.columns


@pytest.mark.parametrize("y_sign", [1, -1])
def test_marker_lands_at_crop_centre_through_the_flipped_fov_mosaic(tmp_path, y_sign):
    truth = write_cosmx(tmp_path / "flat", pixel_size_um=PX, y_sign=y_sign, marker_cell=13)
    section = read_cosmx(tmp_path / "flat", pixel_size_um=PX)
    out = build_multiscale_dataset([section], tmp_path / "ds", **crop_args(PX))
    crop = cell_image(out, truth.marker_cell)
    assert crop.shape == (3, CROP_PX, CROP_PX)
    assert np.abs(marker_offset(crop)).max() <= 0.5  # JPEG blur is symmetric: the centre stays
    # without the y flip the marker is not at the centre: the orientation really matters
    unflipped = read_cosmx(tmp_path / "flat", pixel_size_um=PX, flip_y=False)
    i = unflipped.cell_ids.index(truth.marker_cell)
    col, row = unflipped.centroids_px()[i].astype(int)
    window = np.asarray(unflipped.image[0, row - 3 : row + 4, col - 3 : col + 4])
    assert window.max() < 200


def test_fov_positions_file_places_fovs_without_local_coordinates(tmp_path):
    truth = write_cosmx(tmp_path / "flat", pixel_size_um=PX, image_format="png")
    meta_path = next((tmp_path / "flat").glob("*_metadata_file.csv"))
    pd.read_csv(meta_path).drop(columns=["CenterX_local_px", "CenterY_local_px"]).to_csv(meta_path, index=False)
    s = read_cosmx(tmp_path / "flat", pixel_size_um=PX)
    i = s.cell_ids.index(truth.marker_cell)
    col, row = s.centroids_px()[i].astype(int)
    assert np.abs(marker_offset(np.asarray(s.image[:, row - 5 : row + 6, col - 5 : col + 6]))).max() <= 0.5


def test_mosaic_reads_only_the_fovs_a_window_touches(export):
    folder, _ = export
    s = read_cosmx(folder, pixel_size_um=PX)
    before = s.image.n_file_reads
    s.image[:, 10:20, 10:20]  # inside the first FOV only
    assert s.image.n_file_reads - before == 1
    s.image[:, 10:20, 10:20]
    assert s.image.n_file_reads - before == 1  # decoded FOVs are cached


def test_fov_selection_and_missing_images(export, tmp_path):
    folder, truth = export
    s = read_cosmx(folder, pixel_size_um=PX, fovs=[2, 3])
    assert s.n_cells == 16 and set(s.obs["fov"]) == {2, 3} and s.dropped["cells:other FOVs"] == 16
    import shutil

    copy = tmp_path / "flat"
    shutil.copytree(folder, copy)
    (copy / "CellComposite" / "CellComposite_F004.jpg").unlink()
    with pytest.raises(ValueError, match=r"no image for FOV\(s\) 4 \(8 cells\).*--missing-images drop"):
        read_cosmx(copy, pixel_size_um=PX)
    s = read_cosmx(copy, pixel_size_um=PX, missing_images="drop")
    assert s.n_cells == 24 and s.dropped["cells:FOV without image"] == 8


def _assert_failed_cleanly(code: int, out: Path, capsys, *needles: str) -> None:
    err = capsys.readouterr().err
    assert code == 1, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def _convert(folder: Path, out: Path, *extra: str) -> int:
    return main(["convert", "cosmx", str(folder), "--out", str(out), "--pixel-size", str(PX), "--crop-um", "8",
                 "--crop-px", "16", "--niche-px", "16", "--thumb-px", "32", "--no-progress", *extra])


def test_bad_inputs_fail_clearly_and_leave_nothing(tmp_path, capsys):
    folder = tmp_path / "flat"
    write_cosmx(folder, pixel_size_um=PX)
    meta_path = next(folder.glob("*_metadata_file.csv"))
    meta = pd.read_csv(meta_path)
    # a metadata file missing a column
    meta.drop(columns=["CenterY_global_px"]).to_csv(meta_path, index=False)
    _assert_failed_cleanly(_convert(folder, tmp_path / "ds"), tmp_path / "ds", capsys, "_metadata_file.csv",
                           "'CenterY_global_px' missing")
    # cells in the metadata that the expression matrix lacks
    meta.iloc[:-2].to_csv(meta_path, index=False)
    _assert_failed_cleanly(_convert(folder, tmp_path / "ds"), tmp_path / "ds", capsys, "cell ids differ",
                           "2 only in the matrix")
    # a FOV image smaller than its cells' positions imply
    meta.to_csv(meta_path, index=False)
    from PIL import Image

    small = folder / "CellComposite" / "CellComposite_F002.jpg"
    Image.open(small).crop((0, 0, 48, 48)).save(small)
    _assert_failed_cleanly(_convert(folder, tmp_path / "ds"), tmp_path / "ds", capsys, "CellComposite_F002.jpg",
                           "cells of FOV 2 lie outside this 48 x 48 px image")
    assert _convert(folder, tmp_path / "ok", "--outside", "drop") == 0
