"""Checkpoints and pipelines saved by spatia-hf 0.1 (before the layered layout) load unchanged.

``tests/fixtures/legacy_0_1`` was written by the package at commit 8da3eae (module paths
``spatia_hf.condition_encoder`` etc. in ``model_index.json``), with the outputs it gave on fixed inputs.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

LEGACY = Path(__file__).parent / "fixtures" / "legacy_0_1"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def expected():
    return load_file(LEGACY / "expected_outputs.safetensors")


def test_model_saved_before_the_move_loads_with_identical_outputs(expected):
    from transformers import AutoModel

    import spatia_hf

    model = AutoModel.from_pretrained(LEGACY / "model").eval()
    assert isinstance(model, spatia_hf.SpatiaModel)
    inputs = {k[3:]: v for k, v in expected.items() if k.startswith("in.") and k != "in.expression"}
    with torch.no_grad():
        out = model(**inputs)
    torch.testing.assert_close(out.cell_embeds, expected["model.cell_embeds"], atol=1e-5, rtol=1e-5)


def test_pipeline_saved_before_the_move_loads_with_identical_images(expected):
    from spatia_hf import SpatiaGenerationPipeline
    from spatia_hf.pipelines.condition_encoder import SpatiaConditionEncoder

    pipe = SpatiaGenerationPipeline.from_pretrained(LEGACY / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.condition_encoder, SpatiaConditionEncoder)
    # guidance 4: the default when the expected images were made (it is 2 since session 11)
    images = pipe(expected["in.expression"].numpy(), num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  guidance_scale=4.0, output_type="pt").images
    torch.testing.assert_close(images, expected["pipeline.images"], atol=1e-5, rtol=1e-5)


def test_old_module_paths_import_the_same_modules():
    import importlib
    import sys

    from spatia_hf._compat import LEGACY_MODULE_PATHS

    for old, new in LEGACY_MODULE_PATHS.items():
        assert importlib.import_module(old) is importlib.import_module(new) is sys.modules[old]


def test_pretraining_checkpoint_with_a_scalar_logit_scale_loads_reshaped(tmp_path):
    """``logit_scale`` is (1,) now (FSDP2 refuses 0-d parameters); checkpoints of the 0-d era load by
    from_pretrained and by load_state_dict (Trainer's resume) with the value kept."""
    from safetensors.torch import save_file

    from spatia_hf import SpatiaConfig, SpatiaForPretraining

    model = SpatiaForPretraining(SpatiaConfig.from_preset("tiny"))
    assert model.logit_scale.shape == (1,)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["logit_scale"] = torch.tensor(1.25)  # as spatia-hf <= 0.2 saved it
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})

    loaded = SpatiaForPretraining.from_pretrained(tmp_path)
    assert loaded.logit_scale.shape == (1,) and loaded.logit_scale.item() == 1.25
    torch.testing.assert_close(loaded.mgm_head.state_dict(), model.mgm_head.state_dict())

    fresh = SpatiaForPretraining(SpatiaConfig.from_preset("tiny"))
    fresh.load_state_dict(state)
    assert fresh.logit_scale.shape == (1,) and fresh.logit_scale.item() == 1.25
