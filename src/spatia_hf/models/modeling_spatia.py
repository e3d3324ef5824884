"""The composite SPATIA model: cell, niche and tissue scales in one checkpoint.

``SpatiaModel.forward`` runs the scale its inputs call for:

- cell inputs (``pixel_values [B, C, H, W]`` and/or ``gene_ids [B, L]``) -> the cell model;
- niche inputs (``cell_positions [B, N, 2]`` with ``cell_embeddings [B, N, D]`` or raw per-cell
  inputs with a leading niche dimension, ``pixel_values [B, N, C, H, W]`` / ``gene_ids [B, N, L]``,
  routed through the cell model) -> the niche model;
- tissue inputs (``niche_embeddings [B, M, D]``, ``niche_positions``) -> the tissue model.

``embed_cells`` / ``embed_niches`` / ``embed_tissue`` run many samples in batches without
gradients and return numpy (default) or torch.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from .configuration_spatia import SpatiaConfig
from .modeling_base import SpatiaPreTrainedModel
from .modeling_cell import SpatiaCellModel
from .modeling_niche import SpatiaNicheModel, pick_cells, real_cell_index, scatter_cells
from .modeling_outputs import SpatiaCellOutput, SpatiaModelOutput
from .modeling_tissue import SpatiaTissueModel

CELL_INPUTS = ("pixel_values", "gene_ids", "gene_values", "gene_attention_mask")


class SpatiaModel(SpatiaPreTrainedModel):
    """Cell, niche and tissue models under one config (``model.cell``, ``model.niche``, ``model.tissue``)."""

    config_class = SpatiaConfig
    config: SpatiaConfig
    base_model_prefix = "spatia"
    main_input_name = "gene_ids"

    def __init__(self, config: SpatiaConfig):
        super().__init__(config)
        self.cell = SpatiaCellModel(config.cell_config)
        self.niche = SpatiaNicheModel(config.niche_config)
        self.tissue = SpatiaTissueModel(config.tissue_config)
        self.post_init()

    # ------------------------------------------------------------------ niche routing
    def expression_profiles(self, gene_ids: torch.Tensor, gene_values: torch.Tensor,
                            gene_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """A linear expression profile per cell: its gene embeddings weighted by their log1p values,
        summed and layer-normalised (no affine), ``[..., cell hidden_size]``. The niche model adds it
        to each member token (``use_expression_profiles``), so a neighbourhood sees its members'
        expression directly (like smoothed PCA would), not only through the cell embedding."""
        mask = (gene_ids != 0) if gene_attention_mask is None else gene_attention_mask.bool()
        table = self.cell.expression_encoder.gene_embeddings
        weights = (gene_values * mask).to(table.weight.dtype)[..., None]
        profile = (table(gene_ids) * weights).sum(-2)
        return torch.nn.functional.layer_norm(profile, profile.shape[-1:])

    def encode_niche_cells(
        self,
        cell_attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None = None,
        gene_ids: torch.Tensor | None = None,
        gene_values: torch.Tensor | None = None,
        gene_attention_mask: torch.Tensor | None = None,
        **cell_kwargs,
    ) -> tuple[SpatiaCellOutput, torch.Tensor, torch.Tensor]:
        """Raw per-cell inputs with a leading niche dimension -> cell model on the real cells only.

        Returns ``(cell outputs of the real cells [n_real, ...], embeddings [B, N, D], index of the
        real cells in the flattened [B*N] order)``. Extra ``cell_kwargs`` (``gene_value_mask``,
        ``image_patch_mask``) must already be given per real cell.
        """
        ref = pixel_values if pixel_values is not None else gene_ids
        if ref is None:
            raise ValueError("niche inputs need cell_embeddings or raw per-cell inputs (pixel_values/gene_ids "
                             "with a leading niche dimension)")
        b, n = ref.shape[:2]
        if pixel_values is not None and pixel_values.dim() != 5:
            raise ValueError(f"pixel_values: niche inputs need [batch, cells, C, H, W], got {tuple(pixel_values.shape)}")
        if gene_ids is not None and gene_ids.dim() != 3:
            raise ValueError(f"gene_ids: niche inputs need [batch, cells, genes], got {tuple(gene_ids.shape)}")
        index = real_cell_index(cell_attention_mask, (b, n), ref.device)
        out = self.cell(pixel_values=pick_cells(pixel_values, index, (b, n)),
                        gene_ids=pick_cells(gene_ids, index, (b, n)),
                        gene_values=pick_cells(gene_values, index, (b, n)),
                        gene_attention_mask=pick_cells(gene_attention_mask, index, (b, n)),
                        return_dict=True, **cell_kwargs)
        return out, scatter_cells(out.cell_embeds, index, (b, n)), index

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        gene_ids: torch.Tensor | None = None,
        gene_values: torch.Tensor | None = None,
        gene_attention_mask: torch.Tensor | None = None,
        cell_embeddings: torch.Tensor | None = None,
        cell_positions: torch.Tensor | None = None,
        cell_attention_mask: torch.Tensor | None = None,
        niche_pixel_values: torch.Tensor | None = None,
        niche_embeddings: torch.Tensor | None = None,
        niche_positions: torch.Tensor | None = None,
        niche_attention_mask: torch.Tensor | None = None,
        cell_profiles: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> SpatiaModelOutput | tuple:
        """Runs the tissue model when ``niche_embeddings`` are given, the niche model when
        ``cell_positions`` are given, otherwise the cell model. Shapes: see the module docstring."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if niche_embeddings is not None:
            if niche_positions is None:
                raise ValueError("niche_embeddings given without niche_positions. Fix: pass [B, M, 2] µm positions")
            t = self.tissue(niche_embeddings, niche_positions, niche_attention_mask, return_dict=True)
            out = SpatiaModelOutput(niche_embeds=t.niche_embeds, tissue_embeds=t.tissue_embeds, tissue_outputs=t)
        elif cell_positions is not None:
            cell_out, profiles = None, cell_profiles
            if cell_embeddings is None:
                cell_out, cell_embeddings, _ = self.encode_niche_cells(
                    cell_attention_mask, pixel_values, gene_ids, gene_values, gene_attention_mask
                )
            if (profiles is None and self.config.niche_config.use_expression_profiles and gene_ids is not None
                    and gene_ids.dim() == 3):
                profiles = self.expression_profiles(gene_ids, gene_values, gene_attention_mask)
            nout = self.niche(cell_embeddings, cell_positions, cell_attention_mask, niche_pixel_values,
                              cell_profiles=profiles, return_dict=True)
            out = SpatiaModelOutput(cell_embeds=nout.cell_embeds, niche_embeds=nout.niche_embeds,
                                    cell_outputs=cell_out, niche_outputs=nout)
        else:
            cell_out = self.cell(pixel_values, gene_ids, gene_values, gene_attention_mask, return_dict=True)
            out = SpatiaModelOutput(cell_embeds=cell_out.cell_embeds, cell_outputs=cell_out)
        return out if return_dict else out.to_tuple()

    # ------------------------------------------------------------------ batched embedding helpers
    @torch.no_grad()
    def embed_cells(
        self,
        pixel_values: Any = None,
        gene_ids: Any = None,
        gene_values: Any = None,
        gene_attention_mask: Any = None,
        *,
        batch: dict | None = None,
        batch_size: int = 64,
        return_tensors: str = "np",
    ):
        """Cell embeddings ``[n, D]`` of many cells; give tensors/arrays or a processor ``batch``.

        Image-only or expression-only input works (pass only that modality).
        """
        inputs = _collect(batch, pixel_values=pixel_values, gene_ids=gene_ids, gene_values=gene_values,
                          gene_attention_mask=gene_attention_mask)
        return self._run_batched(lambda kw: self.cell(**kw, return_dict=True).cell_embeds, inputs, batch_size,
                                 return_tensors)

    @torch.no_grad()
    def embed_niches(
        self,
        cell_positions: Any = None,
        cell_embeddings: Any = None,
        cell_attention_mask: Any = None,
        niche_pixel_values: Any = None,
        cell_profiles: Any = None,
        *,
        pixel_values: Any = None,
        gene_ids: Any = None,
        gene_values: Any = None,
        gene_attention_mask: Any = None,
        batch: dict | None = None,
        batch_size: int = 16,
        return_cell_embeddings: bool = False,
        return_tensors: str = "np",
    ):
        """Niche embeddings ``[n, D]`` (and context-aware cells ``[n, N, D]`` when
        ``return_cell_embeddings``) from cell embeddings or raw per-cell inputs + µm positions."""
        inputs = _collect(batch, cell_positions=cell_positions, cell_embeddings=cell_embeddings,
                          cell_attention_mask=cell_attention_mask, niche_pixel_values=niche_pixel_values,
                          cell_profiles=cell_profiles, pixel_values=pixel_values, gene_ids=gene_ids, gene_values=gene_values,
                          gene_attention_mask=gene_attention_mask)
        if "cell_positions" not in inputs:
            raise ValueError("embed_niches needs cell_positions ([n, N, 2] µm relative to each niche centre)")

        def run(kw):
            o = self.forward(**kw, return_dict=True)
            return (o.niche_embeds, o.cell_embeds) if return_cell_embeddings else o.niche_embeds

        return self._run_batched(run, inputs, batch_size, return_tensors)

    @torch.no_grad()
    def embed_tissue(
        self,
        niche_embeddings: Any = None,
        niche_positions: Any = None,
        niche_attention_mask: Any = None,
        *,
        batch: dict | None = None,
        batch_size: int = 1,
        return_niche_embeddings: bool = False,
        return_tensors: str = "np",
    ):
        """Tissue embeddings ``[n, D]`` of sections (and per-niche outputs when asked)."""
        inputs = _collect(batch, niche_embeddings=niche_embeddings, niche_positions=niche_positions,
                          niche_attention_mask=niche_attention_mask)

        def run(kw):
            o = self.tissue(**kw, return_dict=True)
            return (o.tissue_embeds, o.niche_embeds) if return_niche_embeddings else o.tissue_embeds

        return self._run_batched(run, inputs, batch_size, return_tensors)

    def _run_batched(self, fn: Callable, inputs: dict[str, torch.Tensor], batch_size: int, return_tensors: str):
        if return_tensors not in ("np", "pt"):
            raise ValueError(f"return_tensors={return_tensors!r}: use 'np' or 'pt'")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: use a positive batch size")
        if not inputs:
            raise ValueError("no inputs given")
        n = next(iter(inputs.values())).shape[0]
        device = self.device
        was_training = self.training
        self.eval()
        results: list = []
        try:
            for start in range(0, n, batch_size):
                chunk = {k: v[start : start + batch_size].to(device) for k, v in inputs.items()}
                out = fn(chunk)
                results.append(out if isinstance(out, tuple) else (out,))
        finally:
            self.train(was_training)
        merged = tuple(torch.cat([r[i] for r in results]).float().cpu() for i in range(len(results[0])))
        if return_tensors == "np":
            merged = tuple(m.numpy() for m in merged)
        return merged if len(merged) > 1 else merged[0]


def _collect(batch: dict | None, **tensors) -> dict[str, torch.Tensor]:
    """Merge a batch dict and explicit arguments into tensors (numpy arrays converted)."""
    out: dict[str, torch.Tensor] = {}
    for source in (batch or {}), tensors:
        for k, v in source.items():
            if v is None or k not in tensors:
                continue
            out[k] = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
    sizes = {k: v.shape[0] for k, v in out.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"inputs disagree on the number of samples: {sizes}. Fix: give one row per sample everywhere")
    return out


__all__ = ["SpatiaModel"]
