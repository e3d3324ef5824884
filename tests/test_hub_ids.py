"""Hub ids wherever a folder is taken, through one resolver (spatia_hf.utils.hub_ids); offline failures
are one line with the fix. The loopback Hub stands in for huggingface.co."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hub_server import LoopbackHub, isolated_hf_home

from spatia_hf.models.configuration_spatia import SpatiaConfig
from spatia_hf.models.modeling_spatia import SpatiaModel
from spatia_hf.models.processing_spatia import SpatiaProcessor
from spatia_hf.utils.hub_ids import HubUnavailableError, resolve_folder

GENES = [f"GENE{j}" for j in range(12)]


@pytest.fixture
def hf_home(tmp_path):
    with isolated_hf_home(tmp_path / "hf_home") as root:
        yield Path(root)


def _save_model(folder: Path, processor: bool = True) -> Path:
    torch.manual_seed(0)
    config = SpatiaConfig.from_preset("tiny", gene_vocab=GENES, num_channels=2)
    SpatiaModel(config).save_pretrained(folder)
    if processor:
        SpatiaProcessor.from_config(config, target_sum=500.0).save_pretrained(folder)
    return folder


def test_uncached_id_offline_is_one_line_with_the_fix(hf_home):
    with pytest.raises(HubUnavailableError) as err:
        resolve_folder("lab/never-downloaded", what="model")
    text = str(err.value)
    assert "\n" not in text and "Hub is offline (HF_HUB_OFFLINE=1)" in text
    assert "`hf download lab/never-downloaded`" in text and "pass a local folder" in text


def test_a_path_that_is_no_folder_and_no_id_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder, and not a Hub id"):
        resolve_folder(tmp_path / "missing" / "model", what="--model")


def test_processor_and_tl_load_from_a_hub_id_then_offline_from_the_cache(hf_home, tmp_path):
    from spatia_hf import hub
    from spatia_hf.tl import load_model_and_processor

    folder = _save_model(tmp_path / "ckpt")
    with LoopbackHub() as server:
        with server.client():
            hub.push_model(folder, "lab/spatia-tiny", token=server.token)
            assert SpatiaProcessor.from_pretrained("lab/spatia-tiny").target_sum == 500.0
            model, processor = load_model_and_processor("lab/spatia-tiny")
        assert processor.target_sum == 500.0  # the saved processor, not the defaults
    # server gone, HF_HUB_OFFLINE=1: the cache answers
    assert SpatiaProcessor.from_pretrained("lab/spatia-tiny").target_sum == 500.0
    model, _ = load_model_and_processor("lab/spatia-tiny")
    assert isinstance(model, SpatiaModel)


def test_tl_says_when_it_falls_back_to_default_normalisation(tmp_path):
    from spatia_hf.tl import load_model_and_processor

    folder = _save_model(tmp_path / "ckpt", processor=False)
    with pytest.warns(UserWarning, match="has no spatia_processor.json: using the processor defaults"):
        load_model_and_processor(str(folder))


def test_cli_generate_and_evaluate_take_hub_ids_and_fail_offline_in_one_line(hf_home, tmp_path, capsys):
    from spatia_hf.cli import main

    np.save(tmp_path / "x.npy", np.ones((2, len(GENES)), np.float32))
    for argv in (["generate", "--pipeline", "lab/gen", "--expression", str(tmp_path / "x.npy"),
                  "--out", str(tmp_path / "g")],
                 ["evaluate", "--model", "lab/m", "--dataset", str(tmp_path), "--out", str(tmp_path / "r")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "`hf download lab/" in err, err
    with pytest.raises(HubUnavailableError):
        main(["--debug", *argv])


def test_cli_generate_from_a_hub_id(hf_home, tmp_path):
    from spatia_hf import hub
    from spatia_hf.cli import main
    from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline

    torch.manual_seed(0)
    SpatiaGenerationPipeline.from_genes(GENES, image_size=16, size="tiny").save_pretrained(tmp_path / "pipe")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).poisson(2.0, (2, len(GENES))).astype(np.float32))
    (tmp_path / "genes.txt").write_text("\n".join(GENES))
    with LoopbackHub() as server, server.client():
        hub.push_pipeline(tmp_path / "pipe", "lab/gen-tiny", token=server.token)
        rc = main(["generate", "--pipeline", "lab/gen-tiny", "--expression", str(tmp_path / "x.npy"), "--gene-names",
                   str(tmp_path / "genes.txt"), "--steps", "1", "--out", str(tmp_path / "g"), "--no-progress"])
    assert rc == 0 and np.load(tmp_path / "g" / "images.npy").shape[0] == 2
