"""Stage 1 repairs a folder: a rerun re-checks every listed chunk against the manifest and rewrites the missing or
corrupt ones, which come out byte-identical to a clean run's (chunks are deterministic)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.cli import UserError
from training.generate import GenerateConfig, generate
from conftest import folder_bytes, small_generate_cfg

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]


def make_cfg(model_dir: Path, text_file: Path, folder: Path, **kw) -> GenerateConfig:
    """Two hooks, 3 chunks of 700 rows, by default."""
    return small_generate_cfg(model_dir, text_file, folder, **(dict(layers=[0], locations=["residual"], hooks=["blocks.1.attn.hook_z"]) | kw))


def flip_a_byte(path: Path) -> None:
    """Corrupt a file in its data (the header stays valid)."""
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("kw", [dict(), dict(n_chunks=1000, chunk_size=2500), dict(overwrite=True)],
                         ids=["full-chunks", "exhausted-short-last-chunk", "overwrite-same-flags"])
def test_rerun_repairs_deleted_and_corrupt_chunks_byte_identically(tiny_neox_dir, text_file, tmp_path, kw):
    generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "ds", **kw), argv=["generate_test_data.py"])
    clean = folder_bytes(tmp_path / "ds")  # the clean run's files (the manifest names its folder: same path)
    n = len(json.loads((tmp_path / "ds" / "manifest.json").read_text())["chunks"])
    assert n >= 3 and len(clean) == 3 * n + 1
    (tmp_path / "ds" / HOOKS[0] / "1.safetensors").unlink()
    flip_a_byte(tmp_path / "ds" / HOOKS[1] / f"{n - 1}.safetensors")
    (tmp_path / "ds" / "contexts" / "0.safetensors").write_bytes(b"garbage")
    summary = generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "ds", **kw), argv=["generate_test_data.py"])
    assert summary.repaired == 3
    assert folder_bytes(tmp_path / "ds") == clean


def test_a_chunk_that_comes_out_different_is_refused(tiny_neox_dir, text_file, tmp_path):
    folder = tmp_path / "ds"
    generate(make_cfg(tiny_neox_dir, text_file, folder, n_chunks=2), argv=["x"])
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["hooks"][HOOKS[0]]["chunks"][1]["sha256"] = "0" * 64  # as if another model had written it
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"chunk 1 of .* came out different .* --overwrite") as info:
        generate(make_cfg(tiny_neox_dir, text_file, folder, n_chunks=2), argv=["x"])
    assert "\n" not in str(info.value)


def test_rerun_messages_tell_the_truth(tiny_neox_dir, text_file, tmp_path):
    folder = tmp_path / "ds"
    first = generate(make_cfg(tiny_neox_dir, text_file, folder, n_chunks=2), argv=["x"])
    assert str(first).startswith("wrote 1,400 tokens in 2 chunk(s)") and not first.already_complete
    again = generate(make_cfg(tiny_neox_dir, text_file, folder, n_chunks=2), argv=["x"])
    assert again.already_complete and again.tokens == 0
    assert str(again) == f"{folder} is already complete (2 chunk(s) per hook); every chunk matches the manifest, " \
                         "nothing to do"
    (folder / HOOKS[0] / "0.safetensors").unlink()
    fixed = generate(make_cfg(tiny_neox_dir, text_file, folder, n_chunks=2), argv=["x"])
    assert str(fixed) == f"{folder} is already complete (2 chunk(s) per hook); repaired 1 missing or corrupt chunk(s)"
    (folder / HOOKS[0] / "1.safetensors").unlink()
    more = generate(make_cfg(tiny_neox_dir, text_file, folder, n_chunks=3), argv=["x"])
    assert str(more).startswith("wrote 700 tokens in 3 chunk(s)") and "; repaired 1 missing" in str(more)
