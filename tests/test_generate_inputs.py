"""Stage 1 writes nothing before its inputs are known good: a bad dataset or model leaves no folder (or one that
does not block the corrected rerun), and an empty dataset is a one-line error, not a finished 0-chunk folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import training.generate as gen
from training.cli import UserError
from training.generate import GenerateConfig, generate


def make_cfg(model_dir: Path, dataset: Path, folder: Path, **kw) -> GenerateConfig:
    """One hook, 2 chunks of 300 rows."""
    base = dict(model=str(model_dir), dataset=str(dataset), dataset_folder=str(folder), layers=[0], n_chunks=2,
                chunk_size=300, context_length=16, batch_size=4, device="cpu")
    return GenerateConfig(**(base | kw))


def one_line_error(cfg: GenerateConfig, message: str) -> None:
    """generate(cfg) fails with a one-line UserError matching `message`."""
    with pytest.raises(UserError, match=message) as info:
        generate(cfg, argv=["x"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad, message", [
    ("missing", "does not exist"),
    ("no_text_jsonl", "text"),
    ("empty", r"dataset .*empty.txt' \(split 'train'\) is empty"),
    ("short", "gives no token to store .*shorter than --context_length 16"),
])
def test_bad_dataset_leaves_no_folder_and_the_fix_runs(tiny_neox_dir, local_text_files, tmp_path, bad, message):
    paths = {"missing": tmp_path / "nope.txt", "no_text_jsonl": local_text_files.no_text_jsonl,
             "empty": tmp_path / "empty.txt", "short": tmp_path / "short.txt"}
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("a cat")
    folder = tmp_path / "out" / "ds"
    one_line_error(make_cfg(tiny_neox_dir, paths[bad], folder), message)
    assert not (tmp_path / "out").exists()
    assert generate(make_cfg(tiny_neox_dir, local_text_files.jsonl, folder), argv=["x"]).chunks == 2


def test_failure_before_the_first_chunk_does_not_block_the_suggested_fix(tiny_neox_dir, local_text_files, tmp_path,
                                                                        monkeypatch):
    folder = tmp_path / "ds"
    real = gen.capture
    monkeypatch.setattr(gen, "capture", lambda m, t, h, s: {k: x * 1e6 for k, x in real(m, t, h, s).items()}
                        if t.shape[1] > 2 else real(m, t, h, s))  # the model overflows on text, not on the probe
    one_line_error(make_cfg(tiny_neox_dir, local_text_files.txt, folder), "overflow float16")
    assert not folder.exists()
    folder.mkdir()  # an existing folder is left in place, and empty
    one_line_error(make_cfg(tiny_neox_dir, local_text_files.txt, folder), "overflow float16")
    assert list(folder.iterdir()) == []
    monkeypatch.undo()
    # the fix the error suggests: other flags in the same folder, not refused as "made with other settings"
    assert generate(make_cfg(tiny_neox_dir, local_text_files.txt, folder, precision="float32"), argv=["x"]).chunks == 2


def test_an_old_folder_without_chunks_does_not_block(tiny_neox_dir, local_text_files, tmp_path):
    folder = tmp_path / "ds"
    generate(make_cfg(tiny_neox_dir, local_text_files.txt, folder, n_chunks=1), argv=["x"])
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(chunks=[], total_tokens=0, finished=False)
    for hook in manifest["hooks"].values():
        hook["chunks"] = []
    (folder / "manifest.json").write_text(json.dumps(manifest))  # what older versions left after a failed start
    summary = generate(make_cfg(tiny_neox_dir, local_text_files.txt, folder, context_length=32), argv=["x"])
    assert summary.chunks == 2
    assert json.loads((folder / "manifest.json").read_text())["config"]["context_length"] == 32


def test_nothing_to_store_is_an_error(tiny_neox_dir, tmp_path, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("hello there, a few words of text. " * 20)
    monkeypatch.setattr(gen, "plan_batches", lambda *a, **k: iter(()))  # as if every token were special
    one_line_error(make_cfg(tiny_neox_dir, text, tmp_path / "ds"), "gives no token to store")
    assert not (tmp_path / "ds").exists()
