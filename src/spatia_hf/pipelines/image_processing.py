"""Stain images for people: channel names, their display colours, and RGB rendering of (N, C, H, W) stains.

The pipeline's ``output_type="pil"``, the evaluation figures and the README pictures all colour a channel
the same way (DAPI blue, boundary green, others from :data:`PALETTE` in order).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

DEFAULT_CHANNEL_NAMES = ("DAPI", "boundary")


# RGB colour of a stain channel by (lower-case) name; unknown channels take the palette in order.
CHANNEL_COLORS = {
    "dapi": (0.0, 0.35, 1.0), "nuclei": (0.0, 0.35, 1.0), "nucleus": (0.0, 0.35, 1.0), "hoechst": (0.0, 0.35, 1.0),
    "boundary": (0.0, 1.0, 0.0), "membrane": (0.0, 1.0, 0.0), "cell_boundary": (0.0, 1.0, 0.0),
}


PALETTE = ((1.0, 0.0, 0.0), (1.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0))


def default_channel_names(n_channels: int) -> list[str]:
    return list(DEFAULT_CHANNEL_NAMES) if n_channels == 2 else [f"channel_{i}" for i in range(n_channels)]


def channel_colors(channel_names: Sequence[str]) -> np.ndarray:
    """``[C, 3]`` RGB colour of each channel (see :data:`CHANNEL_COLORS`)."""
    colors, k = [], 0
    for name in channel_names:
        c = CHANNEL_COLORS.get(str(name).lower())
        if c is None:
            c = PALETTE[k % len(PALETTE)]
            k += 1
        colors.append(c)
    return np.asarray(colors, dtype=np.float32)


def render_rgb(images: np.ndarray | torch.Tensor, channel_names: Sequence[str]) -> np.ndarray:
    """``[N, C, H, W]`` stains in [0, 1] -> ``[N, H, W, 3]`` uint8 RGB (additive channel colours)."""
    x = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, np.float32)
    if x.ndim != 4 or x.shape[1] != len(channel_names):
        raise ValueError(f"images: expected [N, {len(channel_names)}, H, W] (one plane per channel of "
                         f"{list(channel_names)}), got {x.shape}")
    rgb = np.einsum("nchw,ck->nhwk", np.clip(x, 0.0, 1.0), channel_colors(channel_names))
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)

