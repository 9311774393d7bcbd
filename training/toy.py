"""Synthetic activations with known sparse ground-truth features (Sharkey, Braun, Millidge 2022).

G unit feature directions f_i in R^d (G > d: superposition). Per sample, feature i is active with
probability p_i proportional to decay**i, with magnitude c_i ~ U[0, 1); the activation is
x = sum_i c_i f_i, i.e. acts [batch, d] = coefficients [batch, G] @ features [G, d].
Optionally the active sets are correlated through a Gaussian copula that keeps every marginal p_i.
Batches are drawn fresh from a seeded generator, never stored: the same seed gives the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np
import torch
from torch import Tensor


@dataclass
class ToyConfig:
    """Ground-truth toy data: how many features, their dimension, sparsity and correlation."""

    n_features: int = 512
    """Number G of ground-truth features."""
    d: int = 256
    """Dimension of the activations."""
    avg_active: float = 5.0
    """Expected number of active features per sample (sum of the firing probabilities)."""
    decay: float = 0.99
    """Feature i fires with probability min(1, c * decay**i), c set so the probabilities sum to avg_active."""
    correlated: bool = False
    """Correlate which features fire through a Gaussian copula over a random correlation matrix."""
    corr_rank: int = 8
    """Rank r of the random covariance W W^T + I (W [G, r]); smaller r gives stronger correlations."""
    seed: int = 0
    """Seed of the features, the covariance and the data stream."""


_STREAM_FEATURES, _STREAM_COVARIANCE, _STREAM_DATA = 0, 1, 2


def _derived_seed(seed: int, stream: int) -> int:
    """Independent 63-bit seed for one stream (features, covariance, data) of a config seed."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0]) >> 1


def feature_probabilities(cfg: ToyConfig) -> Tensor:
    """Firing probabilities p [G] float64: p_i = min(1, c * decay**i) with c solving sum_i p_i = avg_active.

    Clipping at 1 is compensated exactly: with the k largest weights clipped,
    c = (avg_active - k) / sum of the other weights, for the smallest k that keeps those below 1.
    Requires 0 < avg_active <= n_features and decay > 0.
    """
    g = cfg.n_features
    if not 0 < cfg.avg_active <= g:
        raise ValueError(f"avg_active must be in (0, n_features={g}], got {cfg.avg_active}")
    if cfg.decay <= 0:
        raise ValueError(f"decay must be > 0, got {cfg.decay}")
    w = torch.tensor(cfg.decay, dtype=torch.float64) ** torch.arange(g, dtype=torch.float64)  # [G]
    w_sorted = w.sort(descending=True).values
    tail = w_sorted.flip(0).cumsum(0).flip(0)  # tail[k] = sum of w_sorted[k:]
    for k in range(g):
        c = (cfg.avg_active - k) / tail[k].item()
        if c * w_sorted[k].item() <= 1.0:
            return (c * w).clamp(max=1.0)
    return torch.ones(g, dtype=torch.float64)  # avg_active == G: every feature always on


def make_features(cfg: ToyConfig) -> Tensor:
    """Ground-truth directions [G, d] float32: Gaussian rows scaled to unit norm, seeded by cfg.seed."""
    gen = torch.Generator().manual_seed(_derived_seed(cfg.seed, _STREAM_FEATURES))
    f = torch.randn(cfg.n_features, cfg.d, generator=gen, dtype=torch.float64)
    return (f / f.norm(dim=1, keepdim=True)).float()


def make_covariance(cfg: ToyConfig) -> Tensor:
    """Random correlation matrix [G, G] float64: S = W W^T + I (W [G, r] Gaussian), rescaled to unit diagonal."""
    gen = torch.Generator().manual_seed(_derived_seed(cfg.seed, _STREAM_COVARIANCE))
    w = torch.randn(cfg.n_features, cfg.corr_rank, generator=gen, dtype=torch.float64)
    s = w @ w.T + torch.eye(cfg.n_features, dtype=torch.float64)
    inv_std = s.diagonal().rsqrt()
    return s * inv_std[:, None] * inv_std[None, :]


@lru_cache(maxsize=8)
def _copula_factors(n_features: int, corr_rank: int, seed: int, avg_active: float, decay: float, device: str) -> tuple[Tensor, Tensor]:
    """Cached (Cholesky factor L [G, G] of the correlation matrix, thresholds Phi^-1(p) [G]), float32 on device."""
    cfg = ToyConfig(n_features=n_features, corr_rank=corr_rank, seed=seed, avg_active=avg_active, decay=decay)
    chol = torch.linalg.cholesky(make_covariance(cfg))
    thresholds = torch.special.ndtri(feature_probabilities(cfg))  # p = 1 -> +inf: always active
    return chol.float().to(device), thresholds.float().to(device)


def make_generator(cfg: ToyConfig, device: str | torch.device = "cpu") -> torch.Generator:
    """Generator for the data stream of cfg.seed (independent of the features' stream)."""
    return torch.Generator(device=device).manual_seed(_derived_seed(cfg.seed, _STREAM_DATA))


def sample_active(cfg: ToyConfig, batch_size: int, generator: torch.Generator) -> Tensor:
    """Bool mask [batch, G] of active features, on generator.device.

    Independent: active_i = (u_i < p_i), u_i ~ U[0, 1). Correlated: z ~ N(0, Sigma) with Sigma the
    correlation matrix of `make_covariance`, u = Phi(z), active_i = (u_i < p_i) <=> z_i < Phi^-1(p_i);
    every u_i is U[0, 1) so the marginals stay p_i.
    """
    device = generator.device
    if not cfg.correlated:
        p = feature_probabilities(cfg).float().to(device)
        return torch.rand(batch_size, cfg.n_features, generator=generator, device=device) < p
    chol, thresholds = _copula_factors(cfg.n_features, cfg.corr_rank, cfg.seed, float(cfg.avg_active), float(cfg.decay), str(device))
    eps = torch.randn(batch_size, cfg.n_features, generator=generator, device=device)  # [batch, G]
    z = eps @ chol.T  # [batch, G], rows ~ N(0, Sigma)
    return z < thresholds


def sample_batch(cfg: ToyConfig, features: Tensor, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw (acts [batch, d], coefficients [batch, G]) with acts = coefficients @ features.

    coefficients_bi = active_bi * m_bi, m_bi ~ U[0, 1) (see `sample_active` for the active mask);
    drawn on generator.device, which must be features.device.
    """
    if features.shape != (cfg.n_features, cfg.d):
        raise ValueError(f"features must be [{cfg.n_features}, {cfg.d}], got {tuple(features.shape)}")
    active = sample_active(cfg, batch_size, generator)
    magnitudes = torch.rand(batch_size, cfg.n_features, generator=generator, device=generator.device)
    coefficients = (magnitudes * active).to(features.dtype)  # [batch, G]
    return coefficients @ features, coefficients


def iter_batches(
    cfg: ToyConfig, batch_size: int, features: Tensor | None = None, device: str | torch.device = "cpu"
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless reproducible stream of (acts [batch, d], coefficients [batch, G]) for cfg (features default: make_features(cfg))."""
    features = (make_features(cfg) if features is None else features).to(device)
    generator = make_generator(cfg, features.device)
    while True:
        yield sample_batch(cfg, features, batch_size, generator)
