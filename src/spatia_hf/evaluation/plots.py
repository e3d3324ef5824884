"""Small PNG pictures for the evaluation report (matplotlib, Agg backend, no display needed).

Each function draws one picture from arrays, writes it atomically (temporary file, then rename) and
returns its path: embeddings coloured by labels, predicted vs true domains in tissue coordinates
(µm), image grids (real or generated crops, perturbation strips) and imputation scatters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from ..utils.io import atomic_path

DPI = 80


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return path


def _categorical(ax, xy: np.ndarray, labels: Sequence, title: str, size: float = 6.0,
                 palette: Sequence[str] | None = None) -> None:
    """Scatter coloured by label; ``palette`` (all classes, in order) keeps colours equal across panels."""
    labels = np.asarray(labels).astype(str)
    classes = list(palette) if palette is not None else list(np.unique(labels))
    classes += [c for c in np.unique(labels) if c not in classes]
    cmap = _pyplot().get_cmap("tab20" if len(classes) > 10 else "tab10")
    for i, c in enumerate(classes):
        m = labels == c
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=size, color=cmap(i % cmap.N), label=c, linewidths=0)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(classes) <= 12:
        ax.legend(fontsize=6, markerscale=2, loc="best", frameon=False)


def embed_2d(x: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """Two coordinates per row for plotting: "pca" (fast, default) or "umap" (umap-learn, seeded)."""
    x = np.asarray(x, np.float64)
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "umap":
        import umap

        return umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, len(x) - 1)).fit_transform(x)
    raise ValueError(f"method={method!r}: expected 'pca' or 'umap'")


def plot_embedding(x: np.ndarray, colorings: Mapping[str, Sequence], path: str | Path, title: str = "",
                   method: str = "pca", seed: int = 0) -> Path:
    """One panel per colouring (e.g. {"cell type": types, "domain": domains}) of a 2-D view of ``x``."""
    if not colorings:
        raise ValueError("colorings is empty: pass e.g. {'cell type': labels}")
    plt = _pyplot()
    xy = embed_2d(x, method, seed)
    fig, axes = plt.subplots(1, len(colorings), figsize=(3.4 * len(colorings), 3.2), squeeze=False)
    for ax, (name, labels) in zip(axes[0], colorings.items()):
        _categorical(ax, xy, labels, f"{title} by {name}" if title else name)
    return _save(fig, path)


def match_labels(truth: Sequence, predicted: Sequence) -> np.ndarray:
    """Cluster ids renamed to the true label they overlap most (one-to-one, Hungarian assignment),
    so that pictures colour a recovered domain like its ground truth; unmatched clusters become
    "cluster <id>"."""
    from scipy.optimize import linear_sum_assignment

    truth, predicted = np.asarray(truth).astype(str), np.asarray(predicted).astype(str)
    t_classes, t_idx = np.unique(truth, return_inverse=True)
    p_classes, p_idx = np.unique(predicted, return_inverse=True)
    overlap = np.zeros((len(p_classes), len(t_classes)))
    np.add.at(overlap, (p_idx, t_idx), 1)
    rows, cols = linear_sum_assignment(-overlap)
    names = np.array([f"cluster {c}" for c in p_classes], dtype=object)
    names[rows] = t_classes[cols]
    return names[p_idx].astype(str)


def plot_spatial_domains(xy_um: np.ndarray, truth: Sequence, predicted: Mapping[str, Sequence], path: str | Path,
                         title: str = "") -> Path:
    """True domains next to each method's predicted domains (renamed by :func:`match_labels`, so
    colours correspond), drawn at the cells' positions (µm)."""
    plt = _pyplot()
    panels = {"ground truth": truth, **{m: match_labels(truth, p) for m, p in predicted.items()}}
    palette = list(np.unique(np.asarray(truth).astype(str)))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.0), squeeze=False)
    for ax, (name, labels) in zip(axes[0], panels.items()):
        _categorical(ax, np.asarray(xy_um), labels, name, size=10.0, palette=palette)
        ax.set_aspect("equal")
        ax.invert_yaxis()  # image convention: y (µm) grows downwards
        if ax.get_legend() is not None and name != "ground truth":
            ax.get_legend().remove()
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def to_rgb(images: np.ndarray) -> np.ndarray:
    """``(N, C, H, W)`` crops (uint8, or float in [0, 1]) as ``(N, H, W, 3)`` floats: one channel is
    grey; two channels show the nuclear stain (0) blue and the boundary stain (1) yellow."""
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"images has shape {x.shape}: expected (N, C, H, W)")
    if np.asarray(images).dtype == np.uint8:
        x = x / 255.0
    x = np.clip(x, 0.0, 1.0)
    if x.shape[1] == 1:
        return np.repeat(x.transpose(0, 2, 3, 1), 3, axis=3)
    if x.shape[1] == 2:
        return np.stack([x[:, 1], x[:, 1], x[:, 0]], axis=-1)
    return x[:, :3].transpose(0, 2, 3, 1)


def plot_image_grid(images: np.ndarray, path: str | Path, ncols: int = 8, titles: Sequence[str] | None = None,
                    row_labels: Sequence[str] | None = None, title: str = "") -> Path:
    """A grid of crops (row-major); ``titles`` per image, ``row_labels`` per row (e.g. fold of a
    perturbation strip, or the type a row was conditioned on)."""
    plt = _pyplot()
    rgb = to_rgb(images)
    n = len(rgb)
    if n == 0:
        raise ValueError("images is empty: nothing to draw")
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.1 * ncols, 1.15 * nrows), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i < n:
            ax.imshow(rgb[i], interpolation="nearest")
            if titles is not None:
                ax.set_title(str(titles[i]), fontsize=6)
    if row_labels is not None:
        for r, label in enumerate(row_labels[:nrows]):
            axes[r, 0].text(-0.1, 0.5, str(label), transform=axes[r, 0].transAxes, ha="right", va="center",
                            fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9, y=1.04)
    return _save(fig, path)


def plot_perturbation_strip(before: np.ndarray, after: Mapping[str, np.ndarray], path: str | Path,
                            max_cells: int = 6, title: str = "", row_labels: Sequence[str] | None = None) -> Path:
    """Rows = cells, columns = the unedited image then one per edit (e.g. {"NUCSIZE x4": images}),
    all generated from the same noise so differences are the edit's effect; ``row_labels`` name the
    cells (e.g. the type of the conditioning expression)."""
    n = min(max_cells, len(before))
    cols = [np.asarray(before)[:n]] + [np.asarray(a)[:n] for a in after.values()]
    grid = np.stack(cols, axis=1).reshape(n * len(cols), *np.asarray(before).shape[1:])
    heads = ["original", *after.keys()]
    return plot_image_grid(grid, path, ncols=len(cols), titles=[heads[i % len(cols)] if i < len(cols) else ""
                                                                 for i in range(len(grid))], title=title,
                           row_labels=None if row_labels is None else list(row_labels)[:n])


def plot_imputation_scatter(predicted: np.ndarray, measured: np.ndarray, gene_names: Sequence[str], path: str | Path,
                            max_genes: int = 4, title: str = "") -> Path:
    """Predicted vs measured values per gene for up to ``max_genes`` genes, with Pearson r."""
    plt = _pyplot()
    predicted, measured = np.asarray(predicted), np.asarray(measured)
    k = min(max_genes, predicted.shape[1])
    fig, axes = plt.subplots(1, k, figsize=(2.4 * k, 2.4), squeeze=False)
    for j, ax in enumerate(axes[0]):
        p, m = predicted[:, j], measured[:, j]
        r = np.corrcoef(p, m)[0, 1] if p.std() > 0 and m.std() > 0 else float("nan")
        ax.scatter(m, p, s=5, alpha=0.6, linewidths=0)
        ax.set_title(f"{gene_names[j]}  r={r:.2f}", fontsize=8)
        ax.set_xlabel("measured", fontsize=7)
        ax.set_ylabel("predicted", fontsize=7)
        ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9, y=1.04)
    return _save(fig, path)
