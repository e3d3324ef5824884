"""Gene panel coverage at every entry point that takes expression.

Each entry point (dataset builder and ``spatia convert``, ``spatia_hf.tl.embed``, the generation
pipeline, the pretraining Trainer) must report the input's coverage by the model vocabulary
(kept / unknown / missing model genes), refuse it below a threshold the user sets (naming the first
unknown genes), and accept genes by Ensembl id where the input carries ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from spatia_hf.models.configuration_spatia import SpatiaConfig
from spatia_hf.data import schema
from spatia_hf.data.builder import build_multiscale_dataset, load_sections_info
from spatia_hf.data.synthetic import make_synthetic_sections
from spatia_hf.models.modeling_spatia import SpatiaModel
from spatia_hf.models.processing_spatia import SpatiaProcessor

SIZES = dict(crop_px=32, niche_px=32, thumb_px=64, progress=False)
N_UNKNOWN = 120  # of the synthetic panel's 200 genes: coverage 0.4


pytestmark = pytest.mark.usefixtures("one_thread")


def ensembl(i: int) -> str:
    return f"ENSG{i:011d}"


@pytest.fixture(scope="module")
def sections():
    return make_synthetic_sections(2, 40, seed=0)


@pytest.fixture(scope="module")
def genes(sections) -> list[str]:
    return list(sections[0].genes)


@pytest.fixture(scope="module")
def partial_model_dir(tmp_path_factory, genes) -> Path:
    """A tiny SPATIA checkpoint whose vocabulary lacks the first ``N_UNKNOWN`` panel genes (and has
    two genes the panel lacks); Ensembl ids recorded for every gene."""
    vocab = genes[N_UNKNOWN:] + ["EXTRA1", "EXTRA2"]
    ids = [ensembl(genes.index(g)) if g in genes else ensembl(9000 + k) for k, g in enumerate(vocab)]
    torch.manual_seed(0)
    config = SpatiaConfig.from_preset("tiny", gene_vocab=vocab, gene_ensembl_ids=ids, num_channels=2)
    path = tmp_path_factory.mktemp("partial") / "model"
    SpatiaModel(config).save_pretrained(path)
    SpatiaProcessor.from_config(config).save_pretrained(path)
    return path


def renamed_with_ids(section):
    """The section with other symbols (``alias_<gene>``) but the Ensembl ids of the model's genes."""
    from dataclasses import replace

    genes = list(section.genes)
    return replace(section, genes=[f"alias_{g}" for g in genes], gene_ids=[ensembl(i) for i in range(len(genes))])


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# ----------------------------------------------------------------------------- builder / spatia convert
def test_builder_refuses_low_coverage_naming_unknown_genes_and_leaves_nothing(sections, genes, partial_model_dir,
                                                                             tmp_path):
    with pytest.raises(ValueError) as err:
        build_multiscale_dataset(sections, tmp_path / "ds", vocabulary=partial_model_dir, min_gene_coverage=0.9,
                                 **SIZES)
    msg = str(err.value)
    assert "genes: coverage 0.40" in msg and "min_gene_coverage=0.90" in msg
    assert f"{N_UNKNOWN} of 200 genes" in msg and repr(genes[0]) in msg and "Fix:" in msg
    assert _leftovers(tmp_path) == []


def test_builder_reports_coverage_per_section(sections, genes, partial_model_dir, tmp_path):
    out = build_multiscale_dataset(sections, tmp_path / "ds", vocabulary=partial_model_dir, min_gene_coverage=0.3,
                                   **SIZES)
    for s in load_sections_info(out)["sections"]:
        cov = s["gene_coverage"]
        assert cov["fraction_kept"] == pytest.approx(0.4) and cov["n_vocabulary"] == 200 - N_UNKNOWN + 2
        assert cov["unknown"] == genes[:N_UNKNOWN] and cov["kept"] == genes[N_UNKNOWN:]
        assert 0 < cov["kept_count_fraction"] < 1


def test_builder_matches_ensembl_ids_when_symbols_differ(sections, partial_model_dir, tmp_path):
    renamed = [renamed_with_ids(s) for s in sections]
    out = build_multiscale_dataset(renamed, tmp_path / "ds", vocabulary=partial_model_dir, min_gene_coverage=0.4,
                                   **SIZES)
    cov = load_sections_info(out)["sections"][0]["gene_coverage"]
    assert cov["matched_by_id"] == len(cov["kept"]) == 200 - N_UNKNOWN
    # the panel stored with the dataset keeps both, so the model maps it by id later
    panel = json.loads((out / schema.GENE_PANEL_FILE).read_text())
    assert panel["genes"][0] == "alias_" + sections[0].genes[0] and panel["gene_ids"][0] == ensembl(0)
    mapping = SpatiaProcessor.from_pretrained(partial_model_dir).map_dataset_panel(out, min_coverage=0.4)
    assert mapping.n_kept == 200 - N_UNKNOWN and mapping.matched_by_id == 200 - N_UNKNOWN


def test_min_coverage_without_vocabulary_is_a_clear_error(sections, tmp_path):
    with pytest.raises(ValueError, match="min_gene_coverage=0.5: needs a vocabulary"):
        build_multiscale_dataset(sections, tmp_path / "ds", min_gene_coverage=0.5, **SIZES)
    assert _leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    from spatia_hf.cli import main

    out = tmp_path_factory.mktemp("synth") / "synth"
    assert main(["synth", "--out", str(out), "--sections", "1", "--cells", "40", "--no-progress"]) == 0
    return out


def test_convert_cli_refuses_and_reports(synth_dir, genes, partial_model_dir, tmp_path, capsys):
    from spatia_hf.cli import main

    base = ["convert", "synthetic", str(synth_dir), "--crop-px", "32", "--niche-px", "32", "--thumb-px", "64",
            "--no-progress", "--vocabulary", str(partial_model_dir)]
    assert main(base + ["--out", str(tmp_path / "bad"), "--min-gene-coverage", "0.9"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("spatia convert: error: section 'synth_s00': genes: coverage 0.40")
    assert repr(genes[0]) in err and len(err.splitlines()) == 1
    assert _leftovers(tmp_path) == []
    assert main(base + ["--out", str(tmp_path / "ok")]) == 0
    printed = capsys.readouterr().out
    assert f"gene coverage: {200 - N_UNKNOWN}/200 genes in the vocabulary, {N_UNKNOWN} unknown" in printed


# ----------------------------------------------------------------------------- tl.embed
def _adata(section, ids: bool = False):
    """An AnnData (centroids in px) and its image from a synthetic section."""
    counts = section.counts_csr()
    var = pd.DataFrame(index=list(section.genes))
    if ids:
        var["gene_ids"] = section.gene_ids
    adata = ad.AnnData(X=counts, obs=pd.DataFrame(index=list(section.cell_ids)), var=var)
    adata.obsm["spatial"] = np.asarray(section.centroids_um) / section.pixel_size_um
    return adata, np.asarray(section.image), section.pixel_size_um


def test_tl_embed_refuses_low_coverage_and_leaves_adata_untouched(sections, genes, partial_model_dir):
    import spatia_hf.tl as tl

    adata, image, px = _adata(sections[0])
    with pytest.raises(ValueError) as err:
        tl.embed(adata, image, str(partial_model_dir), pixel_size_um=px, min_gene_coverage=0.9, progress=False)
    msg = str(err.value)
    assert "coverage 0.40 is below min_coverage=0.90" in msg and repr(genes[0]) in msg
    assert "X_spatia" not in adata.obsm and "spatia" not in adata.uns


def test_tl_embed_reports_kept_unknown_and_missing_genes(sections, genes, partial_model_dir):
    import spatia_hf.tl as tl

    adata, image, px = _adata(sections[0])
    tl.embed(adata, image, str(partial_model_dir), pixel_size_um=px, min_gene_coverage=0.3, n_domains=2,
             progress=False)
    cov = adata.uns["spatia"]["gene_coverage"]
    assert cov["n_kept"] == 200 - N_UNKNOWN and cov["unknown_genes"] == genes[:N_UNKNOWN]
    assert cov["missing_model_genes"] == ["EXTRA1", "EXTRA2"] and cov["coverage"] == pytest.approx(0.4)


def test_tl_embed_matches_ensembl_ids(sections, partial_model_dir):
    import spatia_hf.tl as tl

    adata, image, px = _adata(renamed_with_ids(sections[0]), ids=True)
    assert adata.var_names[0].startswith("alias_")
    tl.embed(adata, image, str(partial_model_dir), pixel_size_um=px, min_gene_coverage=0.4, n_domains=2,
             progress=False)
    cov = adata.uns["spatia"]["gene_coverage"]
    assert cov["n_kept"] == cov["matched_by_ensembl_id"] == 200 - N_UNKNOWN


# ----------------------------------------------------------------------------- generation pipeline
@pytest.fixture(scope="module")
def pipe(genes):
    from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline

    torch.manual_seed(0)
    vocab = genes[N_UNKNOWN:]
    p = SpatiaGenerationPipeline.from_genes(vocab, image_size=16, size="tiny", encoder_overrides={
        "gene_ensembl_ids": [ensembl(genes.index(g)) for g in vocab]})
    p.set_progress_bar_config(disable=True)
    return p


def test_pipeline_refuses_low_coverage_naming_unknown_genes(pipe, genes):
    x = np.ones((1, len(genes)), np.float32)
    with pytest.raises(ValueError) as err:
        pipe(x, gene_names=genes, min_gene_coverage=0.9, num_inference_steps=1, output_type="np")
    assert "coverage 0.40 is below min_coverage=0.90" in str(err.value) and repr(genes[0]) in str(err.value)


def test_pipeline_reports_coverage_and_accepts_ensembl_ids(pipe, genes):
    x = np.ones((1, len(genes)), np.float32)
    with pytest.warns(UserWarning, match="not in the model's panel"):
        out = pipe(x, gene_names=genes, min_gene_coverage=0.3, num_inference_steps=1, output_type="np",
                   generator=torch.Generator().manual_seed(0))
    cov = out.gene_coverage
    assert cov["n_kept"] == 200 - N_UNKNOWN and cov["unknown_genes"] == genes[:N_UNKNOWN]
    assert cov["n_missing_model_genes"] == 0 and cov["coverage"] == pytest.approx(0.4)
    # the same counts with columns named by Ensembl id give the same condition and the same image
    by_id = pipe(x, gene_names=[ensembl(i) for i in range(len(genes))], min_gene_coverage=0.3, num_inference_steps=1,
                 output_type="np", generator=torch.Generator().manual_seed(0))
    assert by_id.gene_coverage["n_kept"] == 200 - N_UNKNOWN
    np.testing.assert_array_equal(by_id.images, out.images)
    # a perturbation may name the gene by its symbol even when the column was given by id
    g = genes[N_UNKNOWN]
    pert = pipe(x, gene_names=[ensembl(i) for i in range(len(genes))], perturbation={g: 4.0}, num_inference_steps=1,
                output_type="np", generator=torch.Generator().manual_seed(0))
    assert pert.perturbed_images.shape == pert.images.shape


# ----------------------------------------------------------------------------- pretraining Trainer
@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, sections) -> Path:
    return build_multiscale_dataset(sections, tmp_path_factory.mktemp("train") / "ds", **SIZES)


def _pretrain(dataset_dir: Path, model_dir: Path, out: Path, min_gene_coverage: float):
    from spatia_hf.training.arguments import DataArguments, ModelArguments, SpatiaTrainingArguments
    from spatia_hf.training.pretrain import run_pretraining

    model_args = ModelArguments(model_name_or_path=str(model_dir), min_gene_coverage=min_gene_coverage)
    data_args = DataArguments(dataset_dir=str(dataset_dir), max_cells_per_niche=4)
    training_args = SpatiaTrainingArguments(output_dir=str(out), max_steps=1, per_device_train_batch_size=2,
                                            save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                                            optim="adamw_torch", do_eval=False)
    return run_pretraining(model_args, data_args, training_args)


def test_trainer_refuses_low_coverage_before_training(dataset_dir, genes, partial_model_dir, tmp_path):
    with pytest.raises(ValueError) as err:
        _pretrain(dataset_dir, partial_model_dir, tmp_path / "out", 0.9)
    assert "coverage 0.40 is below min_coverage=0.90" in str(err.value) and repr(genes[0]) in str(err.value)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_trainer_reports_coverage_in_its_summary(dataset_dir, genes, partial_model_dir, tmp_path):
    result = _pretrain(dataset_dir, partial_model_dir, tmp_path / "out", 0.3)
    panel = result.extra["gene_panel"]
    assert panel["n_kept"] == 200 - N_UNKNOWN and panel["unknown_genes"] == genes[:N_UNKNOWN]
    assert panel["missing_model_genes"] == ["EXTRA1", "EXTRA2"]
    summary = json.loads((tmp_path / "out" / "spatia_training.json").read_text())
    assert summary["gene_panel"]["coverage"] == pytest.approx(0.4)


def test_trainer_matches_ensembl_ids(sections, partial_model_dir, tmp_path):
    ds = build_multiscale_dataset([renamed_with_ids(s) for s in sections], tmp_path / "ds", **SIZES)
    result = _pretrain(ds, partial_model_dir, tmp_path / "out", 0.4)
    assert result.extra["gene_panel"]["matched_by_ensembl_id"] == 200 - N_UNKNOWN
