"""Honest baselines for the 12 tasks, run on the same splits and seeds as SPATIA.

Each baseline is a small function over arrays that produces what a task scores: features (for
probes and clustering), predictions (imputation, image -> expression), paired embeddings (retrieval)
or a predicted shift (perturbation). Everything that is fitted is fitted on the training cells only.

- expression: library-size normalised ``log1p`` counts; PCA of them (fitted on training cells);
- image: down-sampled pixels, and a small CNN trained on the training crops' cell types (seeded,
  a few epochs, fast on a CPU) whose penultimate layer gives image features;
- space: kNN smoothing of features over spatial neighbours within a section (domains, task 5);
- imputation: training-mean, kNN in observed-gene space (cell-only), spatial kNN (niche-aware);
- ridge regression from image features (task 9), random and PCA-CCA embeddings (task 10);
- an observational estimate of a gene's effect on morphology (task 12).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

DEFAULT_TARGET_SUM = 1e4


# ----------------------------------------------------------------------------- expression
def log1p_normalize(counts, target_sum: float = DEFAULT_TARGET_SUM, library: np.ndarray | None = None) -> np.ndarray:
    """``log1p(counts / library * target_sum)`` as dense float32: per-cell depth removed, so only
    composition remains. ``library`` defaults to each row's total (pass the observed genes' total
    when some genes are masked, so the masked values cannot leak through the depth)."""
    x = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    x = x.astype(np.float64)
    lib = x.sum(axis=1) if library is None else np.asarray(library, dtype=np.float64)
    if lib.shape != (x.shape[0],):
        raise ValueError(f"library has shape {lib.shape}: expected one total per cell ({x.shape[0]},)")
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
    return np.log1p(x * scale[:, None]).astype(np.float32)


def pca_features(x: np.ndarray, train_idx: np.ndarray, n_components: int = 30, seed: int = 0) -> np.ndarray:
    """PCA of ``x`` fitted on the training rows, applied to all rows (features centred, not scaled)."""
    from sklearn.decomposition import PCA

    k = int(min(n_components, len(train_idx) - 1, x.shape[1]))
    if k < 1:
        raise ValueError(f"n_components={n_components} with {len(train_idx)} training rows and {x.shape[1]} "
                         "columns: PCA needs at least 2 rows and 1 column")
    pca = PCA(n_components=k, random_state=seed).fit(x[train_idx])
    return pca.transform(x).astype(np.float32)


def highly_variable_genes(x: np.ndarray, n_top: int, exclude: Sequence[int] = ()) -> np.ndarray:
    """Column indices of the ``n_top`` most variable columns of ``x`` (log1p values), skipping ``exclude``."""
    var = x.var(axis=0).astype(np.float64)
    var[np.asarray(list(exclude), dtype=np.int64)] = -np.inf
    order = np.argsort(-var, kind="stable")
    return np.sort(order[: min(n_top, int(np.isfinite(var).sum()))])


# ----------------------------------------------------------------------------- space
def spatial_smoothing(x: np.ndarray, xy_um: np.ndarray, sample_ids: Sequence[str],
                      radius_um: float = 30.0) -> np.ndarray:
    """Mean of each cell's features and those of the cells within ``radius_um`` (same section):
    the classic "smooth, then cluster" spatial-domain baseline."""
    from scipy.spatial import cKDTree

    sample_ids = np.asarray(sample_ids).astype(str)
    out = np.zeros_like(x, dtype=np.float32)
    for sid in np.unique(sample_ids):
        rows = np.flatnonzero(sample_ids == sid)
        tree = cKDTree(xy_um[rows])
        adj = tree.sparse_distance_matrix(tree, radius_um, output_type="coo_matrix").tocsr()
        adj.data[:] = 1.0
        adj = adj + sp.eye(len(rows), format="csr")  # a cell at distance 0 from itself is not stored
        adj.data[:] = 1.0
        deg = np.asarray(adj.sum(axis=1)).ravel()
        out[rows] = (adj @ x[rows]) / deg[:, None]
    return out


# ----------------------------------------------------------------------------- image
def pixel_features(images: np.ndarray, size: int = 8) -> np.ndarray:
    """Crops average-pooled to ``size x size`` per channel, flattened, in [0, 1]."""
    t = torch.as_tensor(np.asarray(images), dtype=torch.float32) / 255.0
    return torch.nn.functional.adaptive_avg_pool2d(t, size).flatten(1).numpy()


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run a block with ``n`` torch CPU threads (None: unchanged), restoring the setting after. The
    baseline CNN's convolutions are tiny: one thread is fastest, and several threads on a busy CPU
    were measured 30x slower (11.8 s vs 0.4 s for 4 epochs of 120 crops)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ImageCNN(nn.Module):
    """Small image-only baseline: three conv blocks, global average pooling, a linear head."""

    def __init__(self, in_channels: int, n_classes: int, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(*block(in_channels, width), nn.MaxPool2d(2), *block(width, 2 * width),
                                  nn.MaxPool2d(2), *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class TrainedCNN:
    """A trained image-only CNN: class names, the network and its training loss per epoch."""

    classes: np.ndarray
    net: ImageCNN
    losses: list[float] = field(default_factory=list)

    num_threads: int | None = 1

    @torch.no_grad()
    def _batches(self, images: np.ndarray, fn, batch_size: int = 256) -> np.ndarray:
        self.net.eval()
        with torch_threads(self.num_threads):
            out = [fn(torch.as_tensor(np.asarray(images[i:i + batch_size]), dtype=torch.float32) / 255.0).numpy()
                   for i in range(0, len(images), batch_size)]
        return np.concatenate(out)

    def features(self, images: np.ndarray) -> np.ndarray:
        """Penultimate-layer features ``(N, 4 * width)`` of uint8 crops."""
        return self._batches(images, self.net.body)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        return self._batches(images, lambda x: torch.softmax(self.net(x), dim=1))

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Predicted class names."""
        return self.classes[self.predict_proba(images).argmax(axis=1)]


def train_image_cnn(images: np.ndarray, labels: Sequence[str], train_idx: np.ndarray, epochs: int = 10,
                    batch_size: int = 64, lr: float = 3e-3, width: int = 16, seed: int = 0,
                    num_threads: int | None = 1) -> TrainedCNN:
    """Train the image-only baseline on the training crops' labels (flip/rot90 augmentation, Adam).

    Seeded without touching the global RNG; a few epochs on 32-64 px crops take seconds on a CPU
    (``num_threads`` torch threads while it runs; see :func:`torch_threads`).
    """
    if epochs < 1:
        raise ValueError(f"epochs={epochs}: expected at least 1")
    labels = np.asarray(labels).astype(str)
    classes, y = np.unique(labels[train_idx], return_inverse=True)
    x = torch.as_tensor(np.asarray(images[train_idx]), dtype=torch.float32) / 255.0
    y = torch.as_tensor(y, dtype=torch.long)
    with torch.random.fork_rng(devices=[]), torch_threads(num_threads):
        torch.manual_seed(seed)
        net = ImageCNN(x.shape[1], len(classes), width)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        losses = []
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            total = 0.0
            for i in range(0, len(x), batch_size):
                idx = order[i:i + batch_size]
                xb = x[idx]
                k = int(torch.randint(0, 4, (1,), generator=gen))
                xb = torch.rot90(xb, k, dims=(2, 3))
                if torch.rand(1, generator=gen) < 0.5:
                    xb = xb.flip(3)
                loss = torch.nn.functional.cross_entropy(net(xb), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            losses.append(total / len(x))
    return TrainedCNN(classes, net, losses, num_threads)


# ----------------------------------------------------------------------------- imputation / regression
def mean_imputation(train_y: np.ndarray, n_test: int) -> np.ndarray:
    """Every test cell gets the training mean of each gene (no per-cell information)."""
    return np.repeat(np.asarray(train_y, np.float32).mean(axis=0, keepdims=True), n_test, axis=0)


def knn_expression_imputation(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int = 15) -> np.ndarray:
    """Mean of the masked genes over the ``k`` training cells closest in observed-gene space
    (cell-only: uses the cell's own expression, not its neighbours)."""
    from sklearn.neighbors import KNeighborsRegressor

    k = int(min(k, len(train_x)))
    return KNeighborsRegressor(n_neighbors=k).fit(train_x, train_y).predict(test_x).astype(np.float32)


def spatial_knn_imputation(train_xy: np.ndarray, train_y: np.ndarray, train_sections: Sequence[str],
                           test_xy: np.ndarray, test_sections: Sequence[str], k: int = 8) -> np.ndarray:
    """Mean of the masked genes over the ``k`` nearest training cells in space, same section
    (niche-aware: uses the neighbours, not the cell). Needs training cells in every test section."""
    from scipy.spatial import cKDTree

    train_sections, test_sections = np.asarray(train_sections).astype(str), np.asarray(test_sections).astype(str)
    out = np.zeros((len(test_xy), train_y.shape[1]), dtype=np.float32)
    for sid in np.unique(test_sections):
        tr, te = np.flatnonzero(train_sections == sid), np.flatnonzero(test_sections == sid)
        if len(tr) == 0:
            raise ValueError(f"section {sid!r} has no training cells: spatial kNN imputation needs a cell-level "
                             "split (splits.cell_split) so every section keeps training cells")
        kk = int(min(k, len(tr)))
        _, nn = cKDTree(train_xy[tr]).query(test_xy[te], k=kk)
        out[te] = train_y[tr][np.asarray(nn).reshape(len(te), kk)].mean(axis=1)
    return out


def ridge_regression(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                     alphas: Sequence[float] = tuple(np.logspace(-2, 4, 13))) -> np.ndarray:
    """Standardised ridge regression with the penalty chosen by efficient leave-one-out CV on the
    training cells (sklearn RidgeCV): e.g. image features -> expression (task 9)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), RidgeCV(alphas=list(alphas)))
    return model.fit(train_x, train_y).predict(test_x).astype(np.float32)


# ----------------------------------------------------------------------------- retrieval
def random_embeddings(n: int, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two independent Gaussian embeddings: the chance level of retrieval (recall@k ~ k / n)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim)).astype(np.float32), rng.standard_normal((n, dim)).astype(np.float32)


def pca_cca_embeddings(expr: np.ndarray, image: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray,
                       n_pca: int = 20, n_components: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Expression and image features of the test cells projected into a shared space: PCA of each
    modality, then CCA, all fitted on the training cells (the classical linear two-tower baseline)."""
    from sklearn.cross_decomposition import CCA

    e = pca_features(expr, train_idx, n_pca, seed)
    m = pca_features(image, train_idx, n_pca, seed)
    k = int(min(n_components, e.shape[1], m.shape[1]))
    cca = CCA(n_components=k, max_iter=1000).fit(e[train_idx], m[train_idx])
    e_c, m_c = cca.transform(e[test_idx], m[test_idx])
    return e_c.astype(np.float32), m_c.astype(np.float32)


# ----------------------------------------------------------------------------- perturbation
def observational_shift(log_expression: np.ndarray, log_feature: np.ndarray, log_folds: Sequence[float],
                        covariates: np.ndarray | None = None) -> np.ndarray:
    """Predicted log-fold morphology shift for each expression fold, from real cells only: the
    least-squares slope of ``log_feature`` on ``log_expression`` (adjusted for ``covariates``, e.g.
    one-hot cell types) times ``log(fold)``. No generator involved; regression dilution from noisy
    counts shrinks it towards 0."""
    from sklearn.linear_model import LinearRegression

    x = np.asarray(log_expression, np.float64)[:, None]
    if covariates is not None:
        x = np.hstack([x, np.asarray(covariates, np.float64)])
    y = np.asarray(log_feature, np.float64)
    if len(y) < 3 or np.ptp(x[:, 0]) == 0:
        raise ValueError(f"{len(y)} cells with expression range {np.ptp(x[:, 0]) if len(y) else 0}: the "
                         "observational slope needs at least 3 cells with varying expression")
    slope = float(LinearRegression().fit(x, y).coef_[0])
    return slope * np.asarray(log_folds, np.float64)


def one_hot(labels: Sequence[str]) -> np.ndarray:
    """One-hot columns of string labels (sorted classes)."""
    classes, inv = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    return np.eye(len(classes), dtype=np.float32)[inv]
