"""``spatia synth`` and ``spatia convert anndata|synthetic`` end to end, and the AnnData reader."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from spatia_hf.cli import main
from spatia_hf.data import schema
from spatia_hf.data.builder import build_multiscale_dataset, load_sections_info
from spatia_hf.data.readers import READERS, ReaderEntry
from spatia_hf.data.readers.anndata_reader import read_anndata
from spatia_hf.data.synthetic import make_synthetic_sections

SIZES = ["--crop-um", "16", "--crop-px", "16", "--niche-px", "16", "--thumb-px", "32", "--no-progress"]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "synth"
    assert main(["synth", "--out", str(out), "--sections", "2", "--cells", "120", "--seed", "0", "--no-progress"]) == 0
    return out


def _table(path: Path, config: str, sid: str) -> dict:
    return pq.read_table(path / config / f"{sid}-00000.parquet").to_pydict()


def test_synth_writes_h5ad_tiff_and_manifest(synth_dir, capsys):
    names = sorted(p.name for p in synth_dir.iterdir())
    assert names == ["synth_s00.h5ad", "synth_s00.ome.tif", "synth_s01.h5ad", "synth_s01.ome.tif", "synthetic.json"]


def test_convert_anndata_matches_the_in_memory_build(synth_dir, tmp_path, capsys):
    out = tmp_path / "ds"
    args = ["convert", "anndata", "--adata", str(synth_dir / "synth_s00.h5ad"), str(synth_dir / "synth_s01.h5ad"),
            "--image", str(synth_dir / "synth_s00.ome.tif"), str(synth_dir / "synth_s01.ome.tif"),
            "--pixel-size", "0.5", "--label-keys", "cell_type,domain", "--out", str(out), *SIZES]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "2 section(s), 240 cells" in printed and "load with" in printed
    ref = build_multiscale_dataset(make_synthetic_sections(2, 120, seed=0), tmp_path / "ref", crop_um=16, crop_px=16,
                                   niche_px=16, thumb_px=32, label_keys=["cell_type", "domain"], progress=False)
    for config in schema.CONFIGS:
        for sid in ("synth_s00", "synth_s01"):
            a, b = _table(out, config, sid), _table(ref, config, sid)
            assert a == b, (config, sid)
    info = load_sections_info(out)
    assert info["sections"][0]["technology"] == "synthetic"
    assert info["sections"][0]["uns"]["synthetic_ground_truth"]["morphology_genes"]["NUCSIZE"]["exponent"] == 0.5
    import datasets

    cells = datasets.load_dataset(str(out), "cells", split="train", cache_dir=str(tmp_path / "cache"))
    assert len(cells) == 240 and set(cells.unique("cell_type")) <= set(make_synthetic_sections(1, 5)[0].obs
                                                                        ["cell_type"].cat.categories)


def test_convert_synthetic_folder(synth_dir, tmp_path):
    out = tmp_path / "ds"
    assert main(["convert", "synthetic", str(synth_dir), "--out", str(out), *SIZES]) == 0
    assert sorted(p.name for p in (out / "tissues").iterdir()) == ["synth_s00-00000.parquet", "synth_s01-00000.parquet"]
    t = _table(out, "tissues", "synth_s01")
    assert t["condition"] == ["disease"] and t["tissue"] == ["tissue_A"]


def test_cli_errors_are_one_line_and_leave_no_output(synth_dir, tmp_path, capsys):
    out = tmp_path / "ds"
    base = ["convert", "anndata", "--adata", str(synth_dir / "synth_s00.h5ad"), "--image",
            str(synth_dir / "synth_s00.ome.tif"), "--out", str(out), *SIZES]
    assert main(base + ["--pixel-size", "0.25"]) == 1
    assert "pixel sizes disagree" in capsys.readouterr().err
    assert main(base[:5] + [str(synth_dir / "synth_s00.ome.tif"), str(synth_dir / "synth_s01.ome.tif")] + base[6:]) == 1
    assert "--image: 2 images for 1 --adata files" in capsys.readouterr().err
    assert main(base + ["--spatial-units", "um"]) == 1  # pixels read as µm put half the cells off the image
    err = capsys.readouterr().err.strip()
    assert err.startswith("spatia convert: error: ") and "fall outside it" in err
    assert "they look like image pixels; pass spatial_units='px'" in err
    assert len(err.splitlines()) == 1
    a = _adata(synth_dir)
    del a.obsm["spatial"]
    a.write_h5ad(tmp_path / "no_spatial.h5ad")
    assert main(["convert", "anndata", "--adata", str(tmp_path / "no_spatial.h5ad")] + base[4:]) == 1
    assert "obsm['spatial'] is missing" in capsys.readouterr().err
    (tmp_path / "no_spatial.h5ad").unlink()
    assert list(tmp_path.iterdir()) == []
    assert main(base) == 0
    assert main(base) == 1 and "already exists" in capsys.readouterr().err


def _adata(synth_dir):
    import anndata as ad

    return ad.read_h5ad(synth_dir / "synth_s00.h5ad")


def test_reader_errors_name_the_field(synth_dir):
    img = synth_dir / "synth_s00.ome.tif"
    a = _adata(synth_dir)
    del a.obsm["spatial"]
    with pytest.raises(ValueError, match=r"obsm\['spatial'\] is missing.*--spatial-key"):
        read_anndata(a, img)
    a = _adata(synth_dir)
    a.obsm["spatial"] = np.array([["a", "b"]] * a.n_obs, dtype=object)
    with pytest.raises(ValueError, match=r"obsm\['spatial'\] is not numeric"):
        read_anndata(a, img)
    a = _adata(synth_dir)
    a.X = a.X.astype(np.float32) / 3.0
    with pytest.raises(ValueError, match="non-integer values.*--layer"):
        read_anndata(a, img)
    a = _adata(synth_dir)
    del a.uns["spatial_pixel_size_um"]
    s = read_anndata(a, img)  # falls back on the OME pixel size
    assert s.pixel_size_um == 0.5 and s.channel_names == ["DAPI", "boundary"]
    with pytest.raises(FileNotFoundError, match="nope.tif does not exist"):
        read_anndata(a, synth_dir / "nope.tif")


def test_reader_reads_lazily_and_accepts_um_coordinates(synth_dir, tmp_path):
    a = _adata(synth_dir)
    s = read_anndata(a, synth_dir / "synth_s00.ome.tif")
    assert s.uns["image"]["access"] in ("zarr", "memmap") and s.image.shape[0] == 2  # lazy, not loaded
    ref = make_synthetic_sections(1, 120, seed=0)[0]
    assert np.array_equal(np.asarray(s.image[:, 10:50, 20:30]), ref.image[:, 10:50, 20:30])
    a.obsm["spatial_um"] = a.obsm["spatial"] * 0.5
    s2 = read_anndata(a, synth_dir / "synth_s00.ome.tif", spatial_key="spatial_um", spatial_units="um")
    assert np.allclose(s2.centroids_um, ref.centroids_um)
    assert s.label_keys == ["cell_type", "domain"] and s.section_labels["condition"] == "healthy"
    # a 2-D npy image becomes one channel
    np.save(tmp_path / "img.npy", ref.image[0])
    s3 = read_anndata(a, tmp_path / "img.npy", 0.5)
    assert s3.image.shape == (1, *ref.image.shape[1:])
    assert np.array_equal(s3.image[:, 5:9, 7:8], ref.image[:1, 5:9, 7:8])


def test_registry_adds_a_format_in_a_few_lines(monkeypatch, tmp_path, capsys):
    import sys
    import types

    mod = types.ModuleType("fake_reader")
    mod.add_cli_arguments = lambda p: p.add_argument("--n", type=int, default=30)
    mod.sections_from_args = lambda args: iter(make_synthetic_sections(1, args.n, seed=2))
    monkeypatch.setitem(sys.modules, "fake_reader", mod)
    monkeypatch.setitem(READERS, "fake", ReaderEntry("fake_reader", help="test format"))
    assert main(["convert", "fake", "--n", "25", "--out", str(tmp_path / "f"), *SIZES]) == 0
    assert "1 section(s), 25 cells" in capsys.readouterr().out


@pytest.mark.slow
def test_parallel_and_sharded_convert_join_into_the_serial_dataset(tmp_path):
    """--num-proc 2 writes the shards a serial build writes; two --shard jobs joined give the same
    sections, one gene panel and one card."""
    import json

    import pyarrow.parquet as pq

    from spatia_hf.cli import main
    from spatia_hf.data.builder import load_sections_info

    synth = tmp_path / "synth"
    assert main(["synth", "--out", str(synth), "--sections", "3", "--cells", "120", "--no-progress"]) == 0
    common = ["--crop-px", "16", "--niche-px", "16", "--thumb-px", "32", "--no-progress"]
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert main(["convert", "synthetic", str(synth), "--out", str(serial), *common]) == 0
    assert main(["convert", "synthetic", str(synth), "--out", str(parallel), "--num-proc", "2", *common]) == 0
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        assert main(["convert", "synthetic", str(synth), "--out", str(part), "--shard", f"{i}/2", *common]) == 0
    joined = tmp_path / "joined"
    assert main(["convert", "join", *map(str, parts), "--out", str(joined)]) == 0

    def shards(d):
        return {p.relative_to(d).as_posix(): pq.read_table(p) for p in sorted(d.glob("*/*.parquet"))}

    reference = shards(serial)
    for other in (parallel, joined):
        got = shards(other)
        assert sorted(got) == sorted(reference)
        for name, table in reference.items():
            assert got[name].equals(table), name
        by_id = sorted(load_sections_info(other)["sections"], key=lambda s: s["sample_id"])
        assert by_id == sorted(load_sections_info(serial)["sections"], key=lambda s: s["sample_id"])
        assert json.loads((other / "gene_panel.json").read_text())["genes"] == \
            json.loads((serial / "gene_panel.json").read_text())["genes"]
    assert [len(load_sections_info(p)["sections"]) for p in parts] == [2, 1]
    assert "configs:" in (joined / "README.md").read_text()


def test_join_refuses_parts_with_other_build_parameters(tmp_path):
    from spatia_hf.cli import main

    synth = tmp_path / "synth"
    assert main(["synth", "--out", str(synth), "--sections", "2", "--cells", "80", "--no-progress"]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["convert", "synthetic", str(synth), "--out", str(a), "--shard", "0/2", "--crop-px", "16",
                 "--niche-px", "16", "--thumb-px", "32", "--no-progress"]) == 0
    assert main(["convert", "synthetic", str(synth), "--out", str(b), "--shard", "1/2", "--crop-px", "32",
                 "--niche-px", "16", "--thumb-px", "32", "--no-progress"]) == 0
    assert main(["convert", "join", str(a), str(b), "--out", str(tmp_path / "j")]) == 1
    assert not (tmp_path / "j").exists()
