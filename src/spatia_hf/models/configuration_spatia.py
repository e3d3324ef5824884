"""Configurations of the SPATIA models: one per scale (cell, niche, tissue) and the composite.

Every hyperparameter lives here with a documented default; the models read nothing from globals.
The gene vocabulary (symbols, optional Ensembl ids) is part of :class:`SpatiaCellConfig`, so a
checkpoint always carries the genes its embedding rows belong to. Vocabulary ids 0-3 are reserved
(pad, mask, cls, unk); gene ``i`` of ``gene_vocab`` has id ``NUM_SPECIAL_TOKENS + i``.

Size presets (``tiny`` for tests, ``small`` for the CPU demo, ``base``/``large`` at paper scale)
are plain dicts of overrides: ``SpatiaConfig.from_preset("tiny", gene_vocab=[...])``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from typing import Any

from transformers import PretrainedConfig

PAD_TOKEN_ID = 0
MASK_TOKEN_ID = 1
CLS_TOKEN_ID = 2
UNK_TOKEN_ID = 3
SPECIAL_TOKENS = ("<pad>", "<mask>", "<cls>", "<unk>")
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)

FUSION_MODES = ("cross_attention", "concat")
EXPRESSION_LIKELIHOODS = ("mse", "nb", "zinb")
CELL_RECONSTRUCTION_TARGETS = ("all", "masked")
PRESETS = ("tiny", "small", "base", "large")
NICHE_POOLINGS = ("mean", "cls")


def _check(cond: bool, field: str, value: Any, fix: str) -> None:
    if not cond:
        raise ValueError(f"{field}={value!r} is invalid. Fix: {fix}")


# Keys transformers itself may hand a config besides its dataclass fields (load-time arguments, and
# attributes of the transformers 4 base config that older config.json files still carry).
_TRANSFORMERS_KWARGS = frozenset({
    "model_type", "torch_dtype", "num_labels", "name_or_path", "_name_or_path", "_commit_hash", "auto_map",
    "output_attentions", "attn_implementation", "experts_implementation", "per_layer_config",
    "_attn_implementation_internal", "_experts_implementation_internal", "_attn_implementation_autoset",
    "use_cache", "tie_word_embeddings", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "tie_encoder_decoder", "pruned_heads", "torchscript", "use_bfloat16", "tf_legacy_loss", "finetuning_task",
    "tokenizer_class", "prefix", "bos_token_id", "pad_token_id", "eos_token_id", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
})


def _reject_unknown_fields(config: PretrainedConfig, kwargs: dict[str, Any]) -> None:
    """A field the class does not define is a typo or a config of another version: fail loudly instead
    of keeping a value no model reads (transformers would store it silently)."""
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(k for k in kwargs if k not in fields and k not in _TRANSFORMERS_KWARGS)
    if unknown:
        named = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, fields, n=1)) else repr(k)
                 for k in unknown]
        raise ValueError(f"{type(config).__name__} (model_type={config.model_type!r}): unknown field(s) "
                         f"{', '.join(named)}. Fix: correct or remove them; the fields are documented in "
                         f"{type(config).__name__}'s docstring")


def _check_heads(prefix: str, hidden_size: int, num_heads: int) -> None:
    _check(hidden_size > 0 and num_heads > 0 and hidden_size % num_heads == 0, f"{prefix}hidden_size", hidden_size,
           f"use a positive hidden_size divisible by num_attention_heads={num_heads}")


class SpatiaCellConfig(PretrainedConfig):
    """Configuration of :class:`~spatia_hf.models.modeling_cell.SpatiaCellModel` (image + expression of one cell).

    Args:
        gene_vocab: gene symbols of the vocabulary, in id order after the 4 special ids. Grows with
            ``model.resize_gene_vocab(new_genes)``.
        gene_ensembl_ids: optional Ensembl ids aligned with ``gene_vocab`` (used to map panels by id).
        hidden_size: width ``D`` of every token and of the cell embedding.
        num_attention_heads: heads of every attention layer (``hidden_size`` must be divisible by it).
        intermediate_size: hidden width of the MLP in every block.
        num_expression_layers: self-attention blocks of the expression branch.
        num_image_layers: self-attention blocks of the built-in ViT image branch (ignored with a backbone).
        num_fusion_layers: fusion blocks after the two branches.
        fusion: ``"cross_attention"`` (image tokens attend to gene tokens and vice versa in every fusion
            block) or ``"concat"`` (the same blocks without cross-attention; the cell embedding is then
            a projection of the two concatenated pooled tokens: the baseline of the evaluation).
        image_size: side of the square cell crop in pixels.
        patch_size: side of a ViT patch in pixels (``image_size`` must be divisible by it).
        num_channels: stain channels of the crop (e.g. 2 for DAPI + boundary).
        image_pool_sigma: the image tokens are pooled with Gaussian weights centred on the crop, of
            this standard deviation as a fraction of the crop side (0: plain mean). A crop holds its
            neighbours too (64 px at 0.5 µm is 32 µm, cells ~12 µm apart): a plain mean describes the
            neighbourhood more than the cell (type macro-F1 0.29 from the mean vs 0.74 with 0.125, at
            initialisation on the synthetic tissue). Every preset sets 0.125; the field's default 0 keeps
            checkpoints saved before it existed giving the same embeddings.
        expression_sketch: add a linear sketch of the cell's expression to the cell embedding: the sum of the
            visible genes' identity embeddings weighted by their values (CellPLM's cell token), normalised,
            as a third input of the pooling projection beside the pooled image and gene tokens. The mean of
            the gene tokens says which genes a cell expresses but keeps how much of each only through
            attention, and a linear probe from the embedding recovered genes below 30 principal
            components (issue 16); the sketch keeps them linearly from the first step. Hidden (masked)
            values never enter it. Every preset sets True; the field's default False keeps checkpoints
            saved before it existed giving the same embeddings.
        vision_backbone: optional name or local path of any transformers vision model (loaded with
            ``AutoModel``) used instead of the built-in ViT. Its config is copied into
            ``vision_backbone_config`` so a saved checkpoint rebuilds it without the original path.
        vision_backbone_config: the backbone's config dict (filled in from ``vision_backbone``).
        max_genes: default number of gene tokens per cell the processor keeps (expressed genes plus
            sampled zeros).
        hidden_act: activation of the MLPs.
        layer_norm_eps: epsilon of every LayerNorm.
        hidden_dropout_prob: dropout after attention and MLP outputs.
        attention_dropout: dropout on attention probabilities.
        initializer_range: std of the normal initialisation of weights.
    """

    model_type = "spatia_cell"
    base_config_key = "cell_config"

    gene_vocab: list[str] | None = None
    gene_ensembl_ids: list[str | None] | None = None
    hidden_size: int = 128
    num_attention_heads: int = 4
    intermediate_size: int = 512
    num_expression_layers: int = 2
    num_image_layers: int = 2
    num_fusion_layers: int = 2
    fusion: str = "cross_attention"
    image_size: int = 64
    patch_size: int = 8
    num_channels: int = 2
    image_pool_sigma: float = 0.0
    expression_sketch: bool = False
    vision_backbone: str | None = None
    vision_backbone_config: dict | None = None
    max_genes: int = 256
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    hidden_dropout_prob: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        _reject_unknown_fields(self, kwargs)
        self.gene_vocab = [str(g) for g in (self.gene_vocab or [])]
        _check(self.image_pool_sigma >= 0.0, "image_pool_sigma", self.image_pool_sigma,
               "use 0 (plain mean) or a positive fraction of the crop side")
        if len(set(self.gene_vocab)) != len(self.gene_vocab):
            seen: set[str] = set()
            dups = [g for g in self.gene_vocab if g in seen or seen.add(g)]
            raise ValueError(f"gene_vocab has duplicate symbols {dups[:5]}. Fix: pass each gene once")
        clash = [g for g in self.gene_vocab if g in SPECIAL_TOKENS]
        _check(not clash, "gene_vocab", clash, f"gene symbols may not be special tokens {SPECIAL_TOKENS}")
        if self.gene_ensembl_ids is not None:
            self.gene_ensembl_ids = [None if g is None else str(g) for g in self.gene_ensembl_ids]
            _check(len(self.gene_ensembl_ids) == len(self.gene_vocab), "gene_ensembl_ids",
                   f"<{len(self.gene_ensembl_ids)} ids>", f"give one id per gene ({len(self.gene_vocab)}) or None")
        _check_heads("", self.hidden_size, self.num_attention_heads)
        _check(self.fusion in FUSION_MODES, "fusion", self.fusion, f"use one of {FUSION_MODES}")
        _check(self.image_size > 0 and self.patch_size > 0 and self.image_size % self.patch_size == 0,
               "image_size", self.image_size, f"use an image_size divisible by patch_size={self.patch_size}")
        _check(self.num_channels > 0, "num_channels", self.num_channels, "use at least one channel")
        for name in ("num_expression_layers", "num_image_layers", "num_fusion_layers"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "use a non-negative number of layers")
        _check(self.max_genes > 0, "max_genes", self.max_genes, "use a positive number of gene tokens")
        if self.vision_backbone and self.vision_backbone_config is None:
            from transformers import AutoConfig

            self.vision_backbone_config = AutoConfig.from_pretrained(self.vision_backbone).to_dict()
        super().__post_init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        """Rows of the gene embedding: the special ids plus one per gene."""
        return NUM_SPECIAL_TOKENS + len(self.gene_vocab)

    def gene_to_id(self) -> dict[str, int]:
        """Vocabulary id of every gene symbol."""
        return {g: NUM_SPECIAL_TOKENS + i for i, g in enumerate(self.gene_vocab)}

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SpatiaCellConfig":
        return cls(**{**_preset(name)["cell_config"], **overrides})


class SpatiaNicheConfig(PretrainedConfig):
    """Configuration of :class:`~spatia_hf.models.modeling_niche.SpatiaNicheModel` (the cells of a neighbourhood).

    Args:
        cell_embed_dim: width of the incoming cell embeddings (the cell model's ``hidden_size``).
        hidden_size: width of the niche tokens and of the niche embedding.
        num_attention_heads: attention heads.
        intermediate_size: MLP hidden width.
        num_hidden_layers: transformer blocks.
        position_min_wavelength_um: shortest wavelength (µm) of the 2-D Fourier encoding of cell positions
            (about a cell diameter: finer features would flip between two centres 1 µm apart, so nearby
            cells would get unrelated niche embeddings).
        position_max_wavelength_um: longest wavelength (µm); positions are relative to the niche centre.
        num_position_frequencies: frequencies per axis (geometric between the two wavelengths).
        use_niche_image: whether a niche image crop adds patch tokens.
        niche_image_size: side of the niche crop (pixels) when ``use_niche_image``.
        niche_patch_size: patch side (pixels) of the niche image tokens.
        num_channels: stain channels of the niche crop.
        num_neighbours: cells of a cell-centred neighbourhood (the centre included), the niche the
            model is trained and embedded on (:func:`spatia_hf.data.neighbourhoods.cell_neighbourhoods`).
        neighbour_radius_um: optional cut-off (µm) of those neighbourhoods; None = the ``num_neighbours``
            nearest cells whatever their distance.
        pooling: how the niche embedding pools the niche: ``"mean"`` of the member tokens' outputs
            (a learned smoothing, informative even at initialisation) or the ``"cls"`` token.
        use_expression_profiles: add to every member token a linear expression profile of the cell
            (its gene embeddings weighted by log1p values), next to its cell embedding.
        num_cell_states: cell states: prototypes in the cell-embedding space (k-means centres of cell
            embeddings, fitted after pretraining by :meth:`SpatiaNicheModel.fit_cell_states`). A niche's
            composition over them (its members' mean soft assignment) is the niche embedding that
            spatial domains are found on: Schürch et al.'s cellular neighbourhoods over learned states.
            It beat the pooled niche token and smoothed PCA for domains (issue 16 note). Every preset
            sets 32 (8 for ``tiny``); the field's default 0 (off) keeps checkpoints saved before it.
        cell_state_temperature: softness of the assignment to cell states, as a fraction of the median
            squared distance of a cell to its nearest state (smaller = closer to a hard assignment).
        cell_state_neighbours: the composition counts this many cells nearest the neighbourhood's centre
            (the centre included; all of them when the neighbourhood is smaller). It may exceed
            ``num_neighbours``: :func:`spatia_hf.inference.embed_cell_niches` then finds the larger
            neighbourhood for the composition alone. The field's default 20 (uniform weights) is what
            checkpoints saved before ``cell_state_bandwidth`` used; every preset counts 40 with a kernel.
        cell_state_bandwidth: None: every counted cell weighs the same; a float: Gaussian weights
            ``exp(-d^2 / 2 sigma^2)`` of a cell's distance ``d`` to the centre, with ``sigma`` this fraction of
            the distance to the farthest counted cell (so the kernel adapts to local density and needs no
            µm constant), as BANKSY weights its neighbour means. Presets: 0.35 of the 40th cell's distance
            (about 5 cells within one sigma; the weight at the 40th cell is 0.02, so the count hardly
            matters). On six generated tissues (bands and blobs, 3-5 domains, 1,200-4,000 cells a section,
            3 pretraining seeds each) it gave better domains than the uniform 20 on every one (issue 16
            note, session 9).
        hidden_act, layer_norm_eps, hidden_dropout_prob, attention_dropout, initializer_range: as in
            :class:`SpatiaCellConfig`.
    """

    model_type = "spatia_niche"
    base_config_key = "niche_config"

    cell_embed_dim: int = 128
    hidden_size: int = 128
    num_attention_heads: int = 4
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    position_min_wavelength_um: float = 10.0
    position_max_wavelength_um: float = 400.0
    num_position_frequencies: int = 16
    use_niche_image: bool = False
    niche_image_size: int = 128
    niche_patch_size: int = 16
    num_channels: int = 2
    num_neighbours: int = 30
    neighbour_radius_um: float | None = None
    pooling: str = "mean"
    use_expression_profiles: bool = True
    num_cell_states: int = 0
    cell_state_temperature: float = 0.3
    cell_state_neighbours: int = 20
    cell_state_bandwidth: float | None = None
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    hidden_dropout_prob: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        _reject_unknown_fields(self, kwargs)
        _check_heads("", self.hidden_size, self.num_attention_heads)
        _check(self.num_cell_states >= 0, "num_cell_states", self.num_cell_states, "use 0 (off) or a positive count")
        _check(self.cell_state_temperature > 0, "cell_state_temperature", self.cell_state_temperature,
               "use a positive temperature (e.g. 0.3)")
        _check(self.cell_state_neighbours >= 1, "cell_state_neighbours", self.cell_state_neighbours,
               "use at least 1 cell")
        _check(self.cell_state_bandwidth is None or self.cell_state_bandwidth > 0, "cell_state_bandwidth",
               self.cell_state_bandwidth, "use None (uniform weights) or a positive fraction such as 0.35")
        _check(self.pooling in NICHE_POOLINGS, "pooling", self.pooling, f"use one of {NICHE_POOLINGS}")
        _check(self.num_neighbours >= 1, "num_neighbours", self.num_neighbours, "use at least 1 cell")
        _check(self.neighbour_radius_um is None or self.neighbour_radius_um > 0, "neighbour_radius_um",
               self.neighbour_radius_um, "use a positive radius in µm or None")
        _check(self.cell_embed_dim > 0, "cell_embed_dim", self.cell_embed_dim, "use the cell model's hidden_size")
        _check(0 < self.position_min_wavelength_um < self.position_max_wavelength_um, "position_min_wavelength_um",
               self.position_min_wavelength_um, "use 0 < position_min_wavelength_um < position_max_wavelength_um")
        _check(self.num_position_frequencies > 0, "num_position_frequencies", self.num_position_frequencies,
               "use at least one frequency")
        _check(self.niche_image_size % self.niche_patch_size == 0, "niche_image_size", self.niche_image_size,
               f"use a size divisible by niche_patch_size={self.niche_patch_size}")
        super().__post_init__(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SpatiaNicheConfig":
        return cls(**{**_preset(name)["niche_config"], **overrides})


class SpatiaTissueConfig(PretrainedConfig):
    """Configuration of :class:`~spatia_hf.models.modeling_tissue.SpatiaTissueModel` (the niches of a section).

    Args:
        niche_embed_dim: width of the incoming niche embeddings (the niche model's ``hidden_size``).
        hidden_size, num_attention_heads, intermediate_size, num_hidden_layers: transformer sizes.
        position_min_wavelength_um / position_max_wavelength_um / num_position_frequencies: 2-D
            Fourier encoding of the niche positions (µm, section coordinates).
        merge_ratio: spatially guided token merging: fraction of the current tokens merged away at
            the start of each layer (a float for every layer, or a list with one value per layer).
            ``0`` is exactly the model without merging.
        merge_total_ratio: if set, overrides ``merge_ratio`` with the per-layer fraction that removes
            this total fraction of tokens by the last layer: ``1 - (1 - total) ** (1 / layers)``.
        merge_k: a token may merge only into one of its ``merge_k`` nearest spatial neighbours.
        merge_radius_um: optional maximum distance (µm) between merged tokens.
        proportional_attention: add ``log(size)`` of merged tokens to the attention logits (ToMe).
        merge_input_ratio: fraction of the niches merged away *before* the input projection (spatial
            neighbours with similar niche embeddings, by the same matching), so no layer and no
            input feature runs at the full niche count: the memory option for very large sections.
            ``0`` (default) = off, exactly the model without it. Approximate: the position
            features and ``input_norm`` see merged niches. Above 0.5 it takes several bipartite
            rounds (each merges at most half); at most 0.9. Every niche is still unmerged in
            ``niche_embeds``.
        hidden_act, layer_norm_eps, hidden_dropout_prob, attention_dropout, initializer_range: as in
            :class:`SpatiaCellConfig`. ``chunk_size_feed_forward`` (transformers' field, 0 = off)
            runs each layer's MLP on that many tokens at a time (same values, less memory).
    """

    model_type = "spatia_tissue"
    base_config_key = "tissue_config"

    niche_embed_dim: int = 128
    hidden_size: int = 128
    num_attention_heads: int = 4
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    position_min_wavelength_um: float = 20.0
    position_max_wavelength_um: float = 20000.0
    num_position_frequencies: int = 16
    merge_ratio: float | list[float] = 0.0
    merge_total_ratio: float | None = None
    merge_k: int = 8
    merge_radius_um: float | None = None
    proportional_attention: bool = True
    merge_input_ratio: float = 0.0
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    hidden_dropout_prob: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        _reject_unknown_fields(self, kwargs)
        _check_heads("", self.hidden_size, self.num_attention_heads)
        self.merge_input_ratio = float(self.merge_input_ratio)
        _check(0.0 <= self.merge_input_ratio <= 0.9, "merge_input_ratio", self.merge_input_ratio,
               "use a fraction in [0, 0.9] (0 = off)")
        _check(0 < self.position_min_wavelength_um < self.position_max_wavelength_um, "position_min_wavelength_um",
               self.position_min_wavelength_um, "use 0 < position_min_wavelength_um < position_max_wavelength_um")
        if isinstance(self.merge_ratio, (list, tuple)):
            self.merge_ratio = [float(r) for r in self.merge_ratio]
            _check(len(self.merge_ratio) == self.num_hidden_layers, "merge_ratio", self.merge_ratio,
                   f"give one ratio per layer ({self.num_hidden_layers}) or a single float")
            ratios = self.merge_ratio
        else:
            self.merge_ratio = float(self.merge_ratio)
            ratios = [self.merge_ratio]
        _check(all(0.0 <= r <= 0.5 for r in ratios), "merge_ratio", self.merge_ratio,
               "use fractions in [0, 0.5] (bipartite matching merges at most half the tokens per layer)")
        if self.merge_total_ratio is not None:
            _check(0.0 <= self.merge_total_ratio < 1.0, "merge_total_ratio", self.merge_total_ratio,
                   "use a fraction in [0, 1)")
        _check(self.merge_k > 0, "merge_k", self.merge_k, "use at least one neighbour")
        super().__post_init__(**kwargs)

    def layer_merge_ratios(self) -> list[float]:
        """Fraction of tokens merged away at the start of each layer."""
        n = self.num_hidden_layers
        if self.merge_total_ratio is not None:
            per = 1.0 - (1.0 - self.merge_total_ratio) ** (1.0 / max(n, 1))
            return [min(per, 0.5)] * n
        if isinstance(self.merge_ratio, list):
            return list(self.merge_ratio)
        return [self.merge_ratio] * n

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SpatiaTissueConfig":
        return cls(**{**_preset(name)["tissue_config"], **overrides})


class SpatiaConfig(PretrainedConfig):
    """Composite configuration of :class:`~spatia_hf.models.modeling_spatia.SpatiaModel` and its heads.

    Holds the three scale configs (like ``CLIPConfig`` holds text and vision) plus the settings of
    the pretraining objectives and heads.

    Args:
        cell_config / niche_config / tissue_config: dicts or config objects of the three scales.
        expression_likelihood: masked gene modelling loss: ``"mse"`` on log1p-normalised values,
            ``"nb"`` (negative binomial) or ``"zinb"`` (zero-inflated NB) on raw counts (needs
            ``gene_counts`` and ``size_factors`` in the batch, which the processor provides).
        mgm_mask_ratio: fraction of real gene tokens whose value is hidden in masked gene modelling.
        mim_mask_ratio: fraction of image patches hidden in masked image modelling (MAE).
        niche_mask_ratio: fraction of a niche's cells hidden in niche masked-cell prediction.
        mgm_weight / mim_weight / contrastive_weight / niche_weight: weights of the four pretraining
            losses in ``loss`` (0 switches an objective off).
        niche_profile_weight: weight of the neighbourhood-expression objective: the pooled niche
            embedding predicts the mean log1p expression of all its cells, the hidden ones included.
        tissue_weight: weight of masked niche modelling at the tissue scale: the tissue model sees the
            niche embeddings of a batch's nearby neighbourhoods (one section), ``tissue_mask_ratio`` of
            them replaced by a mask embedding, and predicts the hidden neighbourhoods' mean expression.
        tissue_mask_ratio: fraction of a tissue's niches hidden in masked niche modelling.
        mim_decoder_hidden_size / mim_decoder_num_layers / mim_decoder_num_heads: the MAE pixel decoder.
        norm_pix_loss: reconstruct per-patch normalised pixels (MAE's default).
        cell_reconstruction: which gene tokens the pooled cell embedding must predict (its own
            decoder, MSE on log1p, part of ``mgm_loss``): ``"all"`` every real token, hidden and visible
            (the embedding keeps the cell's whole profile, not only what neighbouring genes imply), or
            ``"masked"`` only the hidden ones (scGPT's GEPC).
        cell_reconstruction_weight: weight of that term inside ``mgm_loss``.
        contrastive_dim: width of the image/expression projections of the InfoNCE objective.
        logit_scale_init_value: initial log inverse temperature of InfoNCE (CLIP's ln(1/0.07)).
        classifier_dropout: dropout before classification heads.
        initializer_range: std of the normal initialisation of head weights.
    """

    model_type = "spatia"
    sub_configs_defaults = {
        "cell_config": SpatiaCellConfig,
        "niche_config": SpatiaNicheConfig,
        "tissue_config": SpatiaTissueConfig,
    }

    cell_config: dict | SpatiaCellConfig | None = None
    niche_config: dict | SpatiaNicheConfig | None = None
    tissue_config: dict | SpatiaTissueConfig | None = None
    expression_likelihood: str = "mse"
    mgm_mask_ratio: float = 0.25
    mim_mask_ratio: float = 0.75
    niche_mask_ratio: float = 0.25
    mgm_weight: float = 1.0
    mim_weight: float = 1.0
    contrastive_weight: float = 1.0
    niche_weight: float = 1.0
    niche_profile_weight: float = 1.0
    tissue_weight: float = 1.0
    tissue_mask_ratio: float = 0.25
    mim_decoder_hidden_size: int = 64
    mim_decoder_num_layers: int = 1
    mim_decoder_num_heads: int = 4
    norm_pix_loss: bool = True
    cell_reconstruction: str = "all"
    cell_reconstruction_weight: float = 1.0
    contrastive_dim: int = 128
    logit_scale_init_value: float = 2.6592
    classifier_dropout: float = 0.1
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        _reject_unknown_fields(self, kwargs)
        super().__post_init__(**kwargs)
        cell, niche, tissue = self.cell_config, self.niche_config, self.tissue_config
        _check(niche.cell_embed_dim == cell.hidden_size, "niche_config.cell_embed_dim", niche.cell_embed_dim,
               f"set it to cell_config.hidden_size={cell.hidden_size}")
        _check(tissue.niche_embed_dim == niche.hidden_size, "tissue_config.niche_embed_dim", tissue.niche_embed_dim,
               f"set it to niche_config.hidden_size={niche.hidden_size}")
        _check(self.expression_likelihood in EXPRESSION_LIKELIHOODS, "expression_likelihood",
               self.expression_likelihood, f"use one of {EXPRESSION_LIKELIHOODS}")
        for name in ("mgm_mask_ratio", "mim_mask_ratio", "niche_mask_ratio", "tissue_mask_ratio"):
            _check(0.0 <= getattr(self, name) < 1.0, name, getattr(self, name), "use a fraction in [0, 1)")
        _check(self.cell_reconstruction in CELL_RECONSTRUCTION_TARGETS, "cell_reconstruction", self.cell_reconstruction,
               f"use one of {CELL_RECONSTRUCTION_TARGETS}")
        for name in ("mgm_weight", "mim_weight", "contrastive_weight", "niche_weight", "cell_reconstruction_weight",
                     "niche_profile_weight", "tissue_weight"):
            _check(getattr(self, name) >= 0.0, name, getattr(self, name), "use a non-negative weight")
        _check_heads("mim_decoder_", self.mim_decoder_hidden_size, self.mim_decoder_num_heads)

    @classmethod
    def from_preset(
        cls,
        name: str,
        gene_vocab: list[str] | None = None,
        gene_ensembl_ids: list[str | None] | None = None,
        *,
        image_size: int | None = None,
        num_channels: int | None = None,
        cell_config: dict | None = None,
        niche_config: dict | None = None,
        tissue_config: dict | None = None,
        **kwargs,
    ) -> "SpatiaConfig":
        """A size preset (``tiny``/``small``/``base``/``large``) with the given gene vocabulary.

        ``image_size``/``num_channels`` override the crop geometry; ``cell_config`` etc. are dicts of
        further overrides per scale; other keyword arguments set composite fields (``num_labels``,
        ``expression_likelihood``, loss weights, ...).
        """
        preset = _preset(name)
        cell = {**preset["cell_config"], **(cell_config or {})}
        if gene_vocab is not None:
            cell["gene_vocab"] = list(gene_vocab)
        if gene_ensembl_ids is not None:
            cell["gene_ensembl_ids"] = list(gene_ensembl_ids)
        if image_size is not None:
            cell["image_size"] = image_size
        if num_channels is not None:
            cell["num_channels"] = num_channels
        niche = {**preset["niche_config"], **(niche_config or {})}
        if num_channels is not None:
            niche["num_channels"] = num_channels
        tissue = {**preset["tissue_config"], **(tissue_config or {})}
        top = {**preset["composite"], **kwargs}
        return cls(cell_config=cell, niche_config=niche, tissue_config=tissue, **top)


def _scale(d: int, heads: int, layers: dict, **extra) -> dict:
    return {"hidden_size": d, "num_attention_heads": heads, "intermediate_size": 4 * d, **layers, **extra}


# cell-centred pooling of the crop's image tokens, the presets' choice (see SpatiaCellConfig)
IMAGE_POOL_SIGMA = 0.125
# Gaussian-weighted niche compositions, the presets' choice (see SpatiaNicheConfig.cell_state_bandwidth)
COMPOSITION_KERNEL = {"cell_state_neighbours": 40, "cell_state_bandwidth": 0.35}


_PRESETS: dict[str, dict[str, dict]] = {
    # tests: seconds on a CPU
    "tiny": {
        "cell_config": _scale(32, 2, {"num_expression_layers": 1, "num_image_layers": 1, "num_fusion_layers": 1},
                              image_size=32, patch_size=8, max_genes=64, image_pool_sigma=IMAGE_POOL_SIGMA,
                              expression_sketch=True),
        "niche_config": _scale(32, 2, {"num_hidden_layers": 1}, cell_embed_dim=32, niche_image_size=32,
                               niche_patch_size=8, num_position_frequencies=8, num_cell_states=8,
                               **COMPOSITION_KERNEL),
        "tissue_config": _scale(32, 2, {"num_hidden_layers": 2}, niche_embed_dim=32, num_position_frequencies=8,
                                merge_ratio=0.25, merge_k=4),
        "composite": {"mim_decoder_hidden_size": 32, "mim_decoder_num_layers": 1, "mim_decoder_num_heads": 2,
                      "contrastive_dim": 32},
    },
    # the CPU demo: minutes
    "small": {
        "cell_config": _scale(128, 4, {"num_expression_layers": 2, "num_image_layers": 3, "num_fusion_layers": 2},
                              image_size=64, patch_size=8, max_genes=256, image_pool_sigma=IMAGE_POOL_SIGMA,
                              expression_sketch=True),
        "niche_config": _scale(128, 4, {"num_hidden_layers": 2}, cell_embed_dim=128, niche_image_size=128,
                               niche_patch_size=16, num_cell_states=32, **COMPOSITION_KERNEL),
        "tissue_config": _scale(128, 4, {"num_hidden_layers": 4}, niche_embed_dim=128, merge_total_ratio=0.9,
                                merge_k=8),
        "composite": {"mim_decoder_hidden_size": 64, "mim_decoder_num_layers": 1, "mim_decoder_num_heads": 4,
                      "contrastive_dim": 128},
    },
    # paper scale (GPUs)
    "base": {
        "cell_config": _scale(512, 8, {"num_expression_layers": 6, "num_image_layers": 8, "num_fusion_layers": 4},
                              image_size=224, patch_size=16, max_genes=1024, image_pool_sigma=IMAGE_POOL_SIGMA,
                              expression_sketch=True),
        "niche_config": _scale(512, 8, {"num_hidden_layers": 6}, cell_embed_dim=512, niche_image_size=256,
                               niche_patch_size=16, num_cell_states=32, **COMPOSITION_KERNEL),
        "tissue_config": _scale(512, 8, {"num_hidden_layers": 8}, niche_embed_dim=512, merge_total_ratio=0.95,
                                merge_k=8),
        "composite": {"mim_decoder_hidden_size": 256, "mim_decoder_num_layers": 4, "mim_decoder_num_heads": 8,
                      "contrastive_dim": 256},
    },
    "large": {
        "cell_config": _scale(768, 12, {"num_expression_layers": 12, "num_image_layers": 12, "num_fusion_layers": 4},
                              image_size=256, patch_size=16, max_genes=1024, image_pool_sigma=IMAGE_POOL_SIGMA,
                              expression_sketch=True),
        "niche_config": _scale(768, 12, {"num_hidden_layers": 8}, cell_embed_dim=768, niche_image_size=256,
                               niche_patch_size=16, num_cell_states=32, **COMPOSITION_KERNEL),
        "tissue_config": _scale(768, 12, {"num_hidden_layers": 12}, niche_embed_dim=768, merge_total_ratio=0.95,
                                merge_k=8),
        "composite": {"mim_decoder_hidden_size": 512, "mim_decoder_num_layers": 8, "mim_decoder_num_heads": 16,
                      "contrastive_dim": 512},
    },
}


def _preset(name: str) -> dict[str, dict]:
    if name not in _PRESETS:
        raise ValueError(f"preset={name!r} is unknown. Fix: use one of {PRESETS}")
    return copy.deepcopy(_PRESETS[name])


__all__ = [
    "SpatiaCellConfig",
    "SpatiaNicheConfig",
    "SpatiaTissueConfig",
    "SpatiaConfig",
    "PAD_TOKEN_ID",
    "MASK_TOKEN_ID",
    "CLS_TOKEN_ID",
    "UNK_TOKEN_ID",
    "NUM_SPECIAL_TOKENS",
    "SPECIAL_TOKENS",
    "PRESETS",
]
