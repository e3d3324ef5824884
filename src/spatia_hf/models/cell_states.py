"""Cell states: prototypes in the cell-embedding space, and a neighbourhood's composition over them.

Spatial domains differ by which kinds of cells live together (Schürch et al. 2020's cellular
neighbourhoods; Novae's prototypes). A niche's composition over cell states (its members' mean
soft assignment) says that directly, where a pooled token or smoothed PCA mixes it with every
other source of variance of the cells. The states are the k-means centres of cell embeddings:
fitted once after pretraining on training cells (saved with the checkpoint, so every dataset
embedded later is described in the same states), or on the embedded cells when a model has none.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class SpatiaCellStates(nn.Module):
    """``num_states`` centres in the cell-embedding space (buffers, saved with the weights).

    Args:
        num_states: how many cell states.
        embed_dim: width of the cell embeddings they live in.
        temperature: softness of the assignment, as a fraction of the median squared distance of a
            cell to its nearest centre at fitting time (``scale``).
        neighbours: a composition counts the niche's this many cells nearest its centre (None: all).
        bandwidth: None: the counted cells weigh the same; a float: Gaussian weights with sigma this
            fraction of the distance to the farthest counted cell (per niche, so the kernel follows the
            local density).
    """

    def __init__(self, num_states: int, embed_dim: int, temperature: float = 0.3, neighbours: int | None = None,
                 bandwidth: float | None = None):
        super().__init__()
        self.temperature = float(temperature)
        self.neighbours = neighbours
        self.bandwidth = None if bandwidth is None else float(bandwidth)
        self.register_buffer("centres", torch.zeros(num_states, embed_dim))
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("fitted", torch.zeros(1))

    @property
    def num_states(self) -> int:
        return self.centres.shape[0]

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted.item() > 0)

    @torch.no_grad()
    def fit(self, cell_embeddings, *, seed: int = 0, max_cells: int = 50_000) -> "SpatiaCellStates":
        """k-means (scikit-learn, 3 restarts, seeded) of ``cell_embeddings [n, embed_dim]``; at most
        ``max_cells`` rows (a seeded sample) are used."""
        from sklearn.cluster import KMeans

        x = cell_embeddings.detach().float().cpu().numpy() if torch.is_tensor(cell_embeddings) \
            else np.asarray(cell_embeddings, dtype=np.float32)
        width = self.centres.shape[1]
        if x.ndim != 2 or x.shape[1] != width:
            raise ValueError(f"cell_embeddings: expected [n_cells, {width}] (the cell model's embeddings), got "
                             f"{tuple(x.shape)}")
        if not np.isfinite(x).all():
            raise ValueError("cell_embeddings contain NaN or inf. Fix: embed the cells again (a model with "
                             "non-finite weights, or corrupted inputs)")
        if len(x) < self.num_states:
            raise ValueError(f"cell_embeddings: {len(x)} cells for {self.num_states} cell states. Fix: fit on at "
                             f"least {self.num_states} cells, or build the model with fewer num_cell_states")
        if len(x) > max_cells:
            x = x[np.sort(np.random.default_rng(seed).choice(len(x), max_cells, replace=False))]
        x = x.astype(np.float64)
        km = KMeans(n_clusters=self.num_states, n_init=3, random_state=seed).fit(x)
        nearest = km.transform(x).min(1) ** 2
        self.centres.copy_(torch.from_numpy(km.cluster_centers_).to(self.centres))
        self.scale.fill_(max(float(np.median(nearest)), 1e-12))
        self.fitted.fill_(1.0)
        return self

    def probabilities(self, cell_embeddings: torch.Tensor) -> torch.Tensor:
        """Soft assignment ``[..., num_states]`` of cell embeddings ``[..., embed_dim]`` (float32)."""
        if not self.is_fitted:
            raise RuntimeError("the cell states are not fitted. Fix: call fit_cell_states(cell_embeddings) on the "
                               "niche model (spatia pretrain does it after training)")
        x = cell_embeddings.float()
        c = self.centres.float()
        d2 = (x.pow(2).sum(-1, keepdim=True) - 2.0 * x @ c.T + c.pow(2).sum(-1)).clamp(min=0.0)
        return torch.softmax(-d2 / (self.temperature * self.scale.float()), dim=-1)

    def composition(self, cell_embeddings: torch.Tensor, cell_positions: torch.Tensor,
                    cell_mask: torch.Tensor | None = None) -> torch.Tensor:
        """A niche's composition ``[B, num_states]``: the mean assignment of its real cells
        (``cell_embeddings [B, N, embed_dim]``, ``cell_mask [B, N]`` True on real cells) among the
        ``neighbours`` nearest its centre (``cell_positions [B, N, 2]``, relative to the centre),
        weighted by a Gaussian of their distance to the centre when ``bandwidth`` is set."""
        p = self.probabilities(cell_embeddings)
        real = torch.ones(p.shape[:2], dtype=torch.bool, device=p.device) if cell_mask is None else cell_mask.bool()
        dist2 = cell_positions.float().pow(2).sum(-1)
        if self.neighbours is not None and self.neighbours < p.shape[1]:
            rank = dist2.masked_fill(~real, float("inf")).argsort(dim=1, stable=True).argsort(dim=1)  # ties: order
            real = real & (rank < self.neighbours)
        w = real.to(p.dtype)
        if self.bandwidth is not None:
            reach2 = dist2.masked_fill(~real, 0.0).amax(dim=1, keepdim=True)  # farthest counted cell, squared
            sigma2 = (self.bandwidth**2 * reach2).clamp(min=1e-12)
            w = w * torch.exp(-0.5 * dist2 / sigma2)
        w = w[..., None]
        return (p * w).sum(1) / w.sum(1).clamp(min=1e-12)  # an empty niche: 0


__all__ = ["SpatiaCellStates"]
