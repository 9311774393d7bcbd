"""Stage 2's input pipeline: checksums once per run, pinned double-buffered staging, unchanged sweep results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import training.chunks as chunks_mod
import training.sweep as sweep_mod
from bench.top_activations import write_synthetic_folder
from training.chunks import open_hook
from training.cli import UserError
from training.sweep import SweepConfig, run_sweep


@pytest.fixture(scope="module")
def hook_dir(tmp_path_factory) -> Path:
    """A synthetic one-hook folder: 4 chunks of 1000 rows, d 16."""
    return write_synthetic_folder(tmp_path_factory.mktemp("loader") / "ds", 4000, 16, model="none", vocab_size=5,
                                  chunk_size=1000, hook="h")


def sweep_cfg(hook_dir: Path, out: Path, **kw) -> SweepConfig:
    """A small, fast sweep over `hook_dir`."""
    base = dict(dataset_dir=str(hook_dir), output_dir=str(out), ratio=2, l1_values=[1e-3, 1e-2], batch_size=200,
                log_every=3, device="cpu", center_init="mean", holdout_rows=100, n_repetitions=3)
    base.update(kw)
    return SweepConfig(**base)


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The file names hashed by `HookData.verify`, in order."""
    seen: list[str] = []
    real = chunks_mod.file_sha256

    def counting(path, *a, **k):
        seen.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(chunks_mod, "file_sha256", counting)
    return seen


def test_each_chunk_is_hashed_once_per_run(hook_dir, tmp_path, hashed):
    run_sweep(sweep_cfg(hook_dir, tmp_path / "o"))
    assert sorted(hashed) == ["0.safetensors", "1.safetensors", "2.safetensors", "3.safetensors"]


def test_a_resumed_run_verifies_again_once(hook_dir, tmp_path, hashed, monkeypatch):
    real_iter, seen = sweep_mod.iter_chunks, {"n": 0}

    def dying_iter(*args, **kwargs):
        for item in real_iter(*args, **kwargs):
            seen["n"] += 1
            if seen["n"] == 6:  # killed in the second repetition
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(sweep_mod, "iter_chunks", dying_iter)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep_cfg(hook_dir, tmp_path / "o", save_after_every=True))
    assert len(hashed) == 4
    monkeypatch.setattr(sweep_mod, "iter_chunks", real_iter)
    hashed.clear()
    run_sweep(sweep_cfg(hook_dir, tmp_path / "o", save_after_every=True, resume=True))
    assert sorted(hashed) == ["0.safetensors", "1.safetensors", "2.safetensors", "3.safetensors"]


def test_verification_still_catches_a_corrupt_chunk_each_run(hook_dir, tmp_path):
    import shutil
    root = tmp_path / "c"
    shutil.copytree(hook_dir.parent, root)
    data = open_hook(root / "h")
    data.load(2, verify=True)
    path = root / "h" / "2.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x55
    path.write_bytes(bytes(raw))
    data.load(2, verify=True)  # already verified by this object: not hashed again
    with pytest.raises(UserError, match=r"2\.safetensors does not match the checksum"):
        open_hook(root / "h").load(2, verify=True)  # a new run (a new HookData) checks it again
