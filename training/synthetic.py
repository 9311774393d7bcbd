"""Synthetic activations with known features: sparse sums of unit directions, for judging dictionaries.

Model (seeded, reproducible):
    features  F: [n_features, d] rows drawn uniformly on the unit sphere
    frequency p_i = c * (i + 1) ** -freq_exponent (power law), c chosen so that sum_i p_i = mean_active
    magnitude a_ij = base_i * (1 + magnitude_noise * N(0, 1)), clipped at 0, with base_i ~ U(0.5, 1.5)
    row       x_j = sum_i [feature i active in row j] * a_ij * F_i + noise * N(0, I_d) / sqrt(d)
so each row has about `mean_active` features and E||x||^2 is about mean_active * E[a^2] + noise^2.
A dictionary that has learnt the model has, for each feature, a decoder row at cosine ~1 with F_i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


# Offsets the generator's seed so that its features never equal a dictionary's random initialisation
# (members are drawn after torch.manual_seed(seed + i); feature seed 0 would hand member 0 the answer).
_SEED_OFFSET = 0x5EED_F00D


@dataclass(frozen=True)
class SyntheticSpec:
    """The generating model's settings."""

    d: int = 512
    n_features: int = 4096
    mean_active: float = 10.0
    freq_exponent: float = 0.5
    magnitude_noise: float = 0.2
    noise: float = 0.1
    seed: int = 0


@dataclass
class SyntheticModel:
    """The true features and their statistics."""

    spec: SyntheticSpec
    features: Tensor      # [n_features, d], unit rows
    frequency: Tensor     # [n_features], probability that feature i is active in a row
    base: Tensor          # [n_features], mean magnitude of feature i


def make_model(spec: SyntheticSpec) -> SyntheticModel:
    """Draw the features, their frequencies and base magnitudes from `spec.seed`."""
    if spec.mean_active <= 0 or spec.n_features < 1 or spec.d < 1:
        raise ValueError(f"bad synthetic spec {spec}")
    g = torch.Generator().manual_seed(_SEED_OFFSET + spec.seed)
    features = torch.randn(spec.n_features, spec.d, generator=g)
    features /= features.norm(dim=-1, keepdim=True)
    freq = (torch.arange(spec.n_features, dtype=torch.float64) + 1) ** -spec.freq_exponent
    freq = (freq * spec.mean_active / freq.sum()).clamp(max=1.0).float()
    base = 0.5 + torch.rand(spec.n_features, generator=g)
    return SyntheticModel(spec, features, freq, base)


def sample(model: SyntheticModel, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(x: [n, d], codes: [n, n_features] true magnitudes, 0 where inactive) drawn with `generator`."""
    s = model.spec
    active = torch.rand(n, s.n_features, generator=generator) < model.frequency
    mags = model.base * (1 + s.magnitude_noise * torch.randn(n, s.n_features, generator=generator))
    codes = mags.clamp_min(0) * active
    x = codes @ model.features + (s.noise / s.d ** 0.5) * torch.randn(n, s.d, generator=generator)
    return x, codes


def sample_rows(model: SyntheticModel, n: int, seed: int, block: int = 65536) -> Tensor:
    """x: [n, d] drawn in blocks (bounded memory) from a generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([sample(model, min(block, n - i), g)[0] for i in range(0, n, block)])


def recovered_fraction(decoder: Tensor, features: Tensor, threshold: float = 0.9) -> float:
    """Share of true `features: [F, d]` with some `decoder: [h, d]` row at cosine > threshold."""
    dec = decoder / decoder.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    feat = features / features.norm(dim=-1, keepdim=True)
    best = torch.cat([(f @ dec.T).amax(-1) for f in feat.split(1024)])
    return float((best > threshold).float().mean())
