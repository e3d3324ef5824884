"""Building blocks shared by the cell, niche and tissue models.

Pre-norm transformer blocks whose attention goes through transformers' attention interface
(SDPA by default, ``eager`` on request), fused query/key/value projections, additive padding
masks that never produce NaN, 2-D Fourier features of µm positions and the ViT patch helpers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def eager_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Reference attention (``attn_implementation="eager"``): explicit softmax over an additive mask."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``[B, L]`` bool (True = real) -> additive ``[B, 1, 1, L]`` float mask (0 or dtype min), or
    None when nothing is padding.

    A row without any real key would make softmax NaN; such rows keep key 0 attendable (their
    outputs are padding and get masked downstream), so one empty sample never poisons a batch.
    """
    if mask is None:
        return None
    mask = mask.to(torch.bool)
    if bool(mask.all()):  # no padding: let SDPA take its mask-free kernel
        return None
    empty = ~mask.any(dim=-1, keepdim=True)
    if bool(empty.any()):
        mask = mask.clone()
        mask[:, :1] |= empty
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    out.masked_fill_(~mask, torch.finfo(dtype).min)
    return out[:, None, None, :]


def token_chunked(fn, x: torch.Tensor, *rest: torch.Tensor, chunk: int) -> torch.Tensor:
    """``fn(x, *rest)`` for a token-wise ``fn``, ``chunk`` tokens (dim 1) at a time, written into one
    preallocated output: peak scratch is one chunk's, not the whole sequence's (any remainder
    size; transformers' ``apply_chunking_to_forward`` needs a multiple and concatenates)."""
    n = x.shape[1]
    if n <= chunk:
        return fn(x, *rest)
    first = fn(x[:, :chunk], *(r[:, :chunk] for r in rest))
    out = first.new_empty(first.shape[0], n, *first.shape[2:])
    out[:, :chunk] = first
    del first
    for c0 in range(chunk, n, chunk):
        out[:, c0 : c0 + chunk] = fn(x[:, c0 : c0 + chunk], *(r[:, c0 : c0 + chunk] for r in rest))
    return out


class SpatiaAttention(nn.Module):
    """Multi-head attention; self-attention uses one fused ``qkv`` projection, cross-attention a
    ``q`` and a fused ``kv`` projection. Dispatches on ``config._attn_implementation``."""

    is_causal = False

    def __init__(self, config, hidden_size: int, num_heads: int, cross: bool = False, dropout: float = 0.0):
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = dropout
        self.cross = cross
        if cross:
            self.q_proj = nn.Linear(hidden_size, hidden_size)
            self.kv_proj = nn.Linear(hidden_size, 2 * hidden_size)
        else:
            self.qkv_proj = nn.Linear(hidden_size, 3 * hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def key_metric(self, x: torch.Tensor) -> torch.Tensor:
        """Keys of ``x`` (``[B, N, D]``, already normalised), the similarity used by token merging."""
        d = self.hidden_size
        return F.linear(x, self.qkv_proj.weight[d : 2 * d], self.qkv_proj.bias[d : 2 * d])

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``attention_mask`` is additive, ``[B, 1, 1 or Lq, Lk]``; ``context`` is the key/value
        sequence of cross-attention."""
        if self.cross:
            q = self.q_proj(hidden_states)
            k, v = self.kv_proj(context).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv_proj(hidden_states).chunk(3, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            getattr(self.config, "_attn_implementation", None) or "sdpa", eager_attention_forward
        )
        out, _ = interface(
            self, q, k, v, attention_mask,
            dropout=self.dropout if self.training else 0.0, scaling=self.scaling, is_causal=False,
        )
        return self.out_proj(out.reshape(hidden_states.shape[0], hidden_states.shape[1], self.hidden_size))


class SpatiaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SpatiaBlock(GradientCheckpointingLayer):
    """Pre-norm block: self-attention, optional cross-attention to a context sequence, MLP."""

    def __init__(
        self,
        config,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        intermediate_size: int | None = None,
        cross_attention: bool = False,
    ):
        super().__init__()
        d = hidden_size or config.hidden_size
        h = num_heads or config.num_attention_heads
        eps = config.layer_norm_eps
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.attention = SpatiaAttention(config, d, h, dropout=config.attention_dropout)
        if cross_attention:
            self.norm_cross = nn.LayerNorm(d, eps=eps)
            self.norm_context = nn.LayerNorm(d, eps=eps)
            self.cross_attention = SpatiaAttention(config, d, h, cross=True, dropout=config.attention_dropout)
        else:
            self.cross_attention = None
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.mlp = SpatiaMLP(d, intermediate_size or config.intermediate_size, config.hidden_act)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # transformers' ``chunk_size_feed_forward`` (0 = off): run norm2 + MLP on this many tokens at
        # a time, so the [N, intermediate] activation never exists whole (a memory option for
        # long sequences such as a section's niches; each token's values are unchanged).
        self.chunk_size_feed_forward = int(getattr(config, "chunk_size_feed_forward", 0) or 0)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.mlp(self.norm2(x)))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = hidden_states
        x = x + self.dropout(self.attention(self.norm1(x), attention_mask))
        if self.cross_attention is not None and context is not None:
            x = x + self.dropout(self.cross_attention(self.norm_cross(x), context_mask, self.norm_context(context)))
        if self.chunk_size_feed_forward > 0 and x.shape[1] > self.chunk_size_feed_forward:
            return token_chunked(self._feed_forward, x, chunk=self.chunk_size_feed_forward).add_(x)
        return x + self.dropout(self.mlp(self.norm2(x)))


class SpatiaFusionLayer(GradientCheckpointingLayer):
    """One fusion step over the image stream and the gene stream.

    With cross-attention, image tokens attend to gene tokens and gene tokens to image tokens
    (both read the other stream's input state, so the update is symmetric). A missing stream
    (image-only or expression-only input) is passed as None and skipped.
    """

    def __init__(self, config, cross_attention: bool):
        super().__init__()
        self.image_block = SpatiaBlock(config, cross_attention=cross_attention)
        self.gene_block = SpatiaBlock(config, cross_attention=cross_attention)

    def forward(self, image_states, image_mask, gene_states, gene_mask):
        new_image = self.image_block(image_states, image_mask, gene_states, gene_mask) if image_states is not None else None
        new_genes = self.gene_block(gene_states, gene_mask, image_states, image_mask) if gene_states is not None else None
        return new_image, new_genes


def fourier_position_features(
    positions_um: torch.Tensor, min_wavelength_um: float, max_wavelength_um: float, num_frequencies: int
) -> torch.Tensor:
    """``[..., 2]`` positions in µm -> ``[..., 4 * num_frequencies]`` sin/cos features.

    Wavelengths are geometric between the two bounds, so the encoding resolves both a cell
    diameter and a whole niche (or section) without a 1-D index: permuting tokens permutes it.
    """
    f = torch.arange(num_frequencies, device=positions_um.device, dtype=torch.float32)
    ratio = max_wavelength_um / min_wavelength_um
    wavelengths = min_wavelength_um * ratio ** (f / max(num_frequencies - 1, 1))
    angles = 2 * math.pi * positions_um.float()[..., None] / wavelengths  # [..., 2, F]
    feats = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)
    return feats.to(positions_um.dtype if positions_um.is_floating_point() else torch.float32)


class SpatiaPositionEncoder(nn.Module):
    """Fourier features of µm positions projected to the model width."""

    def __init__(self, hidden_size: int, min_wavelength_um: float, max_wavelength_um: float, num_frequencies: int):
        super().__init__()
        self.min_wavelength_um = min_wavelength_um
        self.max_wavelength_um = max_wavelength_um
        self.num_frequencies = num_frequencies
        self.proj = nn.Linear(4 * num_frequencies, hidden_size)

    def forward(self, positions_um: torch.Tensor) -> torch.Tensor:
        feats = fourier_position_features(
            positions_um, self.min_wavelength_um, self.max_wavelength_um, self.num_frequencies
        )
        return self.proj(feats.to(self.proj.weight.dtype))

    @classmethod
    def from_config(cls, config) -> "SpatiaPositionEncoder":
        """The encoder a niche or tissue config describes (its ``hidden_size`` and position fields)."""
        return cls(config.hidden_size, config.position_min_wavelength_um, config.position_max_wavelength_um,
                   config.num_position_frequencies)


def check_token_set(kind: str, embeddings: torch.Tensor, positions: torch.Tensor,
                    attention_mask: torch.Tensor | None, width: int, source: str, frame: str) -> None:
    """Shapes of a set of ``kind`` tokens with µm positions (the cells of a niche, the niches of a
    section): ``{kind}_embeddings [B, N, width]`` made by the ``source`` model, ``{kind}_positions
    [B, N, 2]`` (``frame`` says relative to what), ``{kind}_attention_mask [B, N]``."""
    if embeddings.dim() != 3 or embeddings.shape[-1] != width:
        raise ValueError(f"{kind}_embeddings: expected [batch, {kind}s, {width}], got {tuple(embeddings.shape)}. "
                         f"Fix: embed {kind}s with the matching {source} model")
    if positions.shape != (*embeddings.shape[:2], 2):
        raise ValueError(f"{kind}_positions: expected {(*embeddings.shape[:2], 2)} ({frame}), "
                         f"got {tuple(positions.shape)}")
    if attention_mask is not None and attention_mask.shape != embeddings.shape[:2]:
        raise ValueError(f"{kind}_attention_mask: expected {tuple(embeddings.shape[:2])}, "
                         f"got {tuple(attention_mask.shape)}")


def sincos_2d(grid: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding of a ``grid x grid`` patch grid (MAE), ``[grid * grid, dim]``."""
    if dim % 4:
        raise ValueError(f"hidden_size={dim}: the 2-D sin-cos patch encoding needs a multiple of 4. Fix: change it")
    coords = torch.arange(grid, device=device, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim // 4))
    parts = []
    for c in (xx.flatten(), yy.flatten()):
        out = c[:, None] * omega[None]
        parts += [out.sin(), out.cos()]
    return torch.cat(parts, dim=1).to(dtype)


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)*(W/p), p*p*C]`` (row-major patches, MAE order)."""
    b, c, h, w = pixel_values.shape
    p = patch_size
    x = pixel_values.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, num_channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for square images."""
    b, n, _ = patches.shape
    g = int(round(math.sqrt(n)))
    p = patch_size
    x = patches.reshape(b, g, g, p, p, num_channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, num_channels, g * p, g * p)


def random_patch_mask(batch_size: int, num_patches: int, ratio: float, device=None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """``[B, P]`` bool, exactly ``round(ratio * P)`` True (hidden) per row, as MAE needs equal counts."""
    n_mask = int(round(ratio * num_patches))
    n_mask = min(max(n_mask, 0), num_patches - 1)
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < n_mask


def random_token_mask(attention_mask: torch.Tensor, ratio: float, generator: torch.Generator | None = None,
                      min_keep: int = 1) -> torch.Tensor:
    """``[B, L]`` bool mask hiding ``ratio`` of each row's real tokens (at least one when a row has
    more than ``min_keep`` real tokens, never all of them)."""
    real = attention_mask.bool()
    noise = torch.rand(real.shape, device=real.device, generator=generator)
    noise = noise.masked_fill(~real, 2.0)  # padding sorts last, never chosen
    ranks = noise.argsort(dim=1).argsort(dim=1)
    n_real = real.sum(dim=1, keepdim=True)
    n_mask = (n_real.float() * ratio).round().long()
    n_mask = torch.where(n_real > min_keep, n_mask.clamp(min=1), torch.zeros_like(n_mask))
    n_mask = torch.minimum(n_mask, (n_real - min_keep).clamp(min=0))
    return (ranks < n_mask) & real


def init_module_parameters(module: nn.Module, std: float) -> None:
    """Initialise the extra ``nn.Parameter``s of SPATIA modules (called from ``_init_weights``).

    Linear/Embedding/LayerNorm are handled by transformers' default; modules that own raw
    parameters define ``_spatia_init(std)`` and use ``transformers.initialization`` functions,
    which respect the already-loaded flags when a checkpoint is read.
    """
    fn = getattr(module, "_spatia_init", None)
    if fn is not None:
        fn(std)


__all__ = [
    "SpatiaAttention",
    "SpatiaBlock",
    "SpatiaFusionLayer",
    "SpatiaMLP",
    "SpatiaPositionEncoder",
    "additive_mask",
    "token_chunked",
    "fourier_position_features",
    "sincos_2d",
    "patchify",
    "unpatchify",
    "random_patch_mask",
    "random_token_mask",
]
