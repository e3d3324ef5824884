"""Loss functions of the SPATIA objectives: count likelihoods, masked regression, InfoNCE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-8


def nb_log_likelihood(counts: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Elementwise log NB(counts; mean ``mu``, inverse dispersion ``theta``)."""
    log_theta_mu = torch.log(theta + mu + _EPS)
    return (
        theta * (torch.log(theta + _EPS) - log_theta_mu)
        + counts * (torch.log(mu + _EPS) - log_theta_mu)
        + torch.lgamma(counts + theta)
        - torch.lgamma(theta)
        - torch.lgamma(counts + 1)
    )


def zinb_log_likelihood(counts: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor,
                        zi_logits: torch.Tensor) -> torch.Tensor:
    """Elementwise log ZINB, written with softplus for stability (as in scvi-tools)."""
    softplus_pi = F.softplus(-zi_logits)
    log_theta_eps = torch.log(theta + _EPS)
    log_theta_mu_eps = torch.log(theta + mu + _EPS)
    pi_theta_log = -zi_logits + theta * (log_theta_eps - log_theta_mu_eps)
    case_zero = F.softplus(pi_theta_log) - softplus_pi
    case_non_zero = (
        -softplus_pi
        + pi_theta_log
        + counts * (torch.log(mu + _EPS) - log_theta_mu_eps)
        + torch.lgamma(counts + theta)
        - torch.lgamma(theta)
        - torch.lgamma(counts + 1)
    )
    return torch.where(counts < _EPS, case_zero, case_non_zero)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; 0 (with a gradient path) when nothing is selected."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    target = torch.nan_to_num(target.to(pred.dtype))
    return masked_mean((pred - target) ** 2, mask)


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a ``[B, B]`` similarity matrix whose diagonal holds the positives."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


__all__ = ["nb_log_likelihood", "zinb_log_likelihood", "masked_mean", "masked_mse", "info_nce"]
