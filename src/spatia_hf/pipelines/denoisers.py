"""The denoisers and noise schedules of the generator: UNet and DiT presets and factories, one ``denoise``
call for both (training and sampling), and the training / sampling schedulers.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, PixArtTransformer2DModel, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# Denoiser sizes: ``tiny`` for tests (seconds on CPU), ``small`` for the CPU demo (32-64 px pixel space,
# attention only at 1/2 and 1/4 resolution, where it is cheap on a CPU), ``base`` for GPUs.
# NB: diffusers' UNet2DConditionModel reads ``attention_head_dim`` as the number of heads (a legacy
# naming); ``small`` uses 2 heads (head width 16 and 32): many narrow heads are slow on a CPU.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, attention_head_dim=8,
                 norm_num_groups=8),
    "small": dict(block_out_channels=(16, 32, 64),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                  attention_head_dim=2, norm_num_groups=8),
    "base": dict(block_out_channels=(128, 256, 256, 512),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 layers_per_block=2, attention_head_dim=32, norm_num_groups=32),
}


# DiT sizes (``PixArtTransformer2DModel``, patch size 2 at 32-64 px, so 256-1024 patch tokens): one
# resolution, self- and cross-attention in every block. ``small`` costs about what the ``small`` UNet
# costs per training step on a CPU at 32 px (2 heads of width 48: few wide heads, as for the UNet);
# ``base`` is DiT-S (384 wide, 12 blocks, 6 heads).
TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, patch_size=2),
    "small": dict(num_attention_heads=2, attention_head_dim=48, num_layers=4, patch_size=2),
    "base": dict(num_attention_heads=6, attention_head_dim=64, num_layers=12, patch_size=2),
}


DENOISERS = ("unet", "transformer")


def make_unet(size: str = "small", image_size: int = 32, in_channels: int = 2, cross_attention_dim: int = 64,
              global_condition_dim: int | None = None, **overrides) -> UNet2DConditionModel:
    """A ``UNet2DConditionModel`` of preset ``size`` for ``image_size`` px (pixel space) inputs.

    ``global_condition_dim``: also take a global condition vector of that width as ``class_labels``
    (diffusers' ``class_embed_type="projection"``: an MLP added to the timestep embedding).
    """
    if size not in UNET_PRESETS:
        raise ValueError(f"size={size!r}: expected one of {sorted(UNET_PRESETS)}")
    cfg = dict(UNET_PRESETS[size])
    levels = len(cfg["block_out_channels"])
    if image_size % 2 ** (levels - 1):
        raise ValueError(f"image_size={image_size}: must be divisible by {2 ** (levels - 1)} for the {size!r} UNet "
                         f"({levels} resolution levels)")
    if global_condition_dim is not None:
        if not (isinstance(global_condition_dim, int) and global_condition_dim > 0):
            raise ValueError(f"global_condition_dim={global_condition_dim!r}: expected a positive integer or None")
        cfg.update(class_embed_type="projection", projection_class_embeddings_input_dim=global_condition_dim)
    cfg.update(overrides)
    return UNet2DConditionModel(sample_size=image_size, in_channels=in_channels, out_channels=in_channels,
                                cross_attention_dim=cross_attention_dim, **cfg)


def make_transformer(size: str = "small", image_size: int = 32, in_channels: int = 2, cross_attention_dim: int = 64,
                     **overrides) -> PixArtTransformer2DModel:
    """A DiT denoiser (diffusers' ``PixArtTransformer2DModel``) of preset ``size`` for ``image_size`` px inputs.

    It cross-attends to condition tokens of width ``cross_attention_dim`` in every block and predicts
    ``in_channels`` planes (no learned sigma). PixArt-alpha's resolution / aspect-ratio micro-conditions
    are off (cells are fixed-size crops); the patch size must divide ``image_size``.
    """
    if size not in TRANSFORMER_PRESETS:
        raise ValueError(f"size={size!r}: expected one of {sorted(TRANSFORMER_PRESETS)}")
    cfg = dict(TRANSFORMER_PRESETS[size])
    cfg.update(overrides)
    if image_size % cfg["patch_size"]:
        raise ValueError(f"image_size={image_size}: must be divisible by the {size!r} transformer's patch_size "
                         f"{cfg['patch_size']}. Fix: use an image size that is a multiple of it")
    cfg.setdefault("out_channels", in_channels)
    cfg.setdefault("use_additional_conditions", False)
    return PixArtTransformer2DModel(sample_size=image_size, in_channels=in_channels,
                                    cross_attention_dim=cross_attention_dim, **cfg)


def denoiser_kind(denoiser) -> str:
    """``"unet"`` (diffusers UNets: ``forward(sample, timestep, ...)``) or ``"transformer"`` (diffusers 2-D
    transformers: ``forward(hidden_states, encoder_hidden_states, timestep, ...)``); works on a
    DDP-wrapped model too."""
    model = getattr(denoiser, "module", denoiser)
    params = inspect.signature(model.forward).parameters
    if "sample" in params and "encoder_hidden_states" in params:
        return "unet"
    if {"hidden_states", "encoder_hidden_states", "timestep"} <= set(params):
        return "transformer"
    raise TypeError(f"denoiser: a {type(model).__name__} is neither a diffusers UNet (forward(sample, timestep, "
                    "encoder_hidden_states)) nor a cross-attention transformer (forward(hidden_states, "
                    "encoder_hidden_states, timestep)). Fix: use make_unet(...) or make_transformer(...)")


def denoise(denoiser, sample: torch.Tensor, timestep: torch.Tensor | int | float, encoder_hidden_states: torch.Tensor,
            class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """The denoiser's prediction (noise or v) for ``sample`` at ``timestep``, whichever kind it is.

    One call site for the pipeline and the training loop, so both feed a UNet or a transformer the
    same way. A UNet gets ``class_labels`` (the global condition, or None). A transformer is called
    as diffusers' ``PixArtAlphaPipeline`` calls it: the timestep broadcast to the batch,
    ``added_cond_kwargs`` without micro-conditions, and of a learned-sigma output (``2 * C`` planes)
    only the first ``C``; it takes no ``class_labels``.
    """
    if denoiser_kind(denoiser) == "unet":
        return denoiser(sample, timestep, encoder_hidden_states=encoder_hidden_states, class_labels=class_labels,
                        return_dict=False)[0]
    if class_labels is not None:
        raise ValueError("class_labels: a transformer denoiser takes cross-attention only (no global condition). "
                         "Fix: pass class_labels=None (uses_global_condition(transformer) is False)")
    t = timestep if torch.is_tensor(timestep) else torch.tensor(
        [timestep], dtype=torch.float64 if isinstance(timestep, float) else torch.int64)
    t = t.to(sample.device)
    if t.dim() == 0:
        t = t[None]
    t = t.expand(sample.shape[0])
    out = denoiser(sample, encoder_hidden_states=encoder_hidden_states, timestep=t,
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    if out.shape[1] == 2 * sample.shape[1]:  # learned sigma: the prediction is the first half
        out = out.chunk(2, dim=1)[0]
    return out


def uses_global_condition(denoiser) -> bool:
    """Whether ``denoiser`` takes the global condition (``class_labels``): read from its config, so a
    pipeline saved before the global path existed keeps running with cross-attention only. Always
    False for a transformer (its config has no ``class_embed_type``: cross-attention only)."""
    return denoiser.config.get("class_embed_type") == "projection"


def training_scheduler(prediction_type: str = "v_prediction", num_train_timesteps: int = 1000) -> DDPMScheduler:
    """The noise schedule generators are trained with: DDPM, cosine betas (good for small images)."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                         prediction_type=prediction_type, clip_sample=True, clip_sample_range=1.0)


def sampling_scheduler(train_scheduler: SchedulerMixin, latent: bool = False) -> DPMSolverMultistepScheduler:
    """The default sampler of a trained pipeline: DPM-Solver++ (2nd order) on the training schedule.

    In pixel space the data lie in [-1, 1]; at the first steps of the cosine schedule the predicted
    clean image is ``(x_t - sigma * eps) / alpha`` with ``alpha`` ~ 1e-4, so a small noise-prediction
    error becomes a huge, multistep-propagated x0 error (pure noise comes out). Dynamic thresholding
    (``thresholding=True``, ``sample_max_value=1``) clips those predictions to the data range, as
    DDPM/DDIM's ``clip_sample`` does; ``lambda_min_clipped=-5.1`` (diffusers' IF/unCLIP setting)
    skips the last, worst-conditioned steps of the cosine schedule.

    ``latent=True`` (a pipeline with a VAE): no thresholding. Scaled latents have unit variance but
    no [-1, 1] bound, and dynamic thresholding would clip and rescale them (Stable Diffusion samples
    its latents unthresholded too).
    """
    extra = {"lambda_min_clipped": -5.1} if train_scheduler.config.get("beta_schedule") == "squaredcos_cap_v2" else {}
    clip = {"thresholding": False} if latent else {"thresholding": True, "sample_max_value": 1.0}
    return DPMSolverMultistepScheduler.from_config(train_scheduler.config, algorithm_type="dpmsolver++",
                                                   solver_order=2, **clip, **extra)

