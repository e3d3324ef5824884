"""Nothing lost, nothing clobbered: every write path keeps the user's files.

Each test puts files of the user's inside the target folder and at every name an earlier version of the
code used as a temporary (``T.tmp``, ``T.tmp-save``, ``T.old-save``, ``T.tmp-build``, ``T.old-build``,
``.T.tmp``), then saves / converts / trains / resumes and checks that all of them survive, that the
output is complete, and that no temporary of ours is left beside it. Failures mid-write leave the
previous version intact.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from spatia_hf.utils.io import STAGE_SUFFIX, atomic_path, atomic_write_text, staged_dir, weight_files, write_json

pytestmark = pytest.mark.usefixtures("one_thread")

OLD_TEMPORARY_NAMES = (".tmp", ".tmp-save", ".old-save", ".tmp-build", ".old-build")


def plant(target: Path, inside: bool = True) -> dict[Path, str]:
    """User files inside ``target`` (when ``inside``) and in folders at the old temporary names beside it."""
    placed = {}
    folders = [target.with_name(target.name + suffix) for suffix in OLD_TEMPORARY_NAMES]
    for folder in ([target] if inside else []) + folders:
        folder.mkdir(parents=True, exist_ok=True)
        placed[folder / "my_notes.txt"] = f"mine, in {folder.name}"
    placed[target.with_name(f".{target.name}.tmp")] = "a hidden file of mine"
    for path, text in placed.items():
        path.write_text(text)
    return placed


def assert_kept(placed: dict[Path, str]) -> None:
    for path, text in placed.items():
        assert path.is_file() and path.read_text() == text, f"{path} was lost or changed"


TEMPORARY = re.compile(rf"^\..+\.\w{{8}}({re.escape(STAGE_SUFFIX)}|\.tmp|\.spatia-build)")  # mkstemp / mkdtemp names


def assert_no_temporaries(folder: Path) -> None:
    left = [str(p.relative_to(folder)) for p in folder.rglob(".*") if TEMPORARY.match(p.name)]
    assert not left, left


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- the helper itself
def test_staged_dir_creates_the_target_whole(tmp_path):
    with staged_dir(tmp_path / "a" / "out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.bin").write_bytes(b"x")
        assert tmp.name.startswith(".out.") and tmp.parent == tmp_path / "a"
    assert tree(tmp_path / "a") == {"out/sub/x.bin": b"x"}
    assert oct((tmp_path / "a" / "out").stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode


def test_staged_dir_into_an_existing_folder_replaces_only_its_files(tmp_path):
    out = tmp_path / "out"
    placed = plant(out)
    (out / "w").mkdir()
    (out / "w" / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    (out / "w" / "model.safetensors").write_bytes(b"old")
    (out / "w" / "model_notes.safetensors").write_bytes(b"a user's file with a similar name")
    (out / "a.json").write_text("old")
    with staged_dir(out, stale=weight_files("model")) as tmp:
        (tmp / "w").mkdir()
        (tmp / "w" / "model.safetensors").write_bytes(b"new")
        write_json(tmp / "a.json", {"v": 2})
    assert_kept(placed)
    assert sorted(p.name for p in (out / "w").iterdir()) == ["model.safetensors", "model_notes.safetensors"]
    assert (out / "w" / "model.safetensors").read_bytes() == b"new" and json.loads((out / "a.json").read_text()) == {
        "v": 2}
    assert_no_temporaries(tmp_path)


def test_staged_dir_failing_mid_write_leaves_the_previous_version(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out) as tmp:
        (tmp / "a.txt").write_text("v1")
    placed = plant(out)
    before = tree(out)
    with pytest.raises(RuntimeError, match="boom"), staged_dir(out) as tmp:
        (tmp / "a.txt").write_text("v2")
        raise RuntimeError("boom")
    assert tree(out) == before
    assert_kept(placed)
    assert_no_temporaries(tmp_path)


def test_staged_dir_never_replaces_a_users_folder_by_a_file(tmp_path):
    out = tmp_path / "out"
    (out / "a.txt").mkdir(parents=True)
    (out / "a.txt" / "mine").write_text("mine")
    with pytest.raises(IsADirectoryError, match="Fix:"), staged_dir(out) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (out / "a.txt" / "mine").read_text() == "mine"
    (tmp_path / "f").write_text("a file")
    with pytest.raises(FileExistsError, match="not a folder"), staged_dir(tmp_path / "f") as tmp:
        (tmp / "a.txt").write_text("new")
    assert (tmp_path / "f").read_text() == "a file"
    assert_no_temporaries(tmp_path)


def test_atomic_path_keeps_the_old_file_on_failure_and_has_normal_permissions(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_text(path, "v1")
    with pytest.raises(ValueError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise ValueError
    assert path.read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    assert path.stat().st_mode & 0o044  # readable by others like any file the user writes (not mkstemp's 0600)


def test_staged_dir_into_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("mine.txt").write_text("mine")
    with staged_dir(".") as tmp:
        (tmp / "a.txt").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "mine.txt"]


# ----------------------------------------------------------------------------- models and processors
def test_model_and_processor_save_keep_user_files_and_drop_stale_shards(tmp_path):
    from spatia_hf.models.configuration_spatia import SpatiaConfig
    from spatia_hf.models.modeling_spatia import SpatiaModel
    from spatia_hf.models.processing_spatia import SpatiaProcessor

    config = SpatiaConfig.from_preset("tiny", gene_vocab=[f"G{i}" for i in range(12)], num_channels=2)
    model = SpatiaModel(config)
    out = tmp_path / "model"
    placed = plant(out)
    (out / "model-00001-of-00003.safetensors").write_bytes(b"stale shard of an earlier save")
    (out / "model.safetensors.index.json").write_text("{}")
    model.save_pretrained(out)
    SpatiaProcessor.from_config(config).save_pretrained(out)
    assert_kept(placed)
    assert not (out / "model-00001-of-00003.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    assert {"config.json", "model.safetensors", "README.md", "spatia_processor.json"} <= {p.name for p in out.iterdir()}
    loaded = SpatiaModel.from_pretrained(out)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    assert_no_temporaries(tmp_path)


# ----------------------------------------------------------------------------- data
def test_write_synthetic_over_an_existing_folder(tmp_path):
    from spatia_hf.data.synthetic import write_synthetic

    out = tmp_path / "synth"
    write_synthetic(out, n_sections=2, n_cells=30, seed=0, progress=False)
    placed = plant(out)
    with pytest.raises(FileExistsError, match="Fix:"):
        write_synthetic(out, n_sections=1, n_cells=30, seed=1, progress=False)
    entries = write_synthetic(out, n_sections=1, n_cells=30, seed=1, progress=False, overwrite=True)
    assert_kept(placed)
    # the second section of the first write is listed by its manifest: stale, removed; the user's file is kept
    assert sorted(p.name for p in out.iterdir()) == ["my_notes.txt", "synth_s00.h5ad", "synth_s00.ome.tif",
                                                     "synthetic.json"]
    assert json.loads((out / "synthetic.json").read_text())["sections"] == entries
    assert_no_temporaries(tmp_path)


def _sections(n_cells=40, seed=0, n=2):
    from spatia_hf.data.synthetic import make_synthetic_sections

    return make_synthetic_sections(n_sections=n, n_cells=n_cells, seed=seed)


BUILD = dict(crop_px=16, niche_px=16, thumb_px=32, progress=False)


def test_build_over_an_existing_dataset_keeps_user_files_and_drops_stale_shards(tmp_path):
    from datasets import load_dataset

    from spatia_hf.data.builder import build_multiscale_dataset

    secs = _sections()
    out = build_multiscale_dataset(secs, tmp_path / "ds", **BUILD)
    placed = plant(out)
    (out / "cells" / "notes.parquet.txt").write_text("mine")
    placed[out / "cells" / "notes.parquet.txt"] = "mine"
    build_multiscale_dataset(secs[:1], out, overwrite=True, **BUILD)
    assert_kept(placed)
    for config in ("cells", "niches", "tissues"):
        assert not list((out / config).glob("synth_s01-*.parquet")), config  # stale section removed
    cells = load_dataset(str(out), "cells", split="train", cache_dir=str(tmp_path / "cache"))
    assert set(cells["sample_id"]) == {"synth_s00"} and len(cells) == secs[0].n_cells
    assert_no_temporaries(tmp_path)


def test_build_failing_mid_way_leaves_the_previous_dataset(tmp_path):
    from spatia_hf.data.builder import build_multiscale_dataset

    secs = _sections()
    out = build_multiscale_dataset(secs, tmp_path / "ds", **BUILD)
    placed = plant(out)
    before = tree(out)

    def failing():
        yield secs[0]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_multiscale_dataset(failing(), out, overwrite=True, **BUILD)
    assert tree(out) == before
    assert_kept(placed)
    assert_no_temporaries(tmp_path)


def test_killed_build_resumes_next_to_user_folders(tmp_path):
    """A build interrupted after one section keeps its staging (for resume); the resume finds it among
    folders of the user's named like the old fixed temporaries, and leaves those alone."""
    from spatia_hf.data.builder import build_multiscale_dataset, interrupted_builds

    secs = _sections()
    out = tmp_path / "ds"
    placed = plant(out, inside=False)

    def interrupted():
        yield secs[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_multiscale_dataset(interrupted(), out, resume=True, **BUILD)
    assert len(interrupted_builds(out)) == 1
    build_multiscale_dataset(secs, out, resume=True, **BUILD)
    assert_kept(placed)
    assert interrupted_builds(out) == [] and len(list((out / "cells").glob("*.parquet"))) == 2
    assert_no_temporaries(tmp_path)


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from spatia_hf.data.synthetic import build_tiny_dataset

    return build_tiny_dataset(tmp_path_factory.mktemp("writes") / "data", n_sections=2, n_cells=40, crop_px=16,
                              niche_px=16, thumb_px=32)


GEN = dict(size="tiny", batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=1, progress=False, seed=3)


def test_generator_training_and_resume_keep_user_files(tiny_data, tmp_path):
    from spatia_hf.training.generator import train_generator

    out = tmp_path / "gen"
    placed = plant(out)
    placed.update(plant(out / "checkpoints"))
    placed.update(plant(out / "pipeline"))
    placed.update(plant(out / "checkpoints" / "checkpoint-2"))
    (out / "checkpoints" / "checkpoint-1").mkdir()  # a folder of the user's in our naming, without our state file
    placed[out / "checkpoints" / "checkpoint-1" / "keep.txt"] = "mine"
    (out / "checkpoints" / "checkpoint-1" / "keep.txt").write_text("mine")
    train_generator(tiny_data, out, max_steps=2, checkpoints_total_limit=1, **GEN)
    resumed = train_generator(tiny_data, out, max_steps=4, resume_from_checkpoint="latest",
                              checkpoints_total_limit=1, **GEN)
    assert resumed.global_step == 4
    assert_kept(placed)
    ours = sorted(p.name for p in (out / "checkpoints").iterdir() if (p / "trainer_state.json").is_file())
    assert ours == ["checkpoint-4"]  # checkpoint-2 held a user file: only our files were rotated away
    assert sorted(p.name for p in (out / "checkpoints" / "checkpoint-2").iterdir()) == ["my_notes.txt"]
    assert (out / "checkpoints" / "checkpoint-1" / "keep.txt").read_text() == "mine"
    assert (out / "pipeline" / "model_index.json").is_file() and (out / "generator_training.json").is_file()
    assert_no_temporaries(tmp_path)


def test_vae_training_keeps_user_files(tiny_data, tmp_path):
    from spatia_hf.training.vae import train_vae

    out = tmp_path / "vae"
    placed = plant(out)
    placed.update(plant(out / "vae"))
    train_vae(tiny_data, out, max_steps=1, size="tiny", batch_size=4, warmup_steps=1, progress=False, eval_cells=8,
              scaling_cells=8, seed=1)
    assert_kept(placed)
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file() and (out / "vae_training.json").is_file()
    assert_no_temporaries(tmp_path)


def test_pretraining_and_resume_keep_user_files(tiny_data, tmp_path):
    from spatia_hf.training.arguments import DataArguments, ModelArguments, SpatiaTrainingArguments
    from spatia_hf.training.pretrain import run_pretraining

    out = tmp_path / "run"
    placed = plant(out)

    def args(steps):
        return SpatiaTrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                                       save_strategy="steps", save_steps=2, logging_steps=1, use_cpu=True,
                                       report_to="none", disable_tqdm=True, seed=0)

    model_args, data_args = ModelArguments(preset="tiny"), DataArguments(dataset_dir=str(tiny_data),
                                                                         max_cells_per_niche=4)
    run_pretraining(model_args, data_args, args(2))
    run_pretraining(model_args, data_args, args(3), resume_from_checkpoint=True)
    assert_kept(placed)
    assert (out / "model.safetensors").is_file() and (out / "spatia_training.json").is_file()
    assert_no_temporaries(tmp_path)


# ----------------------------------------------------------------------------- outputs of commands
def test_generate_over_an_existing_folder_keeps_user_files(tmp_path):
    from spatia_hf.cli import main
    from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline

    genes = [f"G{i}" for i in range(6)]
    torch.manual_seed(0)
    SpatiaGenerationPipeline.from_genes(genes, image_size=16, size="tiny").save_pretrained(tmp_path / "gen")
    np.save(tmp_path / "x.npy", np.ones((2, 6), np.float32))
    (tmp_path / "genes.txt").write_text("\n".join(genes) + "\n")
    out = tmp_path / "out"
    base = ["generate", "--pipeline", str(tmp_path / "gen"), "--expression", str(tmp_path / "x.npy"),
            "--gene-names", str(tmp_path / "genes.txt"), "--steps", "1", "--out", str(out)]
    assert main([*base, "--perturb", "G0=4"]) == 0
    placed = plant(out)
    assert main([*base, "--overwrite"]) == 0
    assert_kept(placed)
    # perturbed.npy of the earlier run would no longer match images.npy: this command's own stale file goes
    assert sorted(p.name for p in out.iterdir()) == ["generation.json", "grid.png", "images.npy", "my_notes.txt"]
    assert_no_temporaries(tmp_path)


def test_evaluation_report_keeps_user_files(tmp_path):
    from spatia_hf.evaluation.report import write_report
    from spatia_hf.evaluation.tasks import TASKS, TaskResult

    out = tmp_path / "report"
    placed = plant(out)
    spec = TASKS[1]
    result = TaskResult(1, spec.key, spec.title, list(spec.metrics), spec.primary,
                        {"SPATIA": {spec.primary: 0.6}, "pca": {spec.primary: 0.5}},
                        {"SPATIA": "spatia", "pca": "baseline"})
    write_report([result], out)
    assert_kept(placed)
    assert (out / "report.md").is_file() and (out / "results.json").is_file()
    assert_no_temporaries(tmp_path)


def test_demo_hub_folders_keep_user_files(tiny_data, tmp_path):
    from spatia_hf.data.gene_panel import read_gene_panel
    from spatia_hf.demo import _hub_folders
    from spatia_hf.models.configuration_spatia import SpatiaConfig
    from spatia_hf.models.modeling_spatia import SpatiaModel
    from spatia_hf.models.processing_spatia import SpatiaProcessor
    from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline

    genes = read_gene_panel(tiny_data)["genes"]
    config = SpatiaConfig.from_preset("tiny", gene_vocab=genes, num_channels=2)
    p = {name: tmp_path / name for name in ("pretrained", "generator", "report", "hub")}
    p["dataset"] = tiny_data
    SpatiaModel(config).save_pretrained(p["pretrained"])
    SpatiaProcessor.from_config(config).save_pretrained(p["pretrained"])
    SpatiaGenerationPipeline.from_genes(genes, image_size=16, size="tiny").save_pretrained(p["generator"] / "pipeline")
    _hub_folders(p)
    placed = plant(p["hub"])
    for sub in ("model", "pipeline", "dataset"):
        placed.update(plant(p["hub"] / sub, inside=True))
    (p["hub"] / "dataset" / "cells" / "gone_s09-00000.parquet").write_bytes(b"a shard of a section no longer built")
    _hub_folders(p)  # a second demo run into the same folder
    assert_kept(placed)
    assert not (p["hub"] / "dataset" / "cells" / "gone_s09-00000.parquet").exists()
    assert (p["hub"] / "model" / "model.safetensors").is_file() and (p["hub"] / "pipeline" / "README.md").is_file()
    assert_no_temporaries(tmp_path)
