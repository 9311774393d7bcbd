"""The vmap ensemble: equality with separately trained members and with torch.optim.Adam, fused
gradients against autograd, NaN isolation, checkpoints, dead latents, learning known features."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from training.dictionary import (SparseLinearAutoencoder, TopKAutoencoder, decode_codes, pre_activations,
                                 unit_norm_params)
from bench.step_ops import DeviceOps
from training.ensemble import Ensemble, make_members

F64 = torch.float64


def _data(n_steps: int, batch: int, d_in: int, seed: int = 0, dtype=F64) -> list[torch.Tensor]:
    """Batches of anisotropic, off-centre data."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 2.0, d_in, dtype=dtype)
    return [torch.randn(batch, d_in, generator=g, dtype=dtype) * scale + 0.3 for _ in range(n_steps)]


def _train_alone(module, xs: list[torch.Tensor], lr: float, *, l1: float | None = None,
                 dead_window: int = 10 ** 9, k_aux: int = 0, aux_coef: float = 1 / 32,
                 unit_decoder: bool = False, grad_clip: float = 0.0) -> list[float]:
    """Independent reference: module.loss + autograd (+ torch's clip_grad_norm_) + torch.optim.Adam (+ the unit
    decoder-norm constraint when `unit_decoder` or tied); returns the gradient norm of each step."""
    unit_decoder = unit_decoder or getattr(module, "tied", False)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    since = torch.zeros(module.d_hidden, dtype=torch.long)
    norms = []
    for x in xs:
        opt.zero_grad()
        if l1 is not None:
            loss, _ = module.loss(x, l1)
        else:
            loss, _ = module.loss(x, since >= dead_window, k_aux=k_aux, aux_coef=aux_coef)
        with torch.no_grad():
            fired = (module.encode(x) > 0).any(0)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip or float("inf"))))
        if unit_decoder:
            module.project_decoder_grad_()
        opt.step()
        if unit_decoder:
            module.normalize_decoder_()
        since += x.shape[0]
        since[fired] = 0
    return norms


def _train_ensemble(ens: Ensemble, xs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Step through `xs` (refreshing the aux-K switch every step, as the reference does)."""
    out = []
    for x in xs:
        if ens.architecture == "topk":
            ens.resample_dead(x)
        out.append(ens.step(x))
    return out


def _assert_params_equal(module, ens: Ensemble, i: int, **tol) -> None:
    """Member i of `ens` holds `module`'s parameters."""
    for name, p in module.named_parameters():
        torch.testing.assert_close(ens.params[name][i], p.detach(), msg=f"member {i} {name}", **tol)


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("case", ["l1", "l1_tied", "l1_chunked", "topk_sparse", "topk_dense"])
def test_fused_gradients_equal_autograd(case):
    torch.manual_seed(0)
    if case.startswith("l1"):
        members = make_members("l1", 3, 8, 32, tied=case == "l1_tied", dtype=F64)
        hparams = {"lr": torch.full((3,), 1e-3), "l1": torch.tensor([0.1, 0.5, 2.0])}
        kw = {"chunk_tokens": 24} if case == "l1_chunked" else {}   # batch 64: chunks of 24, 24, 16
    else:
        members = make_members("topk", 3, 8, 32, k=[2, 5, 3], dtype=F64)
        hparams = {"lr": torch.full((3,), 1e-3)}
        kw = {"k_aux": 6, "topk_decoder": case.split("_")[1]}
    x = _data(1, 64, 8)[0]
    results = {}
    for backend in ("fused", "autograd"):
        ens = Ensemble(copy.deepcopy(members), hparams, backend=backend, **kw)
        ens.init_center(x[:7])
        if ens.architecture == "topk":
            ens.tokens_since_fired[:2, ::3] = 10 ** 9     # member 2 has no dead latent
            ens._aux_on = True
        with torch.no_grad():
            stats = ens._gradients(x, {})
        results[backend] = ({n: g.clone() for n, g in ens._grads.items()}, stats)
    (g_f, s_f), (g_a, s_a) = results["fused"], results["autograd"]
    assert set(g_f) == set(g_a) and set(s_f) == set(s_a)
    for name in g_a:
        torch.testing.assert_close(g_f[name], g_a[name], rtol=1e-10, atol=1e-10, msg=name)
    for name in s_a:
        torch.testing.assert_close(s_f[name].to(F64), s_a[name].to(F64), rtol=1e-10, atol=1e-10, msg=name)
    if case.startswith("topk"):
        assert (s_f["aux"][:2] > 0).all() and s_f["aux"][2] == 0


@pytest.mark.parametrize("architecture", ["l1", "topk"])
def test_fused_gradients_follow_bf16_autocast(architecture):
    """Under autocast the fused matmuls run in bf16 like autograd's; gradients agree to bf16 precision."""
    torch.manual_seed(0)
    if architecture == "l1":
        members = make_members("l1", 2, 16, 64)
        hparams = {"lr": [1e-3] * 2, "l1": [0.1, 1.0]}
    else:
        members = make_members("topk", 2, 16, 64, k=[4, 8])
        hparams = {"lr": [1e-3] * 2}
    x = _data(1, 128, 16, dtype=torch.float32)[0]
    grads = {}
    for backend, precision in (("fused", "bf16"), ("autograd", "bf16"), ("fused", "fp32")):
        ens = Ensemble(copy.deepcopy(members), hparams, backend=backend, k_aux=8)
        ens.init_center(x)
        if architecture == "topk":
            ens.tokens_since_fired[:, ::2] = 10 ** 9
            ens._aux_on = True
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            stats = ens._gradients(x, {})
            grads[backend, precision] = {n: g.clone() for n, g in ens._grads.items()}, stats
            ens.step(x)
        assert all(p.dtype == torch.float32 for p in ens.params.values()) and not ens.frozen.any()
    for name, ref in grads["fused", "fp32"][0].items():
        for key in (("fused", "bf16"), ("autograd", "bf16")):   # relative error (TopK: a few selections flip)
            assert (grads[key][0][name] - ref).norm() <= 0.05 * ref.norm(), (key, name)
    torch.testing.assert_close(grads["fused", "bf16"][1]["mse"], grads["fused", "fp32"][1]["mse"], rtol=0.02, atol=0)


# ----------------------------------------------------------------------------- Adam

def test_adam_equals_torch_adam():
    torch.manual_seed(0)
    members = make_members("l1", 3, 6, 12)
    lrs = [1e-3, 3e-2, 1e-1]
    ens = Ensemble(copy.deepcopy(members), {"lr": lrs, "l1": [0.0] * 3}, adam_betas=(0.8, 0.99),
                   adam_eps=1e-6)
    refs = [(m, torch.optim.Adam(m.parameters(), lr=lr, betas=(0.8, 0.99), eps=1e-6)) for m, lr in zip(members, lrs)]
    active = torch.ones(3, dtype=torch.bool)
    for step in range(10):
        for name, g in ens._grads.items():
            g.copy_(torch.randn_like(g) * 10 ** (step % 3 - 1))
        for i, (module, opt) in enumerate(refs):
            for name, p in module.named_parameters():
                p.grad = ens._grads[name][i].clone()
            opt.step()
        ens._adam_(active, 1.0)
        for i, (module, opt) in enumerate(refs):
            _assert_params_equal(module, ens, i, rtol=1e-6, atol=1e-7)
            for name, p in module.named_parameters():
                torch.testing.assert_close(ens.exp_avg_sq[name][i], opt.state[p]["exp_avg_sq"], rtol=1e-6, atol=0)
    assert ens.adam_step.tolist() == [10.0, 10.0, 10.0]


def test_adam_trajectory_float32_single_member():
    torch.manual_seed(0)
    (member,) = make_members("l1", 1, 16, 64)
    xs = _data(30, 128, 16, dtype=torch.float32)
    ens = Ensemble([copy.deepcopy(member)], {"lr": [3e-3], "l1": [0.3]})
    _train_ensemble(ens, xs)
    _train_alone(member, xs, 3e-3, l1=0.3)
    _assert_params_equal(member, ens, 0, rtol=1e-4, atol=2e-5)


# ----------------------------------------------------------------------------- ensemble == separate runs

@pytest.mark.parametrize("case", ["l1", "l1_tied", "l1_unit", "l1_clip", "topk", "topk_unit", "topk_clip"])
def test_ensemble_equals_separately_trained_members(case):
    torch.manual_seed(0)
    n, d, h, batch = 3, 8, 24, 64
    xs = _data(25, batch, d)
    lrs = [1e-3, 1e-2, 3e-2]
    unit = case.endswith("_unit")
    clip = 2.0 if case.endswith("_clip") else 0.0   # between the members' smallest and largest gradient norms
    init_norm = 1.0 if unit else 0.1
    if case.startswith("topk"):
        ks = [1, 3, 4]
        members = make_members("topk", n, d, h, k=ks, dtype=F64, init_norm=init_norm)
        ens = Ensemble(copy.deepcopy(members), {"lr": lrs}, dead_window=3 * batch, k_aux=4, unit_decoder=unit,
                       grad_clip=clip)
    else:
        l1s = [0.05, 0.2, 1.0]
        members = make_members("l1", n, d, h, tied=case == "l1_tied", dtype=F64, init_norm=init_norm)
        ens = Ensemble(copy.deepcopy(members), {"lr": lrs, "l1": l1s}, unit_decoder=unit, grad_clip=clip)
    stats = _train_ensemble(ens, xs)
    norms = []
    for i, module in enumerate(members):
        if case.startswith("topk"):
            norms += _train_alone(module, xs, lrs[i], dead_window=3 * batch, k_aux=4, unit_decoder=unit,
                                  grad_clip=clip)
        else:
            norms += _train_alone(module, xs, lrs[i], l1=l1s[i], unit_decoder=unit, grad_clip=clip)
        # TopK member 0 (k=1) starts with an analytically zero encoder gradient: roundoff (1e-16)
        # divided by Adam's eps moves it by ~1e-11, so TopK gets a looser (still float64-tight) bound.
        tol = 1e-9 if case.startswith("topk") else 1e-12
        _assert_params_equal(module, ens, i, rtol=tol, atol=tol)
    if clip:
        assert min(norms) < clip < max(norms)   # some steps were clipped and some were not
    if case.startswith("topk"):
        assert stats[-1]["n_dead"].sum() > 0 and (stats[-1]["aux"] > 0).any()   # aux-K was exercised
        assert (stats[-1]["l0"] <= torch.tensor(ks, dtype=F64)).all()


# ----------------------------------------------------------------------------- robustness

def test_nan_member_is_frozen_and_others_continue():
    torch.manual_seed(0)
    members = make_members("l1", 3, 8, 16, dtype=F64)
    xs = _data(8, 32, 8)
    hp = {"lr": torch.full((3,), 1e-2), "l1": torch.tensor([0.1, 0.2, 0.3])}
    ens = Ensemble(copy.deepcopy(members), hp)
    pair = Ensemble([copy.deepcopy(members[0]), copy.deepcopy(members[2])],
                    {k: v[[0, 2]] for k, v in hp.items()})
    for x in xs[:3]:
        ens.step(x)
        pair.step(x)
    ens.params["encoder_bias"][1, 0] = float("nan")
    before = {k: v.clone() for k, v in ens.state_dict().items()}
    for x in xs[3:]:
        stats = ens.step(x)
        pair.step(x)
    assert stats["frozen"].tolist() == [False, True, False]
    assert not torch.isfinite(stats["loss"][1]) and torch.isfinite(stats["loss"][[0, 2]]).all()
    after = ens.state_dict()
    for key, value in before.items():
        if key.startswith(("param.", "adam.exp_avg")):
            assert torch.equal(after[key][1].nan_to_num(), value[1].nan_to_num()), key
    assert after["adam.step"].tolist() == [8.0, 3.0, 8.0]
    for name in ens.params:
        torch.testing.assert_close(ens.params[name][[0, 2]], pair.params[name], rtol=0, atol=0)


@pytest.mark.parametrize("stats", [True, False])
def test_a_member_with_a_non_finite_gradient_is_frozen_before_its_update(stats):
    """Freezing reads the gradient (every step, logged or not, clipped or not): a member whose loss is finite but
    whose gradient is not is frozen that very step, its parameters untouched by the NaN; the others train on."""
    members = make_members("l1", 3, 8, 16, dtype=F64, seed=1)
    hp = {"lr": torch.full((3,), 1e-2), "l1": torch.tensor([0.1, 0.2, 0.3])}
    ens, clean = (Ensemble(copy.deepcopy(members), hp, grad_clip=0.0) for _ in range(2))
    gradients = ens._gradients

    def poisoned(*args, **kwargs):
        out = gradients(*args, **kwargs)
        ens._grads["decoder"][1, 0, 0] = float("nan")
        return out
    ens._gradients = poisoned
    x = _data(1, 32, 8)[0]
    before = {n: t[1].clone() for n, t in ens.params.items()}
    out = ens.step(x, stats=stats)
    clean.step(x, stats=stats)
    assert ens.frozen.tolist() == [False, True, False]
    if stats:
        assert torch.isfinite(out["loss"]).all()                    # the loss alone would not have caught it
    for name, t in ens.params.items():
        assert torch.equal(t[1], before[name]), name
        assert torch.equal(t[[0, 2]], clean.params[name][[0, 2]]), name


@pytest.mark.parametrize("architecture", ["l1", "topk"])
def test_state_dict_round_trip_continues_the_same_trajectory(architecture):
    torch.manual_seed(0)
    if architecture == "l1":
        members = make_members("l1", 2, 8, 16, tied=True)
        hp = {"lr": torch.tensor([1e-2, 3e-3]), "l1": torch.tensor([0.1, 0.3])}
    else:
        members = make_members("topk", 2, 8, 16, k=[2, 3])
        hp = {"lr": torch.tensor([1e-2, 3e-3])}
    xs = _data(8, 32, 8, dtype=torch.float32)
    ens = Ensemble(members, hp, dead_window=64, k_aux=3)
    _train_ensemble(ens, xs[:4])
    restored = Ensemble.from_state_dict(st_load(st_save(ens.state_dict())))
    assert restored.architecture == architecture and restored.tied == ens.tied
    a, b = _train_ensemble(ens, xs[4:]), _train_ensemble(restored, xs[4:])
    for name in ens.params:
        assert torch.equal(ens.params[name], restored.params[name]), name
    assert torch.equal(a[-1]["loss"], b[-1]["loss"])
    assert torch.equal(ens.tokens_since_fired, restored.tokens_since_fired)
    with pytest.raises(ValueError):
        restored.load_state_dict({k: v for k, v in ens.state_dict().items() if k != "frozen"})


def test_unstack_gives_modules_with_the_ensembles_outputs():
    torch.manual_seed(0)
    x = _data(3, 32, 8, dtype=torch.float32)
    for ens in (Ensemble(make_members("l1", 3, 8, 16), {"lr": torch.full((3,), 1e-2), "l1": torch.ones(3)}),
                Ensemble(make_members("topk", 3, 8, 16, k=[1, 2, 5]), {"lr": torch.full((3,), 1e-2)})):
        _train_ensemble(ens, x[:2])
        modules = ens.unstack()
        predicted, codes = ens.predict(x[2]), ens.encode(x[2])
        for i, m in enumerate(modules):
            assert type(m) is (SparseLinearAutoencoder if ens.architecture == "l1" else TopKAutoencoder)
            torch.testing.assert_close(m(x[2]), predicted[i], rtol=0, atol=1e-6)
            torch.testing.assert_close(m.encode(x[2]), codes[i], rtol=0, atol=1e-6)


def test_hparams_are_checked():
    members = make_members("topk", 2, 4, 8, k=[1, 2])
    with pytest.raises(ValueError, match="k"):
        Ensemble(members, {"lr": torch.ones(2), "k": torch.tensor([1, 3])})
    with pytest.raises(ValueError):
        Ensemble(make_members("l1", 2, 4, 8), {"lr": torch.ones(2)})
    with pytest.raises(ValueError):
        Ensemble(make_members("l1", 2, 4, 8), {"lr": torch.ones(3), "l1": torch.ones(3)})


# ----------------------------------------------------------------------------- decoder-norm constraint

def test_decoder_rows_stay_unit_norm_and_l1_cannot_be_gamed():
    """Unit rows (`unit_decoder`): rows stay at norm 1 and ||x_hat - center|| <= sum_j codes_j per token.
    Free rows (default): the L1 weights each code by its row's norm, so the same bound holds with the
    weighted code mass, and folding the norms into the encoder (unit_norm_params) changes no output."""
    torch.manual_seed(0)
    xs = _data(150, 64, 8, dtype=torch.float32)
    for unit in (True, False):
        (member,) = make_members("l1", 1, 8, 32, init_norm=1.0 if unit else 0.1)
        ens = Ensemble([member], {"lr": torch.tensor([3e-2]), "l1": torch.tensor([3.0])}, unit_decoder=unit)
        ens.init_center(xs[0])
        _train_ensemble(ens, xs)
        norms = ens.params["decoder"].norm(dim=-1)
        if unit:
            torch.testing.assert_close(norms, torch.ones(1, 32))
        else:
            assert (norms - 1).abs().max() > 0.1                                      # rows really are free
        codes, x_hat = ens.encode(xs[0])[0], ens.predict(xs[0])[0]
        assert x_hat.sub(ens.params["center"][0]).norm(dim=-1).max() > 0.5            # not a trivial solution
        mass = (codes * norms[0]).sum(-1)
        assert (mass >= (x_hat - ens.params["center"][0]).norm(dim=-1) - 1e-4).all()
        folded = unit_norm_params({n: t[0] for n, t in ens.params.items()})
        torch.testing.assert_close(folded["decoder"].norm(dim=-1), torch.ones(32))
        folded_codes = pre_activations(folded, xs[0]).relu()
        torch.testing.assert_close(folded_codes.sum(-1), mass, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(decode_codes(folded, folded_codes), x_hat, rtol=1e-5, atol=1e-5)


def test_dead_latents_are_tracked_and_resampled():
    torch.manual_seed(0)
    n, d, h, batch = 2, 8, 16, 32
    ens = Ensemble(make_members("l1", n, d, h, init_norm=1.0), {"lr": torch.full((n,), 1e-3),
                   "l1": torch.full((n,), 0.1)}, dead_window=2 * batch, unit_decoder=True)
    never = torch.tensor([1, 5, 6])
    ens.params["encoder_bias"][0, never] = -1e4                     # member 0: three latents never fire
    xs = _data(3, batch, d, dtype=torch.float32)
    stats = [ens.step(x) for x in xs]
    assert stats[0]["n_dead"].tolist() == [0, 0] and stats[2]["n_dead"].tolist() == [3, 0]
    assert not stats[2]["fired"][0, never].any()
    assert (ens.tokens_since_fired[0, never] == 3 * batch).all()
    assert ens.dead_mask()[0].nonzero().flatten().tolist() == never.tolist()

    before = {k: v.clone() for k, v in ens.state_dict().items()}
    pool = _data(1, 512, d, seed=1, dtype=torch.float32)[0]
    assert ens.resample_dead(pool).tolist() == [3, 0]
    dec, enc = ens.params["decoder"][0, never], ens.params["encoder"][0, never]
    centred = pool - ens.params["center"][0]
    directions = centred / centred.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(dec.norm(dim=-1), torch.ones(3))
    assert ((dec @ directions.T).amax(-1) > 1 - 1e-5).all()        # each new row is a centred input
    alive = torch.ones(h, dtype=torch.bool)
    alive[never] = False
    expected = 0.2 * before["param.encoder"][0, alive].norm(dim=-1).mean()
    torch.testing.assert_close(enc.norm(dim=-1), expected.expand(3))
    torch.testing.assert_close(enc / enc.norm(dim=-1, keepdim=True), dec)
    assert (ens.params["encoder_bias"][0, never] == 0).all()
    for key in ("adam.exp_avg.decoder", "adam.exp_avg_sq.encoder", "adam.exp_avg.encoder_bias"):
        assert (ens.state_dict()[key][0, never] == 0).all()
    assert (ens.tokens_since_fired[0, never] == 0).all()
    untouched = torch.ones(h, dtype=torch.bool)
    untouched[never] = False
    for name in ("decoder", "encoder", "encoder_bias"):
        assert torch.equal(ens.params[name][0, untouched], before[f"param.{name}"][0, untouched])
        assert torch.equal(ens.params[name][1], before[f"param.{name}"][1])


def test_resampled_rows_of_free_decoders_take_the_mean_live_norm():
    torch.manual_seed(0)
    d, h, batch = 8, 16, 32
    ens = Ensemble(make_members("l1", 1, d, h), {"lr": [1e-3], "l1": [0.1]}, dead_window=batch)
    ens.params["decoder"][0] *= torch.linspace(0.5, 2.0, h).unsqueeze(-1)
    ens.tokens_since_fired[0, :3] = batch
    live_norm = ens.params["decoder"][0, 3:].norm(dim=-1).mean()
    assert ens.resample_dead(_data(1, 256, d, dtype=torch.float32)[0]).tolist() == [3]
    torch.testing.assert_close(ens.params["decoder"][0, :3].norm(dim=-1), live_norm.expand(3))


# ----------------------------------------------------------------------------- learning

def _sparse_feature_data(seed: int = 0):
    """64 ground-truth unit directions in d=32; each sample activates each with prob 3/64, magnitude U(0.5, 1.5)."""
    torch.manual_seed(seed)
    truth = torch.randn(64, 32)
    truth /= truth.norm(dim=-1, keepdim=True)
    gen = torch.Generator().manual_seed(seed + 1)

    def batch(n: int) -> torch.Tensor:
        active = (torch.rand(n, 64, generator=gen) < 3 / 64).float()
        return (active * (torch.rand(n, 64, generator=gen) + 0.5)) @ truth
    return truth, batch


@pytest.mark.parametrize("architecture", ["l1", "topk"])
def test_learns_known_sparse_features(architecture):
    truth, batch = _sparse_feature_data()
    steps = 400
    if architecture == "l1":
        ens = Ensemble(make_members("l1", 2, 32, 128, seed=1), {"lr": torch.full((2,), 1e-2),
                                                                "l1": torch.tensor([0.3, 0.5])},
                       dead_window=100 * 512)
    else:
        ens = Ensemble(make_members("topk", 2, 32, 128, k=[3, 4], seed=1), {"lr": torch.full((2,), 1e-2)},
                       dead_window=20 * 512, k_aux=16)
    ens.init_center(batch(4096), "geometric_median")
    for i in range(steps):
        stats = ens.step(batch(512), lr_scale=min(1.0, 2 * (1 - i / steps)))
        if (i + 1) % 100 == 0:
            ens.resample_dead(batch(8192))
    rows = ens.params["decoder"] / ens.params["decoder"].norm(dim=-1, keepdim=True)
    cosine = (rows @ truth.T).amax(1)                                   # [N, 64]: best row per true feature
    matched = (cosine > 0.9).sum(-1)
    assert (matched >= 56).all(), matched.tolist()
    assert (stats["explained_variance"] > 0.8).all() and not stats["frozen"].any()


def test_resampling_draws_depend_only_on_seed_step_and_the_global_member_index():
    from training.dead_latents import member_generator
    torch.manual_seed(0)
    n, d, h = 3, 8, 16
    members = make_members("l1", n, d, h)
    pool = _data(1, 256, d, seed=1, dtype=torch.float32)[0]

    def resampled(idx: list[int], step: int = 7, member_ids: list[int] | None = None) -> Ensemble:
        ens = Ensemble([members[i] for i in idx], {"lr": [1e-3] * len(idx), "l1": [0.1] * len(idx)}, dead_window=1)
        ens.tokens_since_fired.fill_(1)                                     # every latent is dead
        assert ens.resample_dead(pool, seed=5, step=step, member_ids=member_ids).tolist() == [h] * len(idx)
        return ens

    full = resampled([0, 1, 2])
    for i in range(n):                      # a member alone (as on another rank) gets the same rows by its index
        alone = resampled([i], member_ids=[i])
        for name in alone.params:
            assert torch.equal(alone.params[name][0], full.params[name][i]), (i, name)
    assert not torch.equal(resampled([2], member_ids=[0]).params["decoder"][0], full.params["decoder"][2])
    assert not torch.equal(resampled([0, 1, 2], step=8).params["decoder"], full.params["decoder"])
    # the rows are the documented draws: a CPU generator seeded from (seed, step, member)
    weights = Ensemble([members[1]], {"lr": [1e-3], "l1": [0.1]}).per_token_sq_err(pool)[0].square()
    picks = torch.multinomial((weights + weights.max() * 1e-12).double(), h, replacement=True,
                              generator=member_generator(5, 7, 1))
    centred = pool[picks] - full.params["center"][1]
    expected = centred / centred.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(full.params["decoder"][1] / full.params["decoder"][1].norm(dim=-1, keepdim=True),
                               expected)
    with pytest.raises(ValueError, match="member_ids has 1 entries for 3 members"):
        resampled([0, 1, 2], member_ids=[0])


def test_state_dict_keeps_the_aux_k_switch():
    torch.manual_seed(0)
    ens = Ensemble(make_members("topk", 2, 8, 16, k=[2, 3]), {"lr": [1e-2, 1e-2]}, dead_window=64, k_aux=3)
    _train_ensemble(ens, _data(4, 32, 8, dtype=torch.float32))
    assert ens.dead_mask().any()
    ens._aux_on = False                        # switched off at the last refresh, latents died since
    assert Ensemble.from_state_dict(ens.state_dict())._aux_on is False
    legacy = {k: v for k, v in ens.state_dict().items() if k != "dead.aux_on"}   # an older checkpoint
    assert Ensemble.from_state_dict(legacy)._aux_on is True


# ----------------------------------------------------------------------------- pinned L1 trajectories

PINNED = "63f03a3"
RENAMED = {"l1": "l1_norm"}
"""Step stats renamed since PINNED (the L1 norm of the codes no longer shares the L1 architecture's name)."""
"""The commit before the update was rewritten to run all members at once (issue 9): L1 weights must not change."""


def _pinned_ensemble_module():
    """training/ensemble.py as of PINNED, imported under another name (skipped without the git history)."""
    import subprocess
    import types
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    try:
        src = subprocess.run(["git", "-C", str(root), "show", f"{PINNED}:training/ensemble.py"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"needs the git history (commit {PINNED})")
    import sys
    module = sys.modules["pinned_ensemble"] = types.ModuleType("pinned_ensemble")   # dataclasses look it up
    exec(compile(src, "pinned_ensemble.py", "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("case", ["sweep_default", "unit_groups", "tied_noclip", "chunked_frozen"])
@pytest.mark.parametrize("whole_stack", [False, True])
def test_l1_trajectory_is_bit_identical_to_the_pinned_commit(case, whole_stack):
    old = _pinned_ensemble_module()
    d, h = (128, 4096) if case == "unit_groups" else (16, 64)   # unit_groups: 2 MiB decoders, groups of 2 on CPU
    members = make_members("l1", 3, d, h, tied=case == "tied_noclip", seed=1, init_norm=0.1)
    hp = {"lr": [1e-3, 3e-3, 1e-2], "l1": [0.01, 0.1, 1.0]}
    kw = dict(dead_window=256, unit_decoder=case == "unit_groups", grad_clip=0.0 if case == "tied_noclip" else 0.01,
              chunk_tokens=40 if case == "chunked_frozen" else 1 << 30)
    new_ens, old_ens = Ensemble(copy.deepcopy(members), hp, **kw), old.Ensemble(copy.deepcopy(members), hp, **kw)
    new_ens.whole_stack_update = whole_stack
    for step, x in enumerate(_data(6, 96, d, seed=3, dtype=torch.float32)):
        if case == "chunked_frozen" and step == 3:
            for e in (new_ens, old_ens):
                e.params["encoder"][1, 0, 0] = float("inf")
        a, b = new_ens.step(x, lr_scale=0.5 + 0.1 * step), old_ens.step(x, lr_scale=0.5 + 0.1 * step)
        if whole_stack and new_ens.unit_decoder:
            continue
        assert all(torch.equal(a[RENAMED.get(k, k)], b[k]) for k in b if k != "loss") and a["loss"].nan_to_num().equal(b["loss"].nan_to_num())
    if case == "chunked_frozen":
        assert new_ens.frozen.tolist() == [False, True, False]
    if whole_stack and new_ens.unit_decoder:   # the off-CPU projection sums its dot products in another order
        for name, t in old_ens.params.items():
            torch.testing.assert_close(new_ens.params[name], t, rtol=1e-4, atol=1e-6)
        return
    for group in ("params", "exp_avg", "exp_avg_sq"):
        for name, t in getattr(old_ens, group).items():
            assert torch.equal(getattr(new_ens, group)[name].nan_to_num(), t.nan_to_num()), (group, name)
    assert torch.equal(new_ens.adam_step, old_ens.adam_step)


# ----------------------------------------------------------------------------- launch count at real sizes

def _real_size_ensemble(n: int, unit_decoder: bool, grad_clip: float) -> Ensemble:
    """n L1 members of d_in 2048 x ratio 32 on the meta device (no memory; the off-CPU code path)."""
    ens = Ensemble(make_members("l1", n, 2048, 32 * 2048, device="meta"), {"lr": [1e-3] * n, "l1": [0.1] * n},
                   unit_decoder=unit_decoder, grad_clip=grad_clip)
    assert ens.whole_stack_update
    return ens


@pytest.mark.parametrize("unit_decoder", [False, True])
def test_l1_step_launches_a_constant_small_number_of_kernels_at_real_sizes(unit_decoder):
    x = torch.empty(4096, 2048, device="meta")
    counts = {}
    for n in (8, 16):
        ens = _real_size_ensemble(n, unit_decoder, grad_clip=0.01)
        ens.step(x)                                         # allocates the workspace
        with DeviceOps("meta") as whole:                   # a step whose stats nobody reads (the sweep's usual one)
            ens.step(x, stats=False)
        with DeviceOps("meta") as logged:                  # a step that logs
            ens.step(x)
        ens.grad_clip = 0.0
        with DeviceOps("meta") as unclipped:
            ens.step(x, stats=False)
        with DeviceOps("meta") as grad:
            ens._gradients(x, {})
        active = ~ens.frozen
        with DeviceOps("meta") as adam:                     # Adam (and the projection, the renormalisation)
            ens._update_(active, 1.0)
        counts[n] = len(whole.ops), len(logged.ops), len(unclipped.ops), len(grad.ops), len(adam.ops)
    print(f"kernels per L1 step, unit_decoder {unit_decoder}: {counts}")
    assert counts[8] == counts[16], counts                   # no per-member loop anywhere
    n_step, n_logged, n_unclipped, n_grad, n_adam = counts[8]  # 490+ per step before (one member at a time)
    assert n_grad + n_adam < (70 if unit_decoder else 60), counts
    # 84 / 89 before stats became optional, 65 / 70 before freezing read the clip's gradient norm instead of the loss
    # (the whole step, clipping on); see the op list of bench/step_ops.py --list
    assert n_step < (65 if unit_decoder else 60), counts     # + clipping, dead-latent tracking, NaN freezing
    assert n_unclipped < (59 if unit_decoder else 54), counts
    assert n_step < n_logged < (85 if unit_decoder else 80), counts  # + loss parts, explained variance, n_dead


@pytest.mark.parametrize("case", ["l1_cpu", "l1_whole_stack", "l1_unit_whole_stack", "l1_autograd", "topk",
                                  "topk_whole_stack"])
def test_steps_without_stats_train_the_same_bits(case):
    """`step(stats=False)` changes what is returned, never the update: params, moments, counters, freezing."""
    arch = "topk" if case.startswith("topk") else "l1"
    members = make_members(arch, 3, 8, 32, keys=[2, 4, 8] if arch == "topk" else None, seed=3)
    hp = {"lr": [1e-2, 2e-2, 3e-2]} | ({"l1": [0.1, 1.0, 3.0]} if arch == "l1" else {})
    kw = dict(dead_window=64, grad_clip=0.05, unit_decoder="unit" in case,
              backend="autograd" if "autograd" in case else "fused")
    ens = [Ensemble(copy.deepcopy(members), hp, **kw) for _ in range(2)]
    xs = _data(8, 32, 8, seed=1, dtype=torch.float32)
    outs = []
    for e in ens:
        e.whole_stack_update = "whole_stack" in case
        out = []
        for i, x in enumerate(xs):
            if i == 3:                                       # member 1 diverges: frozen from this step on
                e.params["encoder"][1, 0, 0] = float("inf")
            if arch == "topk":
                e.resample_dead(x)
            out.append(e.step(x, stats=e is ens[0] or i % 3 == 2, lr_scale=1 - i / 16))
        outs.append(out)
    assert ens[0].frozen.tolist() == [False, True, False]
    for group in ("params", "exp_avg", "exp_avg_sq"):
        for name, t in getattr(ens[0], group).items():
            torch.testing.assert_close(getattr(ens[1], group)[name], t, rtol=0, atol=0, equal_nan=True,
                                       msg=f"{group}.{name}")
    for name in ("tokens_since_fired", "frozen", "adam_step"):
        assert torch.equal(getattr(ens[1], name), getattr(ens[0], name)), name
    for i, (full, lean) in enumerate(zip(*outs)):
        torch.testing.assert_close(lean["fired"], full["fired"], rtol=0, atol=0)
        if i % 3 == 2:                                       # a logged step: every stat, the same values
            assert set(lean) == set(full)
            for key, v in full.items():
                torch.testing.assert_close(lean[key], v, rtol=0, atol=0, equal_nan=True, msg=key)
        elif case.startswith("l1") and "autograd" not in case:
            assert set(lean) == {"fired"}, sorted(lean)


@pytest.mark.parametrize("unit_decoder", [False, True])
def test_whole_stack_update_matches_the_cpu_path_for_topk(unit_decoder):
    members = make_members("topk", 3, 16, 64, k=[2, 4, 8], seed=2)
    ens = [Ensemble(copy.deepcopy(members), {"lr": [1e-3, 3e-3, 1e-2]}, dead_window=64, unit_decoder=unit_decoder,
                    grad_clip=0.01) for _ in range(2)]
    ens[1].whole_stack_update = True
    xs = _data(6, 64, 16, seed=4, dtype=torch.float32)
    _train_ensemble(ens[0], xs)
    _train_ensemble(ens[1], xs)
    for name, p in ens[0].params.items():
        if unit_decoder:   # the off-CPU projection sums its dot products in another order
            torch.testing.assert_close(ens[1].params[name], p, rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(ens[1].params[name], p), name


@pytest.mark.parametrize("tied", [False, True])
def test_one_masked_fill_zeroes_frozen_gradients_like_one_per_parameter(tied):
    """Off the CPU the frozen members' gradients (NaN here) are zeroed in one masked_fill over the one gradient
    buffer's rows; the same bits as zeroing each parameter's gradient, and frozen members stay as they are."""
    members = make_members("l1", 3, 64, 128, seed=4, tied=tied)
    ens = [Ensemble(copy.deepcopy(members), {"lr": [1e-2, 2e-2, 3e-2], "l1": [0.1, 1.0, 3.0]}, grad_clip=0.05)
           for _ in range(2)]
    assert ens[0]._grad_rows is not None and ens[0]._grad_rows[0].shape[1] == 64
    ens[1]._grad_rows = None                                  # the per-parameter masked_fill
    xs = _data(6, 32, 64, seed=2, dtype=torch.float32)
    for e in ens:
        e.whole_stack_update = True
        for i, x in enumerate(xs):
            if i == 2:
                e.params["encoder_bias"][1, 0] = float("inf")   # member 1: NaN gradients from here on
                before = {n: p[1].clone() for n, p in e.params.items()}
            e.step(x, stats=False)
        assert e.frozen.tolist() == [False, True, False]
        for n, p in e.params.items():
            assert torch.equal(p[1].nan_to_num(), before[n].nan_to_num()), n
    for group in ("params", "exp_avg", "exp_avg_sq"):
        for name, t in getattr(ens[0], group).items():
            torch.testing.assert_close(getattr(ens[1], group)[name], t, rtol=0, atol=0, equal_nan=True)
    for name, p in ens[0].params.items():                     # views of one buffer, laid out in order
        assert ens[0]._grads[name].is_contiguous() and ens[0]._grads[name].shape == p.shape


def test_a_members_gradient_clip_does_not_depend_on_the_other_members():
    """Clipping member i of an ensemble of 4 gives the same bits as clipping it in an ensemble of 2 (what a rank of a
    member-sharded sweep holds): each member's squared norms are summed along its own row."""
    from training.adam import clip_grads_, grad_sq_norms
    g = torch.Generator().manual_seed(0)
    shapes = {"center": (16,), "encoder": (32, 16), "encoder_bias": (32,), "decoder": (32, 16), "threshold": (32,)}
    whole = {n: torch.randn(4, *s, generator=g) for n, s in shapes.items()}
    part = {n: t[2:].clone() for n, t in whole.items()}
    clip_grads_(whole, grad_sq_norms(whole, 4), 0.01)
    clip_grads_(part, grad_sq_norms(part, 2), 0.01)
    assert all(torch.equal(whole[n][2:], part[n]) for n in shapes)
