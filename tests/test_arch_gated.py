"""The Gated architecture (Rajamanoharan et al. 2024): its loss and gradient against an independent single-member
implementation, saving in raw-activation space, resume, NaN isolation, resampling, learning, and the CLI."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.top_activations import write_synthetic_folder
from conftest import sweep_killed_at_chunk
from training import load_sweep
from training.architectures import get
from training.architectures.gated import GatedAutoencoder, gated_loss
from training.cli import UserError, run_cli
from training.ensemble import Ensemble, make_members
from training.metrics import mmcs
from training.sweep import SweepConfig, run_sweep
from training.toy import ToyConfig, make_features, make_generator, sample_batch

F64 = torch.float64
L1S = [0.1, 0.5, 2.0]


def reference_loss(m: GatedAutoencoder, x: torch.Tensor, l1: float) -> torch.Tensor:
    """The paper's loss written out on its own (dictionary_learning's GatedSAE trainer, with SAELens' decoder-norm
    weighting of the gate penalty): W_mag = exp(r_mag) * W_gate built explicitly, the Heaviside as a comparison."""
    x_cent = x - m.center
    w_mag = m.mag_scale.exp()[:, None] * m.encoder                                 # [h, d]
    pi_gate = torch.einsum("bd,hd->bh", x_cent, m.encoder) + m.encoder_bias
    f_gate = torch.heaviside(pi_gate.detach(), torch.zeros(()).to(x))            # 1[pi > 0]
    f_mag = torch.clamp(torch.einsum("bd,hd->bh", x_cent, w_mag) + m.mag_bias, min=0)
    f = f_gate * f_mag
    x_hat = torch.einsum("bh,hd->bd", f, m.decoder) + m.center
    norms = torch.sqrt((m.decoder ** 2).sum(1))
    sparsity = (torch.clamp(pi_gate, min=0) * norms).sum(1).mean()
    x_frozen = torch.einsum("bh,hd->bd", torch.clamp(pi_gate, min=0), m.decoder.detach()) + m.center.detach()
    return (((x - x_hat) ** 2).sum(1).mean() + l1 * sparsity + ((x - x_frozen) ** 2).sum(1).mean())


def _data(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64) * torch.linspace(0.5, 2.0, d, dtype=F64) + 0.3


def _members(n: int = 3, d: int = 8, h: int = 32) -> list[GatedAutoencoder]:
    """Members with non-trivial magnitude params and biases (the fresh ones are 0)."""
    members = make_members("gated", n, d, h, dtype=F64)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in members:
            for p in (m.mag_scale, m.mag_bias, m.encoder_bias, m.center):
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=F64))
            m.decoder.mul_(torch.rand(h, 1, generator=g, dtype=F64) + 0.5)       # free rows of different norms
    return members


def test_fresh_members_follow_the_reference_initialisation():
    m = make_members("gated", 1, 8, 32, init_norm=0.1)[0]
    assert [n for n, _ in m.named_parameters()] == list(get("gated").param_names)
    assert torch.equal(m.mag_scale, torch.zeros(32)) and torch.equal(m.mag_bias, torch.zeros(32))
    assert torch.equal(m.encoder_bias, torch.zeros(32)) and torch.equal(m.encoder, m.decoder)
    torch.testing.assert_close(m.decoder.norm(dim=1), torch.full((32,), 0.1))


def test_loss_and_its_gradient_equal_the_reference_implementation():
    members = _members()
    x = _data(64, 8)
    ens = Ensemble(copy.deepcopy(members), {"lr": [1e-3] * 3, "l1": L1S}, backend="autograd")
    with torch.no_grad():
        stats = ens._gradients(x, {"l1": 0.5})
    for i, m in enumerate(members):
        m.zero_grad()
        ref = reference_loss(m, x, 0.5 * L1S[i])
        ref.backward()
        torch.testing.assert_close(stats["loss"][i], ref.detach(), rtol=1e-12, atol=1e-12)
        total, parts = m.loss(x, 0.5 * L1S[i])
        torch.testing.assert_close(total, ref.detach(), rtol=1e-12, atol=1e-12)
        for n, p in m.named_parameters():
            torch.testing.assert_close(ens._grads[n][i], p.grad, rtol=1e-10, atol=1e-12, msg=n)
        codes = m.encode(x)
        assert stats["l0"][i] == (codes > 0).double().sum(1).mean() and 0 < stats["l0"][i] < 32
        torch.testing.assert_close(stats["aux"][i], parts["aux"].detach())


@pytest.mark.parametrize("chunk_tokens", [1 << 30, 24])                 # one pass; chunks of 24 (the last one 16)
def test_the_fused_gradient_equals_autograd(chunk_tokens):
    members = _members()
    x = _data(64, 8)
    out = {}
    for backend in ("fused", "autograd"):
        ens = Ensemble(copy.deepcopy(members), {"lr": [1e-3] * 3, "l1": L1S}, backend=backend,
                       chunk_tokens=chunk_tokens)
        with torch.no_grad():
            stats = ens._gradients(x, {"l1": 0.7})
        out[backend] = {n: g.clone() for n, g in ens._grads.items()}, stats
    (g_f, s_f), (g_a, s_a) = out["fused"], out["autograd"]
    assert set(s_f) == set(s_a) and set(g_f) == set(g_a)
    for n in g_a:
        torch.testing.assert_close(g_f[n], g_a[n], rtol=1e-10, atol=1e-12, msg=n)
    for n in s_a:
        torch.testing.assert_close(s_f[n].to(F64), s_a[n].to(F64), rtol=1e-10, atol=1e-12, msg=n)


def test_the_fused_gradient_under_bf16_autocast_is_close_to_fp32():
    members = [m.float() for m in _members()]
    x = _data(64, 8).float()
    grads = {}
    for autocast in (False, True):
        ens = Ensemble(copy.deepcopy(members), {"lr": [1e-3] * 3, "l1": L1S}, chunk_tokens=40)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ens._gradients(x, {"l1": 1.0})
        grads[autocast] = {n: g.clone() for n, g in ens._grads.items()}
    for n, g in grads[False].items():
        assert grads[True][n].dtype == torch.float32
        rel = (grads[True][n] - g).norm() / g.norm()
        assert rel < 0.05, (n, float(rel))


def test_the_auxiliary_reconstruction_leaves_the_decoder_alone():
    """The aux term's decoder is frozen: with l1 = 0 the decoder gradient is that of the MSE alone."""
    m = _members(1)[0]
    x = _data(32, 8)
    _, parts = gated_loss(m.params(), x, 0.0)
    g_mse = torch.autograd.grad(parts["mse"], m.decoder)[0]
    g_all = torch.autograd.grad(gated_loss(m.params(), x, 0.0)[0], m.decoder)[0]
    torch.testing.assert_close(g_mse, g_all, rtol=0, atol=0)
    # ... while the gate learns from it (the Heaviside passes nothing)
    g_gate = torch.autograd.grad(parts["aux"], m.encoder_bias)[0]
    assert g_gate.abs().sum() > 0 and torch.autograd.grad(parts["mse"], m.encoder_bias, allow_unused=True)[0] is None


def test_the_stacked_encoding_equals_each_module():
    members = _members()
    ens = Ensemble(copy.deepcopy(members), {"lr": [1e-3] * 3, "l1": L1S})
    x = _data(16, 8, seed=2)
    for i, m in enumerate(members):
        torch.testing.assert_close(ens.encode(x)[i], m.encode(x).detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ens.predict(x)[i], m.predict(x).detach(), rtol=1e-12, atol=1e-12)


def test_a_nan_member_is_frozen_and_the_others_train_on():
    members = _members()
    x = _data(96, 8)
    clean = Ensemble(copy.deepcopy(members), {"lr": [1e-2] * 3, "l1": L1S})
    poisoned = Ensemble(copy.deepcopy(members), {"lr": [1e-2] * 3, "l1": [L1S[0], math.inf, L1S[2]]})
    before = {n: t[1].clone() for n, t in poisoned.params.items()}
    for xb in x.split(32):
        clean.step(xb)
        stats = poisoned.step(xb)
    assert stats["frozen"].tolist() == [False, True, False]
    for n, t in poisoned.params.items():
        assert torch.equal(t[1], before[n]), n
        for i in (0, 2):
            assert torch.equal(t[i], clean.params[n][i]), n


def test_resampling_resets_every_per_latent_param():
    ens = Ensemble(_members(), {"lr": [1e-2] * 3, "l1": L1S}, dead_window=1)
    for xb in _data(64, 8).split(32):
        ens.step(xb)
    ens.tokens_since_fired.zero_()
    ens.tokens_since_fired[1, :5] = 10
    ens.resample_dead(_data(256, 8, seed=3), seed=0, step=1)
    for name in ("encoder_bias", "mag_scale", "mag_bias"):
        assert torch.equal(ens.params[name][1, :5], torch.zeros(5, dtype=F64)), name
        assert ens.params[name][1, 5:].abs().sum() > 0 and ens.params[name][0, :5].abs().sum() > 0, name
        assert torch.equal(ens.exp_avg[name][1, :5], torch.zeros(5, dtype=F64)), name


# ----------------------------------------------------------------------------- through the sweep

@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A synthetic dataset with known features (48 features in 24 dimensions, 3 active per row, 4 chunks of 12000
    rows) and the features [48, 24]."""
    toy = ToyConfig(n_features=48, d=24, avg_active=3, decay=0.99, seed=0)
    features = make_features(toy)
    acts, _ = sample_batch(toy, features, 48000, make_generator(toy))
    root = tmp_path_factory.mktemp("gated-toy")
    write_synthetic_folder(root / "toy", len(acts), toy.d, model="none", vocab_size=2, chunk_size=12000,
                           hook="synthetic", acts=acts)
    return root / "toy", features


def _cfg(root: Path, out: Path, **kw) -> SweepConfig:
    base = dict(dataset_dir=str(root), output_dir=str(out), architecture="gated", ratio=2, l1_values=[0.3, 3.0],
                batch_size=500, max_tokens=24000, log_every=4, device="cpu", holdout_rows=2000)
    base.update(kw)
    return SweepConfig(**base)


def test_best_member_recovers_the_ground_truth_features(toy_data, tmp_path):
    root, features = toy_data
    run_sweep(SweepConfig(dataset_dir=str(root), output_dir=str(tmp_path / "o"), architecture="gated", ratio=4,
                          l1_values=[0.1, 1.5], batch_size=256, n_repetitions=8, adam_lr=1e-2, device="cpu",
                          center_init="zero", log_every=100))
    score = {l1: mmcs(features, sae.decoder.detach()) for l1, sae in load_sweep(tmp_path / "o").items()}
    assert score[1.5] >= 0.95 and score[0.1] < score[1.5], score


def test_a_saved_member_encodes_raw_activations_as_the_trained_one_encodes_scaled_ones(toy_data, tmp_path):
    root, _ = toy_data
    from training.sweep_files import read_checkpoint
    run_sweep(_cfg(root, tmp_path / "o", activation_norm=3.0))
    meta = json.loads((tmp_path / "o" / "sweep.json").read_text())
    scale = meta["progress"]["input_scale"]
    assert scale != 1.0 and meta["architecture"] == "gated" and meta["keys"] == [0.3, 3.0]
    _, state = read_checkpoint(tmp_path / "o", set(meta["progress"]))
    ens = Ensemble.from_state_dict(state)
    saes = load_sweep(tmp_path / "o")
    x = torch.randn(50, 24) * 2 + 0.5
    codes_scaled = ens.encode(scale * x)                                            # [N, 50, h]
    norms = ens.params["decoder"].norm(dim=-1)                                     # [N, h]
    for i, (key, sae) in enumerate(saes.items()):
        assert type(sae) is GatedAutoencoder
        codes = sae.encode(x)
        assert (codes > 0).sum() > 0
        torch.testing.assert_close(codes, codes_scaled[i] * norms[i] / scale, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sae(x), ens.predict(scale * x)[i] / scale, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sae.decoder.norm(dim=1), torch.ones(48), rtol=0, atol=1e-5)
        assert torch.equal((codes > 0), codes_scaled[i] > 0)                      # the same latents fire


def test_a_killed_sweep_resumes_bit_exactly(toy_data, tmp_path):
    root, _ = toy_data
    kw = dict(max_tokens=None, batch_size=2000, save_after_every=True, resample_every=3, dead_window_tokens=2000,
              l1_values=[0.3, 30.0])                        # 30: many dead latents, resampled at every 3rd step
    run_sweep(_cfg(root, tmp_path / "whole", **kw))
    with sweep_killed_at_chunk(3):
        run_sweep(_cfg(root, tmp_path / "killed", **kw))
    assert json.loads((tmp_path / "killed" / "checkpoint.json").read_text())["progress"]["step"] == 12
    run_sweep(_cfg(root, tmp_path / "killed", resume=True, **kw))
    a, b = (load_file(str(tmp_path / n / "sweep.safetensors")) for n in ("whole", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (tmp_path / "killed" / "metrics.jsonl").read_text()


def test_the_command_line_trains_a_gated_sweep(toy_data, tmp_path, capsys):
    root, _ = toy_data
    from training.sweep import main_sweep
    out = tmp_path / "cli"
    run_cli(lambda c: print(main_sweep(c)), "", SweepConfig,
            ["--dataset_dir", str(root), "--output_dir", str(out), "--architecture", "gated", "--ratio", "2",
             "--l1_values", "0.1", "1", "--batch_size", "500", "--max_tokens", "10000", "--log_every", "5",
             "--l1_warmup_fraction", "0.5", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "trained 2 dictionaries for 20 steps" in printed
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "mse", "aux", "l0", "l1"} <= set(lines[0]) and lines[0]["aux"] > 0
    saes = load_sweep(out)
    assert list(saes) == [0.1, 1.0] and all(type(s) is GatedAutoencoder for s in saes.values())
    with pytest.raises(UserError, match="--tied applies to the l1 architecture only"):
        run_sweep(_cfg(root, tmp_path / "t", tied=True))


def test_the_top_activations_scorer_uses_the_gated_encoding():
    from training.top_activations import SaeScorer
    m = _members(1)[0].float()
    x = _data(40, 8, seed=4).float()
    scorer = SaeScorer(m, torch.device("cpu"))
    codes = m.encode(x).detach()                                                    # [40, 32]
    assert (codes > 0).any() and (codes == 0).any()
    torch.testing.assert_close(scorer.codes_t(x), codes.T)
    rows = torch.arange(40).repeat_interleave(3)
    feats = torch.randint(0, 32, (120,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(scorer.at(x, rows, feats, block=16), codes[rows, feats])
