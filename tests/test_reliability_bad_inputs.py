"""A catalogue of bad inputs across readers, builder, models, pipeline and CLI.

Every case asserts three things: the error type, a message naming the offending field / file (and
a fix, for the package's own errors), and that nothing was left behind in the output area (no
dataset, no ``.tmp-build`` / ``.tmp`` folder, no half-written file). CLI cases also assert the
error is one ``spatia <command>: error: ...`` line with exit status 1, not a traceback.

Inputs live in ``tmp_path/"in"``, outputs go to ``tmp_path/"out"``, which must stay empty.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).parent))
from instrument_fixtures import write_xenium  # noqa: E402

from spatia_hf.cli import main  # noqa: E402
from spatia_hf.models.configuration_spatia import SpatiaConfig  # noqa: E402
from spatia_hf.data.builder import build_multiscale_dataset  # noqa: E402
from spatia_hf.data.synthetic import make_synthetic_sections  # noqa: E402
from spatia_hf.data.validation import SectionValidationError  # noqa: E402
from spatia_hf.models.modeling_spatia import SpatiaModel  # noqa: E402

SIZES = dict(crop_px=32, niche_px=32, thumb_px=64, progress=False)
CLI_SIZES = ["--crop-px", "32", "--niche-px", "32", "--thumb-px", "64", "--no-progress"]
XENIUM_SIZES = ["--crop-um", "8", "--crop-px", "16", "--niche-px", "16", "--thumb-px", "32", "--no-progress"]


class CliError(Exception):
    """A CLI run that exited with status 1; ``str()`` is its stderr."""


@dataclass
class Env:
    """Inputs shared by the cases (built once per module) and this case's folders."""

    sections: list
    synth: Path  # a `spatia synth` folder: synth_s00.h5ad + synth_s00.ome.tif
    model: Path  # a tiny SpatiaModel checkpoint on the synthetic panel
    pipeline: Path  # a tiny SpatiaGenerationPipeline on the synthetic panel
    inp: Path = Path()
    out: Path = Path()

    def cli(self, *argv: str) -> Callable[[], None]:
        def run() -> None:
            import contextlib
            import io

            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = main([str(a) for a in argv])
            if rc != 1:
                raise AssertionError(f"expected exit status 1, got {rc}")
            raise CliError(err.getvalue())

        return run

    def build(self, sections) -> Callable[[], None]:
        return lambda: build_multiscale_dataset(sections, self.out / "ds", **SIZES)

    def xenium(self) -> Path:
        folder = self.inp / "xenium"
        write_xenium(folder, n_cells=30)
        return folder

    def convert_xenium(self, folder: Path) -> Callable[[], None]:
        return self.cli("convert", "xenium", folder, "--out", self.out / "ds", *XENIUM_SIZES)

    def convert_anndata(self, h5ad: Path, image: Path | None = None) -> Callable[[], None]:
        image = image or self.synth / "synth_s00.ome.tif"
        return self.cli("convert", "anndata", "--adata", h5ad, "--image", image, "--pixel-size", "0.5",
                        "--out", self.out / "ds", *CLI_SIZES)

    def adata(self) -> ad.AnnData:
        return ad.read_h5ad(self.synth / "synth_s00.h5ad")

    def write_adata(self, adata: ad.AnnData, name: str) -> Path:
        path = self.inp / name
        adata.write_h5ad(path)
        return path


def truncate(path: Path, fraction: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def with_counts(section, edit: Callable[[np.ndarray], None]):
    dense = section.counts_csr().toarray().astype(np.float32)
    edit(dense)
    return replace(section, counts=sp.csr_matrix(dense))


def with_image(section, edit: Callable[[np.ndarray], np.ndarray]):
    return replace(section, image=edit(np.asarray(section.image)))


def first_n(section, n: int):
    return replace(section, counts=section.counts_csr()[:n], cell_ids=list(section.cell_ids[:n]),
                   centroids_um=np.asarray(section.centroids_um)[:n], obs=section.obs.iloc[:n])


# ----------------------------------------------------------------------------- the cases
# name -> (where, build(env) -> callable that must fail, error type, fragments the message must contain)
def _nan(x):
    x[0, 0] = np.nan


def _inf(x):
    x[1, 2] = np.inf


def _neg(x):
    x[2, 3] = -2


def _outside(env):
    s = env.sections[0]
    xy = np.asarray(s.centroids_um).copy()
    xy[5] = [1e5, 1e5]
    return env.build([replace(s, centroids_um=xy)])


def _three_channels(env):
    a, b = env.sections
    image = np.concatenate([np.asarray(b.image), np.asarray(b.image)[:1]])
    return env.build([a, replace(b, image=image, channel_names=None)])  # fails after section 1 was written


def _dup_genes(env):
    s = env.sections[0]
    return env.build([replace(s, genes=[s.genes[1]] + list(s.genes[1:]))])


def _float_counts_h5ad(env):
    a = env.adata()
    a.X = a.X.astype(np.float32) * 0.5  # normalised-looking values
    return env.convert_anndata(env.write_adata(a, "float.h5ad"))


def _nan_h5ad(env):
    a = env.adata()
    x = a.X.toarray().astype(np.float32)
    x[3, 4] = np.nan
    a.X = sp.csr_matrix(x)
    return env.convert_anndata(env.write_adata(a, "nan.h5ad"))


def _truncated_h5ad(env):
    path = env.inp / "cut.h5ad"
    shutil.copy(env.synth / "synth_s00.h5ad", path)
    return env.convert_anndata(truncate(path, 0.5))


def _truncated_h5(env):
    folder = env.xenium()
    truncate(folder / "cell_feature_matrix.h5", 0.5)
    return env.convert_xenium(folder)


def _truncated_parquet(env):
    folder = env.xenium()
    truncate(folder / "cells.parquet", 0.5)
    return env.convert_xenium(folder)


def _mismatched_ids(env):
    folder = env.xenium()
    table = pq.read_table(folder / "cells.parquet").to_pydict()
    table["cell_id"][0] = "cell-from-another-run"
    pq.write_table(pa.table(table), folder / "cells.parquet")
    return env.convert_xenium(folder)


def _truncated_tiff_header(env):
    image = env.inp / "cut.ome.tif"
    shutil.copy(env.synth / "synth_s00.ome.tif", image)
    return env.convert_anndata(env.synth / "synth_s00.h5ad", truncate(image, 0.002))


def _truncated_tiff_pixels(env):
    folder = env.xenium()
    truncate(folder / "morphology_focus" / "morphology_focus_0000.ome.tif", 0.6)
    return env.convert_xenium(folder)


def _other_model_type(env):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=30)).save_pretrained(env.inp / "bert")
    return lambda: SpatiaModel.from_pretrained(env.inp / "bert")


def _cell_as_tissue(env):
    from spatia_hf import SpatiaCellModel, SpatiaTissueModel

    SpatiaCellModel(SpatiaConfig.from_pretrained(env.model).cell_config).save_pretrained(env.inp / "cell")
    return lambda: SpatiaTissueModel.from_pretrained(env.inp / "cell")


def _unknown_config_field(env):
    ckpt = env.inp / "ckpt"
    shutil.copytree(env.model, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["cell_config"]["hiden_size"] = 64
    (ckpt / "config.json").write_text(json.dumps(config))
    return lambda: SpatiaModel.from_pretrained(ckpt)


def _corrupt_safetensors(env):
    ckpt = env.inp / "ckpt"
    shutil.copytree(env.model, ckpt)
    truncate(ckpt / "model.safetensors", 0.5)
    return lambda: SpatiaModel.from_pretrained(ckpt)


def _pixel_channels(env):
    model = SpatiaModel.from_pretrained(env.model).eval()
    return lambda: model(pixel_values=torch.zeros(2, 3, 32, 32))


def _gene_id_outside_vocab(env):
    model = SpatiaModel.from_pretrained(env.model).eval()
    return lambda: model(gene_ids=torch.tensor([[4, 10_000]]), gene_values=torch.ones(1, 2))


def _pipe(env):
    from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline

    pipe = SpatiaGenerationPipeline.from_pretrained(env.pipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_nan(env):
    pipe, genes = _pipe(env), env.sections[0].genes
    x = np.ones((2, len(genes)))
    x[1, 3] = np.nan
    return lambda: pipe(x, gene_names=genes, num_inference_steps=1, output_type="np")


def _pipeline_negative(env):
    pipe, genes = _pipe(env), env.sections[0].genes
    x = np.ones((1, len(genes)))
    x[0, 7] = -1
    return lambda: pipe(x, gene_names=genes, num_inference_steps=1, output_type="np")


def _pipeline_dup_genes(env):
    pipe, genes = _pipe(env), list(env.sections[0].genes)
    return lambda: pipe(np.ones((1, 3)), gene_names=[genes[0], genes[1], genes[0]], num_inference_steps=1)


def _pipeline_width(env):
    pipe = _pipe(env)
    return lambda: pipe(np.ones((1, 5)), num_inference_steps=1)


def _pipeline_corrupt_weights(env):
    from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline

    copy = env.inp / "pipe"
    shutil.copytree(env.pipeline, copy)
    truncate(copy / "unet" / "diffusion_pytorch_model.safetensors", 0.5)
    return lambda: SpatiaGenerationPipeline.from_pretrained(copy)


def _generate_cli_nan(env):
    genes = list(env.sections[0].genes)
    x = np.ones((2, len(genes)))
    x[0, 0] = np.nan
    pd.DataFrame(x, columns=genes, index=["c0", "c1"]).to_csv(env.inp / "expr.csv")
    return env.cli("generate", "--pipeline", env.pipeline, "--expression", env.inp / "expr.csv", "--steps", "1",
                   "--device", "cpu", "--out", env.out / "gen")


def _embed_cli_truncated(env):
    image = env.synth / "synth_s00.ome.tif"
    path = env.inp / "cut.h5ad"
    shutil.copy(env.synth / "synth_s00.h5ad", path)
    truncate(path, 0.4)
    return env.cli("embed", "--model", env.model, "--adata", path, "--image", image, "--pixel-size", "0.5",
                   "--device", "cpu", "--out", env.out / "out.h5ad")


def _embed_cli_single_cell(env):
    a = env.adata()[:1].copy()
    return env.cli("embed", "--model", env.model, "--adata", env.write_adata(a, "one.h5ad"), "--image",
                   env.synth / "synth_s00.ome.tif", "--pixel-size", "0.5", "--device", "cpu",
                   "--out", env.out / "out.h5ad")


def _pretrain_cli_unknown_field(env):
    data = env.inp / "ds"
    build_multiscale_dataset(env.sections, data, **SIZES)
    return env.cli("pretrain", "--data", data, "--out", env.out / "run", "--max-steps", "1", "--device", "cpu",
                   "--no-progress", "--set", "config_overrides=cell_config.hiden_size=64")


CASES = {
    # builder (validation of any reader's Section)
    "nan-counts": ("builder", lambda e: e.build([with_counts(e.sections[0], _nan)]), SectionValidationError,
                   ["'synth_s00'", "counts:", "NaN or inf", "Fix:"]),
    "inf-counts": ("builder", lambda e: e.build([with_counts(e.sections[0], _inf)]), SectionValidationError,
                   ["counts:", "NaN or inf values (e.g. inf)", "Fix:"]),
    "negative-counts": ("builder", lambda e: e.build([with_counts(e.sections[0], _neg)]), SectionValidationError,
                        ["counts:", "1 negative values (min -2.0)", "raw counts"]),
    "empty-section": ("builder", lambda e: e.build([first_n(e.sections[0], 0)]), SectionValidationError,
                      ["counts:", "empty (0 cells)", "Fix:"]),
    "cell-outside-image": ("builder", _outside, SectionValidationError,
                           ["centroids_um:", "1 of 40 cells lie outside", "--outside drop"]),
    "image-ndim-2": ("builder", lambda e: e.build([with_image(e.sections[0], lambda im: im[0])]),
                     SectionValidationError, ["image:", "(C, H, W)", "image[None]"]),
    "image-dtype-bool": ("builder", lambda e: e.build([with_image(e.sections[0], lambda im: im > 0)]),
                         SectionValidationError, ["image:", "unsupported dtype bool", "uint8, uint16 or float"]),
    "image-channels-differ": ("builder", _three_channels, ValueError,
                              ["'synth_s01'", "image:", "3 channels", "earlier sections have 2"]),
    "duplicate-genes": ("builder", _dup_genes, SectionValidationError, ["genes:", "duplicate gene names", "unique"]),
    "cell-ids-count": ("builder", lambda e: e.build([replace(e.sections[0], cell_ids=e.sections[0].cell_ids[:-1])]),
                       SectionValidationError, ["cell_ids:", "39 cell ids for 40 count rows"]),
    "duplicate-cell-ids": ("builder", lambda e: e.build([replace(
        e.sections[0], cell_ids=[e.sections[0].cell_ids[0]] * 2 + list(e.sections[0].cell_ids[2:]))]),
        SectionValidationError, ["cell_ids:", "duplicate cell ids"]),
    # readers, through `spatia convert`
    "float-counts-h5ad": ("reader anndata (CLI)", _float_counts_h5ad, CliError,
                          ["float.h5ad", "non-integer values", "--layer"]),
    "nan-counts-h5ad": ("reader anndata (CLI)", _nan_h5ad, CliError, ["counts:", "NaN or inf"]),
    "truncated-h5ad": ("reader anndata (CLI)", _truncated_h5ad, CliError,
                       ["cut.h5ad", "not a readable .h5ad", "truncated"]),
    "truncated-xenium-h5": ("reader xenium (CLI)", _truncated_h5, CliError,
                            ["cell_feature_matrix.h5", "truncated", "Fix:"]),
    "truncated-xenium-parquet": ("reader xenium (CLI)", _truncated_parquet, CliError,
                                 ["cells.parquet", "not a readable Parquet file", "Fix:"]),
    "mismatched-cell-ids": ("reader xenium (CLI)", _mismatched_ids, CliError,
                            ["cell ids differ", "cell-from-another-run", "--on-mismatch intersect"]),
    "truncated-tiff-header": ("reader images (CLI)", _truncated_tiff_header, CliError,
                              ["cut.ome.tif", "truncated", "Fix:"]),
    "truncated-tiff-pixels": ("reader xenium (CLI)", _truncated_tiff_pixels, CliError,
                              ["morphology_focus_0000.ome.tif", "truncated", "Fix:"]),
    # models
    "checkpoint-of-bert": ("model", _other_model_type, ValueError, ["model_type='bert'", "SpatiaModel", "Fix:"]),
    "cell-checkpoint-as-tissue": ("model", _cell_as_tissue, ValueError,
                                  ["model_type='spatia_cell'", "SpatiaTissueModel", "Fix:"]),
    "config-unknown-field": ("model", _unknown_config_field, ValueError,
                             ["SpatiaCellConfig", "unknown field(s) 'hiden_size'", "did you mean 'hidden_size'"]),
    "corrupt-safetensors": ("model", _corrupt_safetensors, ValueError,
                            ["ckpt", "safetensors weights cannot be read", "corrupt or truncated", "Fix:"]),
    "pixel-values-3-channels": ("model", _pixel_channels, ValueError,
                                ["pixel_values:", "[batch, 2, 32, 32]", "(2, 3, 32, 32)", "Fix:"]),
    "gene-id-outside-vocab": ("model", _gene_id_outside_vocab, ValueError,
                              ["gene_ids:", "id 10000 is outside", "Fix:"]),
    # generation pipeline
    "pipeline-nan-expression": ("pipeline", _pipeline_nan, ValueError, ["expression:", "non-finite", "cell 1", "Fix:"]),
    "pipeline-negative-expression": ("pipeline", _pipeline_negative, ValueError,
                                     ["expression:", "negative values", "Fix:"]),
    "pipeline-duplicate-genes": ("pipeline", _pipeline_dup_genes, ValueError, ["gene_names:", "duplicate genes"]),
    "pipeline-expression-width": ("pipeline", _pipeline_width, ValueError,
                                  ["expression: 5 values per cell", "gene_names", "Fix:"]),
    "pipeline-corrupt-weights": ("pipeline", _pipeline_corrupt_weights, OSError,
                                 ["unet/diffusion_pytorch_model.safetensors"]),
    # CLI
    "generate-nan-expression": ("CLI generate", _generate_cli_nan, CliError, ["expression:", "non-finite"]),
    "embed-truncated-h5ad": ("CLI embed", _embed_cli_truncated, CliError,
                             ["--adata", "cut.h5ad", "not a readable .h5ad"]),
    "embed-single-cell": ("CLI embed", _embed_cli_single_cell, CliError,
                          ["adata: 1 cell(s)", "at least 2 cells", "Fix:"]),
    "pretrain-unknown-config-field": ("CLI pretrain", _pretrain_cli_unknown_field, CliError,
                                      ["unknown field(s) 'hiden_size'", "did you mean 'hidden_size'"]),
}


# ----------------------------------------------------------------------------- fixtures and the test
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("bad_inputs_shared")
    sections = make_synthetic_sections(2, 40, seed=0)
    assert main(["synth", "--out", str(root / "synth"), "--sections", "1", "--cells", "40", "--no-progress"]) == 0
    genes = list(sections[0].genes)
    torch.manual_seed(0)
    SpatiaModel(SpatiaConfig.from_preset("tiny", gene_vocab=genes, num_channels=2)).save_pretrained(root / "model")
    from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline

    SpatiaGenerationPipeline.from_genes(genes, image_size=16, size="tiny").save_pretrained(root / "pipeline")
    return Env(sections, root / "synth", root / "model", root / "pipeline")


def _entries(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


@pytest.mark.parametrize("where, make, error, fragments", list(CASES.values()), ids=list(CASES))
def test_bad_input_fails_clearly_and_leaves_nothing(shared, tmp_path, where, make, error, fragments):
    env = replace(shared, inp=tmp_path / "in", out=tmp_path / "out")
    env.inp.mkdir()
    env.out.mkdir()
    run = make(env)
    with pytest.raises(error) as caught:
        run()
    message = str(caught.value)
    if error is CliError:  # one error line (progress bars of datasets/diffusers may precede it), no traceback
        errors = [ln for ln in message.splitlines() if ": error: " in ln]
        assert len(errors) == 1 and errors[0].startswith("spatia "), message
        assert "Traceback" not in message and message.strip().splitlines()[-1] == errors[0], message
        message = errors[0]
    for fragment in fragments:
        assert fragment in message, f"{where}: {fragment!r} not in {message!r}"
    assert _entries(env.out) == [], f"{where}: left behind {_entries(env.out)}"


def test_catalogue_is_broad():
    """At least 20 distinct bad inputs, and every layer is covered."""
    wheres = {c[0].split()[0] for c in CASES.values()}
    assert len(CASES) >= 20
    assert {"builder", "reader", "model", "pipeline", "CLI"} <= wheres
