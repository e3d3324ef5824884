"""Latent generation: training the AutoencoderKL, then the generator on its frozen latents."""

import json

import numpy as np
import pytest
import torch
from spatia_hf.evaluation.generation import vae_reconstruction_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: fastest on one thread

COMMON_VAE = dict(size="tiny", batch_size=4, warmup_steps=1, progress=False, eval_cells=16, scaling_cells=32, seed=1,
                  measure=vae_reconstruction_metrics)
COMMON_GEN = dict(size="tiny", batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=1, progress=False, seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from spatia_hf.data.synthetic import build_tiny_dataset

    return build_tiny_dataset(tmp_path_factory.mktemp("vae") / "data", n_sections=2, n_cells=40, crop_px=16,
                              niche_px=16, thumb_px=32)


@pytest.fixture(scope="module")
def trained_vae(data, tmp_path_factory):
    from spatia_hf.training.vae import train_vae

    return train_vae(data, tmp_path_factory.mktemp("vae") / "vae", max_steps=3, **COMMON_VAE)


def _training_crops(data) -> torch.Tensor:
    from spatia_hf.data import schema
    from spatia_hf.data.datasets import load_spatia_dataset, split_by_section
    from spatia_hf.training.loop import images_to_model_space

    train, _ = split_by_section(load_spatia_dataset(data, ["cells"])["cells"], None)
    images = np.asarray(train.with_format("numpy", columns=[schema.IMAGE])[:][schema.IMAGE])
    return images_to_model_space(torch.from_numpy(images.astype(np.uint8)), 16)


# ------------------------------------------------------------------ train_vae
def test_train_vae_writes_a_loadable_autoencoder_with_its_scaling_factor(data, trained_vae):
    from diffusers import AutoencoderKL

    out = trained_vae.vae_dir.parent
    assert trained_vae.global_step == 3 and trained_vae.stopped_by == "max_steps"
    saved = sorted(p.name for p in trained_vae.vae_dir.iterdir())
    assert saved == ["config.json", "diffusion_pytorch_model.safetensors"]
    vae = AutoencoderKL.from_pretrained(trained_vae.vae_dir)
    assert vae.config.in_channels == 2 and vae.config.latent_channels == 4 and vae.config.sample_size == 16
    assert vae.config.scaling_factor == pytest.approx(trained_vae.scaling_factor) and vae.config.scaling_factor != 1.0
    with torch.no_grad():  # latents times scaling_factor have about unit std (diffusers' convention)
        z = vae.encode(_training_crops(data)).latent_dist.sample(generator=torch.Generator().manual_seed(5))
    assert float(z.std()) * vae.config.scaling_factor == pytest.approx(1.0, rel=0.1)

    summary = json.loads((out / "vae_training.json").read_text())
    assert summary["global_step"] == 3 and summary["eval_sections"] == ["synth_s01"]
    assert summary["train_sections"] == ["synth_s00"] and summary["downsampling_factor"] == 2
    assert summary["latent_size"] == 8 and summary["scaling_factor"] == pytest.approx(trained_vae.scaling_factor)
    rec = summary["reconstruction"]
    assert rec["evaluated_on"] == "held-out sections" and rec["n_crops"] == 16 and rec["nucleus_channel"] == "DAPI"
    for scores in (rec["vae"], rec["resize_x2_baseline"]):
        assert np.isfinite(scores["psnr_db"]) and scores["mse"] > 0
        assert scores["psnr_db"] == pytest.approx(10 * np.log10(1 / scores["mse"]))
        assert set(scores["mse_per_channel"]) == {"DAPI", "boundary"}
    assert not list(out.glob("*.tmp*"))


def test_more_vae_steps_reconstruct_held_out_crops_better(data, tmp_path):
    from spatia_hf.training.vae import train_vae

    kwargs = {**COMMON_VAE, "learning_rate": 3e-3, "log_every": 5}
    short = train_vae(data, tmp_path / "short", max_steps=1, **kwargs)
    long = train_vae(data, tmp_path / "long", max_steps=40, **kwargs)
    assert long.metrics["vae"]["mse"] < 0.7 * short.metrics["vae"]["mse"]
    log = [json.loads(line) for line in (tmp_path / "long" / "vae_training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert log[-1]["reconstruction"] < log[0]["reconstruction"] and log[-1]["kl"] > 0


def test_train_vae_is_deterministic(data, tmp_path, trained_vae):
    from diffusers import AutoencoderKL

    from spatia_hf.training.vae import train_vae

    again = train_vae(data, tmp_path / "again", max_steps=3, **COMMON_VAE)
    assert again.losses == trained_vae.losses and again.scaling_factor == trained_vae.scaling_factor
    a = AutoencoderKL.from_pretrained(again.vae_dir).state_dict()
    b = AutoencoderKL.from_pretrained(trained_vae.vae_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_vae_loss_terms():
    from spatia_hf.training.vae import vae_loss

    x = torch.zeros(2, 2, 4, 4)
    rec = torch.full_like(x, 0.5)
    zeros = torch.zeros(2, 4, 2, 2)
    loss, rec_term, kl = vae_loss(rec, x, zeros, zeros, kl_weight=1.0, kind="l1")
    assert float(rec_term) == pytest.approx(0.5) and float(kl) == 0.0 and float(loss) == pytest.approx(0.5)
    _, rec_term, _ = vae_loss(rec, x, zeros, zeros, kl_weight=1.0, kind="mse")
    assert float(rec_term) == pytest.approx(0.25)
    mean = torch.ones(2, 4, 2, 2)  # KL per latent element = 0.5 * mean^2 = 0.5; 16 latent / 32 image elements
    loss, _, kl = vae_loss(x, x, mean, zeros, kl_weight=1e-2)
    assert float(kl) == pytest.approx(0.5 * 16 / 32) and float(loss) == pytest.approx(1e-2 * 0.25)


def test_vae_arguments_parse_from_the_command_line_and_are_checked():
    from transformers import HfArgumentParser

    from spatia_hf.training.vae import VaeTrainingArguments

    (args,) = HfArgumentParser(VaeTrainingArguments).parse_args_into_dataclasses(
        ["--dataset_dir", "d", "--out_dir", "o", "--size", "tiny", "--max_steps", "2", "--kl_weight", "1e-5"])
    assert args.size == "tiny" and args.max_steps == 2 and args.kl_weight == 1e-5 and args.eval_sections is None
    args.check()
    for bad, match in ((dict(max_steps=None), "never stop"), (dict(size="huge"), "size='huge'"),
                       (dict(reconstruction_loss="l2"), "reconstruction_loss"), (dict(kl_weight=-1.0), "kl_weight"),
                       (dict(batch_size=0), "batch_size=0")):
        with pytest.raises(ValueError, match=match):
            VaeTrainingArguments(**{"dataset_dir": "d", "out_dir": "o", "max_steps": 2, **bad}).check()


# ------------------------------------------------------------------ the generator on latents
def test_train_generator_on_vae_latents_saves_a_pipeline_with_the_vae(data, trained_vae, tmp_path):
    from diffusers import AutoencoderKL

    from spatia_hf import SpatiaGenerationPipeline
    from spatia_hf.training.generator import train_generator

    result = train_generator(data, tmp_path / "gen", max_steps=2, vae=str(trained_vae.vae_dir.parent), **COMMON_GEN)
    assert result.global_step == 2 and np.isfinite(result.losses).all()
    index = json.loads((result.pipeline_dir / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    summary = json.loads((tmp_path / "gen" / "generator_training.json").read_text())
    assert summary["arguments"]["vae"] == str(trained_vae.vae_dir.parent) and summary["image_size"] == 16

    pipe = SpatiaGenerationPipeline.from_pretrained(result.pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae is not None and pipe.vae_scale_factor == 2 and pipe.image_size == 16
    assert pipe.unet.config.in_channels == 4 and pipe.unet.config.sample_size == 8
    assert not pipe.scheduler.config.thresholding  # latents are not bounded to [-1, 1]
    trained = AutoencoderKL.from_pretrained(trained_vae.vae_dir).state_dict()  # the VAE stayed frozen
    assert all(torch.equal(v, trained[k]) for k, v in pipe.vae.state_dict().items())
    assert pipe.vae.config.scaling_factor == pytest.approx(trained_vae.scaling_factor)

    counts = np.ones((2, len(pipe.genes)))
    run = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    pil = pipe(counts, output_type="pil", **run).images
    assert len(pil) == 2 and pil[0].size == (16, 16) and pil[0].mode == "RGB"
    np_images = pipe(counts, output_type="np", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert np_images.shape == (2, 16, 16, 2) and np_images.min() >= 0 and np_images.max() <= 1
    pt = pipe(counts, output_type="pt", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert pt.shape == (2, 2, 16, 16)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), np_images, atol=1e-6)
    latents = pipe(counts, output_type="latent", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert latents.images.shape == (2, 4, 8, 8)


def test_a_latent_run_resumes_exactly_with_the_vae_from_its_checkpoint(data, trained_vae, tmp_path):
    from spatia_hf.training.generator import train_generator

    vae = str(trained_vae.vae_dir.parent)
    full = train_generator(data, tmp_path / "full", max_steps=4, vae=vae, **COMMON_GEN)
    state = json.loads((tmp_path / "full" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["arguments"]["vae"] == vae and len(state["vae_fingerprint"]) == 64
    assert not (tmp_path / "full" / "checkpoints" / "checkpoint-2" / "vae").exists()  # frozen: not stored

    train_generator(data, tmp_path / "part", max_steps=2, vae=vae, **COMMON_GEN)
    resumed = train_generator(data, tmp_path / "part", max_steps=4, resume_from_checkpoint="latest", **COMMON_GEN)
    assert resumed.global_step == 4
    np.testing.assert_allclose(resumed.losses, full.losses[2:], rtol=1e-5)
    summary = json.loads((tmp_path / "part" / "generator_training.json").read_text())
    assert summary["arguments"]["vae"] == vae


def test_resume_refuses_another_vae_or_a_pixel_space_checkpoint(data, trained_vae, tmp_path):
    from spatia_hf.training.generator import train_generator
    from spatia_hf.training.vae import train_vae

    other = train_vae(data, tmp_path / "other", max_steps=1, **COMMON_VAE)
    train_generator(data, tmp_path / "latent", max_steps=2, vae=str(trained_vae.vae_dir), **COMMON_GEN)
    with pytest.raises(ValueError, match="differ from the VAE the checkpoint was trained on"):
        train_generator(data, tmp_path / "latent", max_steps=4, resume_from_checkpoint="latest",
                        vae=str(other.vae_dir), **COMMON_GEN)
    train_generator(data, tmp_path / "pixel", max_steps=2, **COMMON_GEN)
    with pytest.raises(ValueError, match="trained in pixel space"):
        train_generator(data, tmp_path / "pixel", max_steps=4, resume_from_checkpoint="latest",
                        vae=str(trained_vae.vae_dir), **COMMON_GEN)


def test_latent_training_gives_clear_errors(data, tmp_path):
    from spatia_hf.training.generator import train_generator
    from spatia_hf.training.vae import make_vae, train_vae

    make_vae("tiny", in_channels=3, image_size=16).save_pretrained(tmp_path / "rgb_vae")
    with pytest.raises(ValueError, match=r"in_channels=3 but the dataset's crops have 2 channels"):
        train_generator(data, tmp_path / "g1", max_steps=1, vae=str(tmp_path / "rgb_vae"), **COMMON_GEN)
    vae = train_vae(data, tmp_path / "vae", max_steps=1, **COMMON_VAE).vae_dir
    with pytest.raises(ValueError, match=r"image_size=15 is not divisible by the VAE's downsampling factor 2"):
        train_generator(data, tmp_path / "g2", max_steps=1, vae=str(vae), image_size=15, **COMMON_GEN)
    with pytest.raises(ValueError, match=r"latents of image_size / 2 px"):  # 18 px -> 9 px latents: odd for the UNet
        train_generator(data, tmp_path / "g3", max_steps=1, vae=str(vae), image_size=18, **COMMON_GEN)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        train_generator(data, tmp_path / "g4", max_steps=1, vae=str(tmp_path / "nothing"), **COMMON_GEN)
    with pytest.raises(ValueError, match="not divisible by the 'small' VAE's downsampling factor 4"):
        make_vae("small", image_size=18)
