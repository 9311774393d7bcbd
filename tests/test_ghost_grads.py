"""Ghost grads, the L1 architecture's optional dead policy: the ensemble's gradient against a hand-written single-member
implementation of the mats_sae_training recipe, the switch, saving the policy, and a sweep with --ghost_grads."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import load_file

from bench.top_activations import write_synthetic_folder
from conftest import sweep_killed_at_chunk
from training.architectures.l1 import SparseLinearAutoencoder, ghost_grads_loss, l1_loss
from training.cli import UserError
from training.ensemble import Ensemble, make_members
from training.sweep import SweepConfig, run_sweep

F64 = torch.float64
L1S = [0.1, 0.5, 2.0]


def recipe_loss(m: SparseLinearAutoencoder, x: torch.Tensor, l1: float, dead: torch.Tensor) -> torch.Tensor:
    """MSE + l1 * L1 + ghost, the ghost term as mats_sae_training's SparseAutoencoder.forward writes it (boolean
    indexing of the dead latents; its MSE replaced by this toolkit's: per element, summed over d_in)."""
    sae_in = x - m.center
    hidden_pre = sae_in @ m.encoder.T + m.encoder_bias
    acts = torch.relu(hidden_pre)
    sae_out = acts @ m.decoder + m.center
    mse_elements = (sae_out - x) ** 2                                               # [B, d]
    loss = mse_elements.sum(-1).mean() + l1 * (acts * m.decoder.norm(dim=1)).sum(-1).mean()
    if dead.sum() == 0:
        return loss
    residual = x - sae_out
    residual_centred = residual - residual.mean(dim=0, keepdim=True)
    l2_norm_residual = torch.norm(residual, dim=-1)
    feature_acts_dead_neurons_only = torch.exp(hidden_pre[:, dead])
    ghost_out = feature_acts_dead_neurons_only @ m.decoder[dead, :]
    l2_norm_ghost_out = torch.norm(ghost_out, dim=-1)
    norm_scaling_factor = l2_norm_residual / (1e-6 + l2_norm_ghost_out * 2)
    ghost_out = ghost_out * norm_scaling_factor[:, None].detach()
    mse_loss_ghost_resid = (torch.pow((ghost_out - residual.detach()), 2)
                            / (residual_centred.detach() ** 2).sum(dim=-1, keepdim=True).sqrt())
    mse_rescaling_factor = (mse_elements / (mse_loss_ghost_resid + 1e-6)).detach()
    return loss + (mse_rescaling_factor * mse_loss_ghost_resid).sum(-1).mean()


def _data(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64) * torch.linspace(0.5, 2.0, d, dtype=F64) + 0.3


def _dead() -> torch.Tensor:
    """[3, 32]: member 0 has no dead latent, members 1 and 2 some."""
    dead = torch.zeros(3, 32, dtype=torch.bool)
    dead[1, ::3] = True
    dead[2, 5:9] = True
    return dead


@pytest.mark.parametrize("backend", ["fused", "autograd"])
def test_the_gradient_equals_the_recipe(backend):
    torch.manual_seed(0)
    members = make_members("l1", 3, 8, 32, dtype=F64)
    x, dead = _data(64, 8), _dead()
    ens = Ensemble(copy.deepcopy(members), {"lr": [1e-3] * 3, "l1": L1S}, backend=backend, dead_policy="ghost_grads",
                   dead_window=100)
    ens.init_center(x[:9])
    ens.tokens_since_fired[dead] = 1000
    ens.resample_dead(x)                                                        # switches the term on
    assert ens._aux_on
    with torch.no_grad():
        stats = ens._gradients(x, {"l1": 0.5})
    for i, m in enumerate(members):
        with torch.no_grad():
            m.center.copy_(ens.params["center"][i])
        m.zero_grad()
        ref = recipe_loss(m, x, 0.5 * L1S[i], dead[i])
        ref.backward()
        torch.testing.assert_close(stats["loss"][i], ref.detach(), rtol=1e-10, atol=1e-12)
        for n, p in m.named_parameters():
            torch.testing.assert_close(ens._grads[n][i], p.grad, rtol=1e-9, atol=1e-12, msg=n)
    assert stats["aux"][0] == 0 and (stats["aux"][1:] > 0).all()
    # the term's value is the MSE's (each element rescaled to it), its gradient reaches only the dead latents
    torch.testing.assert_close(stats["aux"][1:], stats["mse"][1:], rtol=1e-3, atol=0)   # up to the 1e-6s


def test_the_term_moves_only_dead_latents_and_the_decoder():
    torch.manual_seed(1)
    m = make_members("l1", 1, 8, 32, dtype=F64)[0]
    x, dead = _data(32, 8), _dead()[1]
    _, parts = l1_loss(m.params(), x, 0.0)
    pre = (x - m.center) @ m.encoder.T + m.encoder_bias
    term = ghost_grads_loss(m.params(), x, parts["x_hat"], pre, dead)
    g_enc, g_bias, g_dec = torch.autograd.grad(term, [m.encoder, m.encoder_bias, m.decoder])
    assert g_enc[~dead].abs().sum() == 0 and g_bias[~dead].abs().sum() == 0 and g_dec[~dead].abs().sum() == 0
    assert g_enc[dead].abs().sum() > 0 and g_dec[dead].abs().sum() > 0


def test_the_policy_is_an_option_of_l1_only_and_is_saved():
    torch.manual_seed(0)
    ens = Ensemble(make_members("l1", 3, 8, 32, dtype=F64), {"lr": [1e-3] * 3, "l1": L1S}, dead_policy="ghost_grads")
    assert ens.dead_policy == "ghost_grads" and Ensemble(make_members("l1", 1, 8, 32), {"lr": [1e-3], "l1": [1.0]}
                                                         ).dead_policy == "resample"
    state = st_load(st_save(ens.state_dict()))
    assert Ensemble.from_state_dict(state).dead_policy == "ghost_grads"
    old = {n: t for n, t in state.items() if n != "option.dead_policy"}          # saved before the policy was
    assert Ensemble.from_state_dict(old).dead_policy == "resample"
    with pytest.raises(ValueError, match="not 'ghost_grads'"):
        Ensemble(make_members("topk", 2, 8, 32, keys=[2, 3]), {"lr": [1e-3] * 2}, dead_policy="ghost_grads")


def test_without_dead_latents_the_step_is_plain_l1():
    torch.manual_seed(0)
    members = make_members("l1", 3, 8, 32, dtype=F64)
    ghost = Ensemble(copy.deepcopy(members), {"lr": [1e-2] * 3, "l1": L1S}, dead_policy="ghost_grads")
    plain = Ensemble(copy.deepcopy(members), {"lr": [1e-2] * 3, "l1": L1S})
    for xb in _data(96, 8).split(32):
        ghost.resample_dead(xb)                                                  # nothing dead: the term stays off
        assert "aux" not in ghost.step(xb)
        plain.step(xb)
    for n, t in plain.params.items():
        assert torch.equal(ghost.params[n], t), n


# ----------------------------------------------------------------------------- through the sweep

@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """4 chunks of 3000 rows, 16 dimensions (a sparse mixture, so an L1 sweep has dead latents soon)."""
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(24, 16, generator=g)
    coefs = torch.rand(12000, 24, generator=g) * (torch.rand(12000, 24, generator=g) < 0.1)
    root = tmp_path_factory.mktemp("ghost") / "data"
    write_synthetic_folder(root, 12000, 16, model="none", vocab_size=2, chunk_size=3000, hook="h",
                           acts=coefs @ directions)
    return root / "h"


def _cfg(root: Path, out: Path, **kw) -> SweepConfig:
    base = dict(dataset_dir=str(root), output_dir=str(out), ghost_grads=True, ratio=4, l1_values=[0.01, 1.0],
                batch_size=500, log_every=1, device="cpu", holdout_rows=0, dead_window_tokens=1000,
                save_after_every=True, adam_lr=1e-2)
    base.update(kw)
    return SweepConfig(**base)


def test_a_ghost_grads_sweep_trains_and_resumes_bit_exactly(dataset, tmp_path, monkeypatch):
    import training.sweep as sweep_mod
    monkeypatch.setattr(sweep_mod, "AUX_REFRESH_STEPS", 4)
    run_sweep(_cfg(dataset, tmp_path / "whole"))
    aux = [json.loads(ln).get("aux") for ln in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert aux[0] is None and any(a is not None and a > 0 for a in aux)          # off, then on once latents died
    with sweep_killed_at_chunk(3):
        run_sweep(_cfg(dataset, tmp_path / "killed"))
    run_sweep(_cfg(dataset, tmp_path / "killed", resume=True))
    a, b = (load_file(str(tmp_path / n / "sweep.safetensors")) for n in ("whole", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (tmp_path / "killed" / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match="--ghost_grads applies to the l1 architecture only"):
        run_sweep(_cfg(dataset, tmp_path / "t", architecture="topk"))
