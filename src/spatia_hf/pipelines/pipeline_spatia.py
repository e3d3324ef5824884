"""``SpatiaGenerationPipeline``: cell images generated from a cell's expression (a diffusers pipeline).

Components (``register_modules``, one folder each in a saved pipeline, named in ``model_index.json``):

* the denoiser, exactly one of two components (the other is None; ``pipe.denoiser`` is whichever is set):

  - ``unet`` (default): a diffusers ``UNet2DConditionModel`` that cross-attends to the condition
    tokens. Built by :meth:`SpatiaGenerationPipeline.from_genes` it also takes a *global condition*
    (``class_embed_type="projection"``) as ``class_labels``, added to the timestep embedding: the
    condition encoder's :meth:`~SpatiaConditionEncoder.global_condition`, by default the per-gene
    standardised log1p profile (older pipelines: the flattened condition tokens), so a whole-cell
    property such as nucleus size can be set in every ResNet block. A UNet without a class embedding
    (pipelines saved before) is run with cross-attention only: the path is detected from
    ``unet.config.class_embed_type``;
  - ``transformer``: a DiT, diffusers' ``PixArtTransformer2DModel`` (:func:`make_transformer`,
    ``from_genes(..., denoiser="transformer")``; diffusers' component name for DiTs, as in
    ``PixArtAlphaPipeline``): patch tokens, adaLN-single timestep conditioning, cross-attention to the
    condition tokens in every block. It takes cross-attention only (no ``class_labels``; the encoder's
    ``expression_token`` carries the whole profile as a token) and is called the PixArt way (timestep
    broadcast to the batch, ``added_cond_kwargs`` without resolution micro-conditions, the first half of
    a learned-sigma output). Other diffusers transformers do not fit: ``DiTTransformer2DModel`` takes
    integer class labels only, SD3/Flux transformers need pooled projections.

  Pipelines saved before the ``transformer`` component existed (no such key in ``model_index.json``)
  load unchanged, with ``transformer=None``;
* ``scheduler``: any diffusers scheduler; training uses DDPM, sampling DPM-Solver++ or DDIM, swapped
  with ``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)``;
* ``condition_encoder``: :class:`~spatia_hf.pipelines.condition_encoder.SpatiaConditionEncoder`, SPATIA's
  expression branch plus a learned null condition; it carries the gene panel;
* ``vae`` (optional, None by default): an ``AutoencoderKL`` for latent generation at >= 128 px; at
  the default 32-64 px the denoiser works in pixel space. ``spatia_hf.training.vae.train_vae`` trains
  one on a dataset's crops and ``train_generator(..., vae=...)`` the denoiser on its latents;
  latent pipelines sample without thresholding (``sampling_scheduler(..., latent=True)``).

Images have the dataset's stain channels (``channel_names``, e.g. DAPI and boundary), values in
[0, 1]. ``output_type="pil"`` renders them as RGB: DAPI/nuclei blue, boundary/membrane green, other
channels red, magenta, cyan, yellow (additive, clipped). ``"np"`` gives ``[N, H, W, C]`` float32 and
``"pt"`` ``[N, C, H, W]`` float32 with every channel.

Perturbation (``perturbation={"NUCSIZE": 4.0}``) multiplies that gene's counts by the fold and
generates the control and the perturbed images from the same initial noise (and the same sampler
noise), so a morphology difference is attributable to the edit alone. The edited cell is normalised
by its *unedited* library size (``perturbation_library="unedited"``, the default): the size factor
belongs to the cell (capture, cell size), the edit changes one gene's expression, so only that gene's
normalised value moves. Recomputing the library from the edited counts (``"edited"``, the behaviour
before) hides part of the edit of an abundant gene and lowers every other gene: ``NUCSIZE`` holds ~20%
of a demo cell's counts, so x4 raised its normalised value only ~2.4x. Callers that batch edited
copies themselves pass ``reference_rows`` (row ``i`` is an edit of row ``reference_rows[i]``).
``perturbation_guidance`` (default 4) adds guidance along the edit, ``w_p x (eps(x, edited) -
eps(x, unedited))`` at the edited sample, one more denoiser pass per edited image: the edit is guided on its own
(``w_p``), apart from how strongly every image follows its expression (``guidance_scale``, default 2).

Token merging (ToMe in the denoiser's self-attention, ``spatia_hf.pipelines.denoiser_merging``) is off by
default (``token_merging_ratio=0.0``): it is recorded in the pipeline config, saved in
``model_index.json``, and changed with :meth:`SpatiaGenerationPipeline.set_token_merging`. It patches
the ``BasicTransformerBlock`` self-attention of either denoiser: the UNet's at its finest attention
level, every PixArt block's over the patch grid.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers import (AutoencoderKL, PixArtTransformer2DModel,
                       UNet2DConditionModel)
from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..hub.mixins import SpatiaPipelineHubMixin  # Hub-id loading + push with the SPATIA card
from ..hub.push import push_pipeline
from ..models.configuration_spatia import NUM_SPECIAL_TOKENS
from ..models.processing_spatia import SpatiaProcessor
from ..utils.io import staged_dir, weight_files
from .condition_encoder import ENCODER_PRESETS, SpatiaConditionEncoder
from .denoisers import (DENOISERS, denoise, denoiser_kind, make_transformer, make_unet, sampling_scheduler,
                        training_scheduler, uses_global_condition)
from .image_processing import DEFAULT_CHANNEL_NAMES, default_channel_names, render_rgb

# diffusers accepts a component's library from a Hub repo only when it is a key of LOADABLE_CLASSES
# (or a code file in the repo); ours is named by module path. Register that path, and the one pipelines
# saved before the package layout of 0.2 recorded, so ``SpatiaGenerationPipeline.from_pretrained("org/name")``
# works with the package installed.
CONDITION_ENCODER_MODULE = SpatiaConditionEncoder.__module__
for _module in (CONDITION_ENCODER_MODULE, "spatia_hf.condition_encoder"):
    LOADABLE_CLASSES.setdefault(_module, {"ModelMixin": ["save_pretrained", "from_pretrained"]})

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Two guidance weights, chosen apart because they trade different things (session 11; docs/dev_notes/session-11):
# classifier-free guidance ``w`` makes a cell look like its expression's type but, past ~2, pushes intensities off
# the real distribution (feature FID of the 19-minute UNet on held-out cells: 8.7 / 8.9 at w = 2 vs 22.3 / 21.2
# at w = 4 on two training seeds; type accuracy 0.933 / 0.906 vs 0.956 / 0.928). Edit guidance ``w_p`` then
# sets how far an edited cell moves along its edit, without touching the unedited images: 4 was chosen on a
# validation tissue (other seed, geometry, types and panel than the demo) as the weight whose NUCSIZE response
# came closest to the ground truth there.
DEFAULT_GUIDANCE_SCALE = 2.0
DEFAULT_TOKEN_MERGING_RATIO = 0.0
# How an edited cell is normalised (see the module docstring): by its unedited library size.
PERTURBATION_LIBRARIES = ("unedited", "edited")
DEFAULT_PERTURBATION_LIBRARY = "unedited"
DEFAULT_PERTURBATION_GUIDANCE = 4.0


def _rescale_noise_cfg():
    """diffusers' ``rescale_noise_cfg``, imported on first use (its module loads the Stable Diffusion pipeline)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    return rescale_noise_cfg


@dataclass
class SpatiaPipelineOutput(BaseOutput):
    """Output of :class:`SpatiaGenerationPipeline`.

    Args:
        images: generated cells (list of RGB PIL images, ``[N, H, W, C]`` numpy or ``[N, C, H, W]`` torch,
            values in [0, 1]); ``num_images_per_expression`` consecutive images per input row.
        perturbed_images: with ``perturbation``: the same cells generated from the same noise after the
            edit, aligned one to one with ``images``; None otherwise.
        unknown_genes: genes of ``gene_names`` the model's panel does not have (ignored, warned about).
        gene_coverage: the given genes against the model's panel: ``n_panel_genes`` (given), ``n_kept``,
            ``coverage``, ``unknown_genes``, ``missing_model_genes`` (panel genes not given, counted as 0).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    perturbed_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None
    unknown_genes: list[str] | None = None
    gene_coverage: dict[str, Any] | None = None


def _expression_matrix(expression: Any, gene_names: Sequence[str] | None) -> tuple[np.ndarray, list[str] | None]:
    """Any supported expression input -> ``[B, n]`` float64 array and the gene names it carries."""
    names = None if gene_names is None else [str(g) for g in gene_names]
    try:  # AnnData: .X rows, genes from var_names
        import anndata

        if isinstance(expression, anndata.AnnData):
            names = names if names is not None else [str(g) for g in expression.var_names]
            expression = expression.X
    except ImportError:  # pragma: no cover - anndata is a dependency
        pass
    try:
        import pandas as pd

        if isinstance(expression, pd.DataFrame):
            names = names if names is not None else [str(g) for g in expression.columns]
            expression = expression.to_numpy()
        elif isinstance(expression, pd.Series):
            names = names if names is not None else [str(g) for g in expression.index]
            expression = expression.to_numpy()
    except ImportError:  # pragma: no cover
        pass
    import scipy.sparse as sp

    if sp.issparse(expression):
        expression = expression.toarray()
    if isinstance(expression, torch.Tensor):
        expression = expression.detach().cpu().double().numpy()
    try:
        x = np.asarray(expression, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"expression: cannot read {type(expression).__name__} as numbers ({err}). Fix: pass counts as "
                         "a numpy array / torch tensor / list, a pandas Series/DataFrame or an AnnData") from None
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"expression: expected a vector [n_genes] or a matrix [n_cells, n_genes], got shape {x.shape}")
    return x, names


class SpatiaGenerationPipeline(SpatiaPipelineHubMixin, DiffusionPipeline):
    """Expression-conditioned cell image generation (SPATIA's generator).

    Args:
        unet: the UNet denoiser (``UNet2DConditionModel`` with cross-attention on ``encoder_hidden_states``).
        scheduler: any diffusers scheduler.
        condition_encoder: :class:`SpatiaConditionEncoder` (gene panel + expression branch + null condition).
        vae: optional ``AutoencoderKL``; None means pixel-space generation.
        channel_names: stain channel names of the images (rendering and provenance).
        token_merging_ratio: fraction of self-attention tokens merged in the denoiser (0 = off).
        token_merging_max_downsample: merge in self-attention at most this many times coarser than the
            input (None: the finest resolution that has self-attention, e.g. 2 for the ``small`` UNet, 1
            (the patch grid) for a transformer).
        transformer: the DiT denoiser instead of ``unet`` (``PixArtTransformer2DModel``, see
            :func:`make_transformer`); exactly one of ``unet`` and ``transformer`` is given.
    """

    model_cpu_offload_seq = "condition_encoder->unet->transformer->vae"
    _optional_components = ["unet", "transformer", "vae"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        unet: UNet2DConditionModel | None = None,
        *,
        scheduler: SchedulerMixin,
        condition_encoder: SpatiaConditionEncoder,
        vae: AutoencoderKL | None = None,
        channel_names: list[str] | None = None,
        token_merging_ratio: float = DEFAULT_TOKEN_MERGING_RATIO,
        token_merging_max_downsample: int | None = None,
        transformer: PixArtTransformer2DModel | None = None,
    ):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("unet / transformer: " + ("both are given" if unet is not None else "neither is given")
                             + "; the pipeline takes exactly one denoiser. Fix: pass unet=make_unet(...) or "
                             "transformer=make_transformer(...), not both")
        self.register_modules(unet=unet, transformer=transformer, scheduler=scheduler,
                              condition_encoder=condition_encoder, vae=vae)
        denoiser = self.denoiser
        n_channels = vae.config.in_channels if vae is not None else denoiser.config.in_channels
        names = list(channel_names) if channel_names is not None else default_channel_names(n_channels)
        if len(names) != n_channels:
            raise ValueError(f"channel_names={names}: {len(names)} names for {n_channels} image channels. "
                             "Fix: give one name per channel")
        self._check_components(denoiser, condition_encoder, vae, "unet" if unet is not None else "transformer")
        self.register_to_config(channel_names=names, token_merging_ratio=0.0, token_merging_max_downsample=None)
        self.set_token_merging(token_merging_ratio, token_merging_max_downsample)

    @staticmethod
    def _check_components(denoiser, condition_encoder, vae, name: str = "unet") -> None:
        """Refuse components that cannot work together (``name``: the denoiser's component name)."""
        kind = denoiser_kind(denoiser)
        if kind != name:
            raise ValueError(f"{name}: got a {type(denoiser).__name__}, which is a {kind}. Fix: pass it as {kind}=")
        if name == "transformer":
            SpatiaGenerationPipeline._check_transformer(denoiser, condition_encoder, vae)
            return
        unet = denoiser
        cross = unet.config.get("cross_attention_dim")
        if cross is not None and cross != condition_encoder.config.cross_attention_dim:
            raise ValueError(f"condition_encoder.cross_attention_dim={condition_encoder.config.cross_attention_dim} "
                             f"differs from unet.cross_attention_dim={cross}. Fix: build both with the same width")
        class_type = unet.config.get("class_embed_type")
        if class_type not in (None, "projection") or unet.config.get("num_class_embeds") is not None:
            raise ValueError(f"unet.class_embed_type={class_type!r} / num_class_embeds="
                             f"{unet.config.get('num_class_embeds')!r}: the pipeline can only feed a 'projection' "
                             "class embedding (the global expression condition). Fix: build the UNet with "
                             "make_unet(..., global_condition_dim=condition_encoder.pooled_dim) or without one")
        if class_type == "projection":
            width = unet.config.get("projection_class_embeddings_input_dim")
            if width != condition_encoder.pooled_dim:
                raise ValueError(f"unet.projection_class_embeddings_input_dim={width} differs from the condition "
                                 f"encoder's global condition width {condition_encoder.pooled_dim} (num_tokens "
                                 f"{condition_encoder.num_tokens} x cross_attention_dim "
                                 f"{condition_encoder.config.cross_attention_dim}). Fix: build the UNet with "
                                 "global_condition_dim=condition_encoder.pooled_dim")
        if vae is not None and vae.config.latent_channels != unet.config.in_channels:
            raise ValueError(f"unet.in_channels={unet.config.in_channels} differs from vae.latent_channels="
                             f"{vae.config.latent_channels}. Fix: build the UNet on the VAE's latents")

    @staticmethod
    def _check_transformer(transformer, condition_encoder, vae) -> None:
        cfg = transformer.config
        width = cfg.get("caption_channels") or cfg.get("cross_attention_dim")  # PixArt projects captions if set
        if width != condition_encoder.config.cross_attention_dim:
            raise ValueError(f"condition_encoder.cross_attention_dim={condition_encoder.config.cross_attention_dim} "
                             f"differs from the width transformer takes (caption_channels / cross_attention_dim = "
                             f"{width}). Fix: build it with make_transformer(..., cross_attention_dim="
                             f"{condition_encoder.config.cross_attention_dim})")
        inner = cfg.get("num_attention_heads") * cfg.get("attention_head_dim")
        if cfg.get("caption_channels") and cfg.get("cross_attention_dim") != inner:
            raise ValueError(f"transformer.cross_attention_dim={cfg.get('cross_attention_dim')}: with a caption "
                             f"projection (caption_channels={cfg.get('caption_channels')}) the blocks attend to "
                             f"projected tokens of the inner width {inner}. Fix: build it with cross_attention_dim="
                             f"{inner}")
        if getattr(transformer, "use_additional_conditions", False):
            raise ValueError("transformer.use_additional_conditions=True: PixArt-alpha's resolution / aspect-ratio "
                             "micro-conditions mean nothing for fixed-size cell crops and the pipeline does not feed "
                             "them. Fix: build it with use_additional_conditions=False (make_transformer does)")
        in_ch = cfg.get("in_channels")
        out_ch = cfg.get("out_channels") or in_ch
        if out_ch not in (in_ch, 2 * in_ch):
            raise ValueError(f"transformer.out_channels={out_ch}: expected in_channels={in_ch} (or {2 * in_ch} with "
                             "a learned sigma). Fix: build it with make_transformer")
        if vae is not None and vae.config.latent_channels != in_ch:
            raise ValueError(f"transformer.in_channels={in_ch} differs from vae.latent_channels="
                             f"{vae.config.latent_channels}. Fix: build the transformer on the VAE's latents")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_genes(
        cls,
        genes: Sequence[str],
        image_size: int = 32,
        channel_names: Sequence[str] = DEFAULT_CHANNEL_NAMES,
        size: str = "small",
        prediction_type: str = "v_prediction",
        vae: AutoencoderKL | None = None,
        condition_encoder: SpatiaConditionEncoder | None = None,
        token_merging_ratio: float = DEFAULT_TOKEN_MERGING_RATIO,
        unet_overrides: Mapping[str, Any] | None = None,
        encoder_overrides: Mapping[str, Any] | None = None,
        global_condition: bool = True,
        denoiser: str = "unet",
        transformer_overrides: Mapping[str, Any] | None = None,
    ) -> "SpatiaGenerationPipeline":
        """A randomly initialised pipeline for the gene panel ``genes`` and ``image_size`` px images.

        ``size`` picks the presets of :data:`UNET_PRESETS` (or :data:`TRANSFORMER_PRESETS`) and
        :data:`ENCODER_PRESETS`. ``denoiser``: ``"unet"`` (default) or ``"transformer"`` (a PixArt DiT,
        :func:`make_transformer`). Pass a ``condition_encoder`` (e.g.
        :meth:`SpatiaConditionEncoder.from_spatia_model`) to start from a pretrained expression branch,
        and a ``vae`` for latent generation. ``global_condition`` (default) also feeds the condition
        encoder's global vector to the UNet's class embedding (added to the timestep embedding); False
        builds the cross-attention-only UNet of earlier versions. A transformer is always
        cross-attention only (``global_condition`` does not apply to it).
        """
        if size not in ENCODER_PRESETS:
            raise ValueError(f"size={size!r}: expected one of {sorted(ENCODER_PRESETS)}")
        if denoiser not in DENOISERS:
            raise ValueError(f"denoiser={denoiser!r}: expected one of {DENOISERS}")
        if condition_encoder is None:
            enc = {**ENCODER_PRESETS[size], **(encoder_overrides or {})}
            condition_encoder = SpatiaConditionEncoder.from_genes(list(genes), **enc)
        elif list(condition_encoder.genes) != [str(g) for g in genes]:
            raise ValueError("condition_encoder.genes differs from genes. Fix: pass genes=condition_encoder.genes")
        n_channels = len(channel_names)
        global_dim = condition_encoder.pooled_dim if global_condition else None
        size_in, channels_in = image_size, n_channels
        if vae is not None:
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            if image_size % factor:
                raise ValueError(f"image_size={image_size} is not divisible by the VAE's downsampling factor {factor}")
            size_in, channels_in = image_size // factor, vae.config.latent_channels
        cross = condition_encoder.config.cross_attention_dim
        if denoiser == "transformer":
            model = {"transformer": make_transformer(size, size_in, channels_in, cross,
                                                     **(transformer_overrides or {}))}
        else:
            model = {"unet": make_unet(size, size_in, channels_in, cross, global_dim, **(unet_overrides or {}))}
        scheduler = sampling_scheduler(training_scheduler(prediction_type), latent=vae is not None)
        return cls(**model, scheduler=scheduler, condition_encoder=condition_encoder, vae=vae,
                   channel_names=list(channel_names), token_merging_ratio=token_merging_ratio)

    # ------------------------------------------------------------------ properties
    @property
    def genes(self) -> list[str]:
        """The model's gene panel (column order of the counts the condition encoder takes)."""
        return self.condition_encoder.genes

    @property
    def denoiser(self) -> UNet2DConditionModel | PixArtTransformer2DModel:
        """The denoiser, whichever component holds it (``unet`` or ``transformer``)."""
        return self.unet if getattr(self, "unet", None) is not None else self.transformer

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def image_size(self) -> int:
        """Side of generated images in pixels."""
        return int(self.denoiser.config.sample_size) * self.vae_scale_factor

    @property
    def num_channels(self) -> int:
        return len(self.config.channel_names)

    def finest_attention_downsample(self) -> int:
        """Downsampling factor of the finest resolution at which the denoiser has self-attention (a
        transformer: 1, every block attends over the full patch grid)."""
        blocks = self.denoiser.config.get("down_block_types")
        if not blocks:
            return 1
        for i, name in enumerate(blocks):
            if "CrossAttn" in name or "Attn" in name:
                return 2**i
        return 2 ** (len(blocks) - 1)

    def set_token_merging(self, ratio: float, max_downsample: int | None = None) -> None:
        """Merge ``ratio`` of the self-attention tokens in the denoiser (0 removes merging).

        Patches the denoiser (``unet`` or ``transformer``) through ``spatia_hf.pipelines.denoiser_merging``
        (spatially guided ToMe) in the self-attention at most ``max_downsample`` times coarser than
        the input (None: the finest level with attention; a transformer's blocks all attend over its
        patch grid, level 1) and records both in the pipeline config (saved in ``model_index.json``);
        the weights are not changed.
        """
        ratio = float(ratio)
        if not (math.isfinite(ratio) and 0.0 <= ratio < 1.0):
            raise ValueError(f"token_merging_ratio={ratio}: expected a fraction in [0, 1). Fix: use e.g. 0.5, or 0 "
                             "to switch merging off")
        try:
            from . import denoiser_merging
        except ImportError:
            if ratio > 0:
                raise
            denoiser_merging = None
        if denoiser_merging is not None:
            denoiser_merging.remove_token_merging(self.denoiser)
            if ratio > 0:
                level = int(max_downsample) if max_downsample is not None else self.finest_attention_downsample()
                denoiser_merging.apply_token_merging(self.denoiser, ratio=ratio, max_downsample=level)
        self.register_to_config(token_merging_ratio=ratio, token_merging_max_downsample=max_downsample)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, max_shard_size: int | str | None = None,
                        push_to_hub: bool = False, **kwargs) -> None:
        """``DiffusionPipeline.save_pretrained`` staged in a unique temporary sibling and moved into
        ``save_directory`` when complete (never half-written): an existing folder keeps the files this save
        does not write, except stale weight files of an earlier save of its components; safetensors only."""
        if not safe_serialization:
            raise ValueError("safe_serialization=False: spatia-hf writes safetensors only. Fix: drop the argument")
        out = Path(save_directory)
        with staged_dir(out, stale=weight_files("diffusion_pytorch_model", "model")) as tmp:
            super().save_pretrained(tmp, safe_serialization=True, variant=variant, max_shard_size=max_shard_size)
        if push_to_hub:  # the same route as push_to_hub / `spatia push`: one commit with the SPATIA card
            push_pipeline(out, kwargs.pop("repo_id", out.name), token=kwargs.get("token"),
                          private=kwargs.get("private"), commit_message=kwargs.get("commit_message"),
                          create_pr=kwargs.get("create_pr", False))

    # ------------------------------------------------------------------ inputs
    def prepare_expression(
        self, expression: Any, gene_names: Sequence[str] | None = None, min_gene_coverage: float = 0.0
    ) -> tuple[torch.Tensor, list[str], dict[str, int]]:
        """Expression -> ``[B, n_panel_genes]`` float32 counts on the model's panel.

        ``gene_names`` may be symbols or, when the panel records them, Ensembl ids. Returns the counts,
        the unknown genes (in ``gene_names``, not in the panel; ignored) and the panel index of every
        given gene that is in the panel (by the given name and by the panel symbol). Raises when less
        than ``min_gene_coverage`` of the given genes is in the panel, naming the first unknown genes.
        """
        x, names = _expression_matrix(expression, gene_names)
        panel = self.genes
        if names is None:
            if x.shape[1] != len(panel):
                raise ValueError(
                    f"expression: {x.shape[1]} values per cell, but the model's gene panel has {len(panel)} genes "
                    "and no gene_names were given. Fix: pass gene_names=[...] (one symbol per value; they are "
                    "mapped onto the panel) or a vector in pipe.genes order")
            names = list(panel)
        if len(names) != x.shape[1]:
            raise ValueError(f"gene_names: {len(names)} names for {x.shape[1]} expression values per cell. "
                             "Fix: give exactly one gene symbol per column of expression")
        seen: set[str] = set()
        dups = sorted({g for g in names if g in seen or seen.add(g)})
        if dups:
            raise ValueError(f"gene_names: duplicate genes {dups[:10]}. Fix: sum or drop duplicated columns first")
        bad = ~np.isfinite(x)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ValueError(f"expression: {int(bad.sum())} non-finite values (NaN/inf), e.g. cell {r}, gene "
                             f"{names[c]!r} = {x[r, c]}. Fix: replace missing values by 0 counts")
        neg = x < 0
        if neg.any():
            r, c = np.argwhere(neg)[0]
            raise ValueError(f"expression: {int(neg.sum())} negative values, e.g. cell {r}, gene {names[c]!r} = "
                             f"{x[r, c]}. Fix: pass raw (non-negative) counts, not scaled or centred values")
        processor = SpatiaProcessor(panel, self.condition_encoder.gene_ensembl_ids)
        ids = names if processor.gene_ensembl_ids else None  # a column may be named by its Ensembl id
        vocab_ids = processor.map_panel(names, ids, min_coverage=min_gene_coverage).vocab_ids
        cmap = np.where(vocab_ids >= 0, vocab_ids - NUM_SPECIAL_TOKENS, -1)
        known = np.flatnonzero(cmap >= 0)
        unknown = [names[j] for j in np.flatnonzero(cmap < 0)]
        if unknown:
            warnings.warn(f"gene_names: {len(unknown)} genes are not in the model's panel and are ignored: "
                          f"{unknown[:20]}{' ...' if len(unknown) > 20 else ''}", UserWarning, stacklevel=4)
        if len(known) == 0:
            raise ValueError(f"gene_names: none of the {len(names)} genes is in the model's panel (e.g. "
                             f"{names[:5]}; panel starts {panel[:5]}). Fix: use the gene symbols of pipe.genes")
        missing = len(panel) - len(known)
        if missing:
            warnings.warn(f"expression: {missing} of the model's {len(panel)} panel genes were not given and count as "
                          "0 (e.g. " + str([g for g in panel if g not in set(names)][:10]) + ")", UserWarning,
                          stacklevel=4)
        counts = np.zeros((x.shape[0], len(panel)), dtype=np.float32)
        counts[:, cmap[known]] = x[:, known]
        index = {names[j]: int(cmap[j]) for j in known}
        index.update({panel[int(cmap[j])]: int(cmap[j]) for j in known})
        return torch.from_numpy(counts), unknown, index

    @staticmethod
    def _reference_rows(reference_rows, perturbation, n_rows: int, perturbation_library: str,
                        perturbation_guidance: float) -> torch.Tensor | None:
        """``reference_rows`` checked and as a LongTensor (None when not given)."""
        if perturbation_library not in PERTURBATION_LIBRARIES:
            raise ValueError(f"perturbation_library={perturbation_library!r}: expected one of {PERTURBATION_LIBRARIES}")
        if not (isinstance(perturbation_guidance, (int, float)) and math.isfinite(perturbation_guidance)
                and perturbation_guidance >= 0):
            raise ValueError(f"perturbation_guidance={perturbation_guidance!r}: expected a finite number >= 0 "
                             "(0 = off)")
        if reference_rows is None:
            return None
        if perturbation is not None:
            raise ValueError("reference_rows and perturbation: give one. perturbation= pairs every cell with its "
                             "edit itself; reference_rows is for edited copies batched by the caller")
        ref = torch.as_tensor(np.asarray(reference_rows), dtype=torch.long).flatten()
        if len(ref) != n_rows or (len(ref) and (int(ref.min()) < 0 or int(ref.max()) >= n_rows)):
            raise ValueError(f"reference_rows: expected {n_rows} row indices in [0, {n_rows}) (one per expression "
                             f"row), got {len(ref)} values in [{int(ref.min()) if len(ref) else '-'}, "
                             f"{int(ref.max()) if len(ref) else '-'}]")
        if bool((ref[ref] != ref).any()):
            raise ValueError("reference_rows: a reference row must be unedited (reference_rows[r] == r for every "
                             "referenced row r)")
        return ref

    def check_inputs(
        self,
        perturbation: Mapping[str, float] | None,
        gene_index: Mapping[str, int],
        num_inference_steps: int,
        guidance_scale: float,
        num_images_per_expression: int,
        output_type: str,
        callback_on_step_end_tensor_inputs: Sequence[str] | None,
        guidance_rescale: float = 0.0,
    ) -> None:
        """Validate the call arguments up front (expression values are checked in :meth:`prepare_expression`)."""
        if not (isinstance(num_inference_steps, int) and num_inference_steps > 0):
            raise ValueError(f"num_inference_steps={num_inference_steps!r}: expected a positive integer")
        if not (isinstance(num_images_per_expression, int) and num_images_per_expression > 0):
            raise ValueError(f"num_images_per_expression={num_images_per_expression!r}: expected a positive integer")
        if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale) and guidance_scale >= 0):
            raise ValueError(f"guidance_scale={guidance_scale!r}: expected a finite number >= 0 (1 = no guidance)")
        if not (isinstance(guidance_rescale, (int, float)) and 0.0 <= guidance_rescale <= 1.0):
            raise ValueError(f"guidance_rescale={guidance_rescale!r}: expected a number in [0, 1] (0 = plain guidance)")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: expected one of {OUTPUT_TYPES}")
        extra = [k for k in (callback_on_step_end_tensor_inputs or []) if k not in self._callback_tensor_inputs]
        if extra:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {extra} are not available; choose from "
                             f"{self._callback_tensor_inputs}")
        if perturbation is None:
            return
        if not isinstance(perturbation, Mapping) or not perturbation:
            raise ValueError(f"perturbation={perturbation!r}: expected a non-empty dict {{gene: fold}}, "
                             "e.g. {'NUCSIZE': 4.0}")
        panel = set(self.genes)
        for gene, fold in perturbation.items():
            if gene not in gene_index:
                where = "is not in the model's gene panel" if gene not in panel else "is not among gene_names"
                raise ValueError(f"perturbation: gene {gene!r} {where}, so it cannot be changed. Fix: perturb a gene "
                                 f"of pipe.genes that the expression measures (e.g. {self.genes[:5]})")
            if not (isinstance(fold, (int, float, np.number)) and math.isfinite(float(fold)) and float(fold) > 0):
                raise ValueError(f"perturbation[{gene!r}]={fold!r}: the fold must be a finite number > 0 "
                                 "(e.g. 4.0 to raise the gene 4x, 0.25 to lower it 4x)")

    def encode_expression(self, counts: torch.Tensor, do_classifier_free_guidance: bool,
                          library_size: torch.Tensor | None = None) -> torch.Tensor:
        """Condition tokens for ``counts`` (normalised by ``library_size`` when given, else each row's
        total); with guidance, the null condition is prepended (``[2B, K, D]``)."""
        enc = self.condition_encoder
        lib = None if library_size is None else library_size.to(device=enc.device, dtype=enc.dtype)
        cond = enc(counts.to(device=enc.device, dtype=enc.dtype), library_size=lib)
        if do_classifier_free_guidance:
            cond = torch.cat([enc.null_condition(cond.shape[0]).to(cond.dtype), cond], dim=0)
        return cond

    def encode_global_condition(self, counts: torch.Tensor, do_classifier_free_guidance: bool,
                                tokens: torch.Tensor, library_size: torch.Tensor | None = None) -> torch.Tensor | None:
        """The UNet's ``class_labels`` for ``counts`` (None when it takes none, e.g. a transformer); with
        guidance the null condition's global vector is prepended, matching :meth:`encode_expression`'s
        ``tokens``."""
        if not uses_global_condition(self.denoiser):
            return None
        enc = self.condition_encoder
        if enc.config.global_vector == "tokens":
            return enc.pooled(tokens)  # the null tokens' rows already lead with guidance
        lib = None if library_size is None else library_size.to(device=enc.device, dtype=enc.dtype)
        glob = enc.global_condition(counts.to(device=enc.device, dtype=enc.dtype), tokens, library_size=lib)
        if do_classifier_free_guidance:
            glob = torch.cat([enc.null_global_condition(glob.shape[0]).to(glob.dtype), glob], dim=0)
        return glob

    def null_global_condition(self, batch_size: int) -> torch.Tensor | None:
        """The null condition's ``class_labels`` (None when the denoiser takes none): the unconditional
        generator's."""
        if not uses_global_condition(self.denoiser):
            return None
        return self.condition_encoder.null_global_condition(batch_size)

    def prepare_latents(self, batch_size: int, dtype: torch.dtype, device: torch.device,
                        generator: torch.Generator | list[torch.Generator] | None,
                        latents: torch.Tensor | None = None) -> torch.Tensor:
        size = int(self.denoiser.config.sample_size)
        shape = (batch_size, int(self.denoiser.config.in_channels), size, size)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"generator: {len(generator)} generators for {batch_size} images. Fix: pass one "
                             "generator, or one per image (rows x num_images_per_expression)")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        return latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    def _denoise(self, model_in: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                 class_labels: torch.Tensor | None) -> torch.Tensor:
        """The denoiser's prediction, UNet or transformer (see :func:`denoise`)."""
        return denoise(self.denoiser, model_in, t, cond, class_labels)

    def _step_kwargs(self, scheduler: SchedulerMixin, generator, eta: float) -> dict:
        params = set(inspect.signature(scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoised latents (or pixels) -> ``[N, C, H, W]`` float32 images in [0, 1]."""
        if self.vae is not None:
            latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
            latents = self.vae.decode(latents).sample
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    def postprocess(self, images: torch.Tensor, output_type: str):
        if output_type == "pt":
            return images.cpu()
        if output_type == "np":
            return images.permute(0, 2, 3, 1).cpu().numpy()
        rgb = render_rgb(images, self.config.channel_names)
        return [PIL.Image.fromarray(im) for im in rgb]

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def __call__(
        self,
        expression: Any,
        gene_names: Sequence[str] | None = None,
        perturbation: Mapping[str, float] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        num_images_per_expression: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        min_gene_coverage: float = 0.0,
        perturbation_library: str = DEFAULT_PERTURBATION_LIBRARY,
        reference_rows: Sequence[int] | None = None,
        perturbation_guidance: float = DEFAULT_PERTURBATION_GUIDANCE,
        guidance_rescale: float = 0.0,
    ) -> SpatiaPipelineOutput | tuple:
        """Generate cell images from expression.

        Args:
            expression: raw counts of one cell ``[n_genes]`` or several ``[n_cells, n_genes]`` (numpy,
                torch, list, scipy sparse, pandas Series/DataFrame or an AnnData, whose ``.X`` and
                ``var_names`` are used).
            gene_names: gene symbol of every expression column; mapped onto the model's panel
                (unknown genes are ignored with a warning; panel genes not given count as 0). Default:
                the columns are ``pipe.genes`` (or the AnnData/pandas gene names).
            perturbation: ``{gene: fold}``: also generate every cell with that gene's counts multiplied
                by ``fold``, from the same noise; returned as ``perturbed_images``.
            num_inference_steps: sampler steps.
            guidance_scale: classifier-free guidance weight ``w`` in ``uncond + w * (cond - uncond)``;
                ``<= 1`` samples the conditional model only (half the compute).
            num_images_per_expression: images per input cell (consecutive in the output).
            generator: ``torch.Generator`` (or one per image) for reproducible noise.
            latents: optional initial noise ``[n_cells * num_images_per_expression, C, h, w]``.
            eta: DDIM's eta (ignored by other schedulers).
            output_type: ``"pil"`` (RGB rendering), ``"np"`` (``[N, H, W, C]``), ``"pt"`` (``[N, C, H, W]``)
                or ``"latent"``.
            return_dict: return a :class:`SpatiaPipelineOutput` (else a tuple).
            callback_on_step_end: ``fn(pipe, step, timestep, {"latents": ...}) -> dict`` after every step;
                a returned ``latents`` replaces the current one.
            min_gene_coverage: refuse the call when less than this fraction of ``gene_names`` is in the
                model's panel (the error names the first unknown genes); 0 accepts any overlap.
            perturbation_library: ``"unedited"`` (default): an edited cell is normalised by the library
                size of its unedited counts, so only the edited gene's normalised value changes;
                ``"edited"``: by its own (edited) total, as before this option existed.
            reference_rows: for edits batched by the caller: row ``i`` of ``expression`` is an edited copy
                of row ``reference_rows[i]`` (itself for an unedited row); used like ``perturbation``'s
                pairs by ``perturbation_library`` and ``perturbation_guidance``. Not with ``perturbation``.
            perturbation_guidance: ``w_p >= 0``; edited images also get ``w_p x (eps(x, edited) -
                eps(x, unedited))`` at their own sample ``x`` (one more denoiser pass per edited image;
                default 4, see ``DEFAULT_PERTURBATION_GUIDANCE``); 0 is plain sampling of the edited cells.
            guidance_rescale: ``phi`` in [0, 1] of diffusers' ``rescale_noise_cfg`` (Lin et al. 2023, 3.4): the
                guided prediction is rescaled to the conditional prediction's standard deviation and mixed
                ``phi : 1 - phi`` with the unrescaled one, against the over-bright images of large guidance
                weights; 0 (default) is plain guidance (on the demo tissue's 19-minute UNet, 0.7 raised the
                feature FID at guidance 2 and 4: it brightens the background).
        """
        counts, unknown, gene_index = self.prepare_expression(expression, gene_names, min_gene_coverage)
        self.check_inputs(perturbation, gene_index, num_inference_steps, guidance_scale, num_images_per_expression,
                          output_type, callback_on_step_end_tensor_inputs, guidance_rescale)
        device = self._execution_device
        dtype = self.denoiser.dtype
        ref = self._reference_rows(reference_rows, perturbation, counts.shape[0], perturbation_library,
                                   perturbation_guidance)
        k = num_images_per_expression
        counts = counts.repeat_interleave(k, dim=0)
        n = counts.shape[0]
        if ref is not None:  # row i*k + j is an edit of row ref[i]*k + j
            ref = (ref.repeat_interleave(k) * k + torch.arange(k).repeat(len(ref)))
        perturbed = perturbation is not None
        if perturbed:
            pcounts = counts.clone()
            for gene, fold in perturbation.items():
                j = gene_index[gene]
                if bool((pcounts[:, j] == 0).any()):
                    warnings.warn(f"perturbation: gene {gene!r} has 0 counts in some cells; a fold leaves those "
                                  "unchanged", UserWarning, stacklevel=3)
                pcounts[:, j] *= float(fold)
            counts = torch.cat([counts, pcounts], dim=0)
            ref = torch.arange(n).repeat(2)  # every perturbed image is an edit of its control

        do_cfg = guidance_scale > 1.0
        library = counts.sum(dim=1)
        if ref is not None and perturbation_library == "unedited":
            library = library[ref]  # the edit changes one gene, not the cell's size factor
        cond = self.encode_expression(counts, do_cfg, library).to(dtype)
        class_labels = self.encode_global_condition(counts, do_cfg, cond, library)  # None: cross-attention only
        if class_labels is not None:
            class_labels = class_labels.to(device=device, dtype=dtype)
        # rows whose counts an edit changed get edit guidance (a fold of 1, or of a gene with 0 counts, changes
        # nothing: no guidance term, no extra pass); None when there are none
        edited_rows = None
        if ref is not None and perturbation_guidance > 0:
            changed = (ref != torch.arange(len(ref))) & (counts != counts[ref]).any(dim=1)
            edited_rows = torch.nonzero(changed).flatten() if bool(changed.any()) else None
        if edited_rows is not None:
            # the unedited condition of every edited row, evaluated at the edited sample
            ref_counts, ref_library = counts[ref[edited_rows]], library[ref[edited_rows]]
            ref_cond = self.encode_expression(ref_counts, False, ref_library).to(dtype)
            ref_labels = self.encode_global_condition(ref_counts, False, ref_cond, ref_library)
            if ref_labels is not None:
                ref_labels = ref_labels.to(device=device, dtype=dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(n, dtype, device, generator, latents)
        schedulers = [self.scheduler]
        if perturbed:  # same initial noise; a second scheduler state replays the same sampler noise
            latents = torch.cat([latents, latents], dim=0)
            schedulers.append(copy.deepcopy(self.scheduler))

        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                parts = latents.chunk(len(schedulers), dim=0)
                model_in = torch.cat([s.scale_model_input(p, t) for s, p in zip(schedulers, parts)], dim=0)
                if do_cfg:
                    model_in = torch.cat([model_in, model_in], dim=0)
                noise_pred = self._denoise(model_in, t, cond, class_labels)
                if do_cfg:
                    uncond, cond_pred = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (cond_pred - uncond)
                    if guidance_rescale > 0:
                        noise_pred = _rescale_noise_cfg()(noise_pred, cond_pred, guidance_rescale)
                else:
                    cond_pred = noise_pred
                if edited_rows is not None:
                    x_edit = model_in[-len(cond_pred):][edited_rows]
                    unedited = self._denoise(x_edit, t, ref_cond, ref_labels)
                    noise_pred = noise_pred.clone()
                    noise_pred[edited_rows] += perturbation_guidance * (cond_pred[edited_rows] - unedited)
                preds = noise_pred.chunk(len(schedulers), dim=0)
                state = _generator_states(generator)
                new = []
                for s, p, x in zip(schedulers, preds, parts):
                    _restore_generator_states(generator, state)
                    new.append(s.step(p, t, x, **self._step_kwargs(s, generator, eta), return_dict=False)[0])
                latents = torch.cat(new, dim=0)
                if callback_on_step_end is not None:
                    available = {"latents": latents}
                    callback_kwargs = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = outputs.pop("latents", latents)
                progress_bar.update()

        if output_type == "latent":
            images = latents
        else:
            images = self.postprocess(self.decode_latents(latents), output_type)
        self.maybe_free_model_hooks()
        control, edited = (images[:n], images[n:]) if perturbed else (images, None)  # lists, arrays and tensors alike
        if not return_dict:
            return (control, edited) if perturbed else (control,)
        return SpatiaPipelineOutput(images=control, perturbed_images=edited, unknown_genes=unknown,
                                    gene_coverage=_coverage_report(self.genes, unknown, gene_index))


def _coverage_report(panel: Sequence[str], unknown: list[str], gene_index: Mapping[str, int]) -> dict[str, Any]:
    """Given genes against the panel, with the keys of ``PanelMapping.report``."""
    kept = set(gene_index.values())
    missing = [g for i, g in enumerate(panel) if i not in kept]
    given = len(kept) + len(unknown)
    return {"n_panel_genes": given, "n_kept": len(kept), "coverage": round(len(kept) / max(given, 1), 4),
            "n_unknown": len(unknown), "unknown_genes": list(unknown), "n_missing_model_genes": len(missing),
            "missing_model_genes": missing}


def _generator_states(generator) -> list[torch.Tensor] | None:
    if generator is None:
        return None
    gens = generator if isinstance(generator, list) else [generator]
    return [g.get_state() for g in gens]


def _restore_generator_states(generator, states) -> None:
    if generator is None or states is None:
        return
    gens = generator if isinstance(generator, list) else [generator]
    for g, s in zip(gens, states):
        g.set_state(s)


__all__ = ["SpatiaGenerationPipeline", "SpatiaPipelineOutput"]
