"""The tissue scale: every niche of a section, with spatially guided token merging.

A section has 10^3-10^5 niche tokens. At the start of each layer the tokens that are spatial
neighbours *and* have similar attention keys are merged (ToMe bipartite matching restricted to
the ``merge_k`` nearest neighbours, :mod:`spatia_hf.models.token_merging`), so even the first attention
runs on the reduced set. Merged tokens are size-weighted means, attention is proportional
(``log size`` added to the logits), and every merge is recorded so the final tokens unmerge back
to one output per input niche. ``merge_ratio=0`` never calls the matching and is exactly the plain
transformer. ``merge_input_ratio`` (off by default) also merges niches before the input projection,
so no activation exists at the full niche count; the full-size stages that remain (input features,
merge keys) run in token chunks, and the merge never copies the whole token set.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration_spatia import SpatiaTissueConfig
from .modeling_base import SpatiaPreTrainedModel
from .modeling_layers import SpatiaBlock, SpatiaPositionEncoder, additive_mask, check_token_set, token_chunked
from .modeling_outputs import SpatiaTissueOutput
from .token_merging import (
    MergeTracker,
    merge_count,
    proportional_attention_bias,
    spatial_bipartite_matching,
    spatial_neighbours,
)


# Tokens per chunk for the stages that run at the full niche count (input features, merge keys):
# their scratch stays O(chunk x D) instead of several [N, D] copies. Row-wise ops, same values.
_TOKEN_CHUNK = 2048


def _rowwise(fn, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
    return token_chunked(fn, x, *rest, chunk=_TOKEN_CHUNK)


class SpatiaTissueLayer(SpatiaBlock):
    """A pre-norm transformer block; its keys double as the merge similarity."""

    def merge_metric(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Keys this layer would compute for ``hidden_states``: ``[B, N, D]`` (chunked over tokens)."""
        return _rowwise(lambda h: self.attention.key_metric(self.norm1(h)), hidden_states)


class SpatiaTissueModel(SpatiaPreTrainedModel):
    """Niche embeddings + µm positions of a section -> tissue embedding and per-niche outputs."""

    config_class = SpatiaTissueConfig
    config: SpatiaTissueConfig
    base_model_prefix = "tissue"
    main_input_name = "niche_embeddings"

    def __init__(self, config: SpatiaTissueConfig):
        super().__init__(config)
        d = config.hidden_size
        self.input_proj = nn.Linear(config.niche_embed_dim, d)
        self.position_encoder = SpatiaPositionEncoder.from_config(config)
        self.input_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList([SpatiaTissueLayer(config) for _ in range(config.num_hidden_layers)])
        self.final_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.post_init()

    def check_inputs(self, niche_embeddings, niche_positions, niche_attention_mask) -> None:
        check_token_set("niche", niche_embeddings, niche_positions, niche_attention_mask, self.config.niche_embed_dim,
                        "niche", "x, y in µm")

    def forward(
        self,
        niche_embeddings: torch.Tensor,
        niche_positions: torch.Tensor,
        niche_attention_mask: torch.Tensor | None = None,
        merge_ratio: float | list[float] | None = None,
        return_dict: bool | None = None,
    ) -> SpatiaTissueOutput | tuple:
        """Args:
            niche_embeddings: ``[B, M, niche_embed_dim]``.
            niche_positions: ``[B, M, 2]`` niche centres in µm (section coordinates).
            niche_attention_mask: ``[B, M]`` 1 = real niche, 0 = padding.
            merge_ratio: overrides the config's per-layer merge fractions for this call (e.g. 0 to
                compare with the unmerged model using the same weights: 0 also skips the config's
                ``merge_input_ratio``).
        """
        self.check_inputs(niche_embeddings, niche_positions, niche_attention_mask)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        b, m = niche_embeddings.shape[:2]
        ratios = self._ratios(merge_ratio)
        mask = (torch.ones(b, m, dtype=torch.bool, device=niche_embeddings.device) if niche_attention_mask is None
                else niche_attention_mask.bool())
        positions = niche_positions.to(torch.float32)
        # a call-time merge_ratio of 0 means "the unmerged model": the input merge is off too
        input_ratio = 0.0 if merge_ratio is not None and not any(ratios) else self.config.merge_input_ratio
        merging = any(r > 0 for r in ratios) or input_ratio > 0
        tracker = MergeTracker(positions=positions, attention_mask=mask) if merging else None
        num_tokens = [m]
        emb = niche_embeddings
        left = merge_count(m, input_ratio) if input_ratio > 0 else 0
        while left > 0:  # merge similar neighbouring niches before any full-size activation exists;
            # bipartite rounds of at most half the tokens each, until the input ratio is reached
            info = self._match(emb, tracker, min(left, emb.shape[1] // 2), sizes=tracker.num_tokens < m)
            if info.is_identity:
                break
            emb = info.merge(emb, mode="mean")
            tracker.push(info)
            left -= info.r
        x = _rowwise(self._embed, emb, tracker.positions if tracker is not None else positions)
        del emb
        input_merged = tracker is not None and tracker.num_tokens < m
        bias = self._bias(tracker, x.dtype) if input_merged else additive_mask(mask, x.dtype)
        for layer, ratio in zip(self.layers, ratios):
            r = merge_count(x.shape[1], ratio) if ratio > 0 else 0
            if r > 0:
                metric = layer.merge_metric(x)
                info = self._match(metric, tracker, r)
                del metric
                x = info.merge(x, mode="mean")
                tracker.push(info)
                bias = self._bias(tracker, x.dtype)
            x = layer(x, bias)
            num_tokens.append(x.shape[1])
        x = self.final_norm(x)

        if tracker is not None:
            sizes, final_mask, final_pos = tracker.sizes, tracker.attention_mask, tracker.positions
            per_niche = tracker.unmerge_all(x)
        else:
            sizes, final_mask, final_pos, per_niche = torch.ones(b, m, device=x.device), mask, positions, x
        w = (sizes * final_mask).to(x.dtype)[..., None]
        tissue_embeds = (x * w).sum(1) / w.sum(1).clamp(min=1.0)
        out = SpatiaTissueOutput(
            tissue_embeds=tissue_embeds,
            niche_embeds=per_niche,
            merged_hidden_state=x,
            merged_sizes=sizes,
            merged_positions=final_pos,
            merged_attention_mask=final_mask,
            num_tokens=tuple(num_tokens),
        )
        return out if return_dict else out.to_tuple()

    def _embed(self, niche_embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Input tokens: projected niche embeddings plus position features, normalised (token-wise)."""
        x = self.input_proj(niche_embeddings)
        x += self.position_encoder(positions).to(niche_embeddings.dtype)
        return self.input_norm(x)

    def _match(self, metric: torch.Tensor, tracker: MergeTracker, r: int, sizes: bool = True):
        """Spatial bipartite matching of the tracker's current tokens (neighbours searched first,
        so the search scratch and the metric are never live together with the matching's)."""
        cfg = self.config
        neighbours = spatial_neighbours(tracker.positions, k=cfg.merge_k, radius=cfg.merge_radius_um,
                                        attention_mask=tracker.attention_mask)
        return spatial_bipartite_matching(metric, None, r, sizes=tracker.sizes if sizes else None,
                                          attention_mask=tracker.attention_mask, neighbours=neighbours)

    def _ratios(self, merge_ratio) -> list[float]:
        if merge_ratio is None:
            return self.config.layer_merge_ratios()
        if isinstance(merge_ratio, (list, tuple)):
            if len(merge_ratio) != len(self.layers):
                raise ValueError(f"merge_ratio: {len(merge_ratio)} values for {len(self.layers)} layers. "
                                 "Fix: give one per layer or a single float")
            return [float(r) for r in merge_ratio]
        return [float(merge_ratio)] * len(self.layers)

    def _bias(self, tracker: MergeTracker, dtype: torch.dtype) -> torch.Tensor:
        if not self.config.proportional_attention:
            return additive_mask(tracker.attention_mask, dtype)
        bias = proportional_attention_bias(tracker.sizes, tracker.attention_mask, dtype=dtype)
        return bias.clamp(min=torch.finfo(dtype).min)  # finite: an all-padding row cannot become NaN


__all__ = ["SpatiaTissueModel", "SpatiaTissueLayer"]
