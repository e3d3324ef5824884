"""The generator's global condition path: flattened condition tokens -> the UNet's class embedding."""

import json

import numpy as np
import pytest
import torch

from spatia_hf.pipelines.condition_encoder import SpatiaConditionEncoder, log1p_normalize, profile_statistics
from spatia_hf.pipelines.denoisers import make_unet, training_scheduler, uses_global_condition
from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline
from spatia_hf.training.generator import diffusion_loss
from test_pipeline import GENES, STEPS, _counts, _load, _pipe, _run  # the same tiny pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def _class_embedding_inputs(pipe, **kwargs) -> list[torch.Tensor]:
    """What the UNet's class embedding (the global condition path) received at each denoising step."""
    seen = []
    hook = pipe.unet.class_embedding.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    try:
        _run(pipe, **kwargs)
    finally:
        hook.remove()
    return seen


def test_the_unet_gets_the_standardised_profile_and_guidance_the_null_one():
    pipe = _pipe()
    enc = pipe.condition_encoder
    assert uses_global_condition(pipe.unet) and enc.config.global_vector == "profile"
    assert pipe.unet.config.projection_class_embeddings_input_dim == enc.pooled_dim == len(GENES)
    counts = torch.from_numpy(_counts(6, seed=3))
    mean, std = profile_statistics(counts, enc.config.normalize_total)
    enc.set_profile_statistics(mean, std)
    seen = _class_embedding_inputs(pipe, guidance_scale=3.0)
    assert len(seen) == STEPS and seen[0].shape == (4, len(GENES))
    assert torch.equal(seen[0][:2], enc.null_profile[None].expand(2, -1))  # CFG's unconditional half
    expected = (log1p_normalize(torch.from_numpy(_counts()), enc.config.normalize_total)
                - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(seen[0][2:], expected.float(), atol=1e-5)
    z = enc.global_condition(counts, None)  # the statistics' own cells come out standardised
    assert torch.allclose(z.mean(0), torch.zeros(len(GENES)), atol=1e-5)
    assert torch.allclose(z.std(0), torch.ones(len(GENES)), atol=1e-4)


def test_a_gene_edit_moves_the_condition_at_init_as_much_as_a_different_cell_does():
    """The diagnosis that motivated the profile global vector: with std-0.02 weights behind a
    LayerNorm, 4x one gene moved the tokens by <1%; now both paths carry the edit from step 0."""
    pipe = _pipe(encoder_overrides={"expression_token": True})
    enc = pipe.condition_encoder
    cells = torch.from_numpy(_counts(64, seed=4))
    enc.set_profile_statistics(*profile_statistics(cells, enc.config.normalize_total))
    edited = cells.clone()
    edited[:, 3] *= 4
    with torch.no_grad():
        t0, g0 = enc(cells, return_global=True)
        t1, g1 = enc(edited, return_global=True)
    gene_z = (g1 - g0)[:, 3]
    others = (g1 - g0)[:, [j for j in range(len(GENES)) if j != 3]]  # moved only by the library size
    assert gene_z.min() > 1.0 and gene_z.mean() > 3 * others.abs().mean()
    token_change = ((t1 - t0)[:, -1].norm() / t0[:, -1].norm()).item()
    between = ((t0[:, -1] - t0[:, -1].mean(0)).norm() / t0[:, -1].norm()).item()
    assert token_change > 0.05 and between > 0.1  # the expression token (default init) sees the edit too


def test_global_vector_tokens_keeps_the_flattened_tokens():
    pipe = _pipe(encoder_overrides={"global_vector": "tokens"})
    enc = pipe.condition_encoder
    assert enc.null_profile is None and pipe.unet.config.projection_class_embeddings_input_dim == enc.num_tokens * 16
    seen = _class_embedding_inputs(pipe, guidance_scale=3.0)
    cond = enc(torch.from_numpy(_counts()))
    assert torch.equal(seen[0][:2], enc.null_tokens.flatten()[None].expand(2, -1))
    assert torch.allclose(seen[0][2:], cond.flatten(1), atol=1e-6)


def test_an_encoder_saved_without_the_new_fields_reads_back_as_before(tmp_path):
    enc = SpatiaConditionEncoder.from_genes(GENES, hidden_size=16, num_attention_heads=2, num_expression_layers=1,
                                            cross_attention_dim=8, num_condition_tokens=3, expression_token=True)
    counts = torch.from_numpy(_counts(3))
    before = enc(counts)
    enc.save_pretrained(tmp_path / "enc")
    cfg_path = tmp_path / "enc" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("global_vector", "gene_mean", "gene_std"):
        cfg.pop(key)
    cfg_path.write_text(json.dumps(cfg))
    loaded = SpatiaConditionEncoder.from_pretrained(tmp_path / "enc")
    assert loaded.config.global_vector == "tokens" and not loaded.has_profile_statistics
    assert torch.equal(loaded(counts), before)
    assert torch.equal(loaded.global_condition(counts, before), before.flatten(1))


def test_profile_statistics_are_saved_and_bad_ones_refused(tmp_path):
    pipe = _pipe()
    enc = pipe.condition_encoder
    enc.set_profile_statistics(*profile_statistics(torch.from_numpy(_counts(8, seed=5)), enc.config.normalize_total))
    before = _run(pipe).images
    pipe.save_pretrained(tmp_path / "p")
    loaded = _load(tmp_path / "p")
    assert loaded.condition_encoder.config.gene_std == enc.config.gene_std
    assert torch.equal(_run(loaded).images, before)
    with pytest.raises(ValueError, match="gene_mean: 3 values for a panel of 12 genes"):
        enc.set_profile_statistics([0.0] * 3, [1.0] * 3)
    with pytest.raises(ValueError, match=r"gene_std\[2\]=0.0"):
        enc.set_profile_statistics([0.0] * 12, [1.0, 1.0, 0.0] + [1.0] * 9)
    with pytest.raises(ValueError, match="global_vector='mean'"):
        SpatiaConditionEncoder(expression_config=enc.config.expression_config, global_vector="mean")
    constant = torch.ones(4, 12)  # every gene constant: the std floor keeps the z-scores finite
    _, std = profile_statistics(constant, None)
    assert min(std) == pytest.approx(0.1)


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
    loaded = _load(tmp_path / "old")
    assert not uses_global_condition(loaded.unet)
    after = _run(loaded, perturbation={"G3": 4.0})
    assert torch.equal(after.images, before.images) and torch.equal(after.perturbed_images, before.perturbed_images)


def test_a_pipeline_with_the_global_path_round_trips(tmp_path):
    pipe = _pipe()
    before = _run(pipe).images
    pipe.save_pretrained(tmp_path / "new")
    loaded = _load(tmp_path / "new")
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
