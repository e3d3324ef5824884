"""SpatiaProcessor: panel mapping, normalisation, token selection, images, batches of dataset rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spatia_hf import SpatiaConfig, SpatiaModel, SpatiaProcessor
from spatia_hf.models.configuration_spatia import NUM_SPECIAL_TOKENS, PAD_TOKEN_ID
from spatia_hf.data.schema import GENE_COUNTS, GENE_INDICES, GENE_PANEL_FILE, IMAGE

VOCAB = [f"G{i}" for i in range(20)]


pytestmark = pytest.mark.usefixtures("one_thread")


def processor(**kwargs) -> SpatiaProcessor:
    defaults = dict(image_size=8, num_channels=2, max_genes=16, zero_ratio=0.5)
    return SpatiaProcessor(VOCAB, **{**defaults, **kwargs})


def test_panel_mapping_reports_kept_unknown_and_missing():
    proc = processor()
    panel = ["G3", "G1", "NOPE", "G7"]
    m = proc.map_panel(panel)
    assert m.vocab_ids.tolist() == [NUM_SPECIAL_TOKENS + 3, NUM_SPECIAL_TOKENS + 1, -1, NUM_SPECIAL_TOKENS + 7]
    rep = m.report()
    assert rep["n_kept"] == 3 and rep["unknown_genes"] == ["NOPE"] and rep["coverage"] == 0.75
    assert len(rep["missing_model_genes"]) == len(VOCAB) - 3 and "G0" in rep["missing_model_genes"]


def test_panel_mapping_prefers_ensembl_ids():
    ids = [f"ENSG{i:05d}" for i in range(len(VOCAB))]
    proc = SpatiaProcessor(VOCAB, ids, image_size=8, num_channels=2)
    m = proc.map_panel(["renamed_G5", "G2"], gene_ids=["ENSG00005", None])
    assert m.vocab_ids.tolist() == [NUM_SPECIAL_TOKENS + 5, NUM_SPECIAL_TOKENS + 2]
    assert m.matched_by_id == 1


def test_low_coverage_is_refused_naming_unknown_genes():
    proc = processor(min_coverage=0.5)
    with pytest.raises(ValueError, match=r"coverage 0\.25 is below min_coverage=0\.50.*'X1', 'X2', 'X3'"):
        proc.map_panel(["G0", "X1", "X2", "X3"])
    assert proc.map_panel(["G0", "X1", "X2", "X3"], min_coverage=0.2).n_kept == 1


def test_normalisation_and_token_selection():
    proc = processor(zero_ratio=1.0)
    proc.map_panel(VOCAB[:10])
    out = proc.encode_expression([[0, 2, 5]], [[10.0, 0.0, 30.0]], seed=0)  # G2 measured as 0
    mask = out["gene_attention_mask"][0].bool()
    ids, values, counts = out["gene_ids"][0][mask], out["gene_values"][0][mask], out["gene_counts"][0][mask]
    assert ids[:2].tolist() == [NUM_SPECIAL_TOKENS + 0, NUM_SPECIAL_TOKENS + 5]  # expressed genes first
    torch.testing.assert_close(values[:2], torch.log1p(torch.tensor([10.0, 30.0]) / 40.0 * 1e4))
    torch.testing.assert_close(out["size_factors"], torch.tensor([40.0 / 1e4]))
    zeros = ids[2:]
    assert len(zeros) == 2 and (counts[2:] == 0).all() and (values[2:] == 0).all()
    assert set(zeros.tolist()) <= {NUM_SPECIAL_TOKENS + i for i in range(10) if i not in (0, 5)}


def test_max_genes_keeps_the_highest_counts():
    proc = processor(max_genes=3, zero_ratio=0.5)
    proc.map_panel(VOCAB)
    out = proc.encode_expression([list(range(6))], [[1.0, 9.0, 3.0, 7.0, 2.0, 8.0]])
    assert out["gene_ids"].shape == (1, 3)
    assert sorted((out["gene_ids"][0] - NUM_SPECIAL_TOKENS).tolist()) == [1, 3, 5]


def test_zero_sampling_is_seeded():
    proc = processor(zero_ratio=2.0)
    proc.map_panel(VOCAB)
    a = proc.encode_expression([[0, 1]], [[1.0, 2.0]], seed=7)["gene_ids"]
    b = proc.encode_expression([[0, 1]], [[1.0, 2.0]], seed=7)["gene_ids"]
    assert torch.equal(a, b)
    assert a.shape == (1, 6)


def test_padding_and_counts_errors():
    proc = processor()
    proc.map_panel(VOCAB)
    out = proc.encode_expression([[0], [1, 2, 3, 4]], [[5.0], [1.0, 1.0, 1.0, 1.0]])
    assert out["gene_ids"].shape == (2, 6)  # 4 expressed + 2 zeros
    assert (out["gene_ids"][0, 2:] == PAD_TOKEN_ID).all() and out["gene_attention_mask"][0].sum() == 2
    with pytest.raises(ValueError, match="gene_indices: index 99 is outside the mapped panel of 20"):
        proc.encode_expression([[99]], [[1.0]])
    with pytest.raises(ValueError, match="gene_counts: counts must be finite and >= 0"):
        proc.encode_expression([[1]], [[-1.0]])
    with pytest.raises(ValueError, match="no gene panel mapped"):
        processor().encode_expression([[1]], [[1.0]])


def test_dense_counts_input():
    proc = processor()
    proc.map_panel(VOCAB[:4])
    out = proc.encode_dense(np.array([[0, 3, 0, 1], [2, 0, 0, 0]]))
    assert out["gene_ids"].shape[0] == 2
    with pytest.raises(ValueError, match="3 columns but the mapped panel has 4"):
        proc.encode_dense(np.zeros((1, 3)))


def test_images_become_normalised_pixel_values():
    proc = processor()
    crops = np.full((3, 2, 8, 8), 255, dtype=np.uint8)
    px = proc.preprocess_images(crops)
    assert px.dtype == torch.float32 and px.shape == (3, 2, 8, 8)
    torch.testing.assert_close(px, torch.ones_like(px))  # (1 - 0.5) / 0.5
    as_lists = proc.preprocess_images([c.tolist() for c in crops])  # what datasets returns
    torch.testing.assert_close(as_lists, px)
    with pytest.raises(ValueError, match=r"image: crops must be \(C, H, W\) = \(2, 8, 8\), got \(3, 8, 8\)"):
        proc.preprocess_images(np.zeros((1, 3, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="got \\(2, 16, 16\\)"):
        proc.preprocess_images(np.zeros((2, 16, 16), dtype=np.uint8))
    with pytest.raises(ValueError, match="0..255"):
        proc.preprocess_images(np.full((2, 8, 8), 4000, dtype=np.int64))


def test_save_and_load(tmp_path):
    proc = processor(zero_ratio=0.25, image_mean=[0.1, 0.2])
    proc.save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["spatia_processor.json"]  # no temp file left behind
    loaded = SpatiaProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == proc.to_dict()


def test_from_model_config_and_checkpoint(tmp_path):
    cfg = SpatiaConfig.from_preset("tiny", gene_vocab=VOCAB)
    proc = SpatiaProcessor.from_config(cfg)
    assert (proc.image_size, proc.num_channels, proc.max_genes) == (32, 2, 64)
    cfg.save_pretrained(tmp_path)
    assert SpatiaProcessor.from_pretrained(tmp_path).gene_vocab == VOCAB
    with pytest.raises(FileNotFoundError, match="no such folder, and not a Hub id"):
        SpatiaProcessor.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="spatia_processor.json"):
        SpatiaProcessor.from_pretrained(tmp_path / "empty")


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    synthetic = pytest.importorskip("spatia_hf.data.synthetic")
    return synthetic.build_tiny_dataset(tmp_path_factory.mktemp("tiny"), n_sections=1, n_cells=40)


def test_batches_of_dataset_rows_feed_the_model(tiny_dataset):
    import datasets

    panel = json.loads((tiny_dataset / GENE_PANEL_FILE).read_text())
    cells = datasets.load_dataset(str(tiny_dataset), "cells", split="train")
    image_shape = np.asarray(cells[0][IMAGE]).shape
    cfg = SpatiaConfig.from_preset("tiny", gene_vocab=panel["genes"], num_channels=image_shape[0],
                                   image_size=image_shape[1])
    proc = SpatiaProcessor.from_config(cfg)
    report = proc.map_dataset_panel(tiny_dataset).report()
    assert report["coverage"] == 1.0
    rows = [cells[i] for i in range(6)]
    batch = proc(rows, seed=0)
    assert set(batch.keys()) == {"pixel_values", "gene_ids", "gene_values", "gene_counts", "gene_attention_mask",
                                 "size_factors"}
    assert batch["pixel_values"].shape == (6, *image_shape)
    # a dict of lists (datasets' batch format) gives the same batch
    same = proc(cells[:6], seed=0)
    assert torch.equal(same["gene_ids"], batch["gene_ids"])
    # every expressed gene of a row is a token with its normalised value
    r0 = rows[0]
    expressed = {NUM_SPECIAL_TOKENS + i for i, c in zip(r0[GENE_INDICES], r0[GENE_COUNTS]) if c > 0}
    assert expressed <= set(batch["gene_ids"][0].tolist())
    model = SpatiaModel(cfg).eval()
    inputs = {k: batch[k] for k in ("pixel_values", "gene_ids", "gene_values", "gene_attention_mask")}
    assert model(**inputs).cell_embeds.shape == (6, cfg.cell_config.hidden_size)
