"""Spatially guided token merging in a diffusers denoiser's self-attention (a faster generator).

On a CPU the full-resolution self-attention of a small UNet dominates its time (attention is
quadratic in the ``H*W`` image tokens). Like tomesd (ToMe for Stable Diffusion) we merge
similar image tokens before self-attention and unmerge the attention output afterwards, so
attention runs on ``N - r`` tokens and the rest of the network is untouched. Unlike tomesd, the
matching is the package's own :func:`~spatia_hf.models.token_merging.spatial_bipartite_matching`, the
same code path the tissue transformer uses:

* a source token may merge only into one of its ``k`` nearest destination tokens on the token
  grid (:func:`~spatia_hf.models.token_merging.grid_positions`, destinations on a 2x2 stride as in
  tomesd), so merges stay local and the matching costs ``N x k`` dot products instead of tomesd's
  dense ``(3N/4) x (N/4)`` similarity matrix; the neighbour lists depend only on the grid size and
  are cached per resolution;
* similarity is the cosine of the attention keys (averaged over heads), the quantity attention
  compares. Keys are computed once on all tokens; merging them with the same weights gives exactly
  the keys of the merged tokens (``to_k`` is affine), so nothing is computed twice;
* the partition is fixed (no random destination choice), so outputs are deterministic;
* ``ratio = 0`` restores the original processors' computation exactly.

Use::

    with apply_token_merging(unet, ratio=0.5):        # or pipe; context manager or plain call
        noise_pred = unet(latents, t, encoder_hidden_states=cond).sample
    remove_token_merging(unet)                        # when used as a plain call
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.token_merging import (
    SpatialNeighbours,
    grid_destination_mask,
    grid_positions,
    merge_count,
    proportional_attention_bias,
    spatial_bipartite_matching,
    spatial_neighbours,
)

__all__ = [
    "DenoiserMergingConfig",
    "SpatialMergingAttnProcessor",
    "TokenMergingHandle",
    "apply_token_merging",
    "remove_token_merging",
]

_STATE_ATTR = "_spatia_token_merging"
_MAX_LEVELS = 8  # token grids down to 1/256 of the input resolution are recognised


@dataclass
class DenoiserMergingConfig:
    """How much and where to merge.

    Attributes:
        ratio: fraction of a block's image tokens merged away before self-attention, in
            ``[0, 1 - 1/stride**2)``; 0 turns merging off exactly.
        max_downsample: merge only in blocks whose token grid is at most this many times coarser
            than the model input (1 = only the highest resolution, like tomesd's default).
        k: destinations each source may choose from (its k nearest on the grid).
        stride: destinations are the top-left token of every ``stride x stride`` block.
        merge_queries: also merge the queries (attention on ``(N-r) x (N-r)``, output unmerged,
            as tomesd); False merges only keys/values (``N x (N-r)``: less speed-up, less change).
        proportional_attention: add ``log(size)`` to merged keys' logits so a merged token gets
            the attention its members would have had.
    """

    ratio: float = 0.5
    max_downsample: int = 1
    k: int = 4
    stride: int = 2
    merge_queries: bool = True
    proportional_attention: bool = True

    def __post_init__(self) -> None:
        limit = 1.0 - 1.0 / (self.stride * self.stride)
        if not 0.0 <= float(self.ratio) < limit:
            raise ValueError(
                f"ratio={self.ratio}; use a fraction in [0, {limit:.3f}) for stride {self.stride} "
                "(0 disables merging; 0.5 is tomesd's default)."
            )
        if int(self.max_downsample) < 1 or self.max_downsample & (self.max_downsample - 1):
            raise ValueError(f"max_downsample={self.max_downsample}; use a power of two: 1, 2, 4 or 8.")
        if int(self.k) < 1:
            raise ValueError(f"k={self.k}; each source needs at least one candidate destination.")
        if int(self.stride) < 2:
            raise ValueError(f"stride={self.stride}; use 2 or more (1 would leave no source tokens).")


@dataclass
class _MergingState:
    """Shared by all patched processors of one model: config, input grid size, neighbour cache."""

    config: DenoiserMergingConfig
    base_grid: tuple[int, int] | None = None
    patch_size: int = 1
    hooks: list[Any] = field(default_factory=list)
    processors: dict[str, Any] = field(default_factory=dict)
    merged_calls: dict[tuple[int, int], int] = field(default_factory=dict)
    _cache: dict[tuple, SpatialNeighbours] = field(default_factory=dict)

    def grid_for(self, num_tokens: int) -> tuple[int, int, int] | None:
        """(height, width, downsample) of the token grid with ``num_tokens`` tokens, if any."""
        if self.base_grid is None:
            return None
        h0, w0 = self.base_grid
        for level in range(_MAX_LEVELS + 1):
            ds = 1 << level
            h, w = math.ceil(h0 / ds), math.ceil(w0 / ds)
            if h * w == num_tokens:
                return h, w, ds
            if h * w < num_tokens:
                break
        return None

    def neighbours(self, height: int, width: int, device: torch.device) -> SpatialNeighbours:
        key = (height, width, self.config.k, self.config.stride, str(device))
        if key not in self._cache:
            self._cache[key] = spatial_neighbours(
                grid_positions(height, width, device=device),
                k=self.config.k,
                dst_mask=grid_destination_mask(height, width, self.config.stride, device=device),
            )
        return self._cache[key]


class SpatialMergingAttnProcessor:
    """Self-attention processor that merges image tokens, attends, and unmerges the output.

    Wraps the module's original processor and hands every call it does not merge (merging off,
    a resolution coarser than ``max_downsample``, cross-attention, masks, 4-D inputs) back to it
    unchanged.
    """

    def __init__(self, state: _MergingState, original: Any) -> None:
        self.state = state
        self.original = original
        params = inspect.signature(original.__call__).parameters
        self._original_takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._original_params = set(params)

    def _delegate(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, args, kwargs) -> Tensor:
        """Call the original processor with what it accepts (as ``Attention.forward`` would)."""
        if args:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if temb is not None:
            kwargs = {**kwargs, "temb": temb}
        if not self._original_takes_any:
            kwargs = {k: v for k, v in kwargs.items() if k in self._original_params}
        return self.original(
            attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
        )

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        cfg = self.state.config
        plain = (
            hidden_states.dim() == 3
            and encoder_hidden_states is None
            and attention_mask is None
            and attn.spatial_norm is None
            and attn.group_norm is None
            and not args
            and not kwargs
        )
        grid = self.state.grid_for(hidden_states.shape[1]) if plain and cfg.ratio > 0 else None
        r = merge_count(hidden_states.shape[1], cfg.ratio) if grid is not None else 0
        if grid is None or grid[2] > cfg.max_downsample or r == 0:
            return self._delegate(attn, hidden_states, encoder_hidden_states, attention_mask, temb, args, kwargs)
        height, width, _ = grid
        self.state.merged_calls[(height, width)] = self.state.merged_calls.get((height, width), 0) + 1
        return self._merged_attention(attn, hidden_states, height, width, r)

    def _merged_attention(self, attn, hidden_states: Tensor, height: int, width: int, r: int) -> Tensor:
        cfg = self.state.config
        residual = hidden_states
        batch, _, _ = hidden_states.shape
        key = attn.to_k(hidden_states)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        metric = key.view(batch, -1, heads, head_dim).mean(2)
        info = spatial_bipartite_matching(
            metric, None, r, neighbours=self.state.neighbours(height, width, hidden_states.device)
        )
        merged = info.merge(hidden_states)
        key = info.merge(key)  # == attn.to_k(merged): to_k is affine and merge weights sum to one
        value = attn.to_v(merged)
        query = attn.to_q(merged if cfg.merge_queries else hidden_states)

        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        bias = None
        if cfg.proportional_attention:
            sizes = info.merge_sizes(torch.ones(batch, info.num_tokens, device=query.device, dtype=query.dtype))
            bias = proportional_attention_bias(sizes)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if cfg.merge_queries:
            out = info.unmerge(out)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class TokenMergingHandle:
    """Returned by :func:`apply_token_merging`; a context manager that removes the patch on exit."""

    def __init__(self, model: torch.nn.Module, state: _MergingState) -> None:
        self.model = model
        self._state = state

    @property
    def config(self) -> DenoiserMergingConfig:
        """The live configuration (``ratio``, ``max_downsample`` ... may be changed between calls)."""
        return self._state.config

    @property
    def merged_calls(self) -> dict[tuple[int, int], int]:
        """How many self-attention calls merged, per token grid (height, width): shows where it acts."""
        return dict(self._state.merged_calls)

    def remove(self) -> None:
        if getattr(self.model, _STATE_ATTR, None) is self._state:
            remove_token_merging(self.model)

    def __enter__(self) -> TokenMergingHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _denoiser_of(model: Any) -> torch.nn.Module:
    for name in ("unet", "transformer"):
        inner = getattr(model, name, None)
        if isinstance(inner, torch.nn.Module):
            return inner
    if isinstance(model, torch.nn.Module):
        return model
    raise TypeError(
        f"model is a {type(model).__name__}; pass a diffusers UNet2DConditionModel / transformer, "
        "or a pipeline with a .unet or .transformer."
    )


def _self_attention_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from diffusers.models.attention import BasicTransformerBlock

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, BasicTransformerBlock) and not module.only_cross_attention:
            found[f"{name}.attn1" if name else "attn1"] = module.attn1
    return found


def apply_token_merging(
    model: Any,
    ratio: float = 0.5,
    *,
    max_downsample: int = 1,
    k: int = 4,
    stride: int = 2,
    merge_queries: bool = True,
    proportional_attention: bool = True,
) -> TokenMergingHandle:
    """Merge image tokens in every self-attention of a diffusers denoiser (see the module doc).

    Args:
        model: a ``UNet2DConditionModel``, a transformer built from ``BasicTransformerBlock``
            (e.g. ``PixArtTransformer2DModel``), or a pipeline holding one as ``.unet`` /
            ``.transformer``. Patched in place; applying again replaces the previous patch.
        ratio, max_downsample, k, stride, merge_queries, proportional_attention: see
            :class:`DenoiserMergingConfig`.

    Returns:
        A handle: use it as a context manager, or call ``remove_token_merging(model)``.
    """
    config = DenoiserMergingConfig(
        ratio=float(ratio),
        max_downsample=int(max_downsample),
        k=int(k),
        stride=int(stride),
        merge_queries=bool(merge_queries),
        proportional_attention=bool(proportional_attention),
    )
    denoiser = _denoiser_of(model)
    remove_token_merging(denoiser)
    targets = _self_attention_modules(denoiser)
    if not targets:
        raise ValueError(
            f"{type(denoiser).__name__} has no BasicTransformerBlock self-attention to merge in; "
            "token merging supports UNet2DConditionModel with cross-attention blocks and DiT-style transformers."
        )
    patch = getattr(getattr(denoiser, "config", None), "patch_size", None) or 1
    state = _MergingState(config=config, patch_size=int(patch))

    def record_size(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if isinstance(sample, Tensor) and sample.dim() == 4:
            state.base_grid = (math.ceil(sample.shape[-2] / state.patch_size), math.ceil(sample.shape[-1] / state.patch_size))
        else:
            state.base_grid = None

    state.hooks.append(denoiser.register_forward_pre_hook(record_size, with_kwargs=True))
    for name, attn in targets.items():
        state.processors[name] = attn.processor
        attn.set_processor(SpatialMergingAttnProcessor(state, attn.processor))
    setattr(denoiser, _STATE_ATTR, state)
    return TokenMergingHandle(denoiser, state)


def remove_token_merging(model: Any) -> None:
    """Undo :func:`apply_token_merging`: restore the original processors and remove the hook."""
    denoiser = _denoiser_of(model)
    state: _MergingState | None = getattr(denoiser, _STATE_ATTR, None)
    if state is None:
        return
    for hook in state.hooks:
        hook.remove()
    modules = dict(denoiser.named_modules())
    for name, original in state.processors.items():
        attn = modules.get(name)
        if attn is not None and isinstance(attn.processor, SpatialMergingAttnProcessor):
            attn.set_processor(original)
    delattr(denoiser, _STATE_ATTR)
