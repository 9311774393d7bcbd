"""Tests of the synthetic ground-truth data (training/toy.py)."""

from __future__ import annotations

import math

import pytest
import torch

from training.toy import (
    ToyConfig,
    feature_probabilities,
    iter_batches,
    make_covariance,
    make_features,
    make_generator,
    sample_batch,
)

N = 40_000  # samples in the statistical tests


def _draw(cfg: ToyConfig, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """One big batch (acts, coefficients) from cfg's data stream."""
    return sample_batch(cfg, make_features(cfg), n, make_generator(cfg))


def test_probabilities_by_hand() -> None:
    """decay 0.5, 8 features, avg 5: the 4 largest clip to 1, then c = 1 / (1/16 + ... + 1/128) = 128/15."""
    p = feature_probabilities(ToyConfig(n_features=8, d=4, avg_active=5, decay=0.5))
    c = 128 / 15
    expected = [1, 1, 1, 1, c / 16, c / 32, c / 64, c / 128]
    assert torch.allclose(p, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert p.sum().item() == pytest.approx(5.0, abs=1e-12)


def test_probabilities_no_clip_default() -> None:
    """Default config: p_i = 5 * 0.99^i / sum_j 0.99^j, the geometric sum being (1 - 0.99^512) / 0.01."""
    p = feature_probabilities(ToyConfig())
    c = 5 / ((1 - 0.99**512) / 0.01)
    assert p[0].item() == pytest.approx(c, rel=1e-12)
    assert p[100].item() == pytest.approx(c * 0.99**100, rel=1e-12)


def test_mean_active_matches_avg_active() -> None:
    """Mean number of active features per sample within 2% of avg_active."""
    cfg = ToyConfig()
    _, coef = _draw(cfg)
    assert coef.shape == (N, cfg.n_features)
    mean_active = (coef != 0).sum(1).double().mean().item()
    assert abs(mean_active - cfg.avg_active) / cfg.avg_active < 0.02


def test_frequencies_decay() -> None:
    """Firing frequency ratio of features 0-49 vs 100-149 is 0.99^-100 = 2.732 within 4%; frequencies match p_i."""
    cfg = ToyConfig()
    _, coef = _draw(cfg)
    freq = (coef != 0).double().mean(0)  # [G]
    ratio = freq[:50].sum() / freq[100:150].sum()
    assert ratio.item() == pytest.approx(0.99**-100, rel=0.04)
    p = feature_probabilities(cfg)
    sigma = (p * (1 - p) / N).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-9).all()


def test_clipped_probabilities_empirical() -> None:
    """With strong decay the first features always fire and the mean still equals avg_active."""
    cfg = ToyConfig(n_features=64, d=32, avg_active=5, decay=0.5)
    _, coef = _draw(cfg, 10_000)
    active = coef != 0
    assert active[:, :4].float().mean().item() > 0.999  # p = 1 (a magnitude of exactly 0 is ~impossible)
    assert active.sum(1).double().mean().item() == pytest.approx(5.0, rel=0.02)


def test_magnitudes_and_acts() -> None:
    """Magnitudes in [0, 1), acts = coefficients @ features."""
    cfg = ToyConfig(n_features=32, d=16, avg_active=3)
    feats = make_features(cfg)
    acts, coef = sample_batch(cfg, feats, 1000, make_generator(cfg))
    assert coef.min() >= 0 and coef.max() < 1
    assert torch.allclose(acts, coef @ feats)
    nz = coef[coef != 0]
    assert nz.mean().item() == pytest.approx(0.5, abs=0.03)


def test_unit_norms_and_seeded_features() -> None:
    """Features are unit rows; same seed same features, other seed other features."""
    cfg = ToyConfig()
    f = make_features(cfg)
    assert f.shape == (512, 256)
    assert torch.allclose(f.norm(dim=1), torch.ones(512), atol=1e-6)
    assert torch.equal(f, make_features(ToyConfig()))
    assert not torch.equal(f, make_features(ToyConfig(seed=1)))


@pytest.mark.parametrize("correlated", [False, True])
def test_reproducible_batches(correlated: bool) -> None:
    """Same seed gives the same sequence of batches; another seed does not."""
    cfg = ToyConfig(n_features=64, d=32, correlated=correlated)
    a, b = iter_batches(cfg, 100), iter_batches(ToyConfig(n_features=64, d=32, correlated=correlated), 100)
    for _ in range(3):
        (xa, ca), (xb, cb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ca, cb)
    first_a, first_b = next(iter_batches(cfg, 100)), next(iter_batches(ToyConfig(n_features=64, d=32, correlated=correlated, seed=7), 100))
    assert not torch.equal(first_a[1], first_b[1])
    # consecutive batches are fresh draws
    it = iter_batches(cfg, 100)
    assert not torch.equal(next(it)[1], next(it)[1])


def test_covariance_is_correlation_matrix() -> None:
    """Unit diagonal, symmetric, positive definite."""
    sigma = make_covariance(ToyConfig(n_features=64, d=32, correlated=True))
    assert torch.allclose(sigma.diagonal(), torch.ones(64, dtype=torch.float64))
    assert torch.allclose(sigma, sigma.T)
    assert torch.linalg.eigvalsh(sigma).min() > 0


def _indicator_corr(active: torch.Tensor) -> torch.Tensor:
    """Pearson correlation [G, G] of the 0/1 activity indicators."""
    a = active.double()
    a = a - a.mean(0)
    cov = a.T @ a / a.shape[0]
    std = cov.diagonal().sqrt()
    return cov / (std[:, None] * std[None, :])


def test_correlated_keeps_marginals_and_correlates() -> None:
    """Copula: frequencies stay p_i; indicator correlation follows the sign of large Sigma entries."""
    cfg = ToyConfig(n_features=40, d=32, avg_active=10, decay=0.98, correlated=True, corr_rank=4)
    _, coef = _draw(cfg)
    active = coef != 0
    p = feature_probabilities(cfg)
    freq = active.double().mean(0)
    sigma_p = (p * (1 - p) / N).sqrt()
    assert ((freq - p).abs() <= 5 * sigma_p).all()
    assert active.sum(1).double().mean().item() == pytest.approx(10.0, rel=0.02)

    sigma = make_covariance(cfg)
    corr = _indicator_corr(active)
    off = ~torch.eye(cfg.n_features, dtype=torch.bool)
    strong_pos = (sigma > 0.6) & off
    strong_neg = (sigma < -0.6) & off
    weak = (sigma.abs() < 0.05) & off
    assert strong_pos.sum() > 0 and strong_neg.sum() > 0 and weak.sum() > 0
    se = 1 / math.sqrt(N)  # standard error of a correlation near 0
    assert (corr[strong_pos] > 0.15).all()
    assert (corr[strong_neg] < -0.05).all()
    assert corr[weak].abs().max() < 6 * se + 0.03
    # the independent option shows no such structure
    _, coef_ind = _draw(ToyConfig(n_features=40, d=32, avg_active=10, decay=0.98))
    assert _indicator_corr(coef_ind != 0)[off].abs().max() < 6 * se


def test_invalid_config() -> None:
    """avg_active above n_features or non-positive decay are rejected."""
    with pytest.raises(ValueError):
        feature_probabilities(ToyConfig(n_features=4, avg_active=5))
    with pytest.raises(ValueError):
        feature_probabilities(ToyConfig(decay=0.0))
