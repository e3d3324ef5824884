"""Task heads on the composite SPATIA model; each computes its loss when labels are given.

- :class:`SpatiaForPretraining`: masked gene modelling (MSE on log1p, or NB/ZINB on counts),
  MAE masked image modelling, image-expression InfoNCE and niche masked-cell prediction. Each
  objective's loss is returned on its own next to the weighted ``loss``.
- :class:`SpatiaForCellClassification`: cell-type annotation (cell or niche-aware).
- :class:`SpatiaForGeneImputation`: values of held-out genes from the measured ones (cell or niche-aware).
- :class:`SpatiaForExpressionPrediction`: expression from the image alone.
- :class:`SpatiaForTissueClassification`: section-level labels from niche embeddings.

All heads wrap ``self.spatia`` (a :class:`~spatia_hf.models.modeling_spatia.SpatiaModel`), so a pretraining
checkpoint loads into any of them with ``from_pretrained``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .configuration_spatia import NUM_SPECIAL_TOKENS, SpatiaConfig
from .modeling_base import GeneTable, SpatiaPreTrainedModel
from .modeling_layers import (
    SpatiaBlock,
    SpatiaMLP,
    patchify,
    random_patch_mask,
    random_token_mask,
    sincos_2d,
)
from .modeling_losses import info_nce, masked_mean, masked_mse, nb_log_likelihood, zinb_log_likelihood
from .modeling_outputs import SpatiaClassifierOutput, SpatiaGeneRegressionOutput, SpatiaPretrainingOutput
from .modeling_niche import pick_cells, real_cell_index, real_cell_mask, scatter_cells
from .modeling_spatia import SpatiaModel


# ---------------------------------------------------------------------- building blocks of heads
class SpatiaGeneQueryDecoder(nn.Module):
    """Predicts a value for any vocabulary gene from a cell-level vector: ``MLP(h) . E[gene] + b[gene]``.

    ``E`` is the expression encoder's gene embedding (passed at call time, so it is shared, not
    copied), so one head covers every gene of the vocabulary, whatever the panel.
    """

    def __init__(self, in_size: int, hidden_size: int, vocab_size: int, act: str = "gelu"):
        super().__init__()
        self.mlp = SpatiaMLP(in_size, hidden_size, act)
        self.out = nn.Linear(in_size, hidden_size)
        self.bias = GeneTable(vocab_size, 1, new_rows="zeros")

    def forward(self, h: torch.Tensor, gene_ids: torch.Tensor, gene_table: nn.Embedding) -> torch.Tensor:
        """``h`` [..., in_size], ``gene_ids`` [..., K] -> ``[..., K]``."""
        q = self.out(h + self.mlp(h))
        genes = gene_table(gene_ids)
        return (genes * q[..., None, :]).sum(-1) + self.bias(gene_ids).squeeze(-1)


class SpatiaMaskedGeneHead(nn.Module):
    """Per-token prediction of a hidden value: log1p value (MSE), or NB/ZINB parameters of the count."""

    def __init__(self, config: SpatiaConfig):
        super().__init__()
        cell = config.cell_config
        self.likelihood = config.expression_likelihood
        n_out = 2 if self.likelihood == "zinb" else 1
        self.mlp = SpatiaMLP(cell.hidden_size, cell.intermediate_size, cell.hidden_act)
        self.norm = nn.LayerNorm(cell.hidden_size, eps=cell.layer_norm_eps)
        self.out = nn.Linear(cell.hidden_size, n_out)
        # per-gene offset of the prediction (mean log1p value, or log mean rate for NB/ZINB), set
        # from data by SpatiaForPretraining.init_gene_value_biases
        self.value_bias = GeneTable(cell.vocab_size, 1, new_rows="zeros")
        # per-gene log inverse dispersion of the NB/ZINB likelihoods
        self.log_theta = GeneTable(cell.vocab_size, 1, new_rows="zeros")

    def forward(self, tokens: torch.Tensor, gene_ids: torch.Tensor | None = None) -> torch.Tensor:
        pred = self.out(self.norm(tokens + self.mlp(tokens)))
        if gene_ids is None:
            return pred
        offset = self.value_bias(gene_ids)
        return torch.cat([pred[..., :1] + offset, pred[..., 1:]], dim=-1)

    def loss(self, pred, gene_ids, gene_values, mask, gene_counts=None, size_factors=None) -> torch.Tensor:
        if self.likelihood == "mse":
            return masked_mse(pred[..., 0], gene_values, mask)
        if gene_counts is None or size_factors is None:
            raise ValueError(f"expression_likelihood={self.likelihood!r} needs gene_counts [B, L] (raw counts) and "
                             "size_factors [B] (library size / target_sum) in the batch. Fix: use SpatiaProcessor "
                             "outputs, or set expression_likelihood='mse'")
        mu = torch.exp(pred[..., 0].clamp(max=15.0)) * size_factors.to(pred.dtype)[:, None]
        theta = torch.exp(self.log_theta(gene_ids).squeeze(-1))
        counts = gene_counts.to(pred.dtype)
        if self.likelihood == "nb":
            ll = nb_log_likelihood(counts, mu, theta)
        else:
            ll = zinb_log_likelihood(counts, mu, theta, pred[..., 1])
        return -masked_mean(ll, mask)


class SpatiaMaeDecoder(nn.Module):
    """MAE pixel decoder: visible tokens + mask tokens at the hidden patches -> pixels of every patch."""

    def __init__(self, config: SpatiaConfig):
        super().__init__()
        cell = config.cell_config
        d = config.mim_decoder_hidden_size
        self.embed = nn.Linear(cell.hidden_size, d)
        self.mask_token = nn.Parameter(torch.empty(1, 1, d))
        self.layers = nn.ModuleList([
            SpatiaBlock(cell, hidden_size=d, num_heads=config.mim_decoder_num_heads, intermediate_size=4 * d)
            for _ in range(config.mim_decoder_num_layers)
        ])
        self.norm = nn.LayerNorm(d, eps=cell.layer_norm_eps)
        self.pred = nn.Linear(d, cell.patch_size * cell.patch_size * cell.num_channels)

    def _spatia_init(self, std: float) -> None:
        init.normal_(self.mask_token, std=std)

    def forward(self, visible: torch.Tensor, keep_index: torch.Tensor, num_patches: int) -> torch.Tensor:
        b, v, _ = visible.shape
        x = self.embed(visible)
        full = self.mask_token.to(x.dtype).expand(b, num_patches, -1).clone()
        full = full.scatter(1, keep_index[..., None].expand(-1, -1, x.shape[-1]), x)
        grid = int(round(num_patches**0.5))
        full = full + sincos_2d(grid, full.shape[-1], full.device, full.dtype)[None]
        for layer in self.layers:
            full = layer(full, None)
        return self.pred(self.norm(full))


def _given_mask(name: str, mask: torch.Tensor, shape: tuple) -> torch.Tensor:
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(mask.shape)} does not match the inputs {tuple(shape)}. Fix: build "
                         "it from the same batch (for niche batches: one row per real cell, in row-major order)")
    return mask.bool()


def _classification_loss(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    if num_labels == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    return F.cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1).long(), ignore_index=-100)


class SpatiaHeadModel(SpatiaPreTrainedModel):
    """Base of the heads: holds ``self.spatia`` and never takes ``**kwargs`` (DDP loss scaling)."""

    config_class = SpatiaConfig
    config: SpatiaConfig
    base_model_prefix = "spatia"
    accepts_loss_kwargs = False


# ---------------------------------------------------------------------- pretraining
class SpatiaForPretraining(SpatiaHeadModel):
    """All pretraining objectives in one forward; works on cell batches and on niche batches.

    Masked gene modelling predicts the hidden values from the fused gene tokens (the configured
    likelihood), and the pooled cell embedding reconstructs every gene token, hidden and visible
    (``config.cell_reconstruction``; MSE on log1p), so the embedding used downstream keeps the
    expression; ``mgm_loss`` is the token loss plus ``cell_reconstruction_weight`` x the cell term.

    Cell batch: ``pixel_values [B, C, H, W]``, ``gene_ids/gene_values/gene_attention_mask [B, L]``
    (+ ``gene_counts [B, L]``, ``size_factors [B]`` for NB/ZINB). Niche batch: the same with a
    leading cell dimension (``[B, N, ...]``) plus ``cell_positions [B, N, 2]`` (µm) and
    ``cell_attention_mask [B, N]``; it adds niche masked-cell prediction (the niche model sees a
    mask token instead of the hidden cells and predicts their gene values from the context) and the
    neighbourhood-expression objective (the pooled niche embedding predicts the mean log1p
    expression of all the niche's cells). With ``niche_centres_um [B, 2]`` (section µm) and
    ``niche_groups [B]`` (one id per section or window), the tissue model is pretrained too: masked
    niche modelling over the niches of each group (see ``SpatiaConfig.tissue_weight``).
    """

    main_input_name = "gene_ids"
    _legacy_scalar_parameters = ("logit_scale",)

    def __init__(self, config: SpatiaConfig):
        super().__init__(config)
        cell = config.cell_config
        self.spatia = SpatiaModel(config)
        self.mgm_head = SpatiaMaskedGeneHead(config)
        self.mae_decoder = SpatiaMaeDecoder(config)
        self.image_projection = nn.Linear(cell.hidden_size, config.contrastive_dim, bias=False)
        self.expression_projection = nn.Linear(cell.hidden_size, config.contrastive_dim, bias=False)
        # shape (1,), not a 0-d scalar: FSDP2's fully_shard refuses scalar parameters ("doesn't support scalar
        # parameters"); checkpoints saved with the 0-d shape (spatia-hf <= 0.2) are reshaped on load
        self.logit_scale = nn.Parameter(torch.empty(1))
        self.niche_decoder = SpatiaGeneQueryDecoder(config.niche_config.hidden_size, cell.hidden_size,
                                                    cell.vocab_size, cell.hidden_act)
        self.cell_decoder = SpatiaGeneQueryDecoder(cell.hidden_size, cell.hidden_size, cell.vocab_size, cell.hidden_act)
        self.niche_profile_decoder = SpatiaGeneQueryDecoder(config.niche_config.hidden_size, cell.hidden_size,
                                                            cell.vocab_size, cell.hidden_act)
        self.tissue_decoder = SpatiaGeneQueryDecoder(config.tissue_config.hidden_size, cell.hidden_size,
                                                     cell.vocab_size, cell.hidden_act)
        # what the tissue model sees instead of a hidden niche's embedding (masked niche modelling)
        self.tissue_mask_embedding = nn.Parameter(torch.empty(1, config.niche_config.hidden_size))
        self.post_init()

    def _spatia_init(self, std: float) -> None:
        init.constant_(self.logit_scale, self.config.logit_scale_init_value)
        init.trunc_normal_(self.tissue_mask_embedding, std=std)

    @torch.no_grad()
    def init_gene_value_biases(self, gene_ids, mean_values, mean_log_rates=None) -> None:
        """Start every gene-value prediction at that gene's mean, measured on the training data.

        Without it the regression heads begin ~4 log1p units below their targets; Adam moves a bias
        ~``lr`` per step, so the network instead aligned every feature to output the constant, and
        the cell embeddings collapsed (mean pairwise cosine 1.0, linear probe near chance).

        Args:
            gene_ids: ``[G]`` vocabulary ids.
            mean_values: ``[G]`` mean log1p-normalised value of each gene's tokens (MSE heads).
            mean_log_rates: ``[G]`` log mean normalised count (NB/ZINB token head); default
                ``log(expm1(mean_values))``.
        """
        ids = torch.as_tensor(gene_ids, dtype=torch.long)
        values = torch.as_tensor(mean_values, dtype=torch.float32)
        if mean_log_rates is None:
            mean_log_rates = torch.log(torch.expm1(values).clamp(min=1e-4))
        token = values if self.config.expression_likelihood == "mse" else torch.as_tensor(mean_log_rates).float()
        for table, v in ((self.mgm_head.value_bias, token), (self.cell_decoder.bias, values),
                         (self.niche_decoder.bias, values), (self.niche_profile_decoder.bias, values),
                         (self.tissue_decoder.bias, values)):
            table.weight[ids, 0] = v.to(table.weight.dtype)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        gene_ids: torch.Tensor | None = None,
        gene_values: torch.Tensor | None = None,
        gene_attention_mask: torch.Tensor | None = None,
        gene_counts: torch.Tensor | None = None,
        size_factors: torch.Tensor | None = None,
        cell_positions: torch.Tensor | None = None,
        cell_attention_mask: torch.Tensor | None = None,
        gene_value_mask: torch.Tensor | None = None,
        image_patch_mask: torch.Tensor | None = None,
        niche_cell_mask: torch.Tensor | None = None,
        niche_centres_um: torch.Tensor | None = None,
        niche_groups: torch.Tensor | None = None,
        cell_uids: torch.Tensor | None = None,
        return_loss: bool = True,
        return_dict: bool | None = None,
    ) -> SpatiaPretrainingOutput | tuple:
        """Masks are drawn from the global RNG unless given (a collator seeding them per example
        makes batches reproducible): ``gene_value_mask [B, L]`` and ``image_patch_mask [B, P]`` (for
        niche batches one row per *real* cell, in row-major order), ``niche_cell_mask [B, N]``.
        ``cell_uids [B, N]`` (niche batches) names the distinct cells: each is encoded once, and the
        cell-level objectives (MGM, MIM, contrastive) and ``gene_predictions`` are per distinct cell."""
        cfg = self.config
        return_dict = cfg.return_dict if return_dict is None else return_dict
        niche = cell_positions is not None
        index = inverse = None
        if niche:
            pixel_values, gene_ids, gene_values, gene_attention_mask, gene_counts, size_factors, index, shape = (
                self._flatten_niche(cell_attention_mask, pixel_values, gene_ids, gene_values, gene_attention_mask,
                                    gene_counts, size_factors)
            )
        if gene_ids is not None and gene_attention_mask is None:
            gene_attention_mask = gene_ids != 0
        per_cell = (gene_ids, gene_values, gene_attention_mask)  # every real cell: the niche objectives' targets
        if niche and cell_uids is not None:
            first, inverse = first_occurrences(pick_cells(cell_uids, index, shape))
            pixel_values, gene_ids, gene_values, gene_attention_mask, gene_counts, size_factors, gene_value_mask, \
                image_patch_mask = (None if t is None else t[first] for t in (
                    pixel_values, gene_ids, gene_values, gene_attention_mask, gene_counts, size_factors,
                    gene_value_mask, image_patch_mask))
        value_mask = patch_mask = None
        if gene_ids is not None and cfg.mgm_weight > 0:
            value_mask = (random_token_mask(gene_attention_mask, cfg.mgm_mask_ratio) if gene_value_mask is None
                          else _given_mask("gene_value_mask", gene_value_mask, gene_ids.shape) & gene_attention_mask.bool())
        if pixel_values is not None and cfg.mim_weight > 0:
            grid = (pixel_values.shape[0], self.spatia.cell.num_patches)
            patch_mask = (random_patch_mask(*grid, cfg.mim_mask_ratio, device=pixel_values.device)
                          if image_patch_mask is None else _given_mask("image_patch_mask", image_patch_mask, grid))
        # the fused pass sees the whole crop, as at inference: the contrastive and cell-level
        # objectives on 25% of the patches stayed at chance; MIM encodes the visible patches apart
        out = self.spatia.cell(pixel_values, gene_ids, gene_values, gene_attention_mask,
                               gene_value_mask=value_mask, return_dict=True)
        losses: dict[str, torch.Tensor] = {}
        gene_pred = pixel_pred = logits = None

        if value_mask is not None:
            gene_pred = self.mgm_head(out.gene_tokens, gene_ids)
            token_loss = self.mgm_head.loss(gene_pred, gene_ids, gene_values, value_mask, gene_counts, size_factors)
            cell_loss = self._cell_reconstruction_loss(out.cell_embeds, gene_ids, gene_values, gene_attention_mask,
                                                       value_mask)
            losses["mgm"] = token_loss + cfg.cell_reconstruction_weight * cell_loss
            gene_pred = gene_pred[..., 0]
        if patch_mask is not None:
            visible, keep_index = self.spatia.cell.encode_image(pixel_values, patch_mask)
            pixel_pred = self.mae_decoder(visible[:, 1:], keep_index, patch_mask.shape[1])
            losses["mim"] = self._mim_loss(pixel_values, pixel_pred, patch_mask)
        if out.image_embeds is not None and out.expression_embeds is not None and cfg.contrastive_weight > 0:
            zi = F.normalize(self.image_projection(out.image_embeds), dim=-1)
            ze = F.normalize(self.expression_projection(out.expression_embeds), dim=-1)
            logits = self.logit_scale.clamp(max=4.6052).exp() * zi @ ze.t()
            if logits.shape[0] > 1:
                losses["contrastive"] = info_nce(logits)
        cell_embeds = out.cell_embeds
        if niche:
            gene_ids, gene_values, gene_attention_mask = per_cell
            member_embeds = out.cell_embeds if inverse is None else out.cell_embeds[inverse]
            nout, niche_loss = self._niche_objective(member_embeds, index, shape, cell_positions, cell_attention_mask,
                                                     gene_ids, gene_values, gene_attention_mask, niche_cell_mask)
            cell_embeds = nout.cell_embeds
            if niche_loss is not None:
                losses["niche"] = niche_loss
            if gene_ids is not None and (cfg.niche_profile_weight > 0 or cfg.tissue_weight > 0):
                target, valid = neighbourhood_profiles(gene_ids, gene_values, gene_attention_mask, index, shape,
                                                       self.spatia.cell.expression_encoder.gene_embeddings.num_embeddings)
                if cfg.niche_profile_weight > 0:
                    losses["niche_profile"] = self._niche_profile_objective(nout.niche_embeds, target, valid)
                if cfg.tissue_weight > 0 and niche_centres_um is not None and niche_groups is not None:
                    tissue_loss = self._tissue_objective(nout.niche_embeds, niche_centres_um, niche_groups, target,
                                                         valid)
                    if tissue_loss is not None:
                        losses["tissue"] = tissue_loss

        weights = {"mgm": cfg.mgm_weight, "mim": cfg.mim_weight, "contrastive": cfg.contrastive_weight,
                   "niche": cfg.niche_weight, "niche_profile": cfg.niche_profile_weight, "tissue": cfg.tissue_weight}
        loss = sum(weights[k] * v for k, v in losses.items()) if (losses and return_loss) else None
        result = SpatiaPretrainingOutput(
            loss=loss,
            mgm_loss=losses.get("mgm"),
            mim_loss=losses.get("mim"),
            contrastive_loss=losses.get("contrastive"),
            niche_loss=losses.get("niche"),
            niche_profile_loss=losses.get("niche_profile"),
            tissue_loss=losses.get("tissue"),
            gene_predictions=gene_pred,
            gene_value_mask=value_mask,
            pixel_predictions=pixel_pred,
            image_patch_mask=patch_mask,
            contrastive_logits=logits,
            cell_embeds=cell_embeds,
        )
        return result if return_dict else result.to_tuple()

    def _cell_reconstruction_loss(self, cell_embeds, gene_ids, gene_values, gene_attention_mask,
                                  value_mask) -> torch.Tensor:
        """MSE (log1p) of the gene values predicted from the pooled cell embedding alone.

        The embedding used downstream must carry the expression itself. Predicting only the hidden
        values (scGPT's GEPC, ``cell_reconstruction="masked"``) rewards what the visible genes imply
        (mostly the cell type) and lets the cell's own variation go: a ridge probe from it recovered
        held-out genes below 30 principal components of log expression. ``"all"`` also asks for the
        visible tokens (expressed genes and the sampled zeros), so the embedding keeps the profile.
        """
        table = self.spatia.cell.expression_encoder.gene_embeddings
        pred = self.cell_decoder(cell_embeds, gene_ids, table)
        targets = value_mask if self.config.cell_reconstruction == "masked" else gene_attention_mask.bool()
        return masked_mse(pred, gene_values, targets)

    def _flatten_niche(self, cell_attention_mask, *tensors):
        ref = next(t for t in tensors if t is not None and t.dim() >= 2)
        shape = tuple(ref.shape[:2])
        index = real_cell_index(cell_attention_mask, shape, ref.device)
        return (*(pick_cells(t, index, shape) for t in tensors), index, shape)

    def _mim_loss(self, pixel_values, pred, patch_mask) -> torch.Tensor:
        g = int(round(patch_mask.shape[1] ** 0.5))
        target = patchify(pixel_values.to(pred.dtype), pixel_values.shape[-1] // g)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        return masked_mean(per_patch, patch_mask)

    def _niche_objective(self, member_embeds, index, shape, cell_positions, cell_attention_mask, gene_ids,
                         gene_values, gene_attention_mask, niche_cell_mask=None):
        emb = scatter_cells(member_embeds, index, shape)
        real = real_cell_mask(cell_attention_mask, shape, emb.device)
        hide = None
        if self.config.niche_weight > 0:
            hide = (random_token_mask(real, self.config.niche_mask_ratio) if niche_cell_mask is None
                    else _given_mask("niche_cell_mask", niche_cell_mask, shape) & real)
        profiles = None
        if self.config.niche_config.use_expression_profiles and gene_ids is not None:
            profiles = scatter_cells(self.spatia.expression_profiles(gene_ids, gene_values, gene_attention_mask),
                                     index, shape)
        nout = self.spatia.niche(emb, cell_positions, real, cell_mask=hide, cell_profiles=profiles, return_dict=True)
        if hide is None or gene_ids is None or not bool(hide.any()):
            return nout, None
        hidden_flat = pick_cells(hide, index, shape)  # per real cell
        ctx = pick_cells(nout.cell_embeds, index, shape)[hidden_flat]
        ids = gene_ids[hidden_flat]
        pred = self.niche_decoder(ctx, ids, self.spatia.cell.expression_encoder.gene_embeddings)
        loss = masked_mse(pred, gene_values[hidden_flat], gene_attention_mask[hidden_flat].bool())
        return nout, loss

    def _gene_query(self, decoder: SpatiaGeneQueryDecoder, h: torch.Tensor) -> torch.Tensor:
        """``decoder`` over the whole vocabulary: ``h [M, D]`` -> ``[M, V]``."""
        table = self.spatia.cell.expression_encoder.gene_embeddings
        ids = torch.arange(table.num_embeddings, device=h.device).expand(h.shape[0], -1)
        return decoder(h, ids, table)

    def _niche_profile_objective(self, niche_embeds: torch.Tensor, target: torch.Tensor,
                                 valid: torch.Tensor) -> torch.Tensor:
        """The pooled niche embedding predicts its neighbourhood's mean log1p expression (all its
        cells, the ones hidden from the niche model included): what spatial smoothing would keep."""
        return masked_mse(self._gene_query(self.niche_profile_decoder, niche_embeds), target, valid)

    def _tissue_objective(self, niche_embeds, centres_um, groups, target, valid) -> torch.Tensor | None:
        """Masked niche modelling at the tissue scale: the niches of each group (nearby neighbourhoods
        of one section) form a tissue; ``tissue_mask_ratio`` of them are replaced by the mask
        embedding and the tissue model's output there predicts their mean expression."""
        emb, pos, real, rows = group_tokens(niche_embeds, centres_um, groups)
        hide = random_token_mask(real, self.config.tissue_mask_ratio) & real
        if not bool(hide.any()):
            return None
        emb = torch.where(hide[..., None], self.tissue_mask_embedding.to(emb.dtype), emb)
        tout = self.spatia.tissue(emb, pos, real, return_dict=True)
        picked = rows[hide]
        pred = self._gene_query(self.tissue_decoder, tout.niche_embeds[hide])
        return masked_mse(pred, target[picked], valid[picked])


def first_occurrences(uids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, inverse)`` for ids ``[n]``: the position of each distinct id's first row ``[U]`` (in
    order of the sorted ids) and, per row, its distinct id's place in ``first``, so ``x[first][inverse]``
    rebuilds a per-row tensor whose rows depend only on the id."""
    _, inverse = torch.unique(uids, return_inverse=True)
    rows = torch.arange(len(uids), device=uids.device)
    first = torch.full((int(inverse.max()) + 1 if len(uids) else 0,), len(uids), dtype=torch.long, device=uids.device)
    return first.scatter_reduce(0, inverse, rows, reduce="amin"), inverse


def neighbourhood_profiles(gene_ids: torch.Tensor, gene_values: torch.Tensor, gene_attention_mask: torch.Tensor,
                           index: torch.Tensor, shape: tuple[int, int], vocab_size: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean log1p value of every vocabulary gene over each niche's real cells, ``[B, V]``, and which
    genes any of its cells measured (tokens present, sampled zeros included), ``[B, V]`` bool.

    ``gene_ids``/``gene_values``/``gene_attention_mask`` are per real cell (``[n_real, L]``), ``index``
    their positions in the flattened ``[B*N]`` niche layout."""
    b, n = shape
    niche_of = (index // n)[:, None].expand_as(gene_ids)
    mask = gene_attention_mask.bool()
    flat = niche_of * vocab_size + gene_ids
    sums = gene_values.new_zeros(b * vocab_size).index_add_(0, flat[mask], gene_values[mask].to(gene_values.dtype))
    seen = gene_values.new_zeros(b * vocab_size).index_add_(0, flat[mask], torch.ones_like(gene_values[mask]))
    cells = torch.bincount(index // n, minlength=b).clamp(min=1).to(gene_values.dtype)
    return sums.view(b, vocab_size) / cells[:, None], seen.view(b, vocab_size) > 0


def group_tokens(x: torch.Tensor, positions: torch.Tensor, groups: torch.Tensor):
    """Rows of ``x [B, D]`` laid out per group: ``([G, M, D], positions [G, M, 2], real [G, M],
    row of each slot in x [G, M] (0 on padding))``, groups in order of first appearance."""
    _, inverse = torch.unique(groups, return_inverse=True)
    g = int(inverse.max()) + 1
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse, minlength=g)
    m = int(counts.max())
    slot = torch.arange(len(order), device=x.device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rows = torch.zeros(g, m, dtype=torch.long, device=x.device)
    real = torch.zeros(g, m, dtype=torch.bool, device=x.device)
    grp = inverse[order]
    rows[grp, slot] = order
    real[grp, slot] = True
    return x[rows] * real[..., None], positions.to(x.dtype)[rows] * real[..., None], real, rows


# ---------------------------------------------------------------------- fine-tuning heads
class SpatiaForCellClassification(SpatiaHeadModel):
    """Cell-type annotation from the fused cell embedding (``[B, num_labels]``), or from niche-aware
    cell embeddings when niche inputs (``cell_positions``) are given (``[B, N, num_labels]``,
    labels ``-100`` on padding)."""

    main_input_name = "gene_ids"

    def __init__(self, config: SpatiaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.spatia = SpatiaModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        width = config.niche_config.hidden_size
        self.cell_classifier = nn.Linear(config.cell_config.hidden_size, config.num_labels)
        self.niche_classifier = nn.Linear(width, config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        gene_ids: torch.Tensor | None = None,
        gene_values: torch.Tensor | None = None,
        gene_attention_mask: torch.Tensor | None = None,
        cell_embeddings: torch.Tensor | None = None,
        cell_positions: torch.Tensor | None = None,
        cell_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> SpatiaClassifierOutput | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self.spatia(pixel_values, gene_ids, gene_values, gene_attention_mask, cell_embeddings=cell_embeddings,
                          cell_positions=cell_positions, cell_attention_mask=cell_attention_mask, return_dict=True)
        classifier = self.niche_classifier if cell_positions is not None else self.cell_classifier
        logits = classifier(self.dropout(out.cell_embeds))
        loss = None
        if labels is not None:
            if cell_positions is not None and cell_attention_mask is not None:
                labels = labels.masked_fill(~cell_attention_mask.bool(), -100)
            loss = _classification_loss(logits, labels, self.num_labels)
        result = SpatiaClassifierOutput(loss=loss, logits=logits, embeds=out.cell_embeds)
        return result if return_dict else result.to_tuple()


class SpatiaForGeneImputation(SpatiaHeadModel):
    """Values (log1p-normalised) of genes *not* in the input, from the measured ones.

    The target genes enter as extra gene tokens whose value is the mask token, so the fused model
    attends to them like any gene; each target token plus the cell's context vector (the fused cell
    embedding, or the niche-aware cell embedding for niche inputs) gives the prediction. Remove the
    target genes from ``gene_ids`` first (the evaluation holds them out).

    Inputs: cell ``gene_ids/gene_values/gene_attention_mask [B, L]`` (optional ``pixel_values``),
    ``target_gene_ids [B, K]``, ``target_attention_mask [B, K]``, ``labels [B, K]``; or niche inputs
    with a leading cell dimension plus ``cell_positions``/``cell_attention_mask``.
    """

    main_input_name = "gene_ids"

    def __init__(self, config: SpatiaConfig):
        super().__init__(config)
        cell = config.cell_config
        self.spatia = SpatiaModel(config)
        self.context_proj = nn.Linear(config.niche_config.hidden_size, cell.hidden_size)
        self.head = SpatiaMLP(2 * cell.hidden_size, cell.intermediate_size, cell.hidden_act)
        self.out = nn.Linear(2 * cell.hidden_size, 1)
        self.post_init()

    def forward(
        self,
        gene_ids: torch.Tensor,
        gene_values: torch.Tensor,
        target_gene_ids: torch.Tensor,
        gene_attention_mask: torch.Tensor | None = None,
        target_attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        cell_positions: torch.Tensor | None = None,
        cell_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> SpatiaGeneRegressionOutput | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if gene_attention_mask is None:
            gene_attention_mask = gene_ids != 0
        if target_attention_mask is None:
            target_attention_mask = target_gene_ids != 0
        k = target_gene_ids.shape[-1]
        ids = torch.cat([gene_ids, target_gene_ids], dim=-1)
        vals = torch.cat([gene_values, torch.zeros_like(target_gene_ids, dtype=gene_values.dtype)], dim=-1)
        att = torch.cat([gene_attention_mask.bool(), target_attention_mask.bool()], dim=-1)
        vmask = torch.cat([torch.zeros_like(gene_attention_mask, dtype=torch.bool),
                           torch.ones_like(target_attention_mask, dtype=torch.bool)], dim=-1)
        if cell_positions is None:
            out = self.spatia.cell(pixel_values, ids, vals, att, gene_value_mask=vmask, return_dict=True)
            context = out.cell_embeds
            target_tokens = out.gene_tokens[:, -k:]
        else:
            shape = tuple(vmask.shape[:2])
            cell_out, emb, index = self.spatia.encode_niche_cells(
                cell_attention_mask, pixel_values, ids, vals, att,
                gene_value_mask=pick_cells(vmask, real_cell_index(cell_attention_mask, shape, vmask.device), shape),
            )
            nout = self.spatia.niche(emb, cell_positions, cell_attention_mask, return_dict=True)
            context = self.context_proj(nout.cell_embeds)
            target_tokens = scatter_cells(cell_out.gene_tokens[:, -k:], index, shape)
        h = torch.cat([target_tokens, context[..., None, :].expand_as(target_tokens)], dim=-1)
        logits = self.out(h + self.head(h)).squeeze(-1)
        loss = None
        if labels is not None:
            valid = target_attention_mask.bool() & torch.isfinite(labels)
            if cell_positions is not None and cell_attention_mask is not None:
                valid = valid & cell_attention_mask.bool()[..., None]
            loss = masked_mse(logits, labels, valid)
        result = SpatiaGeneRegressionOutput(loss=loss, logits=logits, target_gene_ids=target_gene_ids, embeds=context)
        return result if return_dict else result.to_tuple()


class SpatiaForExpressionPrediction(SpatiaHeadModel):
    """Expression (log1p-normalised) from the cell image alone.

    ``target_gene_ids [B, K]`` chooses the genes to predict (default: the whole vocabulary, in id
    order); ``labels [B, K]`` are their true log1p values (NaN or ``target_attention_mask=0`` skips one).
    """

    main_input_name = "pixel_values"

    def __init__(self, config: SpatiaConfig):
        super().__init__(config)
        cell = config.cell_config
        self.spatia = SpatiaModel(config)
        self.decoder = SpatiaGeneQueryDecoder(cell.hidden_size, cell.hidden_size, cell.vocab_size, cell.hidden_act)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        target_gene_ids: torch.Tensor | None = None,
        target_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> SpatiaGeneRegressionOutput | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self.spatia.cell(pixel_values=pixel_values, return_dict=True)
        b = pixel_values.shape[0]
        if target_gene_ids is None:
            vocab = self.spatia.cell.expression_encoder.gene_embeddings.num_embeddings
            target_gene_ids = torch.arange(NUM_SPECIAL_TOKENS, vocab, device=pixel_values.device).expand(b, -1)
        table = self.spatia.cell.expression_encoder.gene_embeddings
        logits = self.decoder(out.cell_embeds, target_gene_ids, table)
        loss = None
        if labels is not None:
            if labels.shape != logits.shape:
                raise ValueError(f"labels: shape {tuple(labels.shape)} differs from the predictions "
                                 f"{tuple(logits.shape)}. Fix: give one label per target gene")
            valid = torch.isfinite(labels)
            if target_attention_mask is not None:
                valid = valid & target_attention_mask.bool()
            loss = masked_mse(logits, labels, valid)
        result = SpatiaGeneRegressionOutput(loss=loss, logits=logits, target_gene_ids=target_gene_ids,
                                            embeds=out.cell_embeds)
        return result if return_dict else result.to_tuple()


class SpatiaForTissueClassification(SpatiaHeadModel):
    """Section-level labels (tissue, condition, donor) from the tissue embedding."""

    main_input_name = "niche_embeddings"

    def __init__(self, config: SpatiaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.spatia = SpatiaModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.tissue_config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        niche_embeddings: torch.Tensor,
        niche_positions: torch.Tensor,
        niche_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> SpatiaClassifierOutput | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self.spatia.tissue(niche_embeddings, niche_positions, niche_attention_mask, return_dict=True)
        logits = self.classifier(self.dropout(out.tissue_embeds))
        loss = _classification_loss(logits, labels, self.num_labels) if labels is not None else None
        result = SpatiaClassifierOutput(loss=loss, logits=logits, embeds=out.tissue_embeds)
        return result if return_dict else result.to_tuple()


__all__ = [
    "SpatiaForPretraining",
    "SpatiaForCellClassification",
    "SpatiaForGeneImputation",
    "SpatiaForExpressionPrediction",
    "SpatiaForTissueClassification",
    "SpatiaGeneQueryDecoder",
    "SpatiaMaskedGeneHead",
    "SpatiaMaeDecoder",
]
