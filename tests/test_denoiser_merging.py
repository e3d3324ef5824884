"""Token merging in a diffusers denoiser's self-attention: exact when off, local, deterministic."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from spatia_hf.pipelines.denoiser_merging import (
    DenoiserMergingConfig,
    SpatialMergingAttnProcessor,
    _MergingState,
    apply_token_merging,
    remove_token_merging,
)


def _tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return _tiny_unet()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 4, 16, generator=g)


@pytest.fixture(scope="module")
def reference(unet, inputs) -> torch.Tensor:
    """The unpatched model's output (computed once: CPU time is shared)."""
    return _run(unet, inputs)


def _run(unet, inputs) -> torch.Tensor:
    sample, t, cond = inputs
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=cond).sample


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_ratio_zero_is_exactly_the_unmerged_model(unet, inputs, reference):
    ref = reference
    with apply_token_merging(unet, ratio=0.0) as handle:
        out = _run(unet, inputs)
    assert torch.equal(out, ref)
    assert handle.merged_calls == {}


def test_merging_changes_the_output_a_little_and_is_deterministic(unet, inputs, reference):
    ref = reference
    with apply_token_merging(unet, ratio=0.5) as handle:
        first = _run(unet, inputs)
        second = _run(unet, inputs)
    assert first.shape == ref.shape
    assert torch.equal(first, second)
    assert 0.0 < _rel(first, ref) < 0.1
    assert handle.merged_calls == {(16, 16): 6}  # only full resolution: 3 blocks x 2 forwards


def test_max_downsample_selects_resolutions(unet, inputs):
    with apply_token_merging(unet, ratio=0.5, max_downsample=2) as handle:
        _run(unet, inputs)
    assert set(handle.merged_calls) == {(16, 16), (8, 8)}


def test_remove_restores_original_processors(unet, inputs, reference):
    before = dict(unet.attn_processors)
    ref = reference
    apply_token_merging(unet, ratio=0.5)
    assert any(isinstance(p, SpatialMergingAttnProcessor) for p in unet.attn_processors.values())
    remove_token_merging(unet)
    after = unet.attn_processors
    assert all(after[name] is proc for name, proc in before.items())
    assert not any(h for h in unet._forward_pre_hooks.values())
    assert torch.equal(_run(unet, inputs), ref)


def test_applying_twice_replaces_the_patch(unet, inputs):
    apply_token_merging(unet, ratio=0.3)
    handle = apply_token_merging(unet, ratio=0.5)
    nested = [p for p in unet.attn_processors.values() if isinstance(p, SpatialMergingAttnProcessor)]
    assert nested and not any(isinstance(p.original, SpatialMergingAttnProcessor) for p in nested)
    handle.remove()
    assert not any(isinstance(p, SpatialMergingAttnProcessor) for p in unet.attn_processors.values())


def test_pipeline_like_objects_are_patched_through_their_unet(inputs):
    unet = _tiny_unet()
    pipe = SimpleNamespace(unet=unet)
    with apply_token_merging(pipe, ratio=0.5) as handle:
        _run(unet, inputs)
    assert handle.merged_calls


def test_merging_duplicate_tokens_with_proportional_attention_is_exact():
    # A 16x16 token grid that is constant on every 2x2 block: merging (which pairs identical
    # tokens) plus log(size) attention bias must reproduce full self-attention exactly.
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4).eval()
    coarse = torch.randn(2, 8, 8, 8)
    x = F.interpolate(coarse, scale_factor=2, mode="nearest").flatten(2).transpose(1, 2)  # [2, 256, 8]
    with torch.no_grad():
        ref = attn(x)
        state = _MergingState(config=DenoiserMergingConfig(ratio=0.5), base_grid=(16, 16))
        proc = SpatialMergingAttnProcessor(state, attn.processor)
        merged = proc(attn, x)
        state_np = _MergingState(config=DenoiserMergingConfig(ratio=0.5, proportional_attention=False), base_grid=(16, 16))
        plain = SpatialMergingAttnProcessor(state_np, attn.processor)(attn, x)
    assert state.merged_calls == {(16, 16): 1}
    torch.testing.assert_close(merged, ref, rtol=1e-4, atol=1e-5)
    assert _rel(plain, ref) > 1e-3  # without proportional attention the merge is visible


def test_kv_only_merging_changes_less(unet, inputs, reference):
    ref = reference
    with apply_token_merging(unet, ratio=0.5):
        full = _run(unet, inputs)
    with apply_token_merging(unet, ratio=0.5, merge_queries=False):
        kv_only = _run(unet, inputs)
    assert 0.0 < _rel(kv_only, ref) < _rel(full, ref)


def test_bad_configuration_names_the_setting():
    with pytest.raises(ValueError, match="ratio=0.8"):
        DenoiserMergingConfig(ratio=0.8)
    with pytest.raises(ValueError, match="max_downsample=3"):
        DenoiserMergingConfig(max_downsample=3)
    with pytest.raises(TypeError, match="unet"):
        apply_token_merging(object(), ratio=0.5)


def test_pixart_transformer_is_supported():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=16,
        sample_size=16,
        patch_size=2,
        caption_channels=16,
    ).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 16, 16, generator=g)
    cond = torch.randn(2, 4, 16, generator=g)
    t = torch.tensor([10, 500])
    kwargs = dict(encoder_hidden_states=cond, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    with torch.no_grad():
        ref = model(x, **kwargs).sample
        with apply_token_merging(model, ratio=0.0):
            off = model(x, **kwargs).sample
        with apply_token_merging(model, ratio=0.5) as handle:
            on = model(x, **kwargs).sample
    assert torch.equal(off, ref)
    assert handle.merged_calls == {(8, 8): 2}
    assert 0.0 < _rel(on, ref) < 0.2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_and_is_close_to_cpu(inputs, monkeypatch):
    # TF32 convolutions/matmuls (cuDNN's default) change the keys enough to flip near-tied merge choices
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    unet = _tiny_unet()
    with apply_token_merging(unet, ratio=0.5):
        cpu = _run(unet, inputs)
    unet = unet.cuda()
    with apply_token_merging(unet, ratio=0.5):
        gpu = _run(unet, tuple(t.cuda() for t in inputs))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-4)
