"""Generation: ``SpatiaGenerationPipeline`` (``pipeline_spatia``), its condition encoder, the denoisers
(UNet / DiT factories, schedulers), image rendering and token merging in the denoiser.

Importing this package is light; the modules import torch and diffusers when they are imported.
Above ``data``; beside ``training``.
"""
