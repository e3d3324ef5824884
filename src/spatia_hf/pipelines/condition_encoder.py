"""The generator's condition encoder: a cell's expression -> cross-attention tokens for the denoiser.

:class:`SpatiaConditionEncoder` wraps SPATIA's expression branch
(:class:`~spatia_hf.models.modeling_cell.SpatiaExpressionEncoder`: gene-identity embedding + value
encoding + self-attention) and adds what a diffusion denoiser needs from it:

* a fixed number of condition tokens (``num_condition_tokens`` learned queries attend over the
  variable-length gene tokens), projected to the denoiser's ``cross_attention_dim``, so the UNet
  sees the same sequence length for every panel size and for the null condition;
* optionally (``expression_token=True``) one more token, an MLP of the whole log1p profile: a
  direct path from every panel gene to the denoiser, which a generator trained briefly learns far
  faster than effects that must pass through attention over freshly initialised gene tokens;
* a *global condition* (:meth:`SpatiaConditionEncoder.global_condition`), which the pipeline
  feeds to a ``UNet2DConditionModel`` built with ``class_embed_type="projection"`` as
  ``class_labels`` (added to the timestep embedding, so it modulates every ResNet block, not only
  the attention levels). ``global_vector="profile"`` (the presets) makes it the per-gene
  standardised log1p profile: z-scores with the per-gene mean/std of the training cells
  (``gene_mean`` / ``gene_std`` in the config, set by :meth:`set_profile_statistics` before
  training, like a normaliser's statistics; mean 0 / std 1 until then), so a gene edit reaches
  the denoiser undiluted from the first step; its null is a learned ``null_profile``.
  ``global_vector="tokens"`` (encoders saved before) flattens the condition tokens instead;
* a learned *null condition* (the same shape) for classifier-free guidance: training replaces the
  condition of a random fraction of cells by it, sampling mixes the two predictions;
* the gene vocabulary (``genes``), so a saved pipeline knows which genes its inputs must be.

Inputs are raw counts on the encoder's gene panel (``[B, n_genes]``, the dataset's
``gene_counts``), normalised here (library size -> ``normalize_total``, then log1p), so the
pipeline, the training loop and the dataset agree on one convention. Genes are turned into
tokens deterministically: every panel gene when the panel has at most ``max_gene_tokens`` genes
(zeros are informative: a missing marker), otherwise the ``max_gene_tokens`` most expressed ones.

The module is a diffusers ``ModelMixin, ConfigMixin``: ``save_pretrained`` writes
``config.json`` + ``diffusion_pytorch_model.safetensors`` and the pipeline saves it as one of its
components. :meth:`SpatiaConditionEncoder.from_spatia_model` copies the expression branch of a
pretrained SPATIA model, so the generator starts from the pretrained gene representation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..models.configuration_spatia import NUM_SPECIAL_TOKENS, PAD_TOKEN_ID, SpatiaCellConfig
from ..models.modeling_cell import SpatiaExpressionEncoder, expression_encoder_state

# The fields of SpatiaCellConfig the expression branch depends on (image fields are left out).
EXPRESSION_CONFIG_KEYS = (
    "gene_vocab", "gene_ensembl_ids", "hidden_size", "num_attention_heads", "intermediate_size",
    "num_expression_layers", "hidden_act", "layer_norm_eps", "hidden_dropout_prob", "attention_dropout",
    "initializer_range", "max_genes",
)
DEFAULT_NORMALIZE_TOTAL = 1e4
GLOBAL_VECTORS = ("tokens", "profile")
# Floor of a gene's log1p standard deviation (a gene constant in the training cells would give
# unbounded z-scores) and the z-score clip: a few outlier cells must not dominate the condition.
MIN_PROFILE_STD = 0.1
MAX_PROFILE_Z = 10.0


# Encoder sizes all take the standardised profile as the global condition (``global_vector``);
# encoders saved before that option read back with the flattened tokens.
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=16, num_attention_heads=2, num_expression_layers=1, cross_attention_dim=16,
                 num_condition_tokens=4, global_vector="profile"),
    "small": dict(hidden_size=64, num_attention_heads=4, num_expression_layers=2, cross_attention_dim=64,
                  num_condition_tokens=8, max_gene_tokens=64, expression_token=True, global_vector="profile"),
    "base": dict(hidden_size=256, num_attention_heads=8, num_expression_layers=4, cross_attention_dim=256,
                 num_condition_tokens=16, expression_token=True, global_vector="profile"),
}


def expression_config_from(cell_config: SpatiaCellConfig | dict) -> dict[str, Any]:
    """The expression-branch subset of a cell config, as a JSON-safe dict."""
    d = cell_config.to_dict() if isinstance(cell_config, SpatiaCellConfig) else dict(cell_config)
    return {k: d[k] for k in EXPRESSION_CONFIG_KEYS if k in d}


def log1p_normalize(counts: torch.Tensor, normalize_total: float | None,
                    library_size: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, G]`` raw counts -> ``log1p(counts / size_factor)`` with ``size_factor = max(library, 1) /
    normalize_total`` (exactly :class:`~spatia_hf.models.processing_spatia.SpatiaProcessor`'s values, so a
    pretrained expression branch sees what it was trained on); raw log1p when ``normalize_total`` is None.

    ``library_size`` (``[B]``, optional) replaces each row's own total: an edited cell normalised by
    its unedited library keeps its size factor, so only the edited gene's value changes (see
    :class:`~spatia_hf.pipelines.pipeline_spatia.SpatiaGenerationPipeline`'s ``perturbation``)."""
    x = counts.float()
    if normalize_total is not None:
        if library_size is None:
            library = x.sum(dim=-1, keepdim=True)
        else:
            library = torch.as_tensor(library_size, dtype=x.dtype, device=x.device).reshape(-1, 1)
            if library.shape[0] != x.shape[0]:
                raise ValueError(f"library_size: {library.shape[0]} values for {x.shape[0]} cells. Fix: give one "
                                 "library size (total counts) per row of counts")
        x = x * (normalize_total / library.clamp(min=1.0))
    return torch.log1p(x)


def profile_statistics(counts: torch.Tensor, normalize_total: float | None,
                       min_std: float = MIN_PROFILE_STD) -> tuple[list[float], list[float]]:
    """Per-gene mean and standard deviation (floored at ``min_std``) of the log1p-normalised
    ``counts`` ``[cells, genes]``: the statistics :meth:`SpatiaConditionEncoder.set_profile_statistics`
    standardises with (computed once from training cells, like a normaliser's)."""
    if counts.dim() != 2 or counts.shape[0] < 2:
        raise ValueError(f"counts: expected [cells >= 2, genes] to estimate per-gene statistics, got shape "
                         f"{tuple(counts.shape)}. Fix: pass the counts of (a sample of) the training cells")
    values = log1p_normalize(counts, normalize_total).double()
    mean = values.mean(dim=0)
    std = values.std(dim=0).clamp(min=min_std)
    return mean.tolist(), std.tolist()


class SpatiaConditionEncoder(ModelMixin, ConfigMixin):
    """Expression (raw counts on ``genes``) -> ``[B, num_condition_tokens, cross_attention_dim]``.

    Args:
        expression_config: the expression-branch fields of a :class:`SpatiaCellConfig`
            (``gene_vocab`` is the gene panel; ``hidden_size``, layers, heads ...). Build it with
            :meth:`from_genes` or :meth:`from_spatia_model`.
        cross_attention_dim: width of the tokens the denoiser cross-attends to.
        num_condition_tokens: number of condition tokens (learned pooling queries).
        normalize_total: counts per cell after library-size scaling, before log1p (None: no scaling).
        max_gene_tokens: at most this many gene tokens per cell (all panel genes when the panel is
            smaller; otherwise the most expressed genes).
        expression_token: add a token computed by an MLP from the full (standardised) log1p profile
            (the condition then has ``num_condition_tokens + 1`` tokens).
        global_vector: what :meth:`global_condition` returns: ``"tokens"`` (the flattened condition
            tokens; the default of encoders saved before it existed) or ``"profile"`` (the
            standardised log1p profile, one value per panel gene).
        gene_mean, gene_std: per-gene mean / std of the training cells' log1p profile (see
            :func:`profile_statistics`); None: mean 0, std 1 (the raw log1p profile).
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        expression_config: dict | None = None,
        cross_attention_dim: int = 64,
        num_condition_tokens: int = 8,
        normalize_total: float | None = DEFAULT_NORMALIZE_TOTAL,
        max_gene_tokens: int = 512,
        expression_token: bool = False,
        global_vector: str = "tokens",
        gene_mean: list[float] | None = None,
        gene_std: list[float] | None = None,
    ):
        super().__init__()
        if not expression_config or not expression_config.get("gene_vocab"):
            raise ValueError(
                "expression_config['gene_vocab'] is empty: the condition encoder needs the gene panel. Fix: build it "
                "with SpatiaConditionEncoder.from_genes(genes, ...) or .from_spatia_model(model_or_path)")
        for name, value in (("cross_attention_dim", cross_attention_dim), ("num_condition_tokens", num_condition_tokens),
                            ("max_gene_tokens", max_gene_tokens)):
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if normalize_total is not None and not normalize_total > 0:
            raise ValueError(f"normalize_total={normalize_total!r}: expected a positive number of counts or None")
        if global_vector not in GLOBAL_VECTORS:
            raise ValueError(f"global_vector={global_vector!r}: expected one of {GLOBAL_VECTORS}")
        n_genes = len(expression_config["gene_vocab"])
        _check_statistics(gene_mean, gene_std, n_genes)
        cell_config = SpatiaCellConfig(**expression_config)
        d = cell_config.hidden_size
        self.expression_encoder = SpatiaExpressionEncoder(cell_config)
        heads = cell_config.num_attention_heads
        self.pool_queries = nn.Parameter(torch.empty(num_condition_tokens, d))
        self.pool_attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.pool_norm = nn.LayerNorm(d, eps=cell_config.layer_norm_eps)
        self.proj = nn.Linear(d, cross_attention_dim)
        self.profile_mlp = (nn.Sequential(nn.Linear(n_genes, d), nn.GELU(), nn.Linear(d, d))
                            if expression_token else None)
        n_tokens = num_condition_tokens + (1 if expression_token else 0)
        self.null_tokens = nn.Parameter(torch.empty(n_tokens, cross_attention_dim))
        # the learned null of the profile global vector (only then: encoders saved before load unchanged)
        self.null_profile = nn.Parameter(torch.empty(n_genes)) if global_vector == "profile" else None
        self._reset_parameters(cell_config.initializer_range)

    @torch.no_grad()
    def _reset_parameters(self, std: float) -> None:
        """Initialise everything here (a diffusers model is not run through transformers' ``_init_weights``).

        The expression branch takes BERT's small normal init (what a pretrained branch was trained
        from); the profile MLP and the output projection keep PyTorch's default (Kaiming-uniform)
        init: with std ``initializer_range`` weights behind a LayerNorm the tokens of two different
        cells differed by ~1% at init, so the denoiser had no expression signal to learn from.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.pool_attention._reset_parameters()
        mask_embedding = self.expression_encoder.value_encoder.mask_embedding
        nn.init.normal_(mask_embedding, std=std)
        nn.init.normal_(self.pool_queries, std=1.0 / math.sqrt(self.pool_queries.shape[-1]))
        nn.init.normal_(self.null_tokens, std=std)
        direct = [self.proj] + ([m for m in self.profile_mlp if isinstance(m, nn.Linear)] if self.profile_mlp is not None else [])
        for module in direct:
            module.reset_parameters()
        if self.null_profile is not None:
            nn.init.zeros_(self.null_profile)  # z = 0: the average training cell

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_genes(
        cls,
        genes: list[str],
        hidden_size: int = 64,
        num_attention_heads: int = 4,
        num_expression_layers: int = 2,
        intermediate_size: int | None = None,
        gene_ensembl_ids: list[str | None] | None = None,
        **kwargs,
    ) -> "SpatiaConditionEncoder":
        """A randomly initialised encoder for the panel ``genes`` (gene symbols, dataset order)."""
        cell_config = SpatiaCellConfig(
            gene_vocab=list(genes), gene_ensembl_ids=gene_ensembl_ids, hidden_size=hidden_size,
            num_attention_heads=num_attention_heads, num_expression_layers=num_expression_layers,
            intermediate_size=intermediate_size or 4 * hidden_size,
        )
        return cls(expression_config=expression_config_from(cell_config), **kwargs)

    @classmethod
    def from_spatia_model(cls, model_or_path, **kwargs) -> "SpatiaConditionEncoder":
        """An encoder whose expression branch is copied from a SPATIA model or checkpoint.

        ``model_or_path``: a ``SpatiaCellModel``, ``SpatiaModel``, SPATIA head, or a local path /
        hub id of one. The pooling, projection and null tokens start fresh (trained with the
        denoiser). ``kwargs``: ``cross_attention_dim``, ``num_condition_tokens``, ...
        """
        cell_config, state = expression_encoder_state(model_or_path)
        encoder = cls(expression_config=expression_config_from(cell_config), **kwargs)
        missing, unexpected = encoder.expression_encoder.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"from_spatia_model: expression branch weights do not fit (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}). Fix: pass a checkpoint of the same spatia-hf version")
        return encoder

    # ------------------------------------------------------------------ properties
    @property
    def genes(self) -> list[str]:
        """The gene panel: column ``j`` of the expected counts is ``genes[j]``."""
        return list(self.config.expression_config["gene_vocab"])

    @property
    def gene_ensembl_ids(self) -> list[str | None] | None:
        return self.config.expression_config.get("gene_ensembl_ids")

    @property
    def num_genes(self) -> int:
        return len(self.config.expression_config["gene_vocab"])

    @property
    def has_profile_statistics(self) -> bool:
        return self.config.gene_mean is not None

    def set_profile_statistics(self, gene_mean: list[float], gene_std: list[float]) -> None:
        """Record the per-gene log1p mean / std the profile is standardised with (saved in the config).

        Set them before training (``train_generator`` does, from the training cells): the profile
        MLP and the denoiser learn on the standardised values.
        """
        gene_mean, gene_std = [float(v) for v in gene_mean], [float(v) for v in gene_std]
        _check_statistics(gene_mean, gene_std, self.num_genes)
        self.register_to_config(gene_mean=gene_mean, gene_std=gene_std)

    def standardized_profile(self, counts: torch.Tensor, library_size: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, G]`` raw counts -> log1p profile, z-scored per gene and clipped at
        +-``MAX_PROFILE_Z`` when statistics are set (else the raw log1p profile, as before them).
        ``library_size``: see :func:`log1p_normalize`."""
        values = log1p_normalize(counts, self.config.normalize_total, library_size)
        if not self.has_profile_statistics:
            return values
        mean = torch.tensor(self.config.gene_mean, dtype=values.dtype, device=values.device)
        std = torch.tensor(self.config.gene_std, dtype=values.dtype, device=values.device)
        return ((values - mean) / std).clamp(-MAX_PROFILE_Z, MAX_PROFILE_Z)

    # ------------------------------------------------------------------ forward
    def gene_tokens_from_counts(self, counts: torch.Tensor, library_size: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, G]`` raw counts -> ``gene_ids`` / ``gene_values`` (log1p-normalised) / mask, ``[B, L]``."""
        if counts.dim() != 2 or counts.shape[1] != self.num_genes:
            raise ValueError(f"counts: expected shape [batch, {self.num_genes}] (one column per panel gene), got "
                             f"{tuple(counts.shape)}. Fix: map the expression onto encoder.genes first "
                             "(SpatiaGenerationPipeline does this from gene_names)")
        values = log1p_normalize(counts, self.config.normalize_total, library_size)
        b, g = values.shape
        ids = torch.arange(NUM_SPECIAL_TOKENS, NUM_SPECIAL_TOKENS + g, device=values.device)
        if g <= self.config.max_gene_tokens:
            gene_ids = ids.expand(b, g)
            mask = torch.ones(b, g, dtype=torch.bool, device=values.device)
            return gene_ids, values, mask
        top = torch.topk(values, self.config.max_gene_tokens, dim=1, sorted=True)  # most expressed genes
        gene_ids = ids[top.indices]
        mask = top.values > 0
        mask[:, 0] = True  # a cell with no counts still has one (zero) token to attend to
        gene_ids = torch.where(mask, gene_ids, torch.full_like(gene_ids, PAD_TOKEN_ID))
        return gene_ids, top.values * mask, mask

    @property
    def num_tokens(self) -> int:
        """Condition tokens per cell (``num_condition_tokens``, plus one with ``expression_token``)."""
        return int(self.null_tokens.shape[0])

    def forward(self, counts: torch.Tensor, drop_condition: torch.Tensor | None = None,
                return_global: bool = False, library_size: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Condition tokens ``[B, num_tokens, cross_attention_dim]`` (and, with ``return_global``,
        the global condition ``[B, pooled_dim]``, computed inside forward so a DDP-wrapped encoder
        syncs its gradients).

        Args:
            counts: ``[B, n_genes]`` raw counts on :attr:`genes`.
            drop_condition: optional ``[B]`` bool; True rows get the null condition (CFG training).
            return_global: also return :meth:`global_condition` of the same rows.
            library_size: optional ``[B]`` totals to normalise by instead of each row's own (an edited
                cell keeps its unedited library, :func:`log1p_normalize`).
        """
        gene_ids, values, mask = self.gene_tokens_from_counts(counts, library_size)
        tokens, mask = self.expression_encoder(gene_ids, values.to(self.dtype), mask)
        queries = self.pool_queries.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        pooled, _ = self.pool_attention(queries, tokens, tokens, key_padding_mask=~mask, need_weights=False)
        pooled = pooled + queries
        if self.profile_mlp is not None:
            profile = self.standardized_profile(counts, library_size).to(tokens.dtype)
            pooled = torch.cat([pooled, self.profile_mlp(profile)[:, None]], dim=1)
        out = self.proj(self.pool_norm(pooled))
        if drop_condition is not None:
            null = self.null_tokens.to(out.dtype).expand_as(out)
            out = torch.where(drop_condition.to(out.device).view(-1, 1, 1), null, out)
        if return_global:
            return out, self.global_condition(counts, out, drop_condition, library_size)
        return out

    @property
    def pooled_dim(self) -> int:
        """Width of :meth:`global_condition` (``num_tokens x cross_attention_dim`` for
        ``global_vector="tokens"``, the number of panel genes for ``"profile"``): the UNet's
        ``projection_class_embeddings_input_dim`` when it takes the global condition."""
        if self.config.global_vector == "profile":
            return self.num_genes
        return self.num_tokens * int(self.config.cross_attention_dim)

    def global_condition(self, counts: torch.Tensor | None, tokens: torch.Tensor,
                         drop_condition: torch.Tensor | None = None,
                         library_size: torch.Tensor | None = None) -> torch.Tensor:
        """The global condition ``[B, pooled_dim]`` of cells with raw ``counts`` and condition ``tokens``.

        ``"tokens"``: :meth:`pooled` of ``tokens`` (already null where dropped; ``counts`` unused).
        ``"profile"``: :meth:`standardized_profile` of ``counts``; ``drop_condition`` rows get
        ``null_profile``.
        """
        if self.config.global_vector == "tokens":
            return self.pooled(tokens)
        if counts is None:
            raise ValueError("counts=None: a 'profile' global condition is computed from the counts. Fix: pass them")
        out = self.standardized_profile(counts, library_size).to(self.null_profile.dtype)
        if drop_condition is not None:
            null = self.null_profile.expand_as(out)
            out = torch.where(drop_condition.to(out.device).view(-1, 1), null, out)
        return out

    def null_global_condition(self, batch_size: int) -> torch.Tensor:
        """The null condition's global vector, ``[batch_size, pooled_dim]`` (guidance's unconditional half)."""
        if self.config.global_vector == "tokens":
            return self.pooled(self.null_condition(batch_size))
        return self.null_profile.expand(batch_size, -1)

    @staticmethod
    def pooled(tokens: torch.Tensor) -> torch.Tensor:
        """Condition tokens ``[B, K, D]`` -> the global condition ``[B, K * D]``.

        Why flatten rather than average: the tokens are a fixed-length set (no padding), and the
        expression token (the MLP over the whole profile) keeps its own slot instead of being
        diluted by the pooled gene tokens. Being a function of the tokens, the null condition's
        global vector comes with the null tokens (CFG and condition dropout drop both).
        """
        if tokens.dim() != 3:
            raise ValueError(f"tokens: expected [batch, tokens, width], got shape {tuple(tokens.shape)}")
        return tokens.flatten(1)

    def null_condition(self, batch_size: int) -> torch.Tensor:
        """The learned null condition, ``[batch_size, num_tokens, cross_attention_dim]``."""
        return self.null_tokens.expand(batch_size, -1, -1)


def _check_statistics(gene_mean: list[float] | None, gene_std: list[float] | None, n_genes: int) -> None:
    if (gene_mean is None) != (gene_std is None):
        raise ValueError("gene_mean / gene_std: give both or neither. Fix: set them with "
                         "encoder.set_profile_statistics(*profile_statistics(train_counts, normalize_total))")
    if gene_mean is None:
        return
    for name, values in (("gene_mean", gene_mean), ("gene_std", gene_std)):
        if len(values) != n_genes:
            raise ValueError(f"{name}: {len(values)} values for a panel of {n_genes} genes. Fix: compute them on "
                             "counts in encoder.genes order")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v) or (name == "gene_std" and v <= 0)]
        if bad:
            raise ValueError(f"{name}[{bad[0]}]={values[bad[0]]!r} (gene {bad[0]}): expected a finite number"
                             f"{' > 0' if name == 'gene_std' else ''}. Fix: use profile_statistics(), which "
                             "floors the std")


__all__ = ["SpatiaConditionEncoder", "log1p_normalize", "expression_config_from", "profile_statistics"]
