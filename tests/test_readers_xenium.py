"""Xenium reader: counts equal scanpy's, stains land on the right pixels, bad bundles fail clearly."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instrument_fixtures import XENIUM_STAINS, CROP_PX, cell_image, crop_args, aligned_counts, marker_offset, reorder, write_xenium
from spatia_hf.cli import main
from spatia_hf.data.builder import build_multiscale_dataset, load_sections_info
from spatia_hf.data.gene_panel import read_gene_panel
from spatia_hf.data.readers.xenium import read_10x_h5, read_xenium

PX = 0.5


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xenium") / "outs"
    return folder, write_xenium(folder, pixel_size_um=PX)


def test_counts_equal_scanpy_read_10x_h5(bundle):
    import scanpy as sc

    folder, truth = bundle
    section = read_xenium(folder)
    ref = sc.read_10x_h5(folder / "cell_feature_matrix.h5", gex_only=True)
    assert section.genes == list(ref.var_names)
    assert section.gene_ids == list(ref.var["gene_ids"])
    order = [list(ref.obs_names).index(c) for c in section.cell_ids]
    assert (section.counts != ref.X[order]).nnz == 0
    # and against the fixture's ground truth (the matrix lists cells in another order than cells.parquet)
    o = reorder(truth, section.cell_ids)
    assert sorted(section.cell_ids) == sorted(truth.cell_ids)
    assert sorted(section.genes) == sorted(truth.genes)
    assert (section.counts != aligned_counts(truth, section)).nnz == 0
    np.testing.assert_allclose(section.centroids_um, truth.centroids_um[o])
    assert section.dropped == {f"features:{t}": n for t, n in truth.n_controls.items()}
    assert section.technology == "xenium" and section.sample_id == "region_A"
    assert section.channel_names == list(XENIUM_STAINS) and section.image.shape == (4, 256, 320)
    assert section.uns["images"][0]["pixel_size_um"] == PX
    assert set(section.obs.columns) == {"transcript_counts", "control_probe_counts", "cell_area", "nucleus_area"}


def test_marker_lands_at_the_centre_of_its_cells_crop(bundle, tmp_path):
    folder, truth = bundle
    out = build_multiscale_dataset([read_xenium(folder)], tmp_path / "ds", **crop_args(PX))
    crop = cell_image(out, truth.marker_cell)
    assert crop.shape == (4, CROP_PX, CROP_PX)
    assert np.abs(marker_offset(crop)).max() <= 0.5
    other = cell_image(out, truth.cell_ids[0])  # a cell far from the marker has no bright centre
    assert other[0, CROP_PX // 2, CROP_PX // 2] < 200
    panel = read_gene_panel(out)
    assert sorted(panel["genes"]) == sorted(truth.genes) and all(i.startswith("ENSG") for i in panel["gene_ids"])
    assert panel["dropped"]["region_A"]["features:Negative Control Probe"] == 2


@pytest.mark.parametrize("layout,kwargs", [
    ("v1", {}),
    ("zstack", {}),
    ("v2", {"cells_format": "csv.gz", "binary_ids": False}),
    ("v2", {"binary_ids": True, "compression": "jpeg2000"}),
    ("v4", {}),
])
def test_bundle_variants_read_the_marker_at_the_centroid(tmp_path, layout, kwargs):
    truth = write_xenium(tmp_path / "outs", layout=layout, pixel_size_um=PX, **kwargs)
    section = read_xenium(tmp_path / "outs")
    assert (section.counts != aligned_counts(truth, section)).nnz == 0
    i = section.cell_ids.index(truth.marker_cell)
    col, row = section.centroids_px()[i].astype(int)
    window = np.asarray(section.image[:, row - 5 : row + 6, col - 5 : col + 6])
    assert np.abs(marker_offset(window)).max() <= 0.5
    if layout in ("v2", "v4"):  # one stain per file, not the whole multi-file OME set per file
        assert section.image.shape[0] == 4 and section.channel_names == list(XENIUM_STAINS)
    if layout == "zstack":
        assert section.uns["image_kind"] == "zstack"  # max projection over z finds the marker on plane 1


def test_pyramid_level_scales_the_pixel_size(bundle):
    folder, _ = bundle
    full, half = read_xenium(folder), read_xenium(folder, level=1)
    assert half.image.shape[1:] == (full.image.shape[1] // 2, full.image.shape[2] // 2)
    assert half.pixel_size_um == pytest.approx(2 * full.pixel_size_um)
    np.testing.assert_allclose(half.centroids_px(), full.centroids_px() / 2)


def test_channels_are_selected_by_name_or_index(bundle):
    folder, _ = bundle
    s = read_xenium(folder, channels=["18s", 0])
    assert s.channel_names == ["18S", "DAPI"] and s.image.shape[0] == 2
    full = read_xenium(folder)
    np.testing.assert_array_equal(np.asarray(s.image[1, 10:20, 30:40]), np.asarray(full.image[0, 10:20, 30:40]))
    with pytest.raises(ValueError, match="channel 'PolyT' not found"):
        read_xenium(folder, channels=["PolyT"])


def test_labels_csv_and_vocabulary_coverage(bundle, tmp_path, capsys):
    folder, truth = bundle
    labels = tmp_path / "clusters.csv"
    labels.write_text("Barcode,Cluster\n" + "".join(f"{c},{k % 3}\n" for k, c in enumerate(truth.cell_ids[:30])))
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(truth.genes[:9]) + "\nOTHER\n")
    s = read_xenium(folder, labels=labels, vocabulary=vocab)
    assert s.label_keys == ["Cluster"] and s.obs["Cluster"].isna().sum() == 10
    assert s.obs.loc[truth.cell_ids[4], "Cluster"] == "1"
    cov = s.uns["panel_coverage"]
    assert sorted(cov["kept"]) == sorted(truth.genes[:9]) and sorted(cov["unknown"]) == sorted(truth.genes[9:])
    assert "9/12 genes" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input


def _convert(folder: Path, out: Path, *extra: str) -> int:
    return main(["convert", "xenium", str(folder), "--out", str(out), "--crop-um", "8", "--crop-px", "16",
                 "--niche-px", "16", "--thumb-px", "32", "--no-progress", *extra])


def _assert_failed_cleanly(code: int, out: Path, capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 1, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))
    return err


@pytest.fixture
def broken(tmp_path):
    folder = tmp_path / "outs"
    write_xenium(folder, n_cells=20, pixel_size_um=PX, layout="v1")
    return folder


def test_truncated_h5_is_a_clear_error_and_leaves_nothing(broken, tmp_path, capsys):
    h5 = broken / "cell_feature_matrix.h5"
    h5.write_bytes(h5.read_bytes()[: h5.stat().st_size // 2])
    with pytest.raises(ValueError, match="cell_feature_matrix.h5.*truncated or corrupt"):
        read_10x_h5(h5)
    _assert_failed_cleanly(_convert(broken, tmp_path / "ds"), tmp_path / "ds", capsys, "cell_feature_matrix.h5")


def test_parquet_missing_a_column_names_it(broken, tmp_path, capsys):
    t = pq.read_table(broken / "cells.parquet").drop(["y_centroid"])
    pq.write_table(t, broken / "cells.parquet")
    _assert_failed_cleanly(_convert(broken, tmp_path / "ds"), tmp_path / "ds", capsys, "cells.parquet",
                           "'y_centroid' missing")


def test_image_smaller_than_the_centroids_imply_names_the_image(broken, tmp_path, capsys):
    exp = json.loads((broken / "experiment.xenium").read_text())
    exp["pixel_size"] = PX / 2  # centroids now map to twice the image size
    (broken / "experiment.xenium").write_text(json.dumps(exp))
    err = _assert_failed_cleanly(_convert(broken, tmp_path / "ds"), tmp_path / "ds", capsys, "morphology_focus.ome.tif",
                                 "lie outside the 320 x 256 px image")
    assert "--outside drop" in err
    assert _convert(broken, tmp_path / "ds2", "--outside", "drop") == 0  # the escape hatch the message names
    info = load_sections_info(tmp_path / "ds2")["sections"][0]
    assert info["dropped"]["cells_outside_image"] > 0 and info["n_cells"] + info["dropped"]["cells_outside_image"] == 20


def test_mismatched_cell_ids_are_an_error_unless_intersect(broken, tmp_path, capsys):
    t = pq.read_table(broken / "cells.parquet")
    ids = t.column("cell_id").to_pylist()
    ids[4] = "stranger-1"
    pq.write_table(t.set_column(0, "cell_id", pa.array(ids)), broken / "cells.parquet")
    _assert_failed_cleanly(_convert(broken, tmp_path / "ds"), tmp_path / "ds", capsys, "cell ids differ",
                           "'stranger-1'", "'cell00004-1'", "--on-mismatch intersect")
    s = read_xenium(broken, on_mismatch="intersect")
    assert s.n_cells == 19 and s.dropped["cells_only_in_matrix"] == 1 and s.dropped["cells_only_in_metadata"] == 1


def test_cli_and_dataset_script_convert_a_bundle(bundle, tmp_path, capsys):
    import importlib.util

    folder, truth = bundle
    assert _convert(folder, tmp_path / "ds", "--channels", "DAPI", "--section-label", "tissue=lung") == 0
    assert "1 section(s), 40 cells" in capsys.readouterr().out
    info = load_sections_info(tmp_path / "ds")["sections"][0]
    assert info["channel_names"] == ["DAPI"] and info["section_labels"] == {"tissue": "lung"}
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("convert_xenium", root / "dataset_scripts" / "convert_xenium.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(folder), "--out", str(tmp_path / "ds2"), "--no-progress", "--crop-um", "8",
                        "--crop-px", "16", "--niche-px", "16", "--thumb-px", "32"]) == 0
    import datasets

    cells = datasets.load_dataset(str(tmp_path / "ds2"), "cells", split="train", cache_dir=str(tmp_path / "cache"))
    assert sorted(cells["cell_id"]) == sorted(truth.cell_ids)
