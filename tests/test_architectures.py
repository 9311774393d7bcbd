"""The architecture registry: every registered architecture's fused gradient equals autograd's, its declaration is
complete, it saves and loads; an architecture with only a loss trains through the autograd backend."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from training.architectures import Architecture, get, names, registry
from training.architectures.l1 import L1, SparseLinearAutoencoder, l1_loss
from training.dictionary import decoder_norms, pre_activations
from training.ensemble import Ensemble, make_members

F64 = torch.float64


def _keys(arch: Architecture) -> list:
    """Three member keys valid for any architecture at d_hidden 32."""
    return [2, 5, 3] if arch.sweep_param_integer else [0.1, 0.5, 2.0]


def _ensemble(arch: Architecture, backend: str, members=None, **kw) -> Ensemble:
    members = members if members is not None else make_members(arch.name, 3, 8, 32, keys=_keys(arch), dtype=F64)
    hparams = {"lr": [1e-3] * 3, arch.sweep_param: _keys(arch)}
    return Ensemble(copy.deepcopy(members), hparams, backend=backend, k_aux=6, **kw)


def _data(n: int, d: int, seed: int = 0, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype) * torch.linspace(0.5, 2.0, d, dtype=dtype) + 0.3


def test_registry_lists_each_declaration_under_its_name():
    assert names()[:2] == ("l1", "topk")                                # the first two: legacy states are theirs
    for name in names():
        arch = get(name)
        assert arch.name == name and arch.module.architecture == name
        assert arch.dead_policy in ("resample", "aux_k", "none") and set(arch.scheduled) <= {arch.sweep_param}
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        get("nope")


@pytest.mark.parametrize("name", names())
@pytest.mark.parametrize("dead", [False, True])
def test_every_fused_gradient_equals_autograd(name, dead):
    arch = get(name)
    if arch.fused_grads is None:
        pytest.skip(f"{name} has no fused gradient")                  # trained by autograd: nothing to compare
    torch.manual_seed(0)
    members = make_members(name, 3, 8, 32, keys=_keys(arch), dtype=F64)
    x = _data(64, 8)
    out = {}
    for backend in ("fused", "autograd"):
        ens = _ensemble(arch, backend, members)
        ens.init_center(x[:7])
        if dead:
            ens.tokens_since_fired[:2, ::3] = 10 ** 9
            ens._aux_on = True
        with torch.no_grad():
            stats = ens._gradients(x, dict.fromkeys(arch.scheduled, 0.5))
        out[backend] = {n: g.clone() for n, g in ens._grads.items()}, stats
    (g_f, s_f), (g_a, s_a) = out["fused"], out["autograd"]
    assert set(g_f) == set(g_a) and set(s_f) == set(s_a)
    for n in g_a:
        torch.testing.assert_close(g_f[n], g_a[n], rtol=1e-10, atol=1e-10, msg=n)
    for n in s_a:
        torch.testing.assert_close(s_f[n].to(F64), s_a[n].to(F64), rtol=1e-10, atol=1e-10, msg=n)


@pytest.mark.parametrize("name", names())
def test_every_architecture_saves_loads_and_unstacks(name):
    arch = get(name)
    ens = _ensemble(arch, "fused")
    for x in _data(96, 8).split(32):
        ens.step(x, coefficient_scales=dict.fromkeys(arch.scheduled, 0.5))
    back = Ensemble.from_state_dict(st_load(st_save(ens.state_dict())))
    assert back.architecture == name
    x = _data(16, 8, seed=1)
    assert torch.equal(back.predict(x), ens.predict(x))
    for i, module in enumerate(ens.unstack()):
        assert type(module) is arch.module
        torch.testing.assert_close(module.predict(x), ens.predict(x)[i])


def test_step_refuses_a_coefficient_the_architecture_does_not_schedule():
    ens = _ensemble(get("topk"), "fused")
    with pytest.raises(ValueError, match="schedules"):
        ens.step(_data(8, 8), coefficient_scales={"l1": 0.5})


# ----------------------------------------------------------------------------- a new architecture: only a loss

class _SquaredAutoencoder(SparseLinearAutoencoder):
    """A ReLU dictionary with a squared penalty: l2 * mean sum_j (codes_j * norms_j)^2."""

    architecture = "squared_test"


def _squared_loss(params, x, coefficients, state):
    """MSE + l2 * mean_b sum_j (codes_j * norms_j)^2."""
    _, parts = l1_loss(params, x, 0.0)
    penalty = (parts["codes"] * decoder_norms(params)).square().sum(-1).mean()
    return parts["mse"] + coefficients["l2"] * penalty, {n: parts[n] for n in ("mse", "codes", "x_hat")}


SQUARED = dataclasses.replace(
    L1, name="squared_test", title="Squared", module=_SquaredAutoencoder,
    make_member=lambda d_in, d_hidden, key, *, tied=False, init_norm=0.1, device=None, dtype=None:
        _SquaredAutoencoder(d_in, d_hidden, tied, init_norm=init_norm, device=device, dtype=dtype),
    sweep_param="l2", scheduled=("l2",), loss=_squared_loss, fused_grads=None)


def test_an_architecture_with_only_a_loss_trains_by_autograd(monkeypatch):
    monkeypatch.setitem(registry(), "squared_test", SQUARED)
    torch.manual_seed(0)
    members = make_members("squared_test", 2, 8, 16, dtype=F64)
    ens = Ensemble(members, {"lr": [1e-2, 1e-2], "l2": [0.0, 1.0]})           # backend "fused" by default
    module = copy.deepcopy(members[1])
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    for x in _data(128, 8).split(32):
        ens.step(x, coefficient_scales={"l2": 0.5})
        opt.zero_grad()
        total, _ = _squared_loss(module.params(), x, {"l2": torch.tensor(0.5, dtype=F64)}, {})
        total.backward()
        opt.step()
    for n, p in module.named_parameters():                                   # member 1 is the reference
        torch.testing.assert_close(ens.params[n][1], p.detach(), rtol=1e-9, atol=1e-12, msg=n)
    codes = pre_activations({n: t[1] for n, t in ens.params.items()}, _data(64, 8)).relu()
    assert codes.abs().sum() > 0


@pytest.mark.parametrize("name", ("l1", "topk"))                     # the architectures older states can hold
def test_a_state_saved_before_the_architecture_name_loads_unchanged(name):
    arch = get(name)
    ens = _ensemble(arch, "fused")
    ens.step(_data(32, 8))
    old = {n: t for n, t in ens.state_dict().items() if n != "option.architecture"}   # as saved before the registry
    for back in (Ensemble.from_state_dict(old), _ensemble(arch, "fused")):
        back.load_state_dict(old)
        assert back.architecture == name
        for n, t in ens.params.items():
            assert torch.equal(back.params[n], t)


def _track_mse_(state, stats, active):
    """A running mean of each active member's MSE (an example of per-member state updated by the step)."""
    ema = state["mse_ema"]
    ema.copy_(torch.where(active, 0.9 * ema + 0.1 * stats["mse"].to(ema.dtype), ema))


STATEFUL = dataclasses.replace(
    SQUARED, member_state=lambda keys, like: {"mse_ema": torch.zeros(len(keys), dtype=like.dtype, device=like.device)},
    saved_state=("mse_ema",), update_state_=_track_mse_)


def test_member_state_is_updated_by_the_step_saved_and_loaded(monkeypatch):
    monkeypatch.setitem(registry(), "squared_test", STATEFUL)
    ens = Ensemble(make_members("squared_test", 2, 8, 16, dtype=F64), {"lr": [1e-2, 1e-2], "l2": [0.0, 1.0]})
    want = torch.zeros(2, dtype=F64)
    for x in _data(64, 8).split(32):
        want = 0.9 * want + 0.1 * ens.step(x)["mse"]
    torch.testing.assert_close(ens.member_state["mse_ema"], want)
    saved = st_load(st_save(ens.state_dict()))
    assert torch.equal(saved["state.mse_ema"], ens.member_state["mse_ema"])
    back = Ensemble.from_state_dict(saved)
    assert torch.equal(back.member_state["mse_ema"], ens.member_state["mse_ema"])
    other = Ensemble(make_members("squared_test", 2, 8, 16, dtype=F64), {"lr": [1e-2, 1e-2], "l2": [0.0, 1.0]})
    other.load_state_dict(saved)
    assert torch.equal(other.member_state["mse_ema"], ens.member_state["mse_ema"])
