"""--lr_values: one learning rate per member, zipped with the sweep's values; each member trains as it would in a
sweep where every member has its learning rate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.top_activations import write_synthetic_folder
from training.cli import UserError
from training.sweep import SweepConfig, member_lrs, run_sweep


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """2 chunks of 2000 rows, 16 dimensions."""
    g = torch.Generator().manual_seed(0)
    acts = (torch.rand(4000, 24, generator=g) * (torch.rand(4000, 24, generator=g) < 0.15)) @ torch.randn(24, 16,
                                                                                                          generator=g)
    root = tmp_path_factory.mktemp("lr") / "data"
    write_synthetic_folder(root, 4000, 16, model="none", vocab_size=2, chunk_size=2000, hook="h", acts=acts)
    return root / "h"


def _cfg(root: Path, out: Path, **kw) -> SweepConfig:
    base = dict(dataset_dir=str(root), output_dir=str(out), ratio=2, l1_values=[0.01, 0.1, 1.0], batch_size=250,
                log_every=4, device="cpu", holdout_rows=500, resample_every=5, dead_window_tokens=500)
    base.update(kw)
    return SweepConfig(**base)


@pytest.mark.parametrize("architecture, keys", [("l1", {"l1_values": [0.01, 0.1, 1.0]}),
                                                 ("topk", {"k_values": [2, 4, 8]})])
def test_members_with_their_own_rates_equal_single_rate_sweeps(dataset, tmp_path, architecture, keys):
    lrs = [1e-3, 1e-2, 3e-3]
    run_sweep(_cfg(dataset, tmp_path / "mixed", architecture=architecture, lr_values=lrs, **keys))
    mixed = load_file(str(tmp_path / "mixed" / "sweep.safetensors"))
    meta = json.loads((tmp_path / "mixed" / "sweep.json").read_text())
    assert [m["lr"] for m in meta["members"]] == lrs and meta["keys"] == list(keys.values())[0]
    for lr in set(lrs):
        run_sweep(_cfg(dataset, tmp_path / f"{lr}", architecture=architecture, adam_lr=lr, **keys))
        single = load_file(str(tmp_path / f"{lr}" / "sweep.safetensors"))
        for i in (i for i, v in enumerate(lrs) if v == lr):
            for name, t in single.items():
                assert torch.equal(mixed[name][i], t[i]), (lr, i, name)
    assert not torch.equal(mixed["decoder"][0], load_file(str(tmp_path / "0.01" / "sweep.safetensors"))["decoder"][0])


def test_lr_values_are_checked(dataset, tmp_path):
    assert member_lrs(_cfg(dataset, tmp_path, adam_lr=0.5)) == [0.5] * 3
    for kw, message in [({"lr_values": [1e-3, 1e-2]}, "gives 2 learning rates for 3 members: give one per value of "
                                                      "--l1_values"),
                        ({"lr_values": [1e-3, 0.0, 1e-3]}, "--lr_values must be positive"),
                        ({"lr_values": [1e-3, 1e-2], "l1_values": [0.1, 0.1]}, "needs distinct --l1_values"),
                        ({"lr_values": [1e-3], "architecture": "topk", "k_values": [2, 3]}, "one per value of "
                                                                                             "--k_values")]:
        with pytest.raises(UserError, match=message):
            run_sweep(_cfg(dataset, tmp_path / "bad", **kw))
        assert not (tmp_path / "bad").exists()
