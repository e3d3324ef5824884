"""The tissue model: spatially guided token merging, unmerging, and merge ratio 0 = the plain model."""

from __future__ import annotations

import pytest
import torch

from spatia_hf import SpatiaTissueConfig, SpatiaTissueModel
from spatia_hf.models.modeling_layers import additive_mask
from spatia_hf.models.token_merging import merge_count


pytestmark = pytest.mark.usefixtures("one_thread")


def tissue(merge_ratio=0.25, layers=3, **kwargs) -> SpatiaTissueModel:
    cfg = SpatiaTissueConfig.from_preset("tiny", num_hidden_layers=layers, merge_ratio=merge_ratio, **kwargs)
    return SpatiaTissueModel(cfg).eval()


def section(b: int = 2, m: int = 200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, m, 32, generator=g), torch.rand(b, m, 2, generator=g) * 2000.0


def test_merging_reduces_tokens_as_configured_and_unmerge_restores_them():
    model = tissue(merge_ratio=0.25, layers=3)
    emb, pos = section()
    out = model(emb, pos)
    expected = [200]
    for _ in range(3):
        expected.append(expected[-1] - merge_count(expected[-1], 0.25))
    assert list(out.num_tokens) == expected  # 200 -> 150 -> 113 -> 85
    assert out.merged_hidden_state.shape == (2, expected[-1], 32)
    assert out.niche_embeds.shape == (2, 200, 32)
    torch.testing.assert_close(out.merged_sizes.sum(1), torch.full((2,), 200.0))
    # every niche gets the value of the final token it was merged into
    members = (out.niche_embeds[:, :, None, :] == out.merged_hidden_state[:, None, :, :]).all(-1)
    assert bool((members.sum(-1) >= 1).all())


def test_per_layer_and_total_merge_schedules():
    per_layer = tissue(merge_ratio=[0.5, 0.0, 0.1], layers=3)
    out = per_layer(*section())
    assert list(out.num_tokens) == [200, 100, 100, 90]
    total = SpatiaTissueConfig.from_preset("tiny", num_hidden_layers=2, merge_total_ratio=0.75)
    assert total.layer_merge_ratios() == pytest.approx([0.5, 0.5])
    assert list(SpatiaTissueModel(total).eval()(*section()).num_tokens) == [200, 100, 50]


def test_merge_ratio_zero_is_exactly_the_plain_transformer():
    model = tissue(merge_ratio=0.0)
    emb, pos = section()
    out = model(emb, pos)
    assert list(out.num_tokens) == [200] * 4
    # the same computation written out without any merging machinery
    x = model.input_norm(model.input_proj(emb) + model.position_encoder(pos))
    for layer in model.layers:
        x = layer(x, None)
    x = model.final_norm(x)
    assert torch.equal(out.niche_embeds, x)
    torch.testing.assert_close(out.tissue_embeds, x.mean(1))


def test_call_time_ratio_zero_matches_a_ratio_zero_model():
    merged = tissue(merge_ratio=0.25)
    plain = tissue(merge_ratio=0.0)
    plain.load_state_dict(merged.state_dict())
    emb, pos = section()
    assert torch.equal(merged(emb, pos, merge_ratio=0.0).niche_embeds, plain(emb, pos).niche_embeds)
    assert not torch.allclose(merged(emb, pos).niche_embeds, plain(emb, pos).niche_embeds)


def test_unmerged_model_padding_does_not_change_outputs():
    model = tissue(merge_ratio=0.0)
    emb, pos = section(m=50)
    pad_emb = torch.cat([emb, torch.randn(2, 10, 32)], 1)
    pad_pos = torch.cat([pos, torch.rand(2, 10, 2) * 2000], 1)
    mask = torch.cat([torch.ones(2, 50), torch.zeros(2, 10)], 1).long()
    a, b = model(emb, pos), model(pad_emb, pad_pos, mask)
    torch.testing.assert_close(a.tissue_embeds, b.tissue_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.niche_embeds, b.niche_embeds[:, :50], atol=1e-5, rtol=1e-5)


def test_padding_never_merges_into_real_niches():
    model = tissue(merge_ratio=0.3)
    emb, pos = section(m=80)
    mask = torch.ones(2, 80, dtype=torch.long)
    mask[1, 50:] = 0
    out = model(emb, pos, mask)
    real_sizes = (out.merged_sizes * out.merged_attention_mask).sum(1)
    torch.testing.assert_close(real_sizes, torch.tensor([80.0, 50.0]))
    assert torch.isfinite(out.niche_embeds).all() and torch.isfinite(out.tissue_embeds).all()


def test_merged_positions_are_size_weighted_means():
    model = tissue(merge_ratio=0.4, layers=2)
    emb, pos = section(b=1, m=60)
    out = model(emb, pos)
    torch.testing.assert_close((out.merged_positions * out.merged_sizes[..., None]).sum(1), pos.sum(1),
                               rtol=1e-4, atol=1e-2)


def test_proportional_attention_changes_merged_outputs():
    on = tissue(merge_ratio=0.4, proportional_attention=True)
    off = tissue(merge_ratio=0.4, proportional_attention=False)
    off.load_state_dict(on.state_dict())
    emb, pos = section()
    assert not torch.allclose(on(emb, pos).tissue_embeds, off(emb, pos).tissue_embeds)


def test_tissue_gradients_flow_through_merges():
    model = tissue(merge_ratio=0.3).train()
    emb, pos = section()
    emb.requires_grad_(True)
    model(emb, pos).niche_embeds.pow(2).mean().backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()
    assert all(p.grad is not None for p in model.parameters())


def test_tissue_input_errors():
    model = tissue()
    emb, pos = section()
    with pytest.raises(ValueError, match="niche_positions: expected"):
        model(emb, pos[..., :1])
    with pytest.raises(ValueError, match="niche_embeddings: expected \\[batch, niches, 32\\]"):
        model(emb[..., :16], pos)


def test_additive_mask_keeps_empty_rows_finite():
    bias = additive_mask(torch.zeros(1, 4, dtype=torch.bool), torch.float32)
    assert bias[0, 0, 0, 0] == 0 and torch.isfinite(bias).all()


def test_input_merge_shrinks_tokens_before_the_first_layer_and_unmerges_every_niche():
    model = tissue(merge_ratio=0.25, layers=2, merge_input_ratio=0.3)
    emb, pos = section()
    out = model(emb, pos)
    after_input = 200 - merge_count(200, 0.3)  # 140 tokens reach layer 0, whose own merge takes 25%
    expected = [200, after_input - merge_count(after_input, 0.25)]
    expected.append(expected[-1] - merge_count(expected[-1], 0.25))
    assert list(out.num_tokens) == expected
    assert out.niche_embeds.shape == (2, 200, 32)
    torch.testing.assert_close(out.merged_sizes.sum(1), torch.full((2,), 200.0))
    members = (out.niche_embeds[:, :, None, :] == out.merged_hidden_state[:, None, :, :]).all(-1)
    assert bool((members.sum(-1) >= 1).all())
    # the input merge alone (layers unmerged) is a model of its own, not the plain transformer
    only_input = tissue(merge_ratio=0.0, layers=2, merge_input_ratio=0.3)
    only_input.load_state_dict(model.state_dict())
    assert list(only_input(emb, pos).num_tokens) == [200, after_input, after_input]


def test_input_merge_off_and_call_time_ratio_zero_are_exactly_the_plain_model():
    merged = tissue(merge_ratio=0.25, merge_input_ratio=0.4)
    plain = tissue(merge_ratio=0.0)
    plain.load_state_dict(merged.state_dict())
    emb, pos = section()
    assert torch.equal(merged(emb, pos, merge_ratio=0.0).niche_embeds, plain(emb, pos).niche_embeds)
    default = tissue(merge_ratio=0.25)
    default.load_state_dict(merged.state_dict())
    explicit_off = tissue(merge_ratio=0.25, merge_input_ratio=0.0)
    explicit_off.load_state_dict(merged.state_dict())
    assert torch.equal(default(emb, pos).niche_embeds, explicit_off(emb, pos).niche_embeds)


def test_input_merge_above_one_half_takes_several_rounds():
    model = tissue(merge_ratio=0.0, layers=1, merge_input_ratio=0.8)
    emb, pos = section()
    out = model(emb, pos)
    assert list(out.num_tokens) == [200, 200 - merge_count(200, 0.8)]  # 200 -> 100 -> 50 -> 40
    torch.testing.assert_close(out.merged_sizes.sum(1), torch.full((2,), 200.0))
    assert out.niche_embeds.shape == (2, 200, 32)


def test_input_merge_keeps_padding_out_of_real_niches():
    model = tissue(merge_ratio=0.2, merge_input_ratio=0.5)
    emb, pos = section(m=80)
    mask = torch.ones(2, 80, dtype=torch.long)
    mask[1, 50:] = 0
    out = model(emb, pos, mask)
    torch.testing.assert_close((out.merged_sizes * out.merged_attention_mask).sum(1), torch.tensor([80.0, 50.0]))
    assert torch.isfinite(out.niche_embeds).all()


@pytest.mark.parametrize("bad", [-0.1, 0.95])
def test_merge_input_ratio_is_validated(bad):
    with pytest.raises(ValueError, match="merge_input_ratio"):
        SpatiaTissueConfig.from_preset("tiny", merge_input_ratio=bad)


@pytest.mark.parametrize("ratio", [0.0, 0.3])
def test_token_chunking_does_not_change_outputs(monkeypatch, ratio):
    """Chunked MLP (chunk_size_feed_forward) and chunked full-size stages give the same values."""
    from spatia_hf.models import modeling_tissue

    model = tissue(merge_ratio=ratio)
    chunked = tissue(merge_ratio=ratio, chunk_size_feed_forward=7)
    chunked.load_state_dict(model.state_dict())
    emb, pos = section()
    ref = model(emb, pos)
    monkeypatch.setattr(modeling_tissue, "_TOKEN_CHUNK", 13)
    out = chunked(emb, pos)
    assert torch.equal(ref.niche_embeds, out.niche_embeds)
    assert out.num_tokens == ref.num_tokens


def test_chunked_feed_forward_gradients_match():
    model = tissue(merge_ratio=0.3).train()
    chunked = tissue(merge_ratio=0.3, chunk_size_feed_forward=16).train()
    chunked.load_state_dict(model.state_dict())
    emb, pos = section()
    grads = []
    for m in (model, chunked):
        m(emb, pos).niche_embeds.pow(2).mean().backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_input_merge_lowers_peak_memory_of_a_large_section():
    """The bench's measure on a small case: merging lowers the peak, the input merge more."""
    from spatia_hf.utils.memory import cpu_peak_mib

    def peak(model, emb, pos):
        with torch.inference_mode():
            return cpu_peak_mib(lambda: model(emb, pos))

    wide = dict(hidden_size=64, num_attention_heads=2, intermediate_size=256, niche_embed_dim=64)
    plain = tissue(merge_ratio=0.0, **wide)
    layers_only = tissue(merge_ratio=0.3, **wide)
    merged = tissue(merge_ratio=0.3, merge_input_ratio=0.5, chunk_size_feed_forward=256, **wide)
    layers_only.load_state_dict(plain.state_dict())
    merged.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(0)
    emb, pos = torch.randn(1, 3000, 64, generator=g), torch.rand(1, 3000, 2, generator=g) * 2000
    p_plain, p_layers, p_merged = peak(plain, emb, pos), peak(layers_only, emb, pos), peak(merged, emb, pos)
    # measured here: 8.1, 5.8 and 3.7 MiB (the rest is the neighbour search's fixed scratch)
    assert p_merged < p_layers < p_plain
    assert p_merged < 0.6 * p_plain
