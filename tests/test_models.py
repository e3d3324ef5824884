"""SPATIA models: configs, cell / niche / composite models, heads, save/load (tiny preset, random tensors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, ViTConfig, ViTModel
from transformers.utils import logging as hf_logging

import spatia_hf
from spatia_hf import (
    SpatiaCellConfig,
    SpatiaCellModel,
    SpatiaConfig,
    SpatiaExpressionEncoder,
    SpatiaForCellClassification,
    SpatiaForExpressionPrediction,
    SpatiaForGeneImputation,
    SpatiaForPretraining,
    SpatiaForTissueClassification,
    SpatiaModel,
    SpatiaTissueModel,
    expression_encoder_state,
)
from spatia_hf.models.configuration_spatia import NUM_SPECIAL_TOKENS, PAD_TOKEN_ID, PRESETS, SpatiaTissueConfig

hf_logging.set_verbosity_error()


pytestmark = pytest.mark.usefixtures("one_thread")

GENES = [f"GENE{i}" for i in range(40)]
VOCAB = NUM_SPECIAL_TOKENS + len(GENES)
B, L, C, S = 4, 12, 2, 32


def tiny_config(**kwargs) -> SpatiaConfig:
    return SpatiaConfig.from_preset("tiny", gene_vocab=GENES, **kwargs)


def cell_inputs(b: int = B, length: int = L, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(len(GENES), generator=g)[:length] + NUM_SPECIAL_TOKENS for _ in range(b)])
    counts = torch.randint(0, 6, (b, length), generator=g).float()
    return {
        "pixel_values": torch.randn(b, C, S, S, generator=g),
        "gene_ids": ids,
        "gene_values": torch.log1p(counts),
        "gene_attention_mask": torch.ones(b, length, dtype=torch.long),
    }


def niche_inputs(b: int = 2, n: int = 5, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    flat = cell_inputs(b * n, length, seed)
    out = {k: v.view(b, n, *v.shape[1:]) for k, v in flat.items()}
    out["cell_positions"] = torch.randn(b, n, 2, generator=g) * 20.0
    mask = torch.ones(b, n, dtype=torch.long)
    mask[0, -1] = 0
    out["cell_attention_mask"] = mask
    return out


# ---------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("preset", PRESETS)
def test_presets_build_consistent_configs(preset):
    cfg = SpatiaConfig.from_preset(preset, gene_vocab=GENES)
    assert cfg.cell_config.vocab_size == VOCAB
    assert cfg.niche_config.cell_embed_dim == cfg.cell_config.hidden_size
    assert cfg.tissue_config.niche_embed_dim == cfg.niche_config.hidden_size
    assert cfg.cell_config.gene_to_id()["GENE0"] == NUM_SPECIAL_TOKENS


def test_paper_presets_are_paper_scale():
    large = SpatiaConfig.from_preset("large").cell_config
    assert large.hidden_size == 768 and large.num_expression_layers == 12 and large.image_size == 256
    tiny = SpatiaConfig.from_preset("tiny").cell_config
    assert tiny.hidden_size <= 64 and tiny.image_size == 32


def test_config_errors_name_field_and_fix():
    with pytest.raises(ValueError, match="hidden_size=30.*divisible"):
        SpatiaCellConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="preset='huge'.*tiny"):
        SpatiaConfig.from_preset("huge")
    with pytest.raises(ValueError, match="duplicate"):
        SpatiaCellConfig(gene_vocab=["A", "A"])
    with pytest.raises(ValueError, match="cell_embed_dim"):
        SpatiaConfig.from_preset("tiny", niche_config={"cell_embed_dim": 16})
    with pytest.raises(ValueError, match="merge_ratio"):
        SpatiaTissueConfig(merge_ratio=0.9)


def test_composite_config_round_trips(tmp_path):
    cfg = tiny_config(num_labels=3, expression_likelihood="zinb")
    cfg.save_pretrained(tmp_path)
    loaded = SpatiaConfig.from_pretrained(tmp_path)
    assert loaded.cell_config.gene_vocab == GENES
    assert loaded.expression_likelihood == "zinb" and loaded.num_labels == 3
    assert isinstance(loaded.cell_config, SpatiaCellConfig)


# ---------------------------------------------------------------------------------------- cell model
def test_cell_model_shapes_for_both_and_single_modalities():
    model = SpatiaCellModel(tiny_config().cell_config).eval()
    x = cell_inputs()
    d = model.config.hidden_size
    out = model(**x)
    assert out.cell_embeds.shape == (B, d)
    assert out.image_tokens.shape == (B, (S // 8) ** 2, d)
    assert out.gene_tokens.shape == (B, L, d)
    img_only = model(pixel_values=x["pixel_values"])
    expr_only = model(gene_ids=x["gene_ids"], gene_values=x["gene_values"])
    assert img_only.cell_embeds.shape == expr_only.cell_embeds.shape == (B, d)
    assert img_only.gene_tokens is None and expr_only.image_tokens is None
    assert not torch.allclose(img_only.cell_embeds, out.cell_embeds)


def test_cell_padding_does_not_change_outputs():
    model = SpatiaCellModel(tiny_config().cell_config).eval()
    x = cell_inputs()
    padded = dict(x)
    padded["gene_ids"] = torch.cat([x["gene_ids"], torch.full((B, 7), PAD_TOKEN_ID)], 1)
    padded["gene_values"] = torch.cat([x["gene_values"], torch.rand(B, 7) * 5], 1)  # garbage under padding
    padded["gene_attention_mask"] = torch.cat([x["gene_attention_mask"], torch.zeros(B, 7, dtype=torch.long)], 1)
    a, b = model(**x), model(**padded)
    torch.testing.assert_close(a.cell_embeds, b.cell_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.gene_tokens, b.gene_tokens[:, :L], atol=1e-5, rtol=1e-5)


def test_expression_branch_is_gene_order_equivariant():
    model = SpatiaCellModel(tiny_config().cell_config).eval()
    x = cell_inputs()
    perm = torch.randperm(L)
    shuffled = {k: (v[:, perm] if k.startswith("gene") else v) for k, v in x.items()}
    a, b = model(**x), model(**shuffled)
    torch.testing.assert_close(a.cell_embeds, b.cell_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.gene_tokens[:, perm], b.gene_tokens, atol=1e-5, rtol=1e-5)


def test_cell_model_rejects_unknown_gene_ids_and_bad_images():
    model = SpatiaCellModel(tiny_config().cell_config)
    x = cell_inputs()
    x["gene_ids"][0, 0] = VOCAB + 5
    with pytest.raises(ValueError, match=rf"gene_ids: id {VOCAB + 5} is outside.*resize_gene_vocab"):
        model(**x)
    with pytest.raises(ValueError, match=r"pixel_values: expected \[batch, 2, 32, 32\].*got \(4, 3, 32, 32\)"):
        model(pixel_values=torch.randn(B, 3, S, S))
    with pytest.raises(ValueError, match="pixel_values.*got \\(4, 2, 64, 64\\)"):
        model(pixel_values=torch.randn(B, C, 64, 64))


def test_concat_fusion_is_a_working_baseline():
    cross = SpatiaCellModel(tiny_config().cell_config)
    concat = SpatiaCellModel(tiny_config(cell_config={"fusion": "concat"}).cell_config)
    assert sum(p.numel() for p in concat.parameters()) < sum(p.numel() for p in cross.parameters())
    assert concat.fusion_layers[0].image_block.cross_attention is None
    out = concat(**cell_inputs())
    assert out.cell_embeds.shape == (B, 32)


def test_sdpa_and_eager_attention_agree():
    model = SpatiaModel(tiny_config()).eval()
    x = cell_inputs()
    a = model(**x).cell_embeds
    model.set_attn_implementation("eager")
    assert model.config.cell_config._attn_implementation == "eager"
    torch.testing.assert_close(model(**x).cell_embeds, a, atol=1e-5, rtol=1e-5)


def test_vision_backbone_from_local_vit(tmp_path):
    vit = ViTModel(ViTConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                             image_size=S, patch_size=8, num_channels=C))
    vit.save_pretrained(tmp_path / "vit")
    cfg = tiny_config(cell_config={"vision_backbone": str(tmp_path / "vit")})
    model = SpatiaForPretraining(cfg)
    backbone = model.spatia.cell.image_encoder.backbone
    assert isinstance(backbone, ViTModel)
    source = vit.state_dict()
    for name, tensor in backbone.state_dict().items():  # the pretrained weights, not a fresh init
        torch.testing.assert_close(tensor, source[name], msg=name)
    out = model(**cell_inputs())
    assert out.mim_loss is not None and out.pixel_predictions.shape == (B, 16, 8 * 8 * C)
    model.save_pretrained(tmp_path / "spatia")
    (tmp_path / "vit" / "model.safetensors").unlink()  # the checkpoint must not need the backbone path
    reloaded = SpatiaForPretraining.from_pretrained(tmp_path / "spatia").eval()
    model.eval()
    x = cell_inputs()
    torch.testing.assert_close(reloaded.spatia.cell(**x).cell_embeds, model.spatia.cell(**x).cell_embeds)


def test_vision_backbone_geometry_mismatch_is_explained(tmp_path):
    ViTModel(ViTConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                       image_size=64, patch_size=8, num_channels=C)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="image_size=64 differs from image_size=32"):
        SpatiaCellModel(tiny_config(cell_config={"vision_backbone": str(tmp_path)}).cell_config)


def test_expression_encoder_extracted_from_checkpoint_matches(tmp_path):
    model = SpatiaForPretraining(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    x = cell_inputs()
    ref, ref_mask = model.spatia.cell.expression_encoder(x["gene_ids"], x["gene_values"], x["gene_attention_mask"])
    config, state = expression_encoder_state(tmp_path)
    assert config.gene_vocab == GENES and "gene_embeddings.weight" in state
    encoder = SpatiaExpressionEncoder.from_spatia(tmp_path).eval()
    tokens, mask = encoder(x["gene_ids"], x["gene_values"], x["gene_attention_mask"])
    torch.testing.assert_close(tokens, ref)
    assert torch.equal(mask, ref_mask)


def test_resize_gene_vocab_keeps_old_rows_and_outputs():
    model = SpatiaForPretraining(tiny_config()).eval()
    x = cell_inputs()
    before = model.spatia.cell(**x).cell_embeds
    old_rows = model.spatia.cell.expression_encoder.gene_embeddings.weight.detach().clone()
    added = model.resize_gene_vocab(["GENE3", "NEW1", "NEW2"])
    assert added == ["NEW1", "NEW2"]
    assert model.config.cell_config.vocab_size == VOCAB + 2
    for table in (model.spatia.cell.expression_encoder.gene_embeddings, model.mgm_head.log_theta,
                  model.niche_decoder.bias):
        assert table.num_embeddings == VOCAB + 2
    torch.testing.assert_close(model.spatia.cell.expression_encoder.gene_embeddings.weight[:VOCAB], old_rows)
    torch.testing.assert_close(model.spatia.cell(**x).cell_embeds, before)
    x["gene_ids"][:, 0] = VOCAB + 1  # the new gene is now a valid id
    assert model.spatia.cell(**x).cell_embeds.shape == (B, 32)


# ---------------------------------------------------------------------------------------- niche model
def test_niche_model_is_invariant_to_cell_order():
    model = SpatiaModel(tiny_config()).niche.eval()
    g = torch.Generator().manual_seed(1)
    emb, pos = torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 2, generator=g) * 25
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    a, b = model(emb, pos), model(emb[:, perm], pos[:, perm])
    torch.testing.assert_close(a.niche_embeds, b.niche_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.cell_embeds[:, perm], b.cell_embeds, atol=1e-5, rtol=1e-5)
    moved = model(emb, pos + torch.tensor([5.0, 0.0]))  # positions matter
    assert not torch.allclose(moved.niche_embeds, a.niche_embeds, atol=1e-4)


def test_niche_padding_does_not_change_outputs():
    model = SpatiaModel(tiny_config()).niche.eval()
    emb, pos = torch.randn(2, 4, 32), torch.randn(2, 4, 2) * 25
    pad_emb = torch.cat([emb, torch.randn(2, 3, 32)], 1)
    pad_pos = torch.cat([pos, torch.randn(2, 3, 2) * 100], 1)
    mask = torch.cat([torch.ones(2, 4), torch.zeros(2, 3)], 1).long()
    a, b = model(emb, pos), model(pad_emb, pad_pos, mask)
    torch.testing.assert_close(a.niche_embeds, b.niche_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.cell_embeds, b.cell_embeds[:, :4], atol=1e-5, rtol=1e-5)


def test_niche_image_tokens():
    cfg = tiny_config(niche_config={"use_niche_image": True})
    model = SpatiaModel(cfg).eval()
    x = niche_inputs()
    img = torch.randn(2, C, 32, 32)
    out = model(**x, niche_pixel_values=img)
    assert out.niche_outputs.image_tokens.shape == (2, 16, 32)
    with pytest.raises(ValueError, match="niche image.*expected"):
        model(**x, niche_pixel_values=torch.randn(2, C, 16, 16))


def test_composite_routes_raw_cells_through_the_cell_model():
    model = SpatiaModel(tiny_config()).eval()
    x = niche_inputs()
    out = model(**x)
    assert out.cell_embeds.shape == (2, 5, 32) and out.niche_embeds.shape == (2, 32)
    real = x["cell_attention_mask"].bool()
    flat = {k: x[k][real] for k in ("pixel_values", "gene_ids", "gene_values", "gene_attention_mask")}
    emb = torch.zeros(2, 5, 32)
    emb[real] = model.cell(**flat).cell_embeds
    profiles = model.expression_profiles(x["gene_ids"], x["gene_values"], x["gene_attention_mask"])
    ref = model(cell_embeddings=emb, cell_positions=x["cell_positions"], cell_attention_mask=x["cell_attention_mask"],
                cell_profiles=profiles)
    torch.testing.assert_close(out.niche_embeds, ref.niche_embeds, atol=1e-5, rtol=1e-5)
    without = model(cell_embeddings=emb, cell_positions=x["cell_positions"], cell_attention_mask=x["cell_attention_mask"])
    assert not torch.allclose(without.niche_embeds, ref.niche_embeds)  # the members' expression profiles count


def test_embed_helpers_do_not_depend_on_batch_size():
    model = SpatiaModel(tiny_config())
    x = cell_inputs(b=7)
    a = model.embed_cells(**x, batch_size=3)
    b = model.embed_cells(batch=x, batch_size=64, return_tensors="pt")
    assert a.shape == (7, 32) and a.dtype.name == "float32"
    torch.testing.assert_close(torch.from_numpy(a), b, atol=1e-5, rtol=1e-5)
    assert model.embed_cells(pixel_values=x["pixel_values"], batch_size=2).shape == (7, 32)
    nx = niche_inputs(b=3)
    niches, cells = model.embed_niches(**nx, batch_size=2, return_cell_embeddings=True)
    assert niches.shape == (3, 32) and cells.shape == (3, 5, 32)
    tissue = model.embed_tissue(torch.randn(2, 30, 32), torch.rand(2, 30, 2) * 500, batch_size=1)
    assert tissue.shape == (2, 32)
    assert model.training  # restored


# ---------------------------------------------------------------------------------------- heads
@pytest.mark.parametrize("likelihood", ["mse", "nb", "zinb"])
def test_pretraining_cell_batch_reports_each_objective(likelihood):
    model = SpatiaForPretraining(tiny_config(expression_likelihood=likelihood))
    x = cell_inputs()
    counts = torch.expm1(x["gene_values"]).round()
    out = model(**x, gene_counts=counts, size_factors=torch.ones(B))
    for name in ("mgm_loss", "mim_loss", "contrastive_loss"):
        assert torch.isfinite(out[name]), name
    assert out.niche_loss is None
    cfg = model.config
    expected = cfg.mgm_weight * out.mgm_loss + cfg.mim_weight * out.mim_loss + cfg.contrastive_weight * out.contrastive_loss
    torch.testing.assert_close(out.loss, expected)
    assert out.gene_predictions.shape == (B, L) and out.pixel_predictions.shape == (B, 16, 128)
    assert out.image_patch_mask.sum(1).tolist() == [12] * B  # 75 % of 16 patches hidden
    assert out.contrastive_logits.shape == (B, B)
    out.loss.backward()
    assert all(p.grad is not None for p in model.spatia.cell.parameters())


def test_count_likelihoods_need_counts():
    model = SpatiaForPretraining(tiny_config(expression_likelihood="nb"))
    with pytest.raises(ValueError, match="gene_counts.*size_factors"):
        model(**cell_inputs())


def test_pretraining_niche_batch_adds_masked_cell_prediction():
    model = SpatiaForPretraining(tiny_config())
    out = model(**niche_inputs())
    assert torch.isfinite(out.niche_loss) and out.cell_embeds.shape == (2, 5, 32)
    out.loss.backward()
    assert model.niche_decoder.out.weight.grad is not None
    assert model.spatia.niche.embeddings.mask_token.grad is not None


def test_pretraining_uses_masks_given_by_the_collator():
    model = SpatiaForPretraining(tiny_config()).eval()
    x = cell_inputs()
    gmask = torch.zeros(B, L, dtype=torch.bool)
    gmask[:, :3] = True
    pmask = torch.zeros(B, 16, dtype=torch.bool)
    pmask[:, ::2] = True
    a = model(**x, gene_value_mask=gmask, image_patch_mask=pmask)
    torch.manual_seed(123)  # the global RNG must not matter any more
    b = model(**x, gene_value_mask=gmask, image_patch_mask=pmask)
    assert torch.equal(a.gene_value_mask, gmask) and torch.equal(a.image_patch_mask, pmask)
    torch.testing.assert_close(a.loss, b.loss)
    nx = niche_inputs()  # 9 real cells: masks come one row per real cell
    n_real = int(nx["cell_attention_mask"].sum())
    hide = torch.zeros(2, 5, dtype=torch.bool)
    hide[:, 1] = True
    out = model(**nx, gene_value_mask=torch.ones(n_real, 8, dtype=torch.bool),
                image_patch_mask=pmask[:1].expand(n_real, -1), niche_cell_mask=hide)
    assert torch.isfinite(out.niche_loss) and out.gene_value_mask.shape == (n_real, 8)
    with pytest.raises(ValueError, match="gene_value_mask: shape"):
        model(**x, gene_value_mask=gmask[:, :5])


def test_pretraining_objectives_switch_off_by_weight():
    model = SpatiaForPretraining(tiny_config(mim_weight=0.0, contrastive_weight=0.0))
    out = model(**cell_inputs())
    assert out.mim_loss is None and out.contrastive_loss is None
    torch.testing.assert_close(out.loss, out.mgm_loss)


def test_cell_classification_head_shapes_and_loss():
    model = SpatiaForCellClassification(tiny_config(num_labels=3))
    out = model(**cell_inputs(), labels=torch.tensor([0, 1, 2, 1]))
    assert out.logits.shape == (B, 3) and out.loss.ndim == 0
    nx = niche_inputs()
    out = model(**nx, labels=torch.tensor([[0, 1, 2, 1, 0], [2, 2, 1, 0, 1]]))
    assert out.logits.shape == (2, 5, 3) and torch.isfinite(out.loss)


def test_gene_imputation_head_cell_and_niche():
    model = SpatiaForGeneImputation(tiny_config())
    x = cell_inputs()
    x.pop("pixel_values")
    targets = torch.full((B, 3), NUM_SPECIAL_TOKENS + 39)
    out = model(**x, target_gene_ids=targets, labels=torch.rand(B, 3))
    assert out.logits.shape == (B, 3) and torch.isfinite(out.loss)
    nx = niche_inputs()
    out = model(**nx, target_gene_ids=torch.full((2, 5, 2), NUM_SPECIAL_TOKENS + 39), labels=torch.rand(2, 5, 2))
    assert out.logits.shape == (2, 5, 2) and torch.isfinite(out.loss)


def test_expression_prediction_head_predicts_whole_vocab_by_default():
    model = SpatiaForExpressionPrediction(tiny_config())
    px = cell_inputs()["pixel_values"]
    out = model(pixel_values=px, labels=torch.rand(B, len(GENES)))
    assert out.logits.shape == (B, len(GENES)) and torch.isfinite(out.loss)
    assert out.target_gene_ids[0, 0].item() == NUM_SPECIAL_TOKENS
    some = model(pixel_values=px, target_gene_ids=torch.tensor([[5, 6]] * B)).logits
    torch.testing.assert_close(some, out.logits[:, 1:3])
    with pytest.raises(ValueError, match="labels: shape"):
        model(pixel_values=px, labels=torch.rand(B, 3))


def test_tissue_classification_head():
    model = SpatiaForTissueClassification(tiny_config(num_labels=2))
    out = model(torch.randn(2, 40, 32), torch.rand(2, 40, 2) * 800, labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, 2) and torch.isfinite(out.loss)


def test_tiny_model_overfits_a_small_batch():
    torch.manual_seed(0)
    model = SpatiaForCellClassification(tiny_config(num_labels=4, classifier_dropout=0.0))
    x = cell_inputs(b=8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(**x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.1 * losses[0], losses[::5]


def test_gradient_checkpointing_gives_the_same_gradients():
    model = SpatiaForPretraining(tiny_config())
    x = niche_inputs()

    def grads():
        model.zero_grad()
        torch.manual_seed(3)  # same masks in both runs
        model(**x).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    model.gradient_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    got = grads()
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("head", [SpatiaModel, SpatiaForPretraining, SpatiaForCellClassification,
                                  SpatiaForExpressionPrediction])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, head):
    model = head(tiny_config(num_labels=3)).eval()
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    loaded = head.from_pretrained(tmp_path).eval()
    x = cell_inputs()
    if head is SpatiaForExpressionPrediction:
        a, b = model(pixel_values=x["pixel_values"]).logits, loaded(pixel_values=x["pixel_values"]).logits
    elif head is SpatiaForPretraining:
        a, b = model.spatia(**x).cell_embeds, loaded.spatia(**x).cell_embeds
    elif head is SpatiaModel:
        a, b = model(**x).cell_embeds, loaded(**x).cell_embeds
    else:
        a, b = model(**x).logits, loaded(**x).logits
    assert torch.equal(a, b)


def test_pretrained_checkpoint_loads_into_a_head(tmp_path):
    pre = SpatiaForPretraining(tiny_config()).eval()
    pre.save_pretrained(tmp_path)
    head, info = SpatiaForCellClassification.from_pretrained(tmp_path, num_labels=5, output_loading_info=True)
    head.eval()
    x = cell_inputs()
    torch.testing.assert_close(head.spatia(**x).cell_embeds, pre.spatia(**x).cell_embeds)
    assert head.cell_classifier.out_features == 5
    # the pretraining-only heads are left out by design (not reported); the new classifier is reported
    assert not info["unexpected_keys"]
    assert {k.split(".")[0] for k in info["missing_keys"]} == {"cell_classifier", "niche_classifier"}
    _, info = SpatiaModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]


def test_automodel_loads_after_import_without_remote_code(tmp_path):
    SpatiaModel(tiny_config()).save_pretrained(tmp_path / "full")
    SpatiaModel(tiny_config()).cell.save_pretrained(tmp_path / "cell")
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert "auto_map" not in config
    code = (
        "import sys, spatia_hf\n"
        "from transformers import AutoModel, AutoModelForPreTraining\n"
        f"m = AutoModel.from_pretrained({str(tmp_path / 'full')!r})\n"
        f"c = AutoModel.from_pretrained({str(tmp_path / 'cell')!r})\n"
        f"p = AutoModelForPreTraining.from_pretrained({str(tmp_path / 'full')!r})\n"
        "print(type(m).__name__, type(c).__name__, type(p).__name__)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["SpatiaModel", "SpatiaCellModel", "SpatiaForPretraining"]


def test_loading_the_wrong_kind_of_checkpoint_is_explained(tmp_path):
    SpatiaModel(tiny_config()).cell.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type='spatia_cell'.*cannot be loaded as SpatiaTissueModel"):
        SpatiaTissueModel.from_pretrained(tmp_path)


def test_loading_with_mismatched_sizes_is_explained(tmp_path):
    SpatiaModel(tiny_config()).save_pretrained(tmp_path)
    bigger = SpatiaConfig.from_preset("tiny", gene_vocab=GENES + ["EXTRA"])
    with pytest.raises(ValueError, match=r"gene_vocab \(length\): 40 -> 41"):
        SpatiaModel.from_pretrained(tmp_path, config=bigger)


def test_cell_model_loads_from_a_composite_checkpoint(tmp_path):
    model = SpatiaModel(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    cell = SpatiaCellModel.from_pretrained(tmp_path).eval()
    x = cell_inputs()
    assert torch.equal(cell(**x).cell_embeds, model(**x).cell_embeds)


def test_scale_model_from_a_head_checkpoint_is_refused_with_the_fix(tmp_path):
    pre = SpatiaForPretraining(tiny_config())
    pre.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"SpatiaForPretraining \(a SPATIA head\).*SpatiaModel.from_pretrained\(path\)\.cell"):
        SpatiaCellModel.from_pretrained(tmp_path)
    base = SpatiaModel.from_pretrained(tmp_path)
    assert torch.equal(base.cell.pool_proj.weight, pre.spatia.cell.pool_proj.weight)


def test_package_exports():
    for name in spatia_hf.__all__:
        assert hasattr(spatia_hf, name), name


def test_image_embeddings_of_distinct_crops_are_not_collapsed_at_init():
    """Regression: the built-in ViT gave every crop ~the same image embedding at init (mean pairwise
    cosine 0.998 on random crops), so image-expression InfoNCE could not leave chance."""
    from spatia_hf.models.configuration_spatia import SpatiaCellConfig
    from spatia_hf.models.modeling_cell import SpatiaCellModel
    from spatia_hf.models.processing_spatia import SpatiaProcessor

    torch.manual_seed(0)
    config = SpatiaCellConfig(gene_vocab=["G0", "G1", "G2"], hidden_size=32, num_attention_heads=2,
                              intermediate_size=128, num_expression_layers=1, num_image_layers=1,
                              num_fusion_layers=1, image_size=32, patch_size=8, num_channels=2, max_genes=8)
    model = SpatiaCellModel(config).eval()
    crops = torch.randint(0, 256, (32, 2, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    pixel_values = SpatiaProcessor.from_config(config).preprocess_images(crops.numpy())
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model(pixel_values=pixel_values).image_embeds, dim=-1)
    n = emb.shape[0]
    mean_cos = float(((emb @ emb.t()).sum() - n) / (n * (n - 1)))
    assert mean_cos < 0.9, f"image embeddings collapsed: mean pairwise cosine {mean_cos:.4f}"
