"""Stage 1 end to end on tiny random models: chunk contents, manifest, resume, reproducibility, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import training.generate as gen
from training.chunks import mmap_tensors, open_hook
from training.cli import UserError
from training.generate import GenerateConfig, generate
from conftest import small_generate_cfg as make_cfg
from training.models import load_model


def file_digests(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every chunk and contexts file under a dataset folder."""
    from training.chunks import file_sha256
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*.safetensors"))}


def test_shapes_dtypes_counts_and_manifest(tiny_neox_dir, text_file, tmp_path):
    cfg = make_cfg(tiny_neox_dir, text_file, tmp_path / "ds")
    summary = generate(cfg, argv=["generate_test_data.py"])
    assert summary.tokens == 3 * 700
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    model = load_model(str(tiny_neox_dir), "cpu")
    widths = {"blocks.0.hook_resid_post": model.cfg.d_model,
              "blocks.0.attn.hook_z": model.cfg.n_heads * model.cfg.d_head,
              "blocks.1.hook_resid_post": model.cfg.d_model, "blocks.1.attn.hook_z": model.cfg.n_heads * model.cfg.d_head}
    assert {h: v["d"] for h, v in manifest["hooks"].items()} == widths
    assert manifest["total_tokens"] == 2100 and manifest["finished"] and manifest["config"]["context_length"] == 16
    assert manifest["toolkit_version"] and manifest["command"] == "generate_test_data.py"
    for hook, d in widths.items():
        data = open_hook(tmp_path / "ds" / hook)
        assert [c.rows for c in data.chunks] == [700, 700, 700]
        for i in range(3):
            t = data.load(i, verify=True)
            assert t["activations"].shape == (700, d) and t["activations"].dtype == torch.float16
            assert t["token_ids"].dtype == torch.int32 and t["sequence_ids"].shape == (700,)
        stacked = torch.cat([c["activations"].float() for c in data.iter_chunks()])
        assert torch.allclose(data.mean, stacked.mean(0), atol=1e-4)
        assert manifest["hooks"][hook]["mean_norm"] == pytest.approx(stacked.norm(dim=1).mean().item(), rel=1e-4)


@pytest.mark.parametrize("model_fixture", ["tiny_neox_dir", "tiny_gpt2_dir"])
def test_stored_rows_equal_run_with_cache(model_fixture, text_file, tmp_path, request):
    model_dir = request.getfixturevalue(model_fixture)
    cfg = make_cfg(model_dir, text_file, tmp_path / "ds", n_chunks=1, precision="float32")
    generate(cfg, argv=["x"])
    model = load_model(str(model_dir), "cpu")
    special = set(json.loads((tmp_path / "ds" / "manifest.json").read_text())["special_token_ids"])
    for hook in ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"]:
        data = open_hook(tmp_path / "ds", hook)
        chunk = data.load(0)
        ctx, _ = mmap_tensors(tmp_path / "ds" / "contexts" / "0.safetensors")
        row_of_seq = {int(s): i for i, s in enumerate(ctx["sequence_ids"])}
        rows = torch.arange(0, 700, 37)
        seq_idx = torch.tensor([row_of_seq[int(s)] for s in chunk["sequence_ids"][rows]])
        tokens = ctx["tokens"][seq_idx].long()
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
        direct = cache[hook].reshape(len(rows), tokens.shape[1], -1)[torch.arange(len(rows)), chunk["positions"][rows].long()]
        assert torch.allclose(chunk["activations"][rows], direct, atol=1e-5)
        # token ids and positions point to the right context
        assert torch.equal(tokens[torch.arange(len(rows)), chunk["positions"][rows].long()], chunk["token_ids"][rows].long())
        assert not special & set(chunk["token_ids"].tolist())


def test_context_window(tiny_neox_dir, text_file, tmp_path):
    generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "ds", n_chunks=1), argv=["x"])
    data = open_hook(tmp_path / "ds", "blocks.0.hook_resid_post")
    chunk = data.load(0)
    for row in [0, 5, 699]:
        window, at = data.context(0, row, before=3, after=2)
        assert window[at] == int(chunk["token_ids"][row])
        assert at == min(3, int(chunk["positions"][row])) and len(window) <= 6


def test_rows_are_shuffled_across_sequences(tiny_neox_dir, text_file, tmp_path):
    generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "ds", n_chunks=1), argv=["x"])
    seqs = open_hook(tmp_path / "ds", "blocks.0.hook_resid_post").load(0)["sequence_ids"]
    assert (seqs[1:] != seqs[:-1]).float().mean() > 0.8
    assert len(seqs[:16].unique()) > 8


def test_special_tokens_kept_when_asked(tiny_neox_dir, text_file, tmp_path):
    generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "ds", n_chunks=1, skip_special_tokens=False), argv=["x"])
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    ids = open_hook(tmp_path / "ds", "blocks.0.hook_resid_post").load(0)["token_ids"]
    assert set(manifest["special_token_ids"]) & set(ids.tolist())


def test_same_flags_give_byte_identical_chunks(tiny_neox_dir, text_file, tmp_path):
    generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "a"), argv=["x"])
    generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "b"), argv=["x"])
    a, b = file_digests(tmp_path / "a"), file_digests(tmp_path / "b")
    assert a == b and len(a) == 3 * 5
    generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "c", seed=1), argv=["x"])
    assert file_digests(tmp_path / "c") != a


def test_killed_run_resumes_with_nothing_lost_or_duplicated(tiny_neox_dir, text_file, tmp_path, monkeypatch):
    generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "whole", n_chunks=4), argv=["x"])
    real_save, calls = gen.save_tensors, {"n": 0}

    def dying_save(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2 * 5 + 3:  # in the middle of writing the third chunk
            raise KeyboardInterrupt
        return real_save(path, tensors, metadata)

    monkeypatch.setattr(gen, "save_tensors", dying_save)
    with pytest.raises(KeyboardInterrupt):
        generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "killed", n_chunks=4), argv=["x"])
    assert len(json.loads((tmp_path / "killed" / "manifest.json").read_text())["chunks"]) == 2
    monkeypatch.setattr(gen, "save_tensors", real_save)
    summary = generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "killed", n_chunks=4), argv=["x"])
    assert summary.tokens == 2 * 700
    assert file_digests(tmp_path / "killed") == file_digests(tmp_path / "whole")
    # a finished folder is left alone; asking for more chunks extends it
    assert generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "killed", n_chunks=4), argv=["x"]).seconds == 0
    generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "killed", n_chunks=5), argv=["x"])
    assert len(json.loads((tmp_path / "killed" / "manifest.json").read_text())["chunks"]) == 5


def test_short_dataset_writes_a_short_last_chunk(tiny_neox_dir, text_file, tmp_path):
    summary = generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "ds", n_chunks=1000, chunk_size=20000), argv=["x"])
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    last = manifest["hooks"]["blocks.0.hook_resid_post"]["chunks"][-1]
    assert last["partial"] and last["rows"] < 20000 and manifest["exhausted"]
    _, meta = mmap_tensors(tmp_path / "ds" / "blocks.0.hook_resid_post" / last["file"])
    assert meta["partial"] is True and meta["rows"] == last["rows"]
    assert summary.tokens == manifest["total_tokens"]


def test_mismatched_flags_are_refused_unless_overwrite(tiny_neox_dir, text_file, tmp_path):
    generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "ds", n_chunks=1), argv=["x"])
    with pytest.raises(UserError, match="context_length: folder has 16, asked 32"):
        generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "ds", n_chunks=1, context_length=32), argv=["x"])
    generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "ds", n_chunks=1, context_length=32, overwrite=True),
             argv=["x"])
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["config"]["context_length"] == 32


def test_retrained_model_is_refused(tiny_neox_dir, text_file, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_neox_dir, model_dir)
    generate(make_cfg(model_dir, text_file, tmp_path / "ds", n_chunks=1), argv=["x"])
    weights = next(model_dir.glob("*.safetensors"))
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="model weights: folder has 'other weights'"):
        generate(make_cfg(model_dir, text_file, tmp_path / "ds", n_chunks=2), argv=["x"])


@pytest.mark.parametrize("kw, message", [
    (dict(hooks=["blocks.0.hook_nonsense"]), r"unknown hook 'blocks.0.hook_nonsense'; valid hooks: .*blocks\.\{0\.\.1\}\.hook_resid_post"),
    (dict(layers=[7]), r"layer 7 is out of range: this model has layers 0..1"),
    (dict(locations=["nowhere"]), r"unknown location 'nowhere'"),
    (dict(device="cuda"), r"no usable GPU"),
    (dict(dataset="/no/such/file.txt"), r"does not exist"),
    (dict(model="/no/such/model"), r"does not exist"),
    (dict(chunk_size=0), r"--chunk_size must be at least 1"),
    (dict(context_length=100000), r"exceeds the model's"),
])
def test_bad_input_gets_one_line_error(tiny_neox_dir, text_file, tmp_path, kw, message):
    if kw.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so --device cuda is valid")
    with pytest.raises(UserError, match=message) as info:
        generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "ds", **kw), argv=["x"])
    assert "\n" not in str(info.value)


def test_overflow_is_an_error(tiny_neox_dir, text_file, tmp_path, monkeypatch):
    real = gen.capture
    monkeypatch.setattr(gen, "capture", lambda *a, **k: {h: x * 1e6 for h, x in real(*a, **k).items()})
    with pytest.raises(UserError, match="overflow float16"):
        generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "ds"), argv=["x"])
    generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "ok", precision="float32", n_chunks=1), argv=["x"])


def test_disk_space_checked_up_front(tiny_neox_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(gen.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(UserError, match="GB free"):
        generate(make_cfg(tiny_neox_dir, text_file, tmp_path / "ds"), argv=["x"])
    assert not list((tmp_path / "ds").rglob("*.safetensors"))


def test_cli_prints_one_line_error(tiny_neox_dir, text_file, tmp_path, capsys):
    from training.cli import run_cli
    with pytest.raises(SystemExit) as info:
        run_cli(lambda cfg: generate(cfg, argv=["x"]), "", GenerateConfig,
                ["--model", str(tiny_neox_dir), "--dataset", str(text_file), "--layers", "9",
                 "--dataset_folder", str(tmp_path / "ds"), "--device", "cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: layer 9 is out of range") and "\n" not in err
