"""SpatiaGenerationPipeline with a DiT denoiser (diffusers' PixArtTransformer2DModel as ``transformer``)."""

import json

import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

from spatia_hf.pipelines.denoisers import TRANSFORMER_PRESETS, denoise, denoiser_kind, make_transformer, uses_global_condition
from spatia_hf.pipelines.image_processing import render_rgb
from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline, SpatiaPipelineOutput
from spatia_hf.training.generator import GeneratorTrainingArguments
from test_pipeline import GENES, STEPS, _counts, _load, _pipe, _run  # the same tiny panel and call

pytestmark = pytest.mark.usefixtures("one_thread")


def _dit(**kwargs) -> SpatiaGenerationPipeline:
    return _pipe(denoiser="transformer", **kwargs)


@pytest.fixture(scope="module")
def pipe():
    return _dit()


def _seen_conditions(pipe, **kwargs) -> list[torch.Tensor]:
    """The ``encoder_hidden_states`` the transformer received at each denoising step."""
    seen = []

    def grab(module, args, kwargs_):
        seen.append(kwargs_["encoder_hidden_states"].detach())

    hook = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _run(pipe, **kwargs)
    finally:
        hook.remove()
    return seen


# ------------------------------------------------------------------ construction
def test_from_genes_builds_a_cross_attention_pixart_transformer(pipe):
    dit, enc = pipe.transformer, pipe.condition_encoder
    assert pipe.unet is None and pipe.denoiser is dit and isinstance(dit, PixArtTransformer2DModel)
    assert denoiser_kind(dit) == "transformer" and not uses_global_condition(dit)
    cfg = dit.config
    assert (cfg.sample_size, cfg.patch_size, cfg.in_channels, cfg.out_channels) == (16, 2, 2, 2)
    assert cfg.cross_attention_dim == enc.config.cross_attention_dim and cfg.caption_channels is None
    assert not dit.use_additional_conditions and cfg.num_layers == TRANSFORMER_PRESETS["tiny"]["num_layers"]
    assert pipe.image_size == 16 and pipe.finest_attention_downsample() == 1
    assert pipe.encode_global_condition(torch.ones(1, len(GENES)), True, torch.zeros(2, 4, 16)) is None
    assert pipe.null_global_condition(2) is None


def test_make_transformer_presets_and_errors():
    small = make_transformer("small", 32, 2, 64)
    assert small.config.num_attention_heads * small.config.attention_head_dim == 96
    assert 5e5 < sum(p.numel() for p in small.parameters()) < 1e6  # about the small UNet's 1.07 M
    with pytest.raises(ValueError, match="patch_size 2"):
        make_transformer("tiny", 15)
    with pytest.raises(ValueError, match="size='huge'"):
        make_transformer("huge")
    with pytest.raises(ValueError, match="denoiser='dit'"):
        SpatiaGenerationPipeline.from_genes(GENES, size="tiny", denoiser="dit")


def test_exactly_one_denoiser_is_accepted(pipe):
    unet = _pipe().unet
    common = dict(scheduler=pipe.scheduler, condition_encoder=pipe.condition_encoder)
    with pytest.raises(ValueError, match="both are given.*exactly one denoiser"):
        SpatiaGenerationPipeline(unet=unet, transformer=pipe.transformer, **common)
    with pytest.raises(ValueError, match="neither is given.*exactly one denoiser"):
        SpatiaGenerationPipeline(**common)
    with pytest.raises(ValueError, match="transformer: got a UNet2DConditionModel.*pass it as unet="):
        SpatiaGenerationPipeline(transformer=unet, **common)
    with pytest.raises(ValueError, match="unet: got a PixArtTransformer2DModel.*pass it as transformer="):
        SpatiaGenerationPipeline(unet=pipe.transformer, **common)
    with pytest.raises(TypeError):  # keyword-only components: a positional scheduler is refused loudly
        SpatiaGenerationPipeline(unet, pipe.scheduler, pipe.condition_encoder)


def test_incompatible_transformers_are_refused(pipe):
    common = dict(scheduler=pipe.scheduler, condition_encoder=pipe.condition_encoder)
    with pytest.raises(ValueError, match="cross_attention_dim=16 differs.*= 24"):
        SpatiaGenerationPipeline(transformer=make_transformer("tiny", 16, 2, 24), **common)
    with pytest.raises(ValueError, match="use_additional_conditions"):
        SpatiaGenerationPipeline(transformer=make_transformer("tiny", 16, 2, 16, use_additional_conditions=True),
                                 **common)
    with pytest.raises(ValueError, match="out_channels=3"):
        SpatiaGenerationPipeline(transformer=make_transformer("tiny", 16, 2, 16, out_channels=3), **common)
    with pytest.raises(ValueError, match="inner width 16. Fix: build it with cross_attention_dim=16"):
        SpatiaGenerationPipeline(transformer=make_transformer("tiny", 16, 2, 32, caption_channels=16), **common)
    # PixArt's own layout: a caption projection from the encoder's 16-wide tokens to the 32-wide blocks
    caption = make_transformer("tiny", 16, 2, 32, attention_head_dim=16, caption_channels=16)
    with_projection = SpatiaGenerationPipeline(transformer=caption, **common)
    with_projection.set_progress_bar_config(disable=True)
    assert _run(with_projection).images.shape == (2, 2, 16, 16)


# ------------------------------------------------------------------ the denoise helper
def test_denoise_calls_the_transformer_the_pixart_way():
    torch.manual_seed(0)
    dit = make_transformer("tiny", 16, 2, 16, out_channels=4).eval()  # learned sigma: 2 x 2 planes
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(3, 2, 16, 16, generator=g), torch.randn(3, 4, 16, generator=g)
    with torch.no_grad():
        raw = dit(x, encoder_hidden_states=cond, timestep=torch.tensor([7, 7, 7]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        out = denoise(dit, x, torch.tensor(7), cond)
        assert raw.shape == (3, 4, 16, 16) and out.shape == (3, 2, 16, 16)
        assert torch.equal(out, raw[:, :2])  # the scalar timestep broadcast, the prediction half kept
        assert torch.equal(denoise(dit, x, 7, cond), out)
        per_row = denoise(dit, x, torch.tensor([7, 500, 900]), cond)
        assert torch.equal(per_row[0], out[0]) and not torch.allclose(per_row[1], out[1])
    with pytest.raises(ValueError, match="class_labels"):
        denoise(dit, x, 7, cond, class_labels=torch.zeros(3, 12))
    with pytest.raises(TypeError, match="neither a diffusers UNet"):
        denoiser_kind(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------ generation
def test_output_types(pipe):
    pt = _run(pipe, output_type="pt").images
    assert pt.shape == (2, 2, 16, 16) and pt.dtype == torch.float32 and 0 <= pt.min() and pt.max() <= 1
    np.testing.assert_allclose(_run(pipe, output_type="np").images, pt.permute(0, 2, 3, 1).numpy())
    pil = _run(pipe, output_type="pil").images
    assert len(pil) == 2 and pil[0].mode == "RGB" and pil[0].size == (16, 16)
    assert np.array_equal(np.asarray(pil[0]), render_rgb(pt[:1], ["DAPI", "boundary"])[0])
    assert _run(pipe, output_type="latent").images.shape == (2, 2, 16, 16)
    tup = _run(pipe, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1 and torch.equal(tup[0], pt)
    assert torch.equal(_run(pipe).images, pt) and not torch.equal(_run(pipe, seed=1).images, pt)


def test_guidance_feeds_the_null_condition_first(pipe):
    seen = _seen_conditions(pipe, guidance_scale=4.0)
    assert len(seen) == STEPS and seen[0].shape == (4, 4, 16)
    assert torch.equal(seen[0][:2], pipe.condition_encoder.null_tokens.expand(2, -1, -1))
    assert _seen_conditions(pipe, guidance_scale=1.0)[0].shape == (2, 4, 16)  # no guidance: conditional only
    plain = _run(pipe, guidance_scale=1.0, output_type="latent").images
    guided = _run(pipe, guidance_scale=4.0, output_type="latent").images
    assert (plain - guided).abs().max() > 1e-4


def test_perturbation_pairs_share_noise(pipe):
    same = _run(pipe, perturbation={"G3": 1.0})
    assert isinstance(same, SpatiaPipelineOutput)
    assert torch.equal(same.images, same.perturbed_images) and torch.equal(same.images, _run(pipe).images)
    edited = _run(pipe, perturbation={"G3": 16.0}, output_type="latent")
    assert torch.equal(edited.images, _run(pipe, output_type="latent").images)
    assert (edited.images - edited.perturbed_images).abs().max() > 1e-4


# ------------------------------------------------------------------ save / load
def test_save_load_round_trip_gives_identical_images(pipe, tmp_path):
    before = _run(pipe, perturbation={"G3": 4.0})
    pipe.save_pretrained(tmp_path / "gen")
    index = json.loads((tmp_path / "gen" / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "PixArtTransformer2DModel"] and index["unet"] == [None, None]
    assert sorted(p.parent.name for p in (tmp_path / "gen").rglob("*.safetensors")) == [
        "condition_encoder", "transformer"]
    loaded = _load(tmp_path / "gen")
    assert loaded.unet is None and isinstance(loaded.transformer, PixArtTransformer2DModel)
    after = _run(loaded, perturbation={"G3": 4.0})
    assert torch.equal(after.images, before.images) and torch.equal(after.perturbed_images, before.perturbed_images)


def test_a_unet_pipeline_saved_before_the_transformer_component_loads_unchanged(tmp_path):
    """Pipelines written before ``transformer`` existed have no such key in model_index.json."""
    unet_pipe = _pipe()
    before = _run(unet_pipe).images
    unet_pipe.save_pretrained(tmp_path / "old")
    index_file = tmp_path / "old" / "model_index.json"
    index = json.loads(index_file.read_text())
    assert index["transformer"] == [None, None] and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    del index["transformer"]
    index_file.write_text(json.dumps(index))
    loaded = _load(tmp_path / "old")
    assert loaded.transformer is None and isinstance(loaded.denoiser, UNet2DConditionModel)
    assert torch.equal(_run(loaded).images, before)


# ------------------------------------------------------------------ token merging
def test_token_merging_patches_every_transformer_block(tmp_path):
    pipe = _dit()
    base = _run(pipe, output_type="latent").images
    pipe.set_token_merging(0.5)
    state = pipe.transformer._spatia_token_merging
    merged = _run(pipe, output_type="latent").images
    blocks = pipe.transformer.config.num_layers
    assert state.merged_calls == {(8, 8): blocks * STEPS}  # the 8 x 8 patch grid of 16 px, patch 2
    rel = float((merged - base).norm() / base.norm())
    assert 0.0 < rel < 0.2
    pipe.save_pretrained(tmp_path / "gen")
    loaded = _load(tmp_path / "gen")
    assert loaded.config.token_merging_ratio == 0.5 and hasattr(loaded.transformer, "_spatia_token_merging")
    assert torch.equal(_run(loaded, output_type="latent").images, merged)
    pipe.set_token_merging(0.0)
    assert not hasattr(pipe.transformer, "_spatia_token_merging")
    assert torch.equal(_run(pipe, output_type="latent").images, base)


# ------------------------------------------------------------------ training
def test_train_generator_with_a_transformer_end_to_end_and_exact_resume(tmp_path):
    from spatia_hf.data.synthetic import build_tiny_dataset
    from spatia_hf.training.generator import train_generator

    data = build_tiny_dataset(tmp_path / "data", n_sections=2, n_cells=40, crop_px=16, niche_px=16, thumb_px=32)
    common = dict(size="tiny", denoiser="transformer", batch_size=4, warmup_steps=1, checkpoint_every=2,
                  log_every=1, progress=False, seed=3)
    full = train_generator(data, tmp_path / "full", max_steps=4, **common)
    assert full.global_step == 4 and len(full.losses) == 4 and np.isfinite(full.losses).all()
    ckpt = tmp_path / "full" / "checkpoints" / "checkpoint-2"
    assert (ckpt / "transformer" / "diffusion_pytorch_model.safetensors").is_file() and not (ckpt / "unet").exists()

    train_generator(data, tmp_path / "part", max_steps=2, **common)
    resumed = train_generator(data, tmp_path / "part", max_steps=4, resume_from_checkpoint="latest", **common)
    assert resumed.global_step == 4
    np.testing.assert_allclose(resumed.losses, full.losses[2:], rtol=1e-5)
    with pytest.raises(ValueError, match="holds a transformer denoiser.*--denoiser transformer"):
        train_generator(data, tmp_path / "part", max_steps=6, resume_from_checkpoint="latest",
                        **{**common, "denoiser": "unet"})

    pipe = _load(full.pipeline_dir)
    assert pipe.unet is None and isinstance(pipe.transformer, PixArtTransformer2DModel) and pipe.image_size == 16
    out = pipe(np.ones(len(pipe.genes)), num_inference_steps=2, output_type="np", perturbation={pipe.genes[0]: 4.0})
    assert out.images.shape == out.perturbed_images.shape == (1, 16, 16, 2)
    summary = json.loads((tmp_path / "full" / "generator_training.json").read_text())
    assert summary["arguments"]["denoiser"] == "transformer"


def test_training_arguments_check_the_denoiser(tmp_path):
    with pytest.raises(ValueError, match="denoiser='dit'.*'unet' or 'transformer'"):
        GeneratorTrainingArguments(dataset_dir=str(tmp_path), out_dir=str(tmp_path), denoiser="dit",
                                   max_steps=1).check()


def test_latent_generation_with_a_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=2, out_channels=2, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=32)
    pipe = SpatiaGenerationPipeline.from_genes(GENES, image_size=32, size="tiny", vae=vae, denoiser="transformer")
    pipe.set_progress_bar_config(disable=True)
    assert (pipe.transformer.config.in_channels, pipe.transformer.config.sample_size) == (4, 16)
    assert pipe.image_size == 32 and _run(pipe).images.shape == (2, 2, 32, 32)
    assert _run(pipe, output_type="latent").images.shape == (2, 4, 16, 16)
