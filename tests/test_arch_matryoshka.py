"""The Matryoshka BatchTopK architecture: the nested loss against an independent implementation, its prefixes as an
architecture option (flag, state_dict, checks), and the BatchTopK checks (tests/test_arch_batchtopk.py) on it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from test_arch_batchtopk import (_data, check_killed_sweep_resumes_bit_exactly,
                                 check_loss_and_gradient_against_reference, check_nan_member_is_frozen_others_unchanged,
                                 check_recovers_known_features, check_sweep_saves_a_threshold_that_loads,
                                 reference_loss)
from test_sweep import cfg_for, chunk_root  # noqa: F401 (chunk_root: the dataset fixture)
from training.architectures.batchtopk import prefix_ends
from training.architectures.matryoshka import DEFAULT_PREFIXES, MatryoshkaAutoencoder
from training.cli import UserError
from training.ensemble import Ensemble, make_members
from training.sweep import SweepConfig, run_sweep

F64 = torch.float64
PREFIXES = (0.25, 0.5, 1.0)


def test_prefix_ends_by_hand():
    assert prefix_ends(32, DEFAULT_PREFIXES) == [1, 3, 7, 15, 32]
    assert prefix_ends(4096, DEFAULT_PREFIXES) == [128, 384, 896, 1920, 4096]   # dictionary_learning's groups
    assert prefix_ends(10, (0.5, 1.0)) == [5, 10] and prefix_ends(10, (1.0,)) == [10]
    for bad in [(0.5, 0.5, 1.0), (0.5, 0.9), (0.01, 1.0), (0.5, 1.5), ()]:
        with pytest.raises(ValueError, match="must rise strictly"):
            prefix_ends(32, bad)
    assert SweepConfig().matryoshka_prefixes == list(DEFAULT_PREFIXES)


def test_nested_loss_by_hand():
    """Two latents, prefixes [1, 2], k = 1 over a batch of two tokens: each token keeps its own latent."""
    params = {"center": torch.zeros(2, dtype=F64), "encoder": torch.eye(2, dtype=F64),
              "encoder_bias": torch.zeros(2, dtype=F64), "decoder": torch.eye(2, dtype=F64),
              "threshold": torch.zeros((), dtype=F64)}
    x = torch.tensor([[3.0, 1.0], [0.5, 2.0]], dtype=F64)             # kept: x[0, 0] = 3 and x[1, 1] = 2
    # prefix 1: x_hat = [[3, 0], [0, 0]] -> errors 1 and 0.25 + 4; prefix 2: x_hat = [[3, 0], [0, 2]] -> 1 and 0.25
    want = (1 + 4.25) / 2 + (1 + 0.25) / 2
    sae = MatryoshkaAutoencoder(2, 2, 1, prefixes=(0.5, 1.0), dtype=F64)
    with torch.no_grad():
        for n, p in sae.named_parameters():
            p.copy_(params[n])
    total, parts = sae.loss(x)
    assert total.item() == pytest.approx(want) and parts["mse"].item() == pytest.approx(1.25 / 2)
    assert reference_loss(params, x, 1, [1, 2])[0].item() == pytest.approx(want)


def test_loss_and_gradient_equal_an_independent_implementation():
    check_loss_and_gradient_against_reference("matryoshka", [8, 16, 32], {"matryoshka_prefixes": PREFIXES})
    check_loss_and_gradient_against_reference("matryoshka", [1, 3, 7, 15, 32], {})


def test_prefixes_are_an_option_kept_by_the_state_dict():
    torch.manual_seed(0)
    ens = Ensemble(make_members("matryoshka", 2, 8, 32, keys=[2, 3], dtype=F64), {"lr": [1e-2] * 2},
                   arch_options={"matryoshka_prefixes": PREFIXES})
    ens.step(_data(32, 8))
    state = st_load(st_save(ens.state_dict()))
    assert state["option.arch.matryoshka_prefixes"].tolist() == list(PREFIXES)
    back = Ensemble.from_state_dict(state)
    assert back.member_state["ends"] == [8, 16, 32] and back.arch_options == {"matryoshka_prefixes": PREFIXES}
    assert torch.equal(back.params["threshold"], ens.params["threshold"])
    x = _data(32, 8, seed=3)
    assert torch.equal(back.step(x)["loss"], ens.step(x)["loss"])
    with pytest.raises(ValueError, match="has no options"):
        Ensemble(make_members("batchtopk", 1, 8, 32, keys=[2]), {"lr": [1e-2]},
                 arch_options={"matryoshka_prefixes": [1]})


def test_nan_member_is_frozen_others_unchanged():
    check_nan_member_is_frozen_others_unchanged("matryoshka", {"matryoshka_prefixes": PREFIXES})


def test_recovers_known_features():
    assert check_recovers_known_features("matryoshka", {"matryoshka_prefixes": (0.5, 1.0)}) >= 0.95


def test_sweep_saves_a_threshold_that_loads_with_its_prefixes(chunk_root, tmp_path):  # noqa: F811
    check_sweep_saves_a_threshold_that_loads(chunk_root, tmp_path / "o", "matryoshka", matryoshka_prefixes=[0.5, 1.0])
    meta = json.loads((tmp_path / "o" / "sweep.json").read_text())
    assert meta["config"]["matryoshka_prefixes"] == [0.5, 1.0]


def test_killed_sweep_resumes_bit_exactly(chunk_root, tmp_path, monkeypatch):  # noqa: F811
    check_killed_sweep_resumes_bit_exactly(chunk_root, tmp_path, "matryoshka", monkeypatch,
                                           matryoshka_prefixes=[0.25, 0.5, 1.0])


def test_bad_prefixes_are_one_line(chunk_root, tmp_path):  # noqa: F811
    with pytest.raises(UserError, match=r"^--matryoshka_prefixes: prefixes \[0.5, 0.25, 1.0\] .* must rise strictly"):
        run_sweep(cfg_for(chunk_root, tmp_path / "o", architecture="matryoshka", k_values=[2],
                          matryoshka_prefixes=[0.5, 0.25, 1.0]))
    assert not (tmp_path / "o").exists()
