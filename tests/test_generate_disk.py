"""Stage 1 on a full disk or a read-only folder: one line saying what is needed and where, no .tmp files left (and
stale ones from a killed run removed), files fsynced before the renames that publish them."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

import training.chunks as chunks
from training.cli import UserError
from training.generate import GenerateConfig, generate
from conftest import folder_bytes, small_generate_cfg


def make_cfg(model_dir: Path, text_file: Path, folder: Path, **kw) -> GenerateConfig:
    """One hook, 3 chunks of 500 rows."""
    return small_generate_cfg(model_dir, text_file, folder, **(dict(layers=[0], locations=["residual"], chunk_size=500) | kw))


def fail_fsync_of(monkeypatch, name: str, code: int) -> None:
    """Make fsync fail with `code` on the file named `name` (the disk filling up as it is written)."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(name):
            raise OSError(code, os.strerror(code))
        real(fd)
    monkeypatch.setattr(chunks.os, "fsync", fsync)


@pytest.mark.parametrize("code, message", [
    (errno.ENOSPC, r"the disk is full: no space left writing .*; the 2 chunk\(s\) still to write need about "
                   r"0\.0\d GB on the disk of .*ds: free space there .* rerun the same command to resume"),
    (errno.EROFS, r"is read-only \(Read-only file system\): make .*ds writable"),
])
def test_full_disk_mid_run_is_one_line_and_resumes_identically(tiny_neox_dir, text_file, tmp_path, monkeypatch,
                                                               code, message):
    folder = tmp_path / "ds"
    generate(make_cfg(tiny_neox_dir, text_file, folder), argv=["x"])
    clean = folder_bytes(folder)
    for p in sorted(folder.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    fail_fsync_of(monkeypatch, "1.safetensors.tmp", code)
    with pytest.raises(UserError, match=message) as info:
        generate(make_cfg(tiny_neox_dir, text_file, folder), argv=["x"])
    assert "\n" not in str(info.value)
    assert not list(folder.rglob("*.tmp"))  # the half-written file is gone
    monkeypatch.undo()
    generate(make_cfg(tiny_neox_dir, text_file, folder), argv=["x"])
    assert folder_bytes(folder) == clean


def test_stale_tmp_files_are_removed_on_the_next_run(tiny_neox_dir, text_file, tmp_path):
    folder = tmp_path / "ds"
    generate(make_cfg(tiny_neox_dir, text_file, folder, n_chunks=1), argv=["x"])
    stale = [folder / "manifest.json.tmp", folder / "blocks.0.hook_resid_post" / "1.safetensors.tmp",
             folder / "contexts" / "1.safetensors.tmp"]
    for p in stale:
        p.write_bytes(b"x" * 100)  # what a run killed mid-write leaves
    assert generate(make_cfg(tiny_neox_dir, text_file, folder, n_chunks=1), argv=["x"]).already_complete
    assert not any(p.exists() for p in stale)


def test_read_only_folder_is_reported_as_read_only(tiny_neox_dir, text_file, tmp_path, monkeypatch):
    import training.locks as locks
    real = os.open

    def read_only(path, *a, **k):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(path, *a, **k)
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(locks.os, "open", read_only)
    with pytest.raises(UserError, match=r"ro is read-only .*make it writable") as info:
        generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "ro"), argv=["x"])
    assert "GB" not in str(info.value)


def test_files_are_fsynced_before_the_rename_that_publishes_them(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(src)))
        real_replace(src, dst)
    monkeypatch.setattr(chunks.os, "fsync", fsync)
    monkeypatch.setattr(chunks.os, "replace", replace)
    chunks.save_tensors(tmp_path / "a.safetensors", {"x": torch.ones(3)})
    chunks.atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert events == [("fsync", str(tmp_path / "a.safetensors.tmp")), ("replace", str(tmp_path / "a.safetensors.tmp")),
                      ("fsync", str(tmp_path)),
                      ("fsync", str(tmp_path / "m.json.tmp")), ("replace", str(tmp_path / "m.json.tmp")),
                      ("fsync", str(tmp_path))]
