"""A tiny diffusers pipeline whose denoiser is a ``ModelMixin`` defined in this package.

It has the layout that matters for Hub round trips of ``SpatiaGenerationPipeline``: ``model_index.json``
names the denoiser by its package module path (``["toy_pipeline", "ToyDenoiser"]``),
which diffusers' generic Hub download rejects. Tests of the Hub machinery use it so they do not
depend on the size or speed of the real generator.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from spatia_hf.hub import SpatiaPipelineHubMixin


class ToyDenoiser(ModelMixin, ConfigMixin):
    """Predicts noise from a noisy image and a condition vector (one conv + a condition bias)."""

    @register_to_config
    def __init__(self, channels: int = 2, cond_dim: int = 8):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels + 1, channels, 3, padding=1)
        self.cond = torch.nn.Linear(cond_dim, channels)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=sample.dtype).reshape(-1, 1, 1, 1).expand(sample.shape[0], 1,
                                                                                       *sample.shape[2:]) / 1000
        return self.conv(torch.cat([sample, t], 1)) + self.cond(cond)[:, :, None, None]


class ToyPipeline(SpatiaPipelineHubMixin, DiffusionPipeline):
    """Denoises ``size`` x ``size`` images conditioned on a vector; returns a float tensor in [-1, 1]."""

    def __init__(self, denoiser: ToyDenoiser, scheduler: DDPMScheduler):
        super().__init__()
        self.register_modules(denoiser=denoiser, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, cond: torch.Tensor, size: int = 8, num_inference_steps: int = 4,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        channels = self.denoiser.config.channels
        sample = torch.randn((cond.shape[0], channels, size, size), generator=generator)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            noise = self.denoiser(sample, t, cond)
            sample = self.scheduler.step(noise, t, sample, generator=generator).prev_sample
        return sample.clamp(-1, 1)


def tiny_toy_pipeline(seed: int = 0, channels: int = 2, cond_dim: int = 8) -> ToyPipeline:
    """A freshly initialised toy pipeline (seeded)."""
    torch.manual_seed(seed)
    return ToyPipeline(ToyDenoiser(channels, cond_dim), DDPMScheduler(num_train_timesteps=100))
