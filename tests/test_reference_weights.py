"""Same seed, same weights: tiny ensembles (resampling firing, aux-K on, tied, unit decoder, grad clipping, both
backends) trained a few steps must reproduce, bit for bit, the weights stored in tests/data/ensemble_reference.safetensors
(written by this recipe before the architecture registry was introduced)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.ensemble import Ensemble, make_members

REFERENCE = Path(__file__).parent / "data" / "ensemble_reference.safetensors"
CASES = {
    # name: (architecture, make_members kwargs, Ensemble kwargs, whole-stack update)
    "l1_fused": ("l1", {}, dict(grad_clip=0.05, dead_window=32), False),
    "l1_autograd": ("l1", {}, dict(grad_clip=0.05, dead_window=32, backend="autograd"), False),
    "l1_tied": ("l1", {"tied": True}, dict(dead_window=32), False),
    "l1_unit_stacked": ("l1", {}, dict(unit_decoder=True, dead_window=32, chunk_tokens=24), True),
    "topk_fused": ("topk", {"k": [1, 2, 4]}, dict(dead_window=32, grad_clip=0.05), False),
    "topk_autograd": ("topk", {"k": [1, 2, 4]}, dict(dead_window=32, backend="autograd"), False),
    "topk_dense_uniform": ("topk", {"k": [2, 2, 2]}, dict(dead_window=32, topk_decoder="dense", unit_decoder=True),
                           True),
}


def _data(n: int, batch: int, d: int, seed: int = 0) -> list[torch.Tensor]:
    """Anisotropic, off-centre batches."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 2.0, d)
    return [torch.randn(batch, d, generator=g) * scale + 0.3 for _ in range(n)]


def _train(name: str) -> dict[str, torch.Tensor]:
    """The recipe: 12 steps with lr decay and an l1 warm-up; L1 resampling at steps 4 and 8, TopK aux-K refresh
    every second step."""
    arch, mk, ek, stacked = CASES[name]
    members = make_members(arch, 3, 8, 48, seed=5, **mk)
    hp = {"lr": [1e-2, 2e-2, 3e-2]}
    if arch == "l1":
        hp["l1"] = [0.1, 3.0, 30.0]
    ens = Ensemble(members, hp, **ek)
    ens.whole_stack_update = stacked
    xs = _data(13, 32, 8)
    pool = torch.cat(xs[:8])
    ens.init_center(pool)
    out = {}
    for step, x in enumerate(xs[:12]):
        warm_up = dict.fromkeys(ens.arch.scheduled, min(1.0, (step + 1) / 4))
        ens.step(x, lr_scale=1 - step / 24, coefficient_scales=warm_up)
        if arch == "l1" and step in (4, 8):
            out[f"{name}.n_revived.{step}"] = ens.resample_dead(pool, seed=3, step=step).clone()
        if arch == "topk" and step % 2 == 1:
            ens.resample_dead(x)
    out.update({f"{name}.param.{n}": t for n, t in ens.params.items()})
    out[f"{name}.tokens_since_fired"] = ens.tokens_since_fired
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_weights_match_reference(name):
    ref = {k: v for k, v in load_file(REFERENCE).items() if k.startswith(name + ".")}
    got = _train(name)
    assert set(got) == set(ref)
    for key, want in ref.items():
        assert torch.equal(got[key], want), key
    if name.startswith("l1_") and name != "l1_tied":
        assert got[f"{name}.n_revived.8"].sum() > 0          # resampling really fired
