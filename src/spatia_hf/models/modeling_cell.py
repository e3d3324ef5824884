"""The cell scale: a cell-centred image crop and the cell's expression become one embedding.

- :class:`SpatiaImageEncoder` (built-in ViT) or :class:`SpatiaBackboneImageEncoder` (any
  transformers vision model) turn the crop into *morphological tokens*;
- :class:`SpatiaExpressionEncoder` turns the expressed genes (plus a sample of zeros) into
  *transcriptomic tokens*: gene-identity embedding + an encoding of the log1p value. It attends
  only over the tokens it is given, so its cost follows the expressed genes, not the panel.
- fusion blocks let image tokens attend to gene tokens and vice versa; a pooled token of each
  stream gives the cell embedding. Either modality may be missing.

The expression encoder is reused by the generation pipeline as its condition encoder:
:func:`expression_encoder_state` extracts its config and weights from any SPATIA checkpoint.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel
from transformers import initialization as init

from .configuration_spatia import NUM_SPECIAL_TOKENS, PAD_TOKEN_ID, SpatiaCellConfig
from .modeling_base import GeneTable, SpatiaPreTrainedModel
from .modeling_layers import SpatiaBlock, SpatiaFusionLayer, additive_mask, sincos_2d
from .modeling_outputs import SpatiaCellOutput


class SpatiaValueEncoder(nn.Module):
    """Continuous encoding of a log1p-normalised expression value; a learned token for hidden values."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(1, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)
        self.mask_embedding = nn.Parameter(torch.empty(hidden_size))

    def _spatia_init(self, std: float) -> None:
        init.normal_(self.mask_embedding, std=std)

    def forward(self, values: torch.Tensor, value_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.fc2(F.gelu(self.fc1(values.to(self.fc1.weight.dtype)[..., None])))
        if value_mask is not None:
            x = torch.where(value_mask[..., None], self.mask_embedding.to(x.dtype), x)
        return x


class SpatiaExpressionEncoder(nn.Module):
    """Gene tokens: identity embedding + value encoding, then self-attention blocks.

    ``forward(gene_ids, gene_values, gene_attention_mask) -> (tokens [B, L, D], mask [B, L])``.
    Permuting the gene tokens permutes the output (no positional index): any panel, any order.
    """

    def __init__(self, config: SpatiaCellConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.gene_embeddings = GeneTable(config.vocab_size, d, padding_idx=PAD_TOKEN_ID)
        self.value_encoder = SpatiaValueEncoder(d)
        self.embed_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList([SpatiaBlock(config) for _ in range(config.num_expression_layers)])
        self.final_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    @classmethod
    def from_spatia(cls, model_or_path) -> "SpatiaExpressionEncoder":
        """The expression branch of a SPATIA model or checkpoint (path, hub id or model), weights loaded."""
        config, state = expression_encoder_state(model_or_path)
        encoder = cls(config)
        encoder.load_state_dict(state, strict=True)
        return encoder

    def check_inputs(self, gene_ids: torch.Tensor, gene_values: torch.Tensor) -> None:
        if gene_ids.dim() != 2:
            raise ValueError(f"gene_ids: expected shape [batch, genes], got {tuple(gene_ids.shape)}. "
                             "Fix: pad each cell's genes into one [B, L] long tensor (SpatiaProcessor does)")
        if gene_values.shape != gene_ids.shape:
            raise ValueError(f"gene_values: shape {tuple(gene_values.shape)} differs from gene_ids "
                             f"{tuple(gene_ids.shape)}. Fix: give one value per gene id")
        if gene_ids.numel():
            lo, hi = int(gene_ids.min()), int(gene_ids.max())
            vocab = self.gene_embeddings.num_embeddings
            if lo < 0 or hi >= vocab:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"gene_ids: id {bad} is outside the model's gene vocabulary (ids 0..{vocab - 1}: "
                    f"{NUM_SPECIAL_TOKENS} special ids + {vocab - NUM_SPECIAL_TOKENS} genes). Fix: map the "
                    "dataset panel with SpatiaProcessor (it reports and drops unknown genes) or grow the "
                    "vocabulary with model.resize_gene_vocab(new_genes)"
                )

    def sketch(self, gene_ids: torch.Tensor, gene_values: torch.Tensor, gene_attention_mask: torch.Tensor | None = None,
               gene_value_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, D]``: the identity embeddings of the real, visible genes weighted by their values and summed
        (a linear map of the expression vector; hidden values and padding contribute nothing)."""
        weights = gene_values.to(self.gene_embeddings.weight.dtype)
        keep = gene_ids != PAD_TOKEN_ID
        if gene_attention_mask is not None:
            keep = keep & gene_attention_mask.bool()
        if gene_value_mask is not None:
            keep = keep & ~gene_value_mask.bool()
        weights = torch.where(keep, weights, torch.zeros_like(weights))
        return torch.einsum("bl,bld->bd", weights, self.gene_embeddings(gene_ids))

    def embed(self, gene_ids: torch.Tensor, gene_values: torch.Tensor,
              gene_value_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Input tokens before self-attention: identity + value, normalised."""
        return self.embed_norm(self.gene_embeddings(gene_ids) + self.value_encoder(gene_values, gene_value_mask))

    def forward(
        self,
        gene_ids: torch.Tensor,
        gene_values: torch.Tensor,
        gene_attention_mask: torch.Tensor | None = None,
        gene_value_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: ``gene_ids`` [B, L] long vocabulary ids (0 = pad); ``gene_values`` [B, L] log1p
        values; ``gene_attention_mask`` [B, L] (1 = real; default ``gene_ids != 0``);
        ``gene_value_mask`` [B, L] bool, values to hide (masked gene modelling)."""
        self.check_inputs(gene_ids, gene_values)
        mask = (gene_ids != PAD_TOKEN_ID) if gene_attention_mask is None else gene_attention_mask.bool()
        x = self.embed(gene_ids, gene_values, gene_value_mask)
        bias = additive_mask(mask, x.dtype)
        for layer in self.layers:
            x = layer(x, bias)
        return self.final_norm(x), mask


class SpatiaImageEncoder(nn.Module):
    """Built-in ViT: patch embedding + fixed 2-D sin-cos positions + a cls token + blocks.

    Masked patches (MAE) are dropped before the blocks, so masked image modelling also saves compute.
    """

    def __init__(self, config: SpatiaCellConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.patch_size = config.patch_size
        self.grid_size = config.image_size // config.patch_size
        self.patch_embed = nn.Conv2d(config.num_channels, d, kernel_size=config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.empty(1, 1, d))
        self.layers = nn.ModuleList([SpatiaBlock(config) for _ in range(config.num_image_layers)])
        self.final_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def _spatia_init(self, std: float) -> None:
        init.trunc_normal_(self.cls_token, std=std)
        # MAE: the patch embedding is a Linear over flattened patches, xavier-uniform on [D, C*p*p].
        # The default normal(0.02) made crop content ~4x weaker than the fixed sin-cos positions
        # (norm sqrt(D/2)), so every crop embedded almost alike (mean pairwise cosine 0.999).
        w = self.patch_embed.weight
        bound = math.sqrt(6.0 / (w[0].numel() + w.shape[0]))
        init.uniform_(w, -bound, bound)

    def forward(self, pixel_values: torch.Tensor, keep_index: torch.Tensor | None = None):
        """``[B, C, H, W]`` -> ``[B, 1 + P', D]`` (cls first); ``keep_index`` [B, P'] selects visible patches."""
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        x = x + sincos_2d(self.grid_size, x.shape[-1], x.device, x.dtype)[None]
        if keep_index is not None:
            x = torch.gather(x, 1, keep_index[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        for layer in self.layers:
            x = layer(x, None)
        return self.final_norm(x)


class SpatiaBackboneImageEncoder(nn.Module):
    """Any transformers vision model (built from ``config.vision_backbone_config``) as the image branch.

    Its patch tokens (or feature-map positions) are projected to ``hidden_size``; their mean is the
    pooled token. Masked patches are blanked in pixel space, as a generic backbone cannot drop tokens.
    """

    def __init__(self, config: SpatiaCellConfig):
        super().__init__()
        self.config = config
        bcfg = dict(config.vision_backbone_config)
        model_type = bcfg.pop("model_type", None)
        if model_type is None:
            raise ValueError("vision_backbone_config has no model_type. Fix: pass vision_backbone=<path or hub id>")
        backbone_config = AutoConfig.for_model(model_type, **bcfg)
        _check_backbone_geometry(backbone_config, config)
        self.backbone = AutoModel.from_config(backbone_config)
        width = getattr(backbone_config, "hidden_size", None) or backbone_config.hidden_sizes[-1]
        self.proj = nn.Linear(width, config.hidden_size)
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.grid_size: int | None = None

    def load_backbone_weights(self) -> None:
        """Copy the pretrained weights of ``config.vision_backbone`` into the backbone (safetensors)."""
        source = AutoModel.from_pretrained(self.config.vision_backbone)
        missing, unexpected = self.backbone.load_state_dict(source.state_dict(), strict=False)
        if missing:
            raise ValueError(f"vision_backbone={self.config.vision_backbone!r}: weights missing for {missing[:5]}. "
                             "Fix: point vision_backbone at the same architecture as vision_backbone_config")

    def forward(self, pixel_values: torch.Tensor, keep_index: torch.Tensor | None = None,
                patch_mask: torch.Tensor | None = None):
        if patch_mask is not None:
            p = self.config.patch_size
            g = self.config.image_size // p
            pix_mask = patch_mask.view(-1, 1, g, 1, g, 1).expand(-1, 1, g, p, g, p)
            pixel_values = pixel_values.masked_fill(pix_mask.reshape(pixel_values.shape[0], 1, g * p, g * p), 0.0)
        out = self.backbone(pixel_values=pixel_values)
        h = out.last_hidden_state
        if h.dim() == 4:  # CNN feature map [B, C, h, w]
            h = h.flatten(2).transpose(1, 2)
        n = h.shape[1]
        g = int(math.isqrt(n))
        while g > 0 and n - g * g > 8:  # allow a few prefix tokens (cls, registers)
            g -= 1
        if g * g == 0 or n - g * g < 0:
            raise ValueError(f"vision backbone returned {n} tokens, not a square grid. Fix: use a ViT/CNN backbone")
        h = h[:, n - g * g :]
        self.grid_size = g
        tokens = self.proj(h)
        if keep_index is not None:
            expected = self.config.image_size // self.config.patch_size
            if g != expected:
                raise ValueError(f"vision backbone gives a {g}x{g} token grid but patch_size={self.config.patch_size} "
                                 f"implies {expected}x{expected}; masked image modelling needs them equal. Fix: set "
                                 "patch_size to the backbone's patch size, or mim_weight=0")
            tokens = torch.gather(tokens, 1, keep_index[..., None].expand(-1, -1, tokens.shape[-1]))
        pooled = tokens.mean(dim=1, keepdim=True)
        return self.final_norm(torch.cat([pooled, tokens], dim=1))


_BACKBONE_GEOMETRY_FIXES = {
    "image_size": "set image_size to the backbone's input size",
    "patch_size": "set patch_size to the backbone's patch size",
    "num_channels": "use a backbone built for this many stain channels",
}


def _check_backbone_geometry(backbone_config, config: SpatiaCellConfig) -> None:
    for name, fix in _BACKBONE_GEOMETRY_FIXES.items():
        have = getattr(backbone_config, name, None)
        if isinstance(have, (list, tuple)):  # (height, width) sizes of some backbones
            have = have[0]
        if have is not None and int(have) != getattr(config, name):
            raise ValueError(f"vision backbone {name}={have} differs from {name}={getattr(config, name)}. Fix: {fix}")


class SpatiaCellModel(SpatiaPreTrainedModel):
    """Image crop + expression of one cell -> fused tokens and a pooled cell embedding."""

    config_class = SpatiaCellConfig
    config: SpatiaCellConfig
    base_model_prefix = "cell"
    main_input_name = "gene_ids"

    def __init__(self, config: SpatiaCellConfig):
        super().__init__(config)
        d = config.hidden_size
        self.expression_encoder = SpatiaExpressionEncoder(config)
        if config.vision_backbone_config:
            self.image_encoder = SpatiaBackboneImageEncoder(config)
        else:
            self.image_encoder = SpatiaImageEncoder(config)
        self.expression_cls = nn.Parameter(torch.empty(1, 1, d))
        cross = config.fusion == "cross_attention"
        self.fusion_layers = nn.ModuleList([SpatiaFusionLayer(config, cross) for _ in range(config.num_fusion_layers)])
        self.image_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.gene_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        # the linear expression sketch (config.expression_sketch): a third input of the pooling projection
        self.sketch_norm = nn.LayerNorm(d, eps=config.layer_norm_eps) if config.expression_sketch else None
        self.pool_proj = nn.Linear((3 if config.expression_sketch else 2) * d, d)
        # unit-scale embeddings: pool_proj's output at init has std ~0.02 * sqrt(2d) (0.16-0.3), so a
        # new linear head on it moved its logits ~100x slower than on standardised features
        self.embed_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.post_init()
        if config.vision_backbone and self.pool_proj.weight.device.type != "meta":
            self.image_encoder.load_backbone_weights()

    def _spatia_init(self, std: float) -> None:
        init.trunc_normal_(self.expression_cls, std=std)

    @property
    def num_patches(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    def pool_image_tokens(self, tokens: torch.Tensor, keep_index: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, P', D]`` patch tokens -> ``[B, D]``: their mean weighted by a Gaussian centred on the
        crop (``config.image_pool_sigma``), so the pooled token describes the centre cell.
        ``keep_index`` [B, P'] names the patches present when some are hidden."""
        weights = center_weights(int(math.isqrt(self.num_patches if keep_index is not None else tokens.shape[1])),
                                 self.config.image_pool_sigma, tokens.device, tokens.dtype)
        weights = weights.expand(tokens.shape[0], -1) if keep_index is None else weights[keep_index]
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=torch.finfo(tokens.dtype).tiny)
        return (tokens * weights[..., None]).sum(dim=1)

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values: expected [batch, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}] "
                f"(channels, height, width), got {tuple(pixel_values.shape)}. Fix: crop/resize cells to "
                f"{cfg.image_size} px with {cfg.num_channels} stain channels (SpatiaProcessor checks this), "
                "or build the model with matching image_size/num_channels"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values: dtype {pixel_values.dtype} is not floating point. "
                             "Fix: convert uint8 crops with SpatiaProcessor.preprocess_images")

    def encode_image(self, pixel_values: torch.Tensor,
                     image_patch_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image branch alone (no fusion): ``[B, 1 + P', D]`` tokens (pooled first) of the visible
        patches and their indices ``[B, P']`` (None when nothing is hidden). Masked image modelling
        runs this on the visible patches, apart from the fused pass, which sees the whole crop."""
        self.check_pixel_values(pixel_values)
        keep_index = _keep_index(image_patch_mask) if image_patch_mask is not None else None
        if isinstance(self.image_encoder, SpatiaBackboneImageEncoder):
            return self.image_encoder(pixel_values, keep_index, image_patch_mask), keep_index
        return self.image_encoder(pixel_values, keep_index), keep_index

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        gene_ids: torch.Tensor | None = None,
        gene_values: torch.Tensor | None = None,
        gene_attention_mask: torch.Tensor | None = None,
        gene_value_mask: torch.Tensor | None = None,
        image_patch_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> SpatiaCellOutput | tuple:
        """Args:
            pixel_values: ``[B, C, H, W]`` float crops (or None: expression only).
            gene_ids / gene_values / gene_attention_mask: ``[B, L]`` expression tokens (or None: image only).
            gene_value_mask: ``[B, L]`` bool, gene values to hide (masked gene modelling).
            image_patch_mask: ``[B, P]`` bool, patches to hide (masked image modelling); equal count per row.
        """
        if pixel_values is None and gene_ids is None:
            raise ValueError("SpatiaCellModel needs pixel_values, gene_ids (with gene_values), or both")
        if gene_ids is not None and gene_values is None:
            raise ValueError("gene_values is None while gene_ids is given. Fix: pass one value per gene id")
        return_dict = self.config.return_dict if return_dict is None else return_dict

        image_states = image_embeds = keep_index = image_mask = None
        if pixel_values is not None:
            image_states, keep_index = self.encode_image(pixel_values, image_patch_mask)
            # pooled patch tokens, centre-weighted (image_pool_sigma): the cls token after one or two
            # blocks is ~the same vector for every crop (it averages position-dominated tokens), which
            # left InfoNCE at chance; a plain mean mostly describes the neighbours in the crop
            image_embeds = self.pool_image_tokens(image_states[:, 1:], keep_index)

        gene_states = expression_embeds = gene_mask = token_mask_out = sketch = None
        if gene_ids is not None:
            tokens, token_mask = self.expression_encoder(gene_ids, gene_values, gene_attention_mask, gene_value_mask)
            if self.sketch_norm is not None:  # after the encoder, which checks the ids and values
                sketch = self.sketch_norm(self.expression_encoder.sketch(gene_ids, gene_values, gene_attention_mask,
                                                                         gene_value_mask))
            expression_embeds = _masked_mean(tokens, token_mask)
            b = tokens.shape[0]
            gene_states = torch.cat([self.expression_cls.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
            full_mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=tokens.device), token_mask], dim=1)
            gene_mask = additive_mask(full_mask, tokens.dtype)
            token_mask_out = token_mask

        for layer in self.fusion_layers:
            image_states, gene_states = layer(image_states, image_mask, gene_states, gene_mask)

        ref = image_states if image_states is not None else gene_states
        zeros = ref.new_zeros(ref.shape[0], ref.shape[-1])
        img_pool = (self.image_norm(self.pool_image_tokens(image_states[:, 1:], keep_index))
                    if image_states is not None else zeros)
        gene_pool = self.gene_norm(_masked_mean(gene_states[:, 1:], token_mask_out)) if gene_states is not None else zeros
        pooled = [img_pool, gene_pool]
        if self.sketch_norm is not None:
            pooled.append(sketch if sketch is not None else zeros)
        cell_embeds = self.embed_norm(self.pool_proj(torch.cat(pooled, dim=-1)))

        out = SpatiaCellOutput(
            cell_embeds=cell_embeds,
            image_embeds=image_embeds,
            expression_embeds=expression_embeds,
            image_tokens=image_states[:, 1:] if image_states is not None else None,
            gene_tokens=gene_states[:, 1:] if gene_states is not None else None,
            gene_attention_mask=token_mask_out,
            image_keep_index=keep_index,
            image_grid_size=getattr(self.image_encoder, "grid_size", None),
        )
        return out if return_dict else out.to_tuple()


def center_weights(grid: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[grid * grid]`` Gaussian weights (row-major patches) centred on the crop, standard deviation
    ``sigma`` x the crop side; all ones for ``sigma == 0`` (plain mean)."""
    if sigma <= 0:
        return torch.ones(grid * grid, device=device, dtype=dtype)
    pos = torch.arange(grid, device=device, dtype=torch.float32) - (grid - 1) / 2
    r2 = pos[:, None] ** 2 + pos[None, :] ** 2
    return torch.exp(-r2 / (2 * (sigma * grid) ** 2)).reshape(-1).to(dtype)


def _keep_index(patch_mask: torch.Tensor) -> torch.Tensor:
    """Indices of the visible (False) patches, ascending, ``[B, P - n_masked]``."""
    counts = (~patch_mask).sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise ValueError("image_patch_mask: every row must hide the same number of patches. "
                         "Fix: build it with spatia_hf.models.modeling_layers.random_patch_mask")
    order = torch.argsort(patch_mask.to(torch.int8), dim=1, stable=True)
    return order[:, : int(counts[0])]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


# ------------------------------------------------------------------ condition-encoder extraction
def _find_cell_model(model) -> SpatiaCellModel:
    if isinstance(model, SpatiaCellModel):
        return model
    for name in ("cell", "spatia"):
        sub = getattr(model, name, None)
        if sub is not None:
            return _find_cell_model(sub)
    raise TypeError(f"{type(model).__name__} holds no SpatiaCellModel. Fix: pass a SPATIA model or checkpoint path")


def expression_encoder_state(model_or_path) -> tuple[SpatiaCellConfig, dict[str, torch.Tensor]]:
    """Config and state dict of the expression branch of a SPATIA model or checkpoint.

    Accepts a :class:`SpatiaCellModel`, :class:`~spatia_hf.models.modeling_spatia.SpatiaModel`, any SPATIA
    head, or a path/hub id of one of them. The generation pipeline builds its condition encoder
    from this with :meth:`SpatiaExpressionEncoder.from_spatia`.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        model_or_path = AutoModel.from_pretrained(model_or_path)
    cell = _find_cell_model(model_or_path)
    config = SpatiaCellConfig.from_dict(cell.config.to_dict())
    state = {k: v.detach().clone() for k, v in cell.expression_encoder.state_dict().items()}
    return config, state



__all__ = [
    "SpatiaCellModel",
    "SpatiaExpressionEncoder",
    "SpatiaImageEncoder",
    "SpatiaBackboneImageEncoder",
    "SpatiaValueEncoder",
    "expression_encoder_state",
]
