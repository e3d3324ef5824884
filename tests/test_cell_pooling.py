"""Centre-weighted pooling of the image tokens (``SpatiaCellConfig.image_pool_sigma``)."""

from __future__ import annotations

import pytest
import torch

from spatia_hf import SpatiaConfig
from spatia_hf.models.modeling_cell import SpatiaCellModel, center_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cell(**kwargs) -> SpatiaCellModel:
    cfg = SpatiaConfig.from_preset("tiny", gene_vocab=[f"G{i}" for i in range(8)], cell_config=kwargs).cell_config
    return SpatiaCellModel(cfg).eval()


def test_center_weights_peak_in_the_middle_and_zero_sigma_is_the_mean():
    w = center_weights(4, 0.125).view(4, 4)
    assert w.shape == (4, 4) and torch.allclose(w, w.t()) and torch.allclose(w, w.flip(0))
    assert w[1, 1] > w[0, 1] > w[0, 0]
    assert torch.equal(center_weights(4, 0.0), torch.ones(16))


def test_pooling_reads_the_centre_patch_more_than_a_corner():
    cell = tiny_cell(image_pool_sigma=0.125)
    tokens = torch.zeros(1, 16, 32)
    centre, corner = tokens.clone(), tokens.clone()
    centre[0, 5] = 1.0  # a middle patch of the 4x4 grid
    corner[0, 0] = 1.0
    assert cell.pool_image_tokens(centre).sum() > 5 * cell.pool_image_tokens(corner).sum()
    flat = tiny_cell(image_pool_sigma=0.0)
    torch.testing.assert_close(flat.pool_image_tokens(centre), centre.mean(dim=1))


def test_pooling_of_visible_patches_matches_weights_of_those_patches():
    cell = tiny_cell()
    tokens = torch.randn(2, 16, 32)
    keep = torch.tensor([[0, 5, 6, 15], [1, 2, 9, 10]])
    got = cell.pool_image_tokens(torch.gather(tokens, 1, keep[..., None].expand(-1, -1, 32)), keep)
    w = center_weights(4, cell.config.image_pool_sigma)[keep]
    want = (torch.gather(tokens, 1, keep[..., None].expand(-1, -1, 32)) * (w / w.sum(1, keepdim=True))[..., None]).sum(1)
    torch.testing.assert_close(got, want)


def test_image_embedding_follows_the_centre_cell_not_the_border():
    torch.manual_seed(0)
    cell = tiny_cell()
    base = torch.randn(1, 2, 32, 32)
    centre_changed, border_changed = base.clone(), base.clone()
    centre_changed[..., 12:20, 12:20] += 3.0
    border_changed[..., :8, :] += 3.0  # four times as many pixels as the centre change
    with torch.no_grad():
        e = [cell(pixel_values=x, return_dict=True).image_embeds for x in (base, centre_changed, border_changed)]
    assert (e[1] - e[0]).norm() > 2 * (e[2] - e[0]).norm()


def test_negative_sigma_is_refused():
    with pytest.raises(ValueError, match="image_pool_sigma"):
        tiny_cell(image_pool_sigma=-0.1)


def test_presets_pool_around_the_centre_while_old_configs_keep_the_mean():
    from spatia_hf.models.configuration_spatia import PRESETS, SpatiaCellConfig

    for preset in PRESETS:
        assert SpatiaConfig.from_preset(preset).cell_config.image_pool_sigma == 0.125
    assert SpatiaCellConfig().image_pool_sigma == 0.0  # a config saved without the field: plain mean
