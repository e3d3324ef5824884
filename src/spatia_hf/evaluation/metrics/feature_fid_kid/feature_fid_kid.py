"""Fréchet distance (FID) and kernel distance (KID) between real and generated images in a feature
space, as an ``evaluate`` metric shipped with spatia-hf.

Task 11. Inception features mean little for 2-channel fluorescence crops, so the caller chooses the
feature extractor (a CNN trained on real crops, the cell model's image branch, morphology
descriptors) and passes features; the metric compares the two feature clouds.

- FID: ``|mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))`` with unbiased covariances and
  ``scipy.linalg.sqrtm``; if the product is singular, ``eps`` is added to both diagonals
  (as pytorch-fid does). Biased upwards when there are fewer samples than feature dimensions.
- KID: unbiased MMD^2 with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``
  (Binkowski et al. 2018), averaged over ``subsets`` random subsets of ``subset_size`` (seeded);
  unbiased, so it can be slightly negative when the two sets match.
"""

import warnings

import datasets
import evaluate
import numpy as np
from scipy import linalg
from sklearn.metrics.pairwise import polynomial_kernel

_DESCRIPTION = """Feature-space FID and KID between a real and a generated set of feature vectors."""

_KWARGS_DESCRIPTION = """
Args:
    features (list of list of float): feature vectors of both sets, one row per image.
    is_generated (list of bool): True for rows of generated images, False for real ones.
    subsets (int, optional): KID subsets to average (default 100).
    subset_size (int, optional): KID subset size (default 1000; clipped to the smaller set).
    seed (int, optional): seed of the KID subset draw (default 0).
    eps (float, optional): diagonal offset used when the covariance product is singular (default 1e-6).
Returns:
    fid (float), kid (float, mean over subsets), kid_std (float), n_real (int), n_generated (int), dim (int).
Examples:
    >>> metric = spatia_hf.evaluation.metrics.load_metric("feature_fid_kid")
    >>> out = metric.compute(features=[[0.0], [2.0], [1.0], [5.0]], is_generated=[False, False, True, True])
    >>> round(out["fid"], 6)
    6.0
"""

_CITATION = """@inproceedings{heusel2017gans, title={GANs Trained by a Two Time-Scale Update Rule Converge to a
  Local Nash Equilibrium}, author={Heusel, M. and others}, booktitle={NeurIPS}, year={2017}}
@inproceedings{binkowski2018demystifying, title={Demystifying {MMD} {GAN}s}, author={Binkowski, M. and
  Sutherland, D. J. and Arbel, M. and Gretton, A.}, booktitle={ICLR}, year={2018}}"""


def frechet_distance(real: np.ndarray, gen: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to the two feature sets."""
    mu_r, mu_g = real.mean(axis=0), gen.mean(axis=0)
    s_r = np.atleast_2d(np.cov(real, rowvar=False))
    s_g = np.atleast_2d(np.cov(gen, rowvar=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s_r @ s_g)
    if caught or not np.isfinite(covmean).all():  # singular product (fewer samples than dimensions)
        offset = np.eye(s_r.shape[0]) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm((s_r + offset) @ (s_g + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real  # numerical noise of sqrtm on a near-singular product
    diff = mu_r - mu_g
    return float(diff @ diff + np.trace(s_r) + np.trace(s_g) - 2.0 * np.trace(covmean))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k_xx = polynomial_kernel(x, x, degree=3, gamma=1.0 / d, coef0=1.0)
    k_yy = polynomial_kernel(y, y, degree=3, gamma=1.0 / d, coef0=1.0)
    k_xy = polynomial_kernel(x, y, degree=3, gamma=1.0 / d, coef0=1.0)
    m, n = len(x), len(y)
    return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
                 - 2.0 * k_xy.mean())


def kernel_distance(real: np.ndarray, gen: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """Mean and std over random subsets of the unbiased polynomial-kernel MMD^2."""
    size = min(int(subset_size), len(real), len(gen))
    rng = np.random.default_rng(seed)
    if size == len(real) == len(gen):
        values = [_mmd2_unbiased(real, gen)]  # every subset would be the whole of both sets
    else:
        values = [_mmd2_unbiased(real[rng.choice(len(real), size, replace=False)],
                                 gen[rng.choice(len(gen), size, replace=False)]) for _ in range(int(subsets))]
    return float(np.mean(values)), float(np.std(values))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FeatureFidKid(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"features": datasets.List(datasets.Value("float64")),
                                        "is_generated": datasets.Value("bool")}),
            reference_urls=["https://arxiv.org/abs/1706.08500", "https://arxiv.org/abs/1801.01401"],
        )

    def _compute(self, features, is_generated, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
                 eps: float = 1e-6) -> dict:
        x = np.asarray(list(features), dtype=np.float64)
        flag = np.asarray(list(is_generated), dtype=bool)
        if x.ndim != 2:
            raise ValueError(f"features has shape {x.shape}: expected (n_images, dim) rows of equal width")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf. Fix: check the feature extractor on these images")
        real, gen = x[~flag], x[flag]
        if len(real) < 2 or len(gen) < 2:
            raise ValueError(f"n_real={len(real)}, n_generated={len(gen)}: FID/KID need at least 2 images of each "
                             "(is_generated marks the generated rows)")
        kid, kid_std = kernel_distance(real, gen, subsets=subsets, subset_size=subset_size, seed=seed)
        return {"fid": frechet_distance(real, gen, eps=eps), "kid": kid, "kid_std": kid_std,
                "n_real": int(len(real)), "n_generated": int(len(gen)), "dim": int(x.shape[1])}
