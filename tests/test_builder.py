"""Multi-scale builder: crops, niches, tissues, gene panel, validation errors, resume."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from spatia_hf.data import schema
from spatia_hf.data.builder import build_multiscale_dataset, interrupted_builds, load_sections_info
from spatia_hf.data.gene_panel import read_gene_panel
from spatia_hf.data.section import Section
from spatia_hf.data.synthetic import build_tiny_dataset, make_synthetic_sections
from spatia_hf.data.validation import SectionValidationError, validate_section

CROP_UM, CROP_PX = 16.0, 32  # synthetic images are 0.5 µm/px: a 32 px window, stored unresized


def _load(path, config, cache):
    import datasets

    return datasets.load_dataset(str(path), config, split="train", cache_dir=str(cache)).with_format(
        "numpy", dtype=None)


@pytest.fixture(scope="module")
def secs():
    return make_synthetic_sections(2, 150, seed=0)


@pytest.fixture(scope="module")
def built(secs, tmp_path_factory):
    root = tmp_path_factory.mktemp("built")
    out = build_multiscale_dataset(secs, root / "ds", crop_um=CROP_UM, crop_px=CROP_PX, niche_px=32, thumb_px=64,
                                   progress=False)
    cache = root / "cache"
    return out, {c: _load(out, c, cache) for c in schema.CONFIGS}


def _rows(ds):
    return [ds[i] for i in range(len(ds))]


def test_three_configs_load_with_load_dataset(built, secs):
    out, ds = built
    assert len(ds["cells"]) == sum(s.n_cells for s in secs)
    assert len(ds["tissues"]) == 2
    assert ds["cells"].features[schema.IMAGE].shape == (2, CROP_PX, CROP_PX)
    assert ds["niches"].features[schema.IMAGE].shape == (2, 32, 32)
    assert ds["tissues"].features[schema.THUMBNAIL].shape == (2, 64, 64)
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "config_name: niches" in card and "path: cells/*.parquet" in card
    assert sorted(p.name for p in (out / "cells").iterdir()) == ["synth_s00-00000.parquet", "synth_s01-00000.parquet"]
    assert not list(out.parent.glob(".ds.*"))  # no staging folder left


def test_crops_are_centred_on_nuclei(built):
    _, ds = built
    img = np.asarray(ds["cells"][:][schema.IMAGE]).astype(np.float32)  # (n, C, H, W)
    dapi = img[:, 0]
    c = CROP_PX // 2
    centre = dapi[:, c - 3 : c + 3, c - 3 : c + 3].mean(axis=(1, 2))
    ring = np.concatenate([dapi[:, :3].reshape(len(dapi), -1), dapi[:, -3:].reshape(len(dapi), -1),
                           dapi[:, :, :3].reshape(len(dapi), -1), dapi[:, :, -3:].reshape(len(dapi), -1)], axis=1)
    assert (centre > ring.mean(axis=1)).mean() > 0.97
    assert centre.mean() > 3 * ring.mean()


def test_crops_equal_slide_normalised_image_windows(built, secs):
    """A stored crop is exactly the image window around the centroid, normalised per slide."""
    out, ds = built
    info = load_sections_info(out)["sections"][0]
    lo, hi = np.array(info["normalization"]["low"]), np.array(info["normalization"]["high"])
    s = secs[0]
    rows = ds["cells"][:]
    ids = list(rows[schema.CELL_ID])
    for i in (0, 40, 149):
        x, y = s.centroids_um[i] / s.pixel_size_um
        r0, c0 = int(np.floor(y - CROP_PX / 2 + 0.5)), int(np.floor(x - CROP_PX / 2 + 0.5))
        padded = np.zeros((2, s.image.shape[1] + 64, s.image.shape[2] + 64), np.float32)
        padded[:, 32:-32, 32:-32] = s.image
        win = padded[:, r0 + 32 : r0 + 32 + CROP_PX, c0 + 32 : c0 + 32 + CROP_PX]
        expect = np.clip(np.round((win - lo[:, None, None]) / (hi - lo)[:, None, None] * 255), 0, 255)
        got = rows[schema.IMAGE][ids.index(s.cell_ids[i])]
        assert np.abs(got.astype(int) - expect.astype(int)).max() <= 1
    # normalisation is per slide: the percentiles are those of the slide, not of each crop
    assert np.isclose(lo[0], np.percentile(s.image[0], 0.5), rtol=0.3)
    assert hi[0] > 5 * lo[0]
    assert rows[schema.PIXEL_SIZE_UM][0] == pytest.approx(CROP_UM / CROP_PX)


def test_border_crops_are_zero_padded_and_counted(secs, tmp_path):
    crop_um, crop_px = 40.0, 20  # an 80 px window shrunk 4x by area averaging
    out = build_multiscale_dataset(secs[:1], tmp_path / "d", crop_um=crop_um, crop_px=crop_px, niche_px=16,
                                   thumb_px=32, progress=False)
    s, info = secs[0], load_sections_info(out)["sections"][0]
    size = int(crop_um / s.pixel_size_um)
    start = np.floor(s.centroids_um / s.pixel_size_um - size / 2 + 0.5)
    h, w = s.image.shape[1:]
    expect = ((start < 0).any(axis=1) | (start[:, 0] + size > w) | (start[:, 1] + size > h)).sum()
    assert info["n_crops_padded"] == expect > 0
    import pyarrow.parquet as pq

    t = pq.read_table(out / "cells" / "synth_s00-00000.parquet").to_pydict()
    top = int(np.argmin(t[schema.Y_UM]))
    r0 = int(np.floor(t[schema.Y_UM][top] / s.pixel_size_um - size / 2 + 0.5))
    img = np.array(t[schema.IMAGE][top])
    assert r0 < -4 and (img[:, : -r0 // 4] == 0).all() and img[:, -r0 // 4 + 1 :].max() > 0
    assert t[schema.PIXEL_SIZE_UM][0] == pytest.approx(crop_um / crop_px)


def test_expression_round_trips_through_the_gene_panel(built, secs):
    out, ds = built
    panel = read_gene_panel(out)
    assert panel["genes"] == secs[0].genes and panel["mode"] == "first"
    rows = ds["cells"][:]
    ids = list(rows[schema.CELL_ID])
    for s in secs:
        dense = s.counts_csr().toarray()
        for i in range(0, s.n_cells, 13):
            j = ids.index(s.cell_ids[i])
            v = np.zeros(len(panel["genes"]))
            v[rows[schema.GENE_INDICES][j]] = rows[schema.GENE_COUNTS][j]
            assert np.array_equal(v, dense[i])


def test_niche_expression_is_the_sum_of_its_cells(built):
    _, ds = built
    cells = ds["cells"][:]
    n_genes = 200
    def dense(idx, cnt):
        v = np.zeros(n_genes)
        v[idx] = cnt
        return v
    by_id = {cid: k for k, cid in enumerate(cells[schema.CELL_ID])}
    for row in _rows(ds["niches"]):
        members = [by_id[c] for c in row[schema.CELL_IDS]]
        assert row[schema.N_CELLS] == len(members) > 0
        total = sum(dense(cells[schema.GENE_INDICES][k], cells[schema.GENE_COUNTS][k]) for k in members)
        assert np.allclose(dense(row[schema.GENE_INDICES], row[schema.GENE_COUNTS]), total)
        assert all(cells[schema.NICHE_ID][k] == row[schema.NICHE_ID] for k in members)
        rel_x = np.array([cells[schema.X_UM][k] for k in members]) - row[schema.X_UM]
        assert np.allclose(row[schema.CELL_REL_X_UM], rel_x, atol=1e-3)
        assert (np.abs(row[schema.CELL_REL_X_UM]) <= 25.0 + 1e-3).all()  # inside the 50 µm tile
    assert sum(r[schema.N_CELLS] for r in _rows(ds["niches"])) == len(cells[schema.CELL_ID])


def test_niche_majority_labels_and_tissue_rows(built, secs):
    _, ds = built
    cells = ds["cells"][:]
    lab = dict(zip(cells[schema.CELL_ID], cells["cell_type"]))
    for row in _rows(ds["niches"])[:20]:
        vals, counts = np.unique([lab[c] for c in row[schema.CELL_IDS]], return_counts=True)
        assert row["cell_type"] == vals[np.argmax(counts)]  # ties -> first in sort order
    tissues = _rows(ds["tissues"])
    for s, t in zip(secs, tissues):
        assert t[schema.SAMPLE_ID] == s.sample_id
        assert t["condition"] == s.section_labels["condition"] and t["tissue"] == s.section_labels["tissue"]
        bulk = np.zeros(200)
        bulk[t[schema.GENE_INDICES]] = t[schema.GENE_COUNTS]
        assert np.allclose(bulk, s.counts_csr().sum(axis=0).A1)
        assert t[schema.N_CELLS] == s.n_cells and len(t[schema.NICHE_IDS]) == t[schema.N_NICHES]
        assert t[schema.THUMBNAIL].max() > 100


def test_cell_labels_and_values_survive(built, secs):
    _, ds = built
    cells = ds["cells"][:]
    ids = list(cells[schema.CELL_ID])
    for s in secs:
        for i in range(0, s.n_cells, 11):
            j = ids.index(s.cell_ids[i])
            assert cells["cell_type"][j] == s.obs["cell_type"].iloc[i]
            assert cells["domain"][j] == s.obs["domain"].iloc[i]
            assert cells["nucleus_area_um2"][j] == pytest.approx(s.obs["nucleus_area_um2"].iloc[i], rel=1e-6)
            assert cells[schema.X_UM][j] == pytest.approx(s.centroids_um[i, 0], rel=1e-6)


def test_ground_truth_travels_in_sections_json(built):
    out, _ = built
    from spatia_hf.data.synthetic import load_ground_truth

    gt = load_ground_truth(out)
    assert gt["morphology_genes"]["NUCSIZE"]["exponent"] == 0.5


def test_tiling_does_not_change_crops(secs, tmp_path):
    a = build_multiscale_dataset(secs[:1], tmp_path / "a", crop_px=16, niche_px=16, thumb_px=32, progress=False)
    b = build_multiscale_dataset(secs[:1], tmp_path / "b", crop_px=16, niche_px=16, thumb_px=32, tile_px=40,
                                 progress=False)
    import pyarrow.parquet as pq

    for config in ("cells", "niches"):
        ta = pq.read_table(a / config / "synth_s00-00000.parquet").sort_by(schema.SAMPLE_ID)
        tb = pq.read_table(b / config / "synth_s00-00000.parquet")
        key = schema.CELL_ID if config == "cells" else schema.NICHE_ID
        da = dict(zip(ta[key].to_pylist(), ta[schema.IMAGE].to_pylist()))
        db = dict(zip(tb[key].to_pylist(), tb[schema.IMAGE].to_pylist()))
        assert da == db


class _SpyImage:
    """Records every slice read from a (C, H, W) array."""

    def __init__(self, arr):
        self.arr, self.shape, self.dtype, self.ndim = arr, arr.shape, arr.dtype, 3
        self.reads = []

    def __getitem__(self, key):
        out = self.arr[key]
        self.reads.append(out.size)
        return out


def test_large_image_is_read_in_bounded_tiles(secs, tmp_path):
    spy = _SpyImage(secs[0].image)
    s = replace(secs[0], image=spy)
    build_multiscale_dataset([s], tmp_path / "d", crop_um=16.0, crop_px=16, niche_um=20.0, niche_px=16, thumb_px=32,
                             tile_px=64, progress=False)
    full = spy.arr.size
    margin = 40 // 2 + 2  # half the larger window (20 µm niche = 40 px) + 2
    assert max(spy.reads) <= 2 * (64 + 2 * margin + 40) ** 2 < full / 4
    assert sum(spy.reads) < 6 * full  # each tile once (plus margins), no full reads


def test_union_and_first_gene_panels_map_by_symbol(secs, tmp_path):
    a = secs[0]
    genes_b = list(reversed(secs[1].genes[:150])) + ["NOVEL1", "NOVEL2"]
    counts_b = sp.hstack([secs[1].counts_csr()[:, :150][:, ::-1], sp.csr_matrix(np.ones((secs[1].n_cells, 2)))]).tocsr()
    b = replace(secs[1], genes=genes_b, counts=counts_b)
    out = build_multiscale_dataset([a, b], tmp_path / "first", crop_px=16, niche_px=16, thumb_px=32, progress=False)
    panel = read_gene_panel(out)
    assert panel["genes"] == a.genes
    assert panel["unknown_genes"]["synth_s01"]["genes"] == ["NOVEL1", "NOVEL2"]
    assert panel["unknown_genes"]["synth_s01"]["counts"] == 2 * b.n_cells
    assert panel["missing_genes"]["synth_s01"] == a.genes[150:]
    import pyarrow.parquet as pq

    t = pq.read_table(out / "cells" / "synth_s01-00000.parquet").to_pydict()
    i = t[schema.CELL_ID].index(b.cell_ids[5])
    v = np.zeros(200)
    v[t[schema.GENE_INDICES][i]] = t[schema.GENE_COUNTS][i]
    assert np.array_equal(v[:150], secs[1].counts_csr()[5].toarray().ravel()[:150]) and v[150:].sum() == 0
    out = build_multiscale_dataset([a, b], tmp_path / "union", crop_px=16, niche_px=16, thumb_px=32,
                                   gene_panel="union", progress=False)
    panel = read_gene_panel(out)
    assert panel["genes"] == a.genes + ["NOVEL1", "NOVEL2"] and panel["mode"] == "union"
    assert panel["unknown_genes"]["synth_s01"]["n"] == 0


# ---------------------------------------------------------------- errors


def _bad(secs, **changes):
    return replace(secs[0], **changes)


def _nan_counts(s):
    c = s.counts_csr().astype(np.float32)
    c.data[3] = np.nan
    return c


def _neg_counts(s):
    c = s.counts_csr().copy()
    c.data[0] = -2
    return c


ERRORS = {
    "nan counts": (lambda s: {"counts": _nan_counts(s)}, r"counts: 1 NaN or inf"),
    "negative counts": (lambda s: {"counts": _neg_counts(s)}, r"counts: 1 negative values.*raw counts"),
    "duplicate genes": (lambda s: {"genes": ["EPI1"] + s.genes[1:3] + ["EPI1"] + s.genes[4:]},
                        r"genes: duplicate gene names 'EPI1'.*var_names_make_unique"),
    "image ndim": (lambda s: {"image": s.image[0]}, r"image: expected a \(C, H, W\) array.*image\[None\]"),
    "pixel size": (lambda s: {"pixel_size_um": 0.0}, r"pixel_size_um: 0.0 is not a positive number"),
    "cells outside": (lambda s: {"centroids_um": s.centroids_um + np.array([[200.0, 0.0]]) * (
        np.arange(s.n_cells)[:, None] < 7)}, r"centroids_um: \d+ of 150 cells lie outside.*first: 'synth_s00-000000'"
                                             r".*outside='drop'"),
    "empty section": (lambda s: {"counts": sp.csr_matrix((0, 200)), "cell_ids": [], "centroids_um": np.zeros((0, 2)),
                                 "obs": s.obs.iloc[:0]}, r"the section is empty \(0 cells\)"),
    "nan positions": (lambda s: {"centroids_um": np.where(np.arange(s.n_cells)[:, None] == 4, np.nan,
                                                          s.centroids_um)}, r"1 cells have NaN/inf positions"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_sections_fail_clearly_and_leave_nothing(name, secs, tmp_path):
    change, message = ERRORS[name]
    bad = _bad(secs, **change(secs[0]))
    if name == "cells outside":  # drop count depends on geometry: recompute
        pass
    with pytest.raises(SectionValidationError, match=message):
        build_multiscale_dataset([secs[1], bad], tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_outside_cells_can_be_dropped_and_counted(secs, tmp_path):
    s = secs[0]
    moved = s.centroids_um.copy()
    moved[:5, 0] += 10_000.0
    out = build_multiscale_dataset([replace(s, centroids_um=moved)], tmp_path / "d", outside="drop", crop_px=16,
                                   niche_px=16, thumb_px=32, progress=False)
    assert read_gene_panel(out)["dropped"]["synth_s00"] == {"cells_outside_image": 5}
    assert load_sections_info(out)["sections"][0]["n_cells"] == s.n_cells - 5


def test_validation_is_reusable_by_other_readers(secs):
    assert validate_section(secs[0]) is secs[0]
    with pytest.raises(SectionValidationError, match="sample_id"):
        validate_section(replace(secs[0], sample_id="bad id/1"))
    with pytest.raises(SectionValidationError, match="cell_ids: duplicate"):
        validate_section(replace(secs[0], cell_ids=["x"] * secs[0].n_cells))


def test_existing_output_and_duplicate_sample_ids(secs, tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        build_multiscale_dataset(secs, tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="sample_id: used by an earlier section"):
        build_multiscale_dataset([secs[0], secs[0]], tmp_path / "e", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    with pytest.raises(ValueError, match=r"label_keys: \['nope'\] are not obs columns"):
        build_multiscale_dataset(secs, tmp_path / "f", label_keys=["nope"], progress=False)


# ---------------------------------------------------------------- resume


def _shard_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def test_resume_after_interruption_gives_identical_shards(secs, tmp_path, monkeypatch):
    kw = dict(crop_px=16, niche_px=16, thumb_px=32, cell_shard_rows=64, progress=False)
    clean = build_multiscale_dataset(secs, tmp_path / "clean", **kw)

    def interrupted():
        yield secs[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_multiscale_dataset(interrupted(), tmp_path / "resumed", resume=True, **kw)
    [tmp] = interrupted_builds(tmp_path / "resumed")
    assert (tmp / "_progress" / "synth_s00.json").exists() and not (tmp_path / "resumed").exists()

    import spatia_hf.data.builder as builder

    built = []
    real = builder._build_section
    monkeypatch.setattr(builder, "_build_section", lambda s, *a, **k: built.append(s.sample_id) or real(s, *a, **k))
    out = build_multiscale_dataset(secs, tmp_path / "resumed", resume=True, **kw)
    assert built == ["synth_s01"]  # the finished section was reused
    assert not tmp.exists()
    a, b = _shard_bytes(clean), _shard_bytes(out)
    assert len(a) >= 6 and a == b
    assert (clean / "gene_panel.json").read_text() == (out / "gene_panel.json").read_text()


def test_resume_refuses_other_parameters(secs, tmp_path):
    def interrupted():
        yield secs[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_multiscale_dataset(interrupted(), tmp_path / "r", resume=True, crop_px=16, progress=False)
    with pytest.raises(ValueError, match="resume: the interrupted build .* used other parameters"):
        build_multiscale_dataset(secs, tmp_path / "r", resume=True, crop_px=24, progress=False)
    # without resume a fresh build runs beside it; the interrupted one (made by an earlier call) is left alone
    [staged] = interrupted_builds(tmp_path / "r")
    build_multiscale_dataset(secs, tmp_path / "r", crop_px=16, niche_px=16, thumb_px=32, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([staged.name, "r"])
    assert interrupted_builds(tmp_path / "r") == [staged]


def test_build_tiny_dataset(tmp_path):
    out = build_tiny_dataset(tmp_path / "tiny", n_sections=2, n_cells=60, seed=0)
    info = json.loads((out / "sections.json").read_text())
    assert [s["n_cells"] for s in info["sections"]] == [60, 60]
    assert info["build"]["crop_px"] == 32 and "cell_type" in info["build"]["label_keys"]
    assert (out / "README.md").exists() and (out / schema.GENE_PANEL_FILE).exists()


@pytest.mark.parametrize("size_in,size_out", [(151, 64), (64, 64), (40, 64), (128, 32)])
def test_crop_resampler_matches_torch_interpolate(size_in, size_out):
    import torch

    from spatia_hf.data.crops import CropResampler, resize

    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 3000, size=(5, 2, size_in, size_in)).astype(np.float32)
    low, high = np.array([100.0, 50.0]), np.array([2500.0, 2900.0])
    got = CropResampler(size_in, size_out)(raw, low, high)
    ref = resize(torch.from_numpy(raw), size_out).numpy()
    ref = np.clip(np.floor((ref - low[None, :, None, None]) / (high - low)[None, :, None, None] * 255 + 0.5), 0, 255)
    assert got.dtype == np.uint8 and got.shape == (5, 2, size_out, size_out)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    assert (got.astype(int) != ref.astype(int)).mean() < 0.01
