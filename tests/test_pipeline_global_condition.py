"""The generator's global condition path: flattened condition tokens -> the UNet's class embedding."""

import json

import numpy as np
import pytest
import torch

from spatia_hf.condition_encoder import SpatiaConditionEncoder
from spatia_hf.pipeline_spatia import SpatiaGenerationPipeline, make_unet, training_scheduler, uses_global_condition
from spatia_hf.training.generator import diffusion_loss

GENES = [f"G{i}" for i in range(12)]
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pipe(**kwargs) -> SpatiaGenerationPipeline:
    torch.manual_seed(0)
    pipe = SpatiaGenerationPipeline.from_genes(GENES, image_size=16, size="tiny", **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _counts(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(3.0, size=(n, len(GENES))).astype(np.float32) + 1


def _run(pipe, expression=None, seed: int = 0, **kwargs):
    expression = _counts() if expression is None else expression
    kwargs.setdefault("output_type", "pt")
    return pipe(expression, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_the_unet_gets_the_flattened_tokens_and_guidance_the_null_ones():
    pipe = _pipe()
    enc = pipe.condition_encoder
    assert uses_global_condition(pipe.unet)
    assert pipe.unet.config.projection_class_embeddings_input_dim == enc.pooled_dim == enc.num_tokens * 16
    seen = []
    hook = pipe.unet.class_embedding.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    try:
        _run(pipe, guidance_scale=3.0)
    finally:
        hook.remove()
    assert len(seen) == STEPS and seen[0].shape == (4, enc.pooled_dim)
    cond = enc(torch.from_numpy(_counts()))
    assert torch.equal(seen[0][:2], enc.null_tokens.flatten()[None].expand(2, -1))  # CFG's unconditional half
    assert torch.allclose(seen[0][2:], cond.flatten(1), atol=1e-6)


def test_the_global_path_alone_changes_the_images():
    pipe = _pipe()
    a = _run(pipe, guidance_scale=1.0, output_type="latent").images
    with torch.no_grad():
        pipe.unet.class_embedding.linear_2.bias.add_(0.5)  # only the global path is touched
    b = _run(pipe, guidance_scale=1.0, output_type="latent").images
    assert (a - b).abs().max() > 1e-3


def test_a_pipeline_without_the_global_path_still_saves_loads_and_runs(tmp_path):
    pipe = _pipe(global_condition=False)
    assert pipe.unet.config.class_embed_type is None and pipe.unet.class_embedding is None
    before = _run(pipe, perturbation={"G3": 4.0})
    pipe.save_pretrained(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "unet" / "config.json").read_text())
    assert cfg["class_embed_type"] is None
    loaded = SpatiaGenerationPipeline.from_pretrained(tmp_path / "old")
    loaded.set_progress_bar_config(disable=True)
    assert not uses_global_condition(loaded.unet)
    after = _run(loaded, perturbation={"G3": 4.0})
    assert torch.equal(after.images, before.images) and torch.equal(after.perturbed_images, before.perturbed_images)


def test_a_pipeline_with_the_global_path_round_trips(tmp_path):
    pipe = _pipe()
    before = _run(pipe).images
    pipe.save_pretrained(tmp_path / "new")
    loaded = SpatiaGenerationPipeline.from_pretrained(tmp_path / "new")
    loaded.set_progress_bar_config(disable=True)
    assert uses_global_condition(loaded.unet)
    assert torch.equal(_run(loaded).images, before)


def test_condition_dropout_drops_both_paths():
    pipe = _pipe()
    sched = training_scheduler()
    clean = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, size=(4, 2, 16, 16)).astype(np.float32))
    a, b = torch.from_numpy(_counts(4, seed=1)), torch.from_numpy(_counts(4, seed=2)) * 5

    def loss(counts, dropout):
        with torch.no_grad():
            return diffusion_loss(pipe.unet, pipe.condition_encoder, sched, clean, counts,
                                  torch.Generator().manual_seed(7), condition_dropout=dropout).item()

    assert loss(a, 0.0) != loss(b, 0.0)
    assert loss(a, 1.0) == loss(b, 1.0)  # every row dropped: the expression reaches the UNet by no path


def test_mismatched_global_width_and_other_class_embeddings_are_refused():
    pipe = _pipe()
    enc = pipe.condition_encoder
    wrong = make_unet("tiny", 16, 2, 16, global_condition_dim=enc.pooled_dim + 1)
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim=.*global_condition_dim"):
        SpatiaGenerationPipeline(unet=wrong, scheduler=pipe.scheduler, condition_encoder=enc)
    labels = make_unet("tiny", 16, 2, 16, num_class_embeds=5)
    with pytest.raises(ValueError, match="num_class_embeds=5"):
        SpatiaGenerationPipeline(unet=labels, scheduler=pipe.scheduler, condition_encoder=enc)
    with pytest.raises(ValueError, match="global_condition_dim=0"):
        make_unet("tiny", 16, 2, 16, global_condition_dim=0)
