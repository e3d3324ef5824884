"""The niche scale: the cells of a neighbourhood as one set of tokens.

A niche is cell-centred (the ``num_neighbours`` nearest cells of a centre cell,
:mod:`spatia_hf.data.neighbourhoods`) when embedding cells and in pretraining; grid tiles still
feed the section-level paths. Each member cell is a token: its cell embedding (plus, with
``use_expression_profiles``, a linear profile of its expression) plus a 2-D Fourier encoding of
its position (µm, relative to the niche centre). There is no 1-D index, so the niche embedding does not depend on
the order the cells are listed in, and per-cell outputs permute with the cells. An optional niche
image adds patch tokens. The niche embedding pools the member tokens' outputs (``pooling="mean"``,
so even an untrained model returns a smoothing of its members) or is the cls token's output; the
member tokens come out as context-aware cell embeddings. Masked cells (niche masked-cell prediction) keep their position but
lose their embedding. With fitted cell states (``num_cell_states``, :mod:`.cell_states`) the
niche's composition over them comes out too in eval mode (``niche_composition``; training skips
it): the niche embedding that ``spatia embed`` writes and clusters into spatial domains.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init

from .cell_states import SpatiaCellStates
from .configuration_spatia import SpatiaNicheConfig
from .modeling_base import SpatiaPreTrainedModel
from .modeling_layers import SpatiaBlock, SpatiaPositionEncoder, additive_mask, check_token_set, sincos_2d
from .modeling_outputs import SpatiaNicheOutput


# ---------------------------------------------------------------------- niche batch layout
# Niche batches carry per-cell tensors with a leading [B, N] (niches, member cells); the cell model
# runs on the real (unpadded) cells only, flattened row-major. These helpers are that one routing,
# shared by the niche model, SpatiaModel.encode_niche_cells and the heads.
def real_cell_mask(cell_attention_mask: torch.Tensor | None, shape: tuple[int, int],
                   device: torch.device) -> torch.Tensor:
    """``[B, N]`` bool, True for real cells (every cell when no mask is given)."""
    if cell_attention_mask is None:
        return torch.ones(*shape, dtype=torch.bool, device=device)
    return cell_attention_mask.bool()


def real_cell_index(cell_attention_mask: torch.Tensor | None, shape: tuple[int, int],
                    device: torch.device) -> torch.Tensor:
    """Positions ``[n_real]`` of the real cells in the flattened ``[B*N]`` (row-major) order."""
    return real_cell_mask(cell_attention_mask, shape, device).reshape(-1).nonzero().squeeze(1)


def pick_cells(t: torch.Tensor | None, index: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor | None:
    """Rows of a ``[B, N, ...]`` tensor at ``index`` (from :func:`real_cell_index`): ``[n_real, ...]``."""
    b, n = shape
    return None if t is None else t.reshape(b * n, *t.shape[2:]).index_select(0, index)


def scatter_cells(t: torch.Tensor, index: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`pick_cells`: ``[n_real, ...]`` -> ``[B, N, ...]`` with zeros at padded cells."""
    b, n = shape
    return t.new_zeros(b * n, *t.shape[1:]).index_copy(0, index, t).view(b, n, *t.shape[1:])


class SpatiaNicheEmbeddings(nn.Module):
    """Cell tokens (embedding + position), optional niche-image tokens, and the cls token."""

    def __init__(self, config: SpatiaNicheConfig):
        super().__init__()
        d = config.hidden_size
        self.cell_proj = nn.Linear(config.cell_embed_dim, d)
        # expression profiles live in the cell model's gene-embedding space (width cell_embed_dim)
        self.profile_proj = nn.Linear(config.cell_embed_dim, d) if config.use_expression_profiles else None
        self.position_encoder = SpatiaPositionEncoder.from_config(config)
        self.cls_token = nn.Parameter(torch.empty(1, 1, d))
        self.mask_token = nn.Parameter(torch.empty(1, 1, d))
        if config.use_niche_image:
            self.patch_embed = nn.Conv2d(config.num_channels, d, config.niche_patch_size, stride=config.niche_patch_size)
            self.image_type = nn.Parameter(torch.empty(1, 1, d))
            self.grid_size = config.niche_image_size // config.niche_patch_size
        else:
            self.patch_embed = None
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def _spatia_init(self, std: float) -> None:
        init.trunc_normal_(self.cls_token, std=std)
        init.trunc_normal_(self.mask_token, std=std)
        if self.patch_embed is not None:
            init.trunc_normal_(self.image_type, std=std)

    def forward(self, cell_embeddings, cell_positions, cell_mask=None, pixel_values=None, cell_profiles=None):
        x = self.cell_proj(cell_embeddings)
        if self.profile_proj is not None and cell_profiles is not None:
            x = x + self.profile_proj(cell_profiles.to(x.dtype))
        if cell_mask is not None:
            x = torch.where(cell_mask[..., None], self.mask_token.to(x.dtype), x)
        x = x + self.position_encoder(cell_positions.to(x.dtype))
        parts = [self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x]
        if pixel_values is not None:
            img = self.patch_embed(pixel_values.to(x.dtype)).flatten(2).transpose(1, 2)
            img = img + sincos_2d(self.grid_size, img.shape[-1], img.device, img.dtype)[None] + self.image_type
            parts.append(img)
        return self.norm(torch.cat(parts, dim=1))


class SpatiaNicheModel(SpatiaPreTrainedModel):
    """Cell embeddings + µm positions (+ niche image) -> niche embedding and context-aware cells."""

    config_class = SpatiaNicheConfig
    config: SpatiaNicheConfig
    base_model_prefix = "niche"
    main_input_name = "cell_embeddings"

    def __init__(self, config: SpatiaNicheConfig):
        super().__init__(config)
        self.embeddings = SpatiaNicheEmbeddings(config)
        self.layers = nn.ModuleList([SpatiaBlock(config) for _ in range(config.num_hidden_layers)])
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.cell_states = (SpatiaCellStates(config.num_cell_states, config.cell_embed_dim,
                                             config.cell_state_temperature, config.cell_state_neighbours,
                                             config.cell_state_bandwidth)
                            if config.num_cell_states else None)
        self.post_init()

    @property
    def has_fitted_cell_states(self) -> bool:
        return self.cell_states is not None and self.cell_states.is_fitted

    def fit_cell_states(self, cell_embeddings, *, seed: int = 0, max_cells: int = 50_000) -> "SpatiaNicheModel":
        """Fit the cell states (k-means centres) on cell embeddings ``[n, cell_embed_dim]`` of the
        cell model this niche model is paired with; ``niche_composition`` is returned from then on."""
        if self.cell_states is None:
            raise ValueError("this niche model has num_cell_states=0. Fix: build it with num_cell_states > 0 (every "
                             "preset sets 32)")
        self.cell_states.fit(cell_embeddings, seed=seed, max_cells=max_cells)
        return self

    def check_inputs(self, cell_embeddings, cell_positions, cell_attention_mask, pixel_values) -> None:
        cfg = self.config
        check_token_set("cell", cell_embeddings, cell_positions, cell_attention_mask, cfg.cell_embed_dim, "cell",
                        "x, y in µm relative to the niche centre")
        if pixel_values is not None:
            if not cfg.use_niche_image:
                raise ValueError("pixel_values (niche image) given but use_niche_image=False. "
                                 "Fix: drop it or build the model with use_niche_image=True")
            expected = (cfg.num_channels, cfg.niche_image_size, cfg.niche_image_size)
            if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
                raise ValueError(f"pixel_values (niche image): expected [batch, {expected[0]}, {expected[1]}, "
                                 f"{expected[2]}], got {tuple(pixel_values.shape)}. Fix: crop niches to "
                                 f"{cfg.niche_image_size} px or set niche_image_size")

    def forward(
        self,
        cell_embeddings: torch.Tensor,
        cell_positions: torch.Tensor,
        cell_attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        cell_mask: torch.Tensor | None = None,
        cell_profiles: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> SpatiaNicheOutput | tuple:
        """Args:
            cell_embeddings: ``[B, N, cell_embed_dim]`` member cells.
            cell_positions: ``[B, N, 2]`` µm relative to the niche centre.
            cell_attention_mask: ``[B, N]`` 1 = real cell, 0 = padding.
            pixel_values: optional ``[B, C, H, W]`` niche image.
            cell_mask: ``[B, N]`` bool, cells whose embedding is hidden (masked-cell prediction).
            cell_profiles: optional ``[B, N, cell_embed_dim]`` expression profiles of the members
                (:meth:`SpatiaModel.expression_profiles`); used when ``use_expression_profiles``.
        """
        self.check_inputs(cell_embeddings, cell_positions, cell_attention_mask, pixel_values)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        b, n = cell_embeddings.shape[:2]
        if cell_profiles is not None and tuple(cell_profiles.shape) != tuple(cell_embeddings.shape):
            raise ValueError(f"cell_profiles: expected shape {tuple(cell_embeddings.shape)} (one profile per cell "
                             f"embedding), got {tuple(cell_profiles.shape)}")
        x = self.embeddings(cell_embeddings, cell_positions, cell_mask, pixel_values, cell_profiles)
        cells_real = real_cell_mask(cell_attention_mask, (b, n), x.device)
        n_img = x.shape[1] - 1 - n
        full = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x.device), cells_real,
                          torch.ones(b, n_img, dtype=torch.bool, device=x.device)], dim=1)
        bias = additive_mask(full, x.dtype)
        for layer in self.layers:
            x = layer(x, bias)
        x = self.final_norm(x)
        out = SpatiaNicheOutput(
            niche_embeds=self._pool(x, cells_real),
            cell_embeds=x[:, 1 : 1 + n],
            cell_attention_mask=cells_real,
            image_tokens=x[:, 1 + n :] if n_img else None,
            niche_composition=(self.cell_states.composition(cell_embeddings, cell_positions, cells_real)
                               if not self.training and self.has_fitted_cell_states else None),
        )
        return out if return_dict else out.to_tuple()

    def _pool(self, x: torch.Tensor, cells_real: torch.Tensor) -> torch.Tensor:
        """The niche embedding: the cls output, or the mean output over the real member cells."""
        if self.config.pooling == "cls":
            return x[:, 0]
        n = cells_real.shape[1]
        w = cells_real.to(x.dtype)[..., None]
        return (x[:, 1 : 1 + n] * w).sum(1) / w.sum(1).clamp(min=1.0)


__all__ = ["SpatiaNicheModel", "SpatiaNicheEmbeddings", "real_cell_mask", "real_cell_index", "pick_cells",
           "scatter_cells"]
