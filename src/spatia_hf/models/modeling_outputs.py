"""Output dataclasses of the SPATIA models and heads (``ModelOutput``: attribute, key or tuple access)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class SpatiaCellOutput(ModelOutput):
    """Output of :class:`~spatia_hf.models.modeling_cell.SpatiaCellModel`.

    Args:
        cell_embeds: ``[B, D]`` pooled (fused) cell embedding.
        image_embeds: ``[B, D]`` image-only embedding before fusion (None without an image).
        expression_embeds: ``[B, D]`` expression-only embedding before fusion (None without genes).
        image_tokens: ``[B, P', D]`` fused patch tokens (only the visible patches when some are masked).
        gene_tokens: ``[B, L, D]`` fused gene tokens, aligned with the input ``gene_ids``.
        gene_attention_mask: ``[B, L]`` bool, True on real gene tokens.
        image_keep_index: ``[B, P']`` indices of the visible patches (None when nothing was masked).
        image_grid_size: patches per side of the image token grid.
    """

    cell_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    expression_embeds: torch.Tensor | None = None
    image_tokens: torch.Tensor | None = None
    gene_tokens: torch.Tensor | None = None
    gene_attention_mask: torch.Tensor | None = None
    image_keep_index: torch.Tensor | None = None
    image_grid_size: int | None = None


@dataclass
class SpatiaNicheOutput(ModelOutput):
    """Output of :class:`~spatia_hf.models.modeling_niche.SpatiaNicheModel`.

    Args:
        niche_embeds: ``[B, D]`` niche embedding (invariant to the order of cells).
        cell_embeds: ``[B, N, D]`` context-aware per-cell embeddings (permute with the cells).
        cell_attention_mask: ``[B, N]`` bool, True on real cells.
        image_tokens: ``[B, P, D]`` niche-image tokens when an image was given.
        niche_composition: ``[B, num_cell_states]`` the real members' mean soft assignment to the
            fitted cell states (eval mode; None without them or in training); float32, rows sum to 1.
    """

    niche_embeds: torch.Tensor | None = None
    cell_embeds: torch.Tensor | None = None
    cell_attention_mask: torch.Tensor | None = None
    image_tokens: torch.Tensor | None = None
    niche_composition: torch.Tensor | None = None


@dataclass
class SpatiaTissueOutput(ModelOutput):
    """Output of :class:`~spatia_hf.models.modeling_tissue.SpatiaTissueModel`.

    Args:
        tissue_embeds: ``[B, D]`` section embedding (size-weighted mean of the final tokens).
        niche_embeds: ``[B, M, D]`` per-niche outputs, unmerged back to every input niche.
        merged_hidden_state: ``[B, M', D]`` final tokens after merging.
        merged_sizes: ``[B, M']`` how many input niches each final token stands for.
        merged_positions: ``[B, M', 2]`` size-weighted µm positions of the final tokens.
        merged_attention_mask: ``[B, M']`` bool, True on real final tokens.
        num_tokens: ``num_tokens[0]`` is the input count; ``num_tokens[i + 1]`` the tokens layer ``i``
            attends over, after its merge (``len = layers + 1``).
    """

    tissue_embeds: torch.Tensor | None = None
    niche_embeds: torch.Tensor | None = None
    merged_hidden_state: torch.Tensor | None = None
    merged_sizes: torch.Tensor | None = None
    merged_positions: torch.Tensor | None = None
    merged_attention_mask: torch.Tensor | None = None
    num_tokens: tuple[int, ...] | None = None


@dataclass
class SpatiaModelOutput(ModelOutput):
    """Output of the composite :class:`~spatia_hf.models.modeling_spatia.SpatiaModel`: the scale that ran.

    Args:
        cell_embeds: ``[B, D]`` (cell inputs) or ``[B, N, D]`` context-aware (niche inputs).
        niche_embeds: ``[B, D]`` (niche inputs) or ``[B, M, D]`` unmerged per-niche (tissue inputs).
        tissue_embeds: ``[B, D]`` (tissue inputs).
        cell_outputs / niche_outputs / tissue_outputs: the full output of each scale that ran.
    """

    cell_embeds: torch.Tensor | None = None
    niche_embeds: torch.Tensor | None = None
    tissue_embeds: torch.Tensor | None = None
    cell_outputs: SpatiaCellOutput | None = None
    niche_outputs: SpatiaNicheOutput | None = None
    tissue_outputs: SpatiaTissueOutput | None = None


@dataclass
class SpatiaPretrainingOutput(ModelOutput):
    """Output of :class:`~spatia_hf.models.modeling_heads.SpatiaForPretraining`.

    ``loss`` is the weighted sum of the objectives that ran; each objective's own (unweighted)
    loss is reported so a Trainer callback can log it.

    Args:
        loss: weighted total.
        mgm_loss / mim_loss / contrastive_loss / niche_loss: per-objective losses (None if not run).
        niche_profile_loss: neighbourhood-expression prediction from the pooled niche embedding.
        tissue_loss: masked niche modelling by the tissue model.
        gene_predictions: ``[B, L]`` predicted log1p values (or log-means for NB/ZINB) at every gene token.
        gene_value_mask: ``[B, L]`` which tokens were masked.
        pixel_predictions: ``[B, P, p*p*C]`` reconstructed patches; ``image_patch_mask`` marks hidden ones.
        contrastive_logits: ``[B, B]`` image-to-expression similarity logits.
        cell_embeds: ``[B, D]`` (or ``[B, N, D]`` for niche batches).
    """

    loss: torch.Tensor | None = None
    mgm_loss: torch.Tensor | None = None
    mim_loss: torch.Tensor | None = None
    contrastive_loss: torch.Tensor | None = None
    niche_loss: torch.Tensor | None = None
    niche_profile_loss: torch.Tensor | None = None
    tissue_loss: torch.Tensor | None = None
    gene_predictions: torch.Tensor | None = None
    gene_value_mask: torch.Tensor | None = None
    pixel_predictions: torch.Tensor | None = None
    image_patch_mask: torch.Tensor | None = None
    contrastive_logits: torch.Tensor | None = None
    cell_embeds: torch.Tensor | None = None


@dataclass
class SpatiaClassifierOutput(ModelOutput):
    """Output of the classification heads: ``logits [B, num_labels]`` and the embedding used."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    embeds: torch.Tensor | None = None


@dataclass
class SpatiaGeneRegressionOutput(ModelOutput):
    """Output of the gene imputation / expression prediction heads.

    Args:
        loss: masked MSE on log1p values when ``labels`` are given.
        logits: ``[B, K]`` (or ``[B, N, K]``) predicted log1p-normalised values of the target genes.
        target_gene_ids: ``[B, K]`` the vocabulary ids predicted (useful when all genes were predicted).
        embeds: the cell embedding used.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    target_gene_ids: torch.Tensor | None = None
    embeds: torch.Tensor | None = None


__all__ = [
    "SpatiaCellOutput",
    "SpatiaNicheOutput",
    "SpatiaTissueOutput",
    "SpatiaModelOutput",
    "SpatiaPretrainingOutput",
    "SpatiaClassifierOutput",
    "SpatiaGeneRegressionOutput",
]
