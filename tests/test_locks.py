"""One writer per folder (training/locks.py): a second process is refused with the holder's PID, a killed holder's
lock is free again, and every tool that writes an output folder takes the lock."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from lock_holder import held_lock, start_holder
from training.cli import UserError
from training.locks import LOCK_NAME, folder_lock, output_lock


def test_second_process_is_refused_with_the_holders_pid(tmp_path):
    folder = tmp_path / "out"
    with held_lock(folder) as holder:
        with pytest.raises(UserError) as err:
            with folder_lock(folder):
                pass
        message = str(err.value)
        assert str(folder) in message and f"PID {holder.pid}" in message and "\n" not in message
    with folder_lock(folder):  # free once the holder is gone
        assert (folder / LOCK_NAME).read_text().strip() == str(os.getpid())


def test_killed_holder_releases_the_lock(tmp_path):
    folder = tmp_path / "out"
    holder = start_holder(folder)
    assert (folder / LOCK_NAME).read_text().strip() == str(holder.pid)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (folder / LOCK_NAME).exists()  # a killed holder leaves its file, but not its lock
    with folder_lock(folder):
        assert (folder / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not (folder / LOCK_NAME).exists()


def test_clean_release_leaves_nothing(tmp_path):
    with folder_lock(tmp_path / "new" / "out") as folder:
        assert folder.is_dir()
    assert not (tmp_path / "new").exists()  # created by the job and left empty: removed, parents too
    (tmp_path / "kept").mkdir()
    with folder_lock(tmp_path / "kept"):
        (tmp_path / "kept" / "result.txt").write_text("x")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["result.txt"]


def test_output_lock_sits_beside_the_output(tmp_path):
    target = tmp_path / "site"
    with held_lock(tmp_path, ".site.lock") as holder:
        with pytest.raises(UserError, match=f"{target} is in use by another process \\(PID {holder.pid}\\)"):
            with output_lock(target):
                pass
    with output_lock(target):
        assert (tmp_path / ".site.lock").exists() and not target.exists()
    assert not (tmp_path / ".site.lock").exists()


def test_read_only_folder_is_reported_as_read_only(tmp_path, monkeypatch):
    import errno

    import training.locks as locks

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(locks.os, "open", read_only)
    with pytest.raises(UserError, match=f"{tmp_path} is read-only"):
        with folder_lock(tmp_path):
            pass


def test_stage1_and_stage2_refuse_a_locked_folder(tiny_neox_dir, tmp_path):
    from training.generate import GenerateConfig, generate
    from training.sweep import SweepConfig, run_sweep
    text = tmp_path / "docs.txt"
    text.write_text("hello world. " * 200)
    folder = tmp_path / "ds"
    cfg = GenerateConfig(model=str(tiny_neox_dir), dataset=str(text), dataset_folder=str(folder), n_chunks=1,
                         chunk_size=64, context_length=16, batch_size=2, device="cpu")
    with held_lock(folder) as holder:
        with pytest.raises(UserError, match=f"{folder} is in use by another process \\(PID {holder.pid}\\)"):
            generate(cfg)
        assert not (folder / "manifest.json").exists()
    generate(cfg)                                          # the lock is free again: the same command runs
    out = tmp_path / "sweep"
    with held_lock(out) as holder:
        with pytest.raises(UserError, match=f"PID {holder.pid}"):
            run_sweep(SweepConfig(dataset_dir=str(folder), output_dir=str(out), batch_size=16, device="cpu",
                                  holdout_rows=0))


def test_tools_refuse_a_locked_output(tmp_path, local_text_files):
    from training.activation_import import ImportConfig, run_import
    from training.evaluate import EVALUATE_LOCK, EvaluateConfig, evaluate_sweep
    from training.steering import SteerConfig, run_steer
    from training.tiny_lm import TinyLMConfig, train_tiny_lm
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    with held_lock(sweep, EVALUATE_LOCK) as holder:
        with pytest.raises(UserError, match=f"PID {holder.pid}"):
            evaluate_sweep(EvaluateConfig(sweep=str(sweep)))
    with held_lock(tmp_path, ".steer.json.lock") as holder:
        with pytest.raises(UserError, match=f"PID {holder.pid}"):
            run_steer(SteerConfig(sweep=str(sweep), prompt="hi", save_json=str(tmp_path / "steer.json")))
    with held_lock(tmp_path, ".lm.lock") as holder:
        with pytest.raises(UserError, match=f"PID {holder.pid}"):
            train_tiny_lm(TinyLMConfig(dataset=str(local_text_files.txt), output_dir=str(tmp_path / "lm")))
    np.save(tmp_path / "a.npy", np.ones((8, 4), dtype=np.float32))
    with held_lock(tmp_path, ".imported.lock") as holder:
        with pytest.raises(UserError, match=f"PID {holder.pid}"):
            run_import(ImportConfig(input=[str(tmp_path / "a.npy")], out=str(tmp_path / "imported")), argv=["x"])


def test_a_file_in_place_of_the_folder_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        with folder_lock(tmp_path / "f"):
            pass
