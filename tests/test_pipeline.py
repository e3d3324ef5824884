"""SpatiaGenerationPipeline, its condition encoder and the generator training loop (tiny sizes, CPU)."""

import json
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from spatia_hf import SpatiaCellConfig, SpatiaCellModel
from spatia_hf.pipelines.condition_encoder import SpatiaConditionEncoder, log1p_normalize
from spatia_hf.pipelines.image_processing import render_rgb
from spatia_hf.pipelines.pipeline_spatia import (DEFAULT_PERTURBATION_GUIDANCE, SpatiaGenerationPipeline,
                                                SpatiaPipelineOutput)

GENES = [f"G{i}" for i in range(12)]
STEPS = 3


def _pipe(**kwargs) -> SpatiaGenerationPipeline:
    torch.manual_seed(0)
    pipe = SpatiaGenerationPipeline.from_genes(GENES, image_size=16, size="tiny", **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load(folder) -> SpatiaGenerationPipeline:
    """A saved pipeline, loaded with its progress bar off."""
    pipe = SpatiaGenerationPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _counts(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(3.0, size=(n, len(GENES))).astype(np.float32) + 1


def _run(pipe, expression=None, seed: int = 0, **kwargs):
    expression = _counts() if expression is None else expression
    kwargs.setdefault("output_type", "pt")
    return pipe(expression, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), **kwargs)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: ~8x faster on one thread


@pytest.fixture(scope="module")
def pipe():
    return _pipe()


# ------------------------------------------------------------------ save / load
def test_save_load_round_trip_gives_identical_images(pipe, tmp_path):
    before = _run(pipe).images
    pipe.save_pretrained(tmp_path / "gen")
    index = json.loads((tmp_path / "gen" / "model_index.json").read_text())
    assert index["condition_encoder"] == ["spatia_hf.pipelines.condition_encoder", "SpatiaConditionEncoder"]
    assert index["vae"] == [None, None] and index["channel_names"] == ["DAPI", "boundary"]
    weights = sorted(p.name for p in (tmp_path / "gen").rglob("*") if p.suffix in (".safetensors", ".bin", ".pt"))
    assert weights == ["diffusion_pytorch_model.safetensors"] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]  # no temporary left beside it
    loaded = _load(tmp_path / "gen")
    assert loaded.genes == GENES
    assert torch.equal(_run(loaded).images, before)


def test_save_pretrained_keeps_the_users_files_and_replaces_stale_weights(pipe, tmp_path):
    out = tmp_path / "gen"
    (out / "unet").mkdir(parents=True)
    (out / "my_notes.txt").write_text("mine")
    (out / "unet" / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"old shard")
    (out / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    for name in ("gen.tmp-save", "gen.old-save", "gen.tmp"):  # names earlier versions used as temporaries
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text(name)
    pipe.save_pretrained(out)
    assert (out / "model_index.json").is_file() and (out / "my_notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    for name in ("gen.tmp-save", "gen.old-save", "gen.tmp"):
        assert (tmp_path / name / "keep.txt").read_text() == name
    assert _load(out).genes == GENES
    with pytest.raises(ValueError, match="safetensors only"):
        pipe.save_pretrained(out, safe_serialization=False)


def test_save_pretrained_failing_mid_write_leaves_the_previous_save(pipe, tmp_path, monkeypatch):
    out = tmp_path / "gen"
    pipe.save_pretrained(out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    from diffusers import ModelMixin

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ModelMixin, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        pipe.save_pretrained(out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]


def test_hub_layout_accepts_the_module_path_component():
    """A Hub repo's model_index.json names our encoder by module path; diffusers must accept it."""
    from diffusers.pipelines.pipeline_loading_utils import _get_custom_components_and_folders

    config = {"_class_name": "SpatiaGenerationPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
              "condition_encoder": ["spatia_hf.pipelines.condition_encoder", "SpatiaConditionEncoder"], "vae": [None, None]}
    custom, folders = _get_custom_components_and_folders("org/gen", config, ["model_index.json"])
    assert custom == {} and "condition_encoder" in folders


# ------------------------------------------------------------------ outputs
def test_output_types(pipe):
    pt = _run(pipe, output_type="pt").images
    assert pt.shape == (2, 2, 16, 16) and pt.dtype == torch.float32 and 0 <= pt.min() and pt.max() <= 1
    np_images = _run(pipe, output_type="np").images
    assert np_images.shape == (2, 16, 16, 2)
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy())
    pil = _run(pipe, output_type="pil").images
    assert len(pil) == 2 and pil[0].mode == "RGB" and pil[0].size == (16, 16)
    assert np.array_equal(np.asarray(pil[0]), render_rgb(pt[:1], ["DAPI", "boundary"])[0])
    latent = _run(pipe, output_type="latent").images
    assert latent.shape == (2, 2, 16, 16)
    tup = _run(pipe, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1 and torch.equal(tup[0], pt)


def test_render_rgb_puts_dapi_in_blue_and_boundary_in_green():
    img = torch.zeros(1, 2, 4, 4)
    img[0, 0, 0, 0] = 1.0  # DAPI only
    img[0, 1, 3, 3] = 1.0  # boundary only
    rgb = render_rgb(img, ["DAPI", "boundary"])
    assert rgb[0, 0, 0, 2] == 255 and rgb[0, 0, 0, 1] < 128 and rgb[0, 0, 0, 0] == 0
    assert tuple(rgb[0, 3, 3]) == (0, 255, 0)
    assert tuple(rgb[0, 1, 1]) == (0, 0, 0)


def test_num_images_per_expression_and_generator_determinism(pipe):
    a = _run(pipe, num_images_per_expression=2).images
    assert a.shape[0] == 4
    assert torch.equal(a, _run(pipe, num_images_per_expression=2).images)
    assert not torch.equal(a, _run(pipe, seed=1, num_images_per_expression=2).images)


# ------------------------------------------------------------------ expression inputs
def test_gene_names_are_mapped_onto_the_panel(pipe):
    x = _counts()
    order = np.random.default_rng(1).permutation(len(GENES))
    shuffled = _run(pipe, x[:, order], gene_names=[GENES[j] for j in order]).images
    assert torch.equal(shuffled, _run(pipe, x).images)


def test_unknown_genes_are_reported_by_name(pipe):
    x = np.c_[_counts(), np.full((2, 1), 5.0)]
    with pytest.warns(UserWarning, match="NOTAGENE"):
        out = _run(pipe, x, gene_names=GENES + ["NOTAGENE"])
    assert out.unknown_genes == ["NOTAGENE"]
    assert torch.equal(out.images, _run(pipe).images)


def test_anndata_and_pandas_inputs(pipe):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    x = _counts()
    expected = _run(pipe, x).images
    adata = ad.AnnData(X=sp.csr_matrix(x), var=pd.DataFrame(index=GENES))
    assert torch.equal(_run(pipe, adata).images, expected)
    assert torch.equal(_run(pipe, pd.DataFrame(x, columns=GENES)).images, expected)
    assert torch.equal(_run(pipe, torch.from_numpy(x)).images, expected)
    assert torch.equal(_run(pipe, x[0]).images, _run(pipe, x[:1]).images)


@pytest.mark.parametrize(
    "expression, kwargs, match",
    [
        (np.ones(5), {}, "gene panel has 12 genes"),
        (np.ones((1, 12)), {"gene_names": GENES[:11]}, "11 names for 12"),
        (np.r_[np.ones(11), np.nan], {}, "non-finite.*'G11'"),
        (np.r_[np.ones(11), -2.0], {}, "negative.*'G11'"),
        (np.ones(12), {"perturbation": {"NOTAGENE": 2.0}}, "'NOTAGENE' is not in the model's gene panel"),
        (np.ones(12), {"perturbation": {"G3": 0.0}}, "fold must be a finite number > 0"),
        (np.ones(12), {"perturbation": {"G3": float("nan")}}, "fold must be"),
        (np.ones(11), {"gene_names": GENES[:11], "perturbation": {"G11": 2.0}}, "'G11' is not among gene_names"),
        (np.ones(12), {"num_inference_steps": 0}, "num_inference_steps"),
        (np.ones(12), {"output_type": "jpeg"}, "output_type"),
        (np.ones((1, 2)), {"gene_names": ["X", "Y"]}, "none of the 2 genes"),
    ],
)
def test_bad_inputs_raise_clear_errors(pipe, expression, kwargs, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match=match):
            pipe(expression, **{"num_inference_steps": 1, "output_type": "pt", **kwargs})


# ------------------------------------------------------------------ perturbation
def test_perturbation_pairs_share_noise(pipe):
    same = _run(pipe, perturbation={"G3": 1.0})
    assert isinstance(same, SpatiaPipelineOutput)
    assert torch.equal(same.images, same.perturbed_images)
    assert torch.equal(same.images, _run(pipe).images)  # the control is the unperturbed generation
    edited = _run(pipe, perturbation={"G3": 16.0}, output_type="latent")  # unclamped: any change shows
    assert torch.equal(edited.images, _run(pipe, output_type="latent").images)
    assert (edited.images - edited.perturbed_images).abs().max() > 1e-4
    control, perturbed = _run(pipe, perturbation={"G3": 16.0}, return_dict=False, output_type="latent")
    assert torch.equal(perturbed, edited.perturbed_images)


def test_perturbation_with_a_stochastic_sampler_replays_the_same_sampler_noise():
    pipe = _pipe()
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    out = _run(pipe, perturbation={"G0": 1.0})
    assert torch.equal(out.images, out.perturbed_images)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    listed = pipe(_counts(), perturbation={"G0": 1.0}, num_inference_steps=STEPS, generator=gens, output_type="pt")
    assert torch.equal(listed.images, listed.perturbed_images)


def test_perturbation_changes_only_the_edited_gene(pipe):
    x = _counts(1)
    counts, _, index = pipe.prepare_expression(x)
    doubled = x.copy()
    doubled[0, 5] *= 4.0
    # "edited" without edit guidance: the edited counts are normalised by their own total, like any new cell
    assert torch.allclose(_run(pipe, x, perturbation={"G5": 4.0}, output_type="latent",
                               perturbation_library="edited", perturbation_guidance=0.0).perturbed_images,
                          _run(pipe, doubled, output_type="latent").images, rtol=1e-4, atol=1e-2)
    assert index["G5"] == 5 and counts.shape == (1, 12)


def test_an_edited_cell_keeps_its_unedited_library_size(pipe):
    """The default edit moves only the edited gene's normalised value (the size factor is the cell's)."""
    enc = pipe.condition_encoder
    x = torch.from_numpy(_counts(1))
    edited = x.clone()
    edited[0, 5] *= 4.0
    kept = enc.standardized_profile(edited, library_size=x.sum(dim=1)) - enc.standardized_profile(x)
    assert kept[0, 5] > 0 and torch.count_nonzero(kept.abs() > 1e-6) == 1
    moved = enc.standardized_profile(edited) - enc.standardized_profile(x)  # own total: every gene moves
    assert torch.count_nonzero(moved.abs() > 1e-6) == 12
    # perturbation= (default "unedited") == the same edit batched by the caller with reference_rows
    via_perturbation = _run(pipe, x.numpy(), perturbation={"G5": 4.0}, output_type="latent").perturbed_images
    gens = [torch.Generator().manual_seed(0) for _ in range(2)]
    batched = pipe(np.concatenate([x.numpy(), edited.numpy()]), num_inference_steps=STEPS, generator=gens,
                   output_type="latent", reference_rows=[0, 0]).images
    assert torch.allclose(via_perturbation[0], batched[1], atol=1e-4)
    own = _run(pipe, x.numpy(), perturbation={"G5": 4.0}, output_type="latent", perturbation_library="edited")
    assert (own.perturbed_images - via_perturbation).abs().max() > 1e-5


def test_perturbation_guidance_moves_only_edited_images(pipe):
    plain = _run(pipe, perturbation={"G5": 4.0}, output_type="latent", perturbation_guidance=0.0)
    guided = _run(pipe, perturbation={"G5": 4.0}, output_type="latent", perturbation_guidance=2.0)
    assert torch.equal(_run(pipe, perturbation={"G5": 4.0}, output_type="latent").perturbed_images,
                       _run(pipe, perturbation={"G5": 4.0}, output_type="latent",
                            perturbation_guidance=DEFAULT_PERTURBATION_GUIDANCE).perturbed_images)
    assert torch.allclose(plain.images, guided.images)  # the controls are not edits
    assert (plain.perturbed_images - guided.perturbed_images).abs().max() > 1e-5
    same = _run(pipe, perturbation={"G5": 1.0}, output_type="latent", perturbation_guidance=2.0)
    assert torch.allclose(same.images, same.perturbed_images, atol=1e-5)  # no edit, no guidance


@pytest.mark.parametrize("kwargs, match", [
    (dict(perturbation={"NOPE": 2.0}), "gene 'NOPE' is not in the model's gene panel"),
    (dict(perturbation_library="raw"), "perturbation_library='raw'"),
    (dict(perturbation_guidance=-1.0), "perturbation_guidance=-1.0"),
    (dict(reference_rows=[0]), "reference_rows: expected 2 row indices"),
    (dict(reference_rows=[1, 0]), "reference row must be unedited"),
    (dict(reference_rows=[0, 0], perturbation={"G1": 2.0}), "reference_rows and perturbation"),
    (dict(guidance_rescale=1.5), "guidance_rescale=1.5"),
])
def test_bad_edits_raise_clear_errors(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _run(pipe, **kwargs)


# ------------------------------------------------------------------ schedulers, guidance, merging
@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, EulerDiscreteScheduler, DDPMScheduler])
def test_scheduler_swap(scheduler_cls):
    pipe = _pipe()
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    assert type(pipe.scheduler) is scheduler_cls
    a = _run(pipe).images
    assert a.shape == (2, 2, 16, 16) and torch.isfinite(a).all()
    assert torch.equal(a, _run(pipe).images)


def test_guidance_uses_the_null_condition(pipe):
    plain = _run(pipe, guidance_scale=1.0, output_type="latent").images
    guided = _run(pipe, guidance_scale=4.0, output_type="latent").images
    assert (plain - guided).abs().max() > 1e-4
    enc = pipe.condition_encoder
    cond = pipe.encode_expression(torch.from_numpy(_counts()), do_classifier_free_guidance=True)
    assert torch.equal(cond[:2], enc.null_tokens.expand(2, -1, -1))


def test_guidance_rescale_matches_the_conditional_spread_only_when_asked(pipe):
    guided = _run(pipe, guidance_scale=4.0, output_type="latent").images
    assert torch.equal(guided, _run(pipe, guidance_scale=4.0, guidance_rescale=0.0, output_type="latent").images)
    rescaled = _run(pipe, guidance_scale=4.0, guidance_rescale=0.7, output_type="latent").images
    assert torch.isfinite(rescaled).all() and (rescaled - guided).abs().max() > 1e-5
    plain = _run(pipe, guidance_scale=1.0, output_type="latent").images  # no guidance: nothing to rescale
    assert torch.equal(plain, _run(pipe, guidance_scale=1.0, guidance_rescale=0.7, output_type="latent").images)


def test_token_merging_is_recorded_saved_and_reversible(tmp_path):
    pipe = _pipe()
    base = _run(pipe).images
    latent = _run(pipe, output_type="latent").images
    pipe.set_token_merging(0.5)
    assert pipe.config.token_merging_ratio == 0.5
    assert hasattr(pipe.unet, "_spatia_token_merging")
    merged = _run(pipe).images
    assert merged.shape == base.shape
    assert (_run(pipe, output_type="latent").images - latent).abs().max() > 1e-5
    pipe.save_pretrained(tmp_path / "gen")
    assert json.loads((tmp_path / "gen" / "model_index.json").read_text())["token_merging_ratio"] == 0.5
    loaded = _load(tmp_path / "gen")
    assert hasattr(loaded.unet, "_spatia_token_merging")
    assert torch.equal(_run(loaded).images, merged)
    pipe.set_token_merging(0.0)
    assert not hasattr(pipe.unet, "_spatia_token_merging")
    assert torch.equal(_run(pipe).images, base)
    with pytest.raises(ValueError, match="token_merging_ratio"):
        pipe.set_token_merging(1.5)


def test_callback_on_step_end_sees_every_step(pipe):
    seen = []

    def cb(p, i, t, kwargs):
        seen.append((i, kwargs["latents"].shape))
        return {}

    _run(pipe, callback_on_step_end=cb)
    assert [i for i, _ in seen] == list(range(STEPS)) and seen[0][1] == (2, 2, 16, 16)


# ------------------------------------------------------------------ condition encoder
def test_condition_encoder_normalises_like_the_processor():
    from spatia_hf import SpatiaProcessor

    counts = np.array([[3.0, 0.0, 1.0, 6.0]])
    proc = SpatiaProcessor(["A", "B", "C", "D"], zero_ratio=0.0)
    proc.map_panel(["A", "B", "C", "D"])
    enc = proc.encode_dense(counts)
    mine = log1p_normalize(torch.from_numpy(counts), 1e4)[0]
    expected = {int(i) - 4: float(v) for i, v in zip(enc["gene_ids"][0], enc["gene_values"][0])}
    for j, v in expected.items():
        assert mine[j].item() == pytest.approx(v, rel=1e-5)


def test_condition_encoder_keeps_the_most_expressed_genes_of_a_large_panel():
    enc = SpatiaConditionEncoder.from_genes(GENES, hidden_size=16, num_attention_heads=2, num_expression_layers=1,
                                            cross_attention_dim=8, num_condition_tokens=2, max_gene_tokens=4)
    counts = torch.zeros(1, 12)
    counts[0, [2, 7, 9]] = torch.tensor([5.0, 1.0, 9.0])
    ids, values, mask = enc.gene_tokens_from_counts(counts)
    assert ids.shape == (1, 4) and mask.tolist() == [[True, True, True, False]]
    assert (ids[0, :3] - 4).tolist() == [9, 2, 7]
    assert enc(counts).shape == (1, 2, 8)
    with pytest.raises(ValueError, match="expected shape \\[batch, 12\\]"):
        enc(torch.zeros(1, 5))


def test_expression_token_adds_a_direct_path_from_every_gene(tmp_path):
    enc = SpatiaConditionEncoder.from_genes(GENES, hidden_size=16, num_attention_heads=2, num_expression_layers=1,
                                            cross_attention_dim=8, num_condition_tokens=3, expression_token=True)
    counts = torch.from_numpy(_counts(2))
    out = enc(counts)
    assert out.shape == (2, 4, 8) and enc.num_tokens == 4 and enc.null_condition(2).shape == (2, 4, 8)
    edited = counts.clone()
    edited[:, 7] *= 4
    assert (enc(edited)[:, -1] - out[:, -1]).abs().max() > 1e-5
    enc.save_pretrained(tmp_path / "enc")
    assert torch.equal(SpatiaConditionEncoder.from_pretrained(tmp_path / "enc")(counts), out)


def test_condition_encoder_from_spatia_model_copies_the_expression_branch(tmp_path):
    config = SpatiaCellConfig(gene_vocab=GENES, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                              num_expression_layers=1, num_image_layers=1, num_fusion_layers=1, image_size=16,
                              patch_size=8)
    model = SpatiaCellModel(config)
    model.save_pretrained(tmp_path / "cell")
    for source in (model, tmp_path / "cell"):
        enc = SpatiaConditionEncoder.from_spatia_model(source, cross_attention_dim=16, num_condition_tokens=4)
        assert enc.genes == GENES
        theirs = model.expression_encoder.state_dict()
        for k, v in enc.expression_encoder.state_dict().items():
            assert torch.equal(v, theirs[k]), k
    pipe = SpatiaGenerationPipeline.from_genes(GENES, image_size=16, size="tiny", condition_encoder=enc)
    pipe.set_progress_bar_config(disable=True)
    assert _run(pipe).images.shape == (2, 2, 16, 16)


def test_mismatched_components_are_refused():
    pipe = _pipe()
    other = SpatiaConditionEncoder.from_genes(GENES, hidden_size=16, num_attention_heads=2, num_expression_layers=1,
                                              cross_attention_dim=24, num_condition_tokens=2)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        SpatiaGenerationPipeline(unet=pipe.unet, scheduler=pipe.scheduler, condition_encoder=other)
    with pytest.raises(ValueError, match="channel_names"):
        SpatiaGenerationPipeline(unet=pipe.unet, scheduler=pipe.scheduler, condition_encoder=pipe.condition_encoder,
                                 channel_names=["DAPI"])


def test_latent_generation_with_a_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=2, out_channels=2, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=32)
    pipe = SpatiaGenerationPipeline.from_genes(GENES, image_size=32, size="tiny", vae=vae)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == 4 and pipe.unet.config.sample_size == 16
    out = _run(pipe).images
    assert out.shape == (2, 2, 32, 32)


# ------------------------------------------------------------------ training
@pytest.mark.parametrize("denoiser", ["unet", "transformer"])
def test_a_few_training_steps_reduce_the_loss(denoiser):
    from spatia_hf.pipelines.denoisers import training_scheduler
    from spatia_hf.training.generator import diffusion_loss

    pipe = _pipe(denoiser=denoiser)
    unet, enc = pipe.denoiser, pipe.condition_encoder
    sched = training_scheduler()
    rng = np.random.default_rng(0)
    clean = torch.from_numpy(rng.uniform(-1, 1, size=(8, 2, 16, 16)).astype(np.float32))
    clean[:, :, 4:12, 4:12] = 1.0
    counts = torch.from_numpy(_counts(8))

    def fixed_loss():
        with torch.no_grad():
            return diffusion_loss(unet, enc, sched, clean, counts, torch.Generator().manual_seed(123)).item()

    before = fixed_loss()
    opt = torch.optim.AdamW(list(unet.parameters()) + list(enc.parameters()), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        loss = diffusion_loss(unet, enc, sched, clean, counts, gen, condition_dropout=0.1, snr_gamma=5.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert fixed_loss() < 0.7 * before


@pytest.mark.slow
def test_generator_training_runs_two_process_ddp_on_cpu_and_resumes(tmp_path):
    """`torchrun --nproc_per_node 2 examples/train_generator.py` without a GPU and without --cpu: the
    two processes form one gloo DDP run (before, each believed it was alone and both wrote the same
    checkpoints), and a launched resume continues it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from spatia_hf.data.synthetic import build_tiny_dataset

    data = build_tiny_dataset(tmp_path / "data", n_sections=2, n_cells=40, crop_px=16, niche_px=16, thumb_px=32)
    script = Path(__file__).resolve().parents[1] / "examples" / "train_generator.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "ddp"

    def launch(steps, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               str(script), "--dataset_dir", str(data), "--out_dir", str(out), "--size", "tiny", "--batch_size", "4",
               "--max_steps", str(steps), "--warmup_steps", "1", "--checkpoint_every", "2", "--progress", "false",
               *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads((out / "generator_training.json").read_text())

    first = launch(4)
    assert first["num_processes"] == 2 and first["global_step"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    resumed = launch(6, "--resume_from_checkpoint", "latest")
    assert resumed["num_processes"] == 2 and resumed["global_step"] == 6
    assert SpatiaGenerationPipeline.from_pretrained(out / "pipeline").image_size == 16


def test_noise_offset_shifts_each_image_channel_and_zero_changes_nothing():
    from spatia_hf.pipelines.denoisers import training_scheduler
    from spatia_hf.training.generator import GeneratorTrainingArguments, diffusion_loss

    pipe = _pipe()
    sched = training_scheduler()
    clean = torch.zeros(8, 2, 16, 16)
    counts = torch.from_numpy(_counts(8))
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append((args[0].clone(), args[1].clone())))

    def channel_means(offset):
        seen.clear()
        with torch.no_grad():
            loss = diffusion_loss(pipe.unet, pipe.condition_encoder, sched, clean, counts,
                                  torch.Generator().manual_seed(5), noise_offset=offset)
        noisy, t = seen[0]
        sigma = (1 - sched.alphas_cumprod[t]).sqrt()[:, None, None, None]
        return loss, (noisy / sigma).mean(dim=(2, 3)).abs().mean().item()  # the clean images are 0

    try:
        plain_loss, plain = channel_means(0.0)
        assert torch.equal(plain_loss, diffusion_loss(pipe.unet, pipe.condition_encoder, sched, clean, counts,
                                                      torch.Generator().manual_seed(5)))  # 0: the default path
        _, offset = channel_means(1.0)
    finally:
        hook.remove()
    assert plain < 0.2 < 0.4 < offset  # white noise averages out over 256 pixels; the offset does not
    with pytest.raises(ValueError, match="noise_offset"):
        GeneratorTrainingArguments(dataset_dir="d", out_dir="o", max_steps=1, noise_offset=-0.1).check()


def test_min_snr_weighting_switches_off_with_zero_from_the_command_line():
    """``--snr_gamma 0`` (HfArgumentParser cannot pass None) trains with the unweighted loss."""
    from transformers import HfArgumentParser

    from spatia_hf.pipelines.denoisers import training_scheduler
    from spatia_hf.training.generator import GeneratorTrainingArguments, diffusion_loss

    (args,) = HfArgumentParser(GeneratorTrainingArguments).parse_args_into_dataclasses(
        ["--dataset_dir", "d", "--out_dir", "o", "--max_steps", "1", "--snr_gamma", "0"])
    args.check()
    pipe = _pipe()
    clean = torch.zeros(4, 2, 16, 16)
    counts = torch.from_numpy(_counts(4))

    def loss(gamma):
        return diffusion_loss(pipe.unet, pipe.condition_encoder, training_scheduler(), clean, counts,
                              torch.Generator().manual_seed(5), snr_gamma=gamma)

    assert torch.equal(loss(args.snr_gamma), loss(None)) and not torch.equal(loss(0.0), loss(5.0))
    with pytest.raises(ValueError, match="snr_gamma"):
        GeneratorTrainingArguments(dataset_dir="d", out_dir="o", max_steps=1, snr_gamma=-1.0).check()


def test_snr_floor_raises_only_the_high_noise_weights():
    """``snr_floor=1``: v-weight clamp(snr, 1, gamma) / (snr + 1), i.e. min-SNR-gamma where snr >= 1 and the
    unweighted v loss's ~1 at high noise, where min-SNR gives ~snr (near 0)."""
    from spatia_hf.pipelines.denoisers import training_scheduler
    from spatia_hf.training.generator import GeneratorTrainingArguments, diffusion_loss

    sched = training_scheduler()
    pipe = _pipe()

    def weights_at(floor):  # the per-sample weights, read by replacing the per-sample loss with ones
        import spatia_hf.training.generator as G

        real = G.F.mse_loss
        G.F.mse_loss = lambda a, b, reduction: torch.ones_like(a)
        try:
            gen = torch.Generator().manual_seed(3)
            out = diffusion_loss(pipe.unet, pipe.condition_encoder, sched, torch.zeros(64, 2, 16, 16),
                                 torch.from_numpy(_counts(64)), gen, snr_gamma=5.0, snr_floor=floor)
        finally:
            G.F.mse_loss = real
        return out.item()

    from diffusers.training_utils import compute_snr

    gen = torch.Generator().manual_seed(3)  # the loss draws its noise, then its timesteps
    torch.randn((64, 2, 16, 16), generator=gen)
    t = torch.randint(0, 1000, (64,), generator=gen)
    snr = compute_snr(sched, t)
    expected = {f: (torch.clamp(snr, min=f, max=5.0) / (snr + 1)).mean().item() for f in (0.0, 1.0)}
    assert weights_at(0.0) == pytest.approx(expected[0.0], rel=1e-5)
    assert weights_at(1.0) == pytest.approx(expected[1.0], rel=1e-5) and expected[1.0] > expected[0.0]
    defaults = {p: GeneratorTrainingArguments(dataset_dir="d", out_dir="o", max_steps=1, prediction_type=p)
                for p in ("v_prediction", "epsilon")}
    for args in defaults.values():
        args.check()
    assert defaults["v_prediction"].snr_floor == 1.0 and defaults["epsilon"].snr_floor == 0.0
    with pytest.raises(ValueError, match="snr_floor"):
        GeneratorTrainingArguments(dataset_dir="d", out_dir="o", max_steps=1, snr_floor=1.0,
                                   prediction_type="epsilon").check()
    with pytest.raises(ValueError, match="snr_floor"):
        GeneratorTrainingArguments(dataset_dir="d", out_dir="o", max_steps=1, snr_floor=6.0).check()


def test_train_generator_end_to_end_and_exact_resume(tmp_path):
    from spatia_hf.data.synthetic import build_tiny_dataset
    from spatia_hf.training.generator import train_generator

    data = build_tiny_dataset(tmp_path / "data", n_sections=2, n_cells=40, crop_px=16, niche_px=16, thumb_px=32)
    common = dict(size="tiny", batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=1, progress=False, seed=3)
    full = train_generator(data, tmp_path / "full", max_steps=4, **common)
    assert full.global_step == 4 and full.eval_sections == ["synth_s01"] and full.train_sections == ["synth_s00"]
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    log = [json.loads(line) for line in (tmp_path / "full" / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]

    train_generator(data, tmp_path / "part", max_steps=2, **common)
    resumed = train_generator(data, tmp_path / "part", max_steps=4, resume_from_checkpoint="latest", **common)
    assert resumed.global_step == 4
    np.testing.assert_allclose(resumed.losses, full.losses[2:], rtol=1e-5)

    pipe = _load(full.pipeline_dir)
    assert pipe.image_size == 16 and pipe.config.channel_names == ["DAPI", "boundary"]
    _assert_profile_statistics_of_the_training_cells(pipe.condition_encoder, data)
    assert isinstance(pipe.scheduler, type(SpatiaGenerationPipeline.from_genes(GENES, size="tiny").scheduler))
    out = pipe(np.ones(len(pipe.genes)), num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 16, 16, 2)
    with pytest.raises(ValueError, match="would never stop"):
        train_generator(data, tmp_path / "never", size="tiny")


def _assert_profile_statistics_of_the_training_cells(enc, data) -> None:
    """The saved encoder standardises with the training section's per-gene log1p mean / std."""
    from spatia_hf.pipelines.condition_encoder import profile_statistics
    from spatia_hf.data import schema
    from spatia_hf.data.datasets import load_spatia_dataset, split_by_section
    from spatia_hf.training.loop import dense_counts

    train, _ = split_by_section(load_spatia_dataset(data, ["cells"])["cells"], None)
    cols = train.with_format("numpy", columns=[schema.GENE_INDICES, schema.GENE_COUNTS])[:]
    counts = dense_counts(cols[schema.GENE_INDICES], cols[schema.GENE_COUNTS], enc.num_genes)
    mean, std = profile_statistics(counts, enc.config.normalize_total)
    assert enc.config.global_vector == "profile" and enc.has_profile_statistics
    np.testing.assert_allclose(enc.config.gene_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(enc.config.gene_std, std, rtol=1e-6)


# ------------------------------------------------------------------ evaluation helpers
def _disks(radii_px, size=24, brightness=0.8):
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2)
    images = np.zeros((len(radii_px), 2, size, size))
    for i, rad in enumerate(radii_px):
        images[i, 0] = brightness / (1 + np.exp((r - rad) / 0.3))
        images[i, 1] = 0.5 * np.exp(-0.5 * ((r - rad - 2) / 0.6) ** 2)
    return images


def test_nucleus_area_measures_disks_in_um2():
    from spatia_hf.evaluation.morphology import nucleus_area

    px = 0.5
    radii = np.array([4.0, 6.0, 8.0])
    areas = nucleus_area(_disks(radii, size=32), px)
    np.testing.assert_allclose(areas, np.pi * (radii * px) ** 2, rtol=0.1)
    assert nucleus_area(np.zeros((1, 2, 24, 24)), px)[0] == 0


def test_real_crops_at_the_generator_resolution_keep_shape_and_nucleus_size():
    from spatia_hf.evaluation.generation import at_resolution
    from spatia_hf.evaluation.morphology import nucleus_area

    crops = (_disks(np.array([5.0, 7.0]), size=32) * 255).round().astype(np.uint8)
    assert np.array_equal(at_resolution(crops, 32), crops)  # already at that resolution: unchanged
    low = at_resolution(crops, 16)  # 32 -> 16 -> 32 px, as a 16 px generator's crops are scored
    assert low.shape == crops.shape and low.dtype == np.uint8 and not np.array_equal(low, crops)
    np.testing.assert_allclose(nucleus_area(low, 0.5), nucleus_area(crops, 0.5), rtol=0.15)


def test_frechet_distance_ignores_features_constant_in_the_reference():
    from spatia_hf.evaluation.generation import frechet_distance

    rng = np.random.default_rng(0)
    real = rng.normal(size=(40, 3))
    gen = rng.normal(size=(40, 3)) + [1.0, 0.0, 0.0]
    base = frechet_distance(real, gen)
    # a 4th feature that is 0 in every real crop but not in the generated ones does not swamp the rest
    padded = frechet_distance(np.c_[real, np.zeros(40)], np.c_[gen, rng.uniform(0, 0.01, 40)])
    assert padded == pytest.approx(base) and 0.5 < base < 3.0
    with pytest.raises(ValueError, match="constant"):
        frechet_distance(np.zeros((5, 2)), gen[:5, :2])


def test_feature_shifts_name_every_feature_and_find_the_one_that_moved():
    from spatia_hf.evaluation.generation import feature_shifts
    from spatia_hf.evaluation.morphology import morphology_feature_names, morphology_features

    names = morphology_feature_names(["DAPI", "boundary"])
    crops = _disks(np.array([4.0, 5.0, 6.0, 7.0]), size=32)
    assert len(names) == morphology_features(crops, 0.5).shape[1] == len(set(names))
    assert names[0] == "log1p_area_um2" and "boundary_p90" in names
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 3))
    gen = rng.normal(size=(200, 3)) * [1.0, 2.0, 1.0] + [3.0, 0.0, 0.0]
    out = feature_shifts(np.c_[real, np.ones(200)], np.c_[gen, np.zeros(200)], ["a", "b", "c", "flat"])
    assert set(out) == {"a", "b", "c"}  # a feature constant in the real crops has no scale: left out
    assert out["a"]["mean_shift_sd"] == pytest.approx(3.0, abs=0.3) and out["b"]["sd_ratio"] == pytest.approx(2, rel=0.2)
    assert abs(out["c"]["mean_shift_sd"]) < 0.3 and out["c"]["sd_ratio"] == pytest.approx(1, rel=0.2)
    with pytest.raises(ValueError, match="names"):
        feature_shifts(real, gen, ["a", "b"])


def test_perturbation_area_shift_and_type_accuracy():
    from spatia_hf.evaluation.generation import (fit_type_classifier, perturbation_area_shift,
                                                 type_accuracy_of_generated)

    radii = np.array([5.0, 6.0])
    shift = perturbation_area_shift(_disks(radii, size=32), _disks(radii * 2**0.5, size=32), 0.5, fold=4.0,
                                    exponent=0.5)
    assert shift["true_ratio"] == 2.0 and shift["measured_ratio"] == pytest.approx(2.0, rel=0.1)
    assert shift["fraction_increased"] == 1.0 and shift["n_pairs"] == 2
    rng = np.random.default_rng(0)
    small, big = rng.uniform(2.5, 3.5, 30), rng.uniform(6, 7, 30)
    clf = fit_type_classifier(_disks(np.r_[small, big]), ["small"] * 30 + ["big"] * 30, 0.5)
    scored = type_accuracy_of_generated(clf, _disks([3.0, 6.5, 6.6]), ["small", "big", "small"], 0.5)
    assert scored["accuracy"] == pytest.approx(2 / 3) and scored["chance_uniform"] == 0.5
    assert scored["per_type"] == {"big": 1.0, "small": 0.5}


# ------------------------------------------------------------------ CLI
def test_cli_generate_from_a_dataset_and_from_a_csv(tmp_path, capsys):
    import pandas as pd

    from spatia_hf.pipelines.pipeline_spatia import DEFAULT_GUIDANCE_SCALE

    from spatia_hf.cli import main
    from spatia_hf.data.synthetic import build_tiny_dataset
    from spatia_hf.data.gene_panel import read_gene_panel

    data = build_tiny_dataset(tmp_path / "data", n_sections=1, n_cells=20, crop_px=16, niche_px=16, thumb_px=32)
    genes = read_gene_panel(data)["genes"]
    torch.manual_seed(0)
    SpatiaGenerationPipeline.from_genes(genes, image_size=16, size="tiny").save_pretrained(tmp_path / "gen")
    out = tmp_path / "out"
    argv = ["generate", "--pipeline", str(tmp_path / "gen"), "--dataset", str(data), "--cells", "3", "--steps", "2",
            "--perturb", "NUCSIZE=4", "--out", str(out)]
    assert main(argv) == 0
    images, edited = np.load(out / "images.npy"), np.load(out / "perturbed.npy")
    assert images.shape == edited.shape == (3, 2, 16, 16) and images.dtype == np.uint8
    meta = json.loads((out / "generation.json").read_text())
    assert meta["perturbation"] == {"NUCSIZE": 4.0} and len(meta["cell_ids"]) == 3
    assert (meta["guidance_scale"], meta["perturbation_guidance"]) == (DEFAULT_GUIDANCE_SCALE,
                                                                       DEFAULT_PERTURBATION_GUIDANCE)  # the values used
    assert (out / "grid.png").is_file() and not (tmp_path / "out.tmp").exists()
    assert main(argv) == 1 and "exists" in capsys.readouterr().err  # no silent overwrite
    assert main(argv + ["--overwrite", "--guidance-scale", "3", "--perturbation-guidance", "1.5"]) == 0
    meta = json.loads((out / "generation.json").read_text())
    assert (meta["guidance_scale"], meta["perturbation_guidance"]) == (3.0, 1.5)

    csv = tmp_path / "x.csv"
    pd.DataFrame(np.ones((2, 3)), columns=[genes[0], genes[1], "NOTAGENE"], index=["a", "b"]).to_csv(csv)
    assert main(["generate", "--pipeline", str(tmp_path / "gen"), "--expression", str(csv), "--steps", "1",
                 "--out", str(tmp_path / "csv")]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "NOTAGENE" in line]
    assert len(warned) == 1 and "spatia: warning: gene_names" in warned[0]  # a library warning as one line
    assert np.load(tmp_path / "csv" / "images.npy").shape == (2, 2, 16, 16)
    assert json.loads((tmp_path / "csv" / "generation.json").read_text())["unknown_genes"] == ["NOTAGENE"]
    assert main(["generate", "--pipeline", str(tmp_path / "gen"), "--expression", str(csv), "--perturb", "X",
                 "--out", str(tmp_path / "bad")]) == 1
    assert "GENE=FOLD" in capsys.readouterr().err


def test_default_sampler_keeps_pixel_predictions_in_range():
    """DPM-Solver++ on the cosine schedule needs thresholding in pixel space (else noise comes out)."""
    from spatia_hf.pipelines.denoisers import sampling_scheduler, training_scheduler

    sched = sampling_scheduler(training_scheduler())
    assert sched.config.thresholding and sched.config.sample_max_value == 1.0
    assert sched.config.lambda_min_clipped == -5.1
    x0 = torch.full((1, 2, 4, 4), 0.5)
    sched.set_timesteps(10)
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    alphas = training_scheduler().alphas_cumprod
    for t in sched.timesteps:  # an oracle denoiser of a constant image, slightly wrong
        a = alphas[int(t)]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt() + 0.01
        x = sched.step(eps, t, x).prev_sample
    assert torch.allclose(x, x0, atol=0.05)


def test_training_maps_the_dataset_panel_onto_a_pretrained_vocabulary(tmp_path):
    """--spatia_model brings its own gene order (and genes the dataset lacks): columns are mapped."""
    from spatia_hf.data.synthetic import build_tiny_dataset
    from spatia_hf.data.gene_panel import read_gene_panel
    from spatia_hf.training.generator import train_generator

    data = build_tiny_dataset(tmp_path / "data", n_sections=1, n_cells=24, crop_px=16, niche_px=16, thumb_px=32)
    genes = read_gene_panel(data)["genes"]
    vocab = ["EXTRA1"] + genes[::-1]
    config = SpatiaCellConfig(gene_vocab=vocab, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                              num_expression_layers=1, num_image_layers=1, num_fusion_layers=1, image_size=16,
                              patch_size=8)
    SpatiaCellModel(config).save_pretrained(tmp_path / "cell")
    result = train_generator(data, tmp_path / "gen", size="tiny", spatia_model=str(tmp_path / "cell"), batch_size=4,
                             max_steps=1, checkpoint_every=0, progress=False, eval_sections=[])
    pipe = SpatiaGenerationPipeline.from_pretrained(result.pipeline_dir)
    assert pipe.genes == vocab
    from spatia_hf.training.generator import _panel_column_map
    from spatia_hf.training.loop import CellBatches
    from spatia_hf.data.datasets import load_spatia_dataset

    cmap = _panel_column_map(vocab, None, genes, None)
    assert cmap[0] == len(vocab) - 1 and (cmap >= 1).all()
    cells = load_spatia_dataset(data, ["cells"])["cells"]
    _, mapped = CellBatches(cells, len(genes), 4, 0, column_map=cmap, n_model_genes=len(vocab)).read([0])
    _, plain = CellBatches(cells, len(genes), 4, 0).read([0])
    assert mapped.shape == (1, len(vocab)) and mapped[0, 0] == 0
    assert torch.equal(mapped[0, 1:].flip(0), plain[0])
