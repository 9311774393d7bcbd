"""The known-feature generator: frequencies, magnitudes, reproducibility, and the recovery score."""

from __future__ import annotations

import pytest
import torch

from training.synthetic import SyntheticSpec, make_model, recovered_fraction, sample, sample_rows


def test_rows_follow_the_spec():
    spec = SyntheticSpec(d=32, n_features=256, mean_active=6.0, noise=0.0)
    model = make_model(spec)
    torch.testing.assert_close(model.features.norm(dim=-1), torch.ones(256))
    assert model.frequency.sum().item() == pytest.approx(6.0, rel=1e-4)
    assert (model.frequency[:-1] >= model.frequency[1:]).all()                    # power law, decreasing
    x, codes = sample(model, 20000, torch.Generator().manual_seed(1))
    assert (codes > 0).sum(-1).float().mean().item() == pytest.approx(6.0, rel=0.05)
    torch.testing.assert_close(x, codes @ model.features)                          # noise 0: exact sums


def test_reproducible_and_never_a_dictionarys_initialisation():
    spec = SyntheticSpec(d=16, n_features=64)
    assert torch.equal(sample_rows(make_model(spec), 100, 3), sample_rows(make_model(spec), 100, 3))
    assert not torch.equal(sample_rows(make_model(spec), 100, 3), sample_rows(make_model(spec), 100, 4))
    torch.manual_seed(spec.seed)                                                  # as make_members seeds member 0
    init = torch.randn(spec.n_features, spec.d)
    assert recovered_fraction(init, make_model(spec).features) == 0.0


def test_recovered_fraction_hand_computed():
    features = torch.eye(4)
    decoder = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, -1.0]])
    # feature 0: cosine 1; features 1 and 2: 0.707; feature 3: -1 -> 1 of 4 above 0.9
    assert recovered_fraction(decoder, features, 0.9) == 0.25
    assert recovered_fraction(decoder, features, 0.7) == 0.75
