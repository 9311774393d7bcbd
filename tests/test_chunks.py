"""The chunk format: safetensors round trips through the memory-mapped reader, atomic JSON, folder errors."""

from __future__ import annotations

import json

import pytest
import torch

from training.chunks import atomic_write_json, file_sha256, list_hooks, mmap_tensors, open_hook, save_tensors
from training.cli import UserError


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.int64])
def test_mmap_round_trip(tmp_path, dtype):
    t = (torch.randn(37, 5) * 100).to(dtype)
    digest = save_tensors(tmp_path / "a.safetensors", {"x": t, "y": torch.arange(3)}, {"rows": 37, "partial": True})
    loaded, info = mmap_tensors(tmp_path / "a.safetensors")
    assert loaded["x"].dtype == dtype and torch.equal(loaded["x"], t) and torch.equal(loaded["y"], torch.arange(3))
    assert info == {"rows": 37, "partial": True}
    assert digest == file_sha256(tmp_path / "a.safetensors")
    assert not list(tmp_path.glob("*.tmp"))


def test_save_is_byte_deterministic(tmp_path):
    t = torch.randn(10, 3)
    a = save_tensors(tmp_path / "a.safetensors", {"b": t, "a": t + 1}, {"z": 1, "a": 2, "m": [1, 2]})
    b = save_tensors(tmp_path / "b.safetensors", {"a": t + 1, "b": t}, {"m": [1, 2], "a": 2, "z": 1})
    assert a == b


def test_atomic_write_json(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": [1, 2]}
    assert not list(tmp_path.glob("*.tmp"))


def write_folder(root, hooks):
    """A dataset folder with one 4-row chunk per hook."""
    manifest = {"hooks": {}}
    for h in hooks:
        (root / h).mkdir(parents=True)
        digest = save_tensors(root / h / "0.safetensors", {"activations": torch.ones(4, 2)})
        manifest["hooks"][h] = {"d": 2, "mean": [1.0, 1.0], "chunks": [{"file": "0.safetensors", "rows": 4, "sha256": digest}]}
    atomic_write_json(root / "manifest.json", manifest)


def test_open_hook_by_folder_or_root(tmp_path):
    write_folder(tmp_path, ["blocks.0.hook_resid_post"])
    a = open_hook(tmp_path)
    b = open_hook(tmp_path / "blocks.0.hook_resid_post")
    assert a.hook == b.hook == "blocks.0.hook_resid_post" and a.d == 2 and a.n_rows == 4
    assert list_hooks(tmp_path) == ["blocks.0.hook_resid_post"]
    assert torch.equal(a.mean, torch.ones(2))


def test_open_hook_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_hook(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no manifest.json"):
        open_hook(tmp_path / "empty")
    write_folder(tmp_path / "two", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    with pytest.raises(UserError, match="several hooks; name one folder: .*blocks.0.hook_resid_post, .*blocks.1"):
        open_hook(tmp_path / "two")
    with pytest.raises(UserError, match="hook 'x' is not in"):
        open_hook(tmp_path / "two", "x")


def test_corrupt_chunk_is_named(tmp_path):
    write_folder(tmp_path, ["h"])
    data = open_hook(tmp_path)
    path = tmp_path / "h" / "0.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"chunk .*0\.safetensors does not match the checksum"):
        data.load(0, verify=True)


def test_files_read_back_with_the_official_safetensors_reader(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    tensors = {"b": torch.randn(3, 4).to(torch.bfloat16), "a": torch.arange(5, dtype=torch.int32),
               "m": torch.tensor([True, False]), "e": torch.zeros(0, 3), "h": torch.randn(2, 2).half()}
    save_tensors(tmp_path / "x.safetensors", tensors, {"partial": False})
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"info": '{"partial": false}'}


@pytest.mark.parametrize("replacement, message", [
    ({"activations": torch.ones(5, 2)}, r"holds \[5, 2\] float32, not the \[4, 2\]"),
    ({"activations": torch.ones(4, 3)}, r"holds \[4, 3\] float32, not the \[4, 2\]"),
    ({"activations": torch.ones(4, 2, dtype=torch.float16)}, r"holds \[4, 2\] float16, not the \[4, 2\] float32"),
    ({"other": torch.ones(4, 2)}, r"holds no activations"),
    (b"\xff" * 8 + b"{}", "has a damaged header"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ", "has a damaged header"),
])
def test_load_checks_the_header_against_the_manifest(tmp_path, replacement, message):
    write_folder(tmp_path, ["h"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    atomic_write_json(tmp_path / "manifest.json", dict(manifest, config={"precision": "float32"}))
    data = open_hook(tmp_path)
    assert data.load(0)["activations"].shape == (4, 2)
    path = tmp_path / "h" / "0.safetensors"
    if isinstance(replacement, bytes):
        path.write_bytes(replacement)
    else:
        save_tensors(path, replacement)
    with pytest.raises(UserError, match=message) as info:
        data.load(0)  # no checksum asked: the header alone gives it away
    assert str(path) in str(info.value) and "rerun generate_test_data.py with the same flags, which repairs it" \
        in str(info.value) and "\n" not in str(info.value)
