"""The tiny-LM trainer (a few steps on a local file) and the committed default model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from training.cli import UserError, run_cli
from training.tiny_lm import DEFAULT_MODEL_DIR, TinyLMConfig, check_bridge, lr_at, train_tiny_lm


def _small_config(dataset: str, output_dir: Path, **overrides: Any) -> TinyLMConfig:
    """A config that trains in about a second."""
    base = dict(dataset=dataset, output_dir=str(output_dir), vocab_size=300, d_model=32, n_layers=2,
                n_heads=4, d_mlp=64, context_length=32, batch_size=4, steps=6, warmup_steps=2,
                heldout_fraction=0.2, progress=False, seed=1)
    return TinyLMConfig(**(base | overrides))


def test_trains_on_a_local_file_and_boots(local_text_files: Any, tmp_path: Path) -> None:
    out = tmp_path / "my-lm"
    info = train_tiny_lm(_small_config(str(local_text_files.jsonl), out))
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json"} <= names
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    saved = json.loads((out / "training.json").read_text())
    assert saved["training"]["steps"] == 6 and saved["training"]["tokens_trained"] == 6 * 4 * 32
    assert "hash" in saved["data"]["heldout"] and saved["data"]["heldout_rows"] > 0
    assert saved["versions"]["python"] and saved["config"]["d_model"] == 32
    assert info["heldout_loss"] == saved["heldout_loss"] and saved["heldout_loss"] > 0
    assert check_bridge(out)[0] == 1


def test_same_seed_same_model(local_text_files: Any, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    a = train_tiny_lm(_small_config(str(local_text_files.split_folder), tmp_path / "a", steps=3))
    b = train_tiny_lm(_small_config(str(local_text_files.split_folder), tmp_path / "b", steps=3))
    assert a["data"]["heldout"] == "split 'validation'"
    assert a["heldout_loss"] == b["heldout_loss"]
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_refuses_to_overwrite_without_flag(local_text_files: Any, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(UserError, match="--overwrite"):
        train_tiny_lm(_small_config(str(local_text_files.txt), tmp_path / "taken"))


def test_bad_inputs_are_user_errors(local_text_files: Any, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="must divide"):
        train_tiny_lm(_small_config(str(local_text_files.txt), tmp_path / "x", n_heads=3))
    with pytest.raises(UserError, match="pre-tokenised"):
        train_tiny_lm(_small_config(str(local_text_files.tokens_jsonl), tmp_path / "x"))
    with pytest.raises(UserError, match="fewer than batch_size"):
        train_tiny_lm(_small_config(str(local_text_files.txt), tmp_path / "x", batch_size=10_000))


def test_cli_prints_one_line_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_tiny_lm, "x", TinyLMConfig, argv=["--dataset", "./missing.jsonl",
                                                        "--output_dir", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "does not exist" in err and "\n" not in err


def test_lr_schedule() -> None:
    cfg = TinyLMConfig(lr=1e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(0.55e-3)
    assert lr_at(110, cfg) == pytest.approx(1e-4)


def test_default_model_dir_is_the_repo_folder() -> None:
    assert DEFAULT_MODEL_DIR.is_absolute() and DEFAULT_MODEL_DIR.name == "tiny-stdlib"
    assert DEFAULT_MODEL_DIR.parent.parent / TinyLMConfig().output_dir == DEFAULT_MODEL_DIR


def test_committed_default_model_boots_and_is_trained() -> None:
    from transformer_lens.model_bridge import TransformerBridge

    assert (DEFAULT_MODEL_DIR / "model.safetensors").is_file(), "run train_tiny_lm.py to build it"
    bridge = TransformerBridge.boot_transformers(str(DEFAULT_MODEL_DIR), device="cpu")
    assert (bridge.cfg.n_layers, bridge.cfg.d_model, bridge.cfg.n_heads, bridge.cfg.d_mlp) == (2, 128, 4, 512)
    tokens = bridge.to_tokens("def read(path):\n    \"\"\"Return the contents of the file.\"\"\"")  # [1, seq]
    logits, cache = bridge.run_with_cache(tokens)  # [1, seq, vocab]
    assert logits.shape == (1, tokens.shape[1], 4096) and torch.isfinite(logits).all()
    assert cache["blocks.1.hook_resid_post"].shape == (1, tokens.shape[1], 128)
    info = json.loads((DEFAULT_MODEL_DIR / "training.json").read_text())
    assert info["heldout_loss"] < info["unigram_heldout_loss"] - 1.0


def test_empty_heldout_set_is_said_not_nan(local_text_files: Any, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    info = train_tiny_lm(_small_config(str(local_text_files.jsonl), tmp_path / "lm", heldout_fraction=1e-9))
    err = capsys.readouterr().err
    assert info["data"]["heldout_rows"] == 0 and info["heldout_loss"] is None
    assert "no held-out loss: the held-out text (" in err and "gives no row of 32 tokens" in err
    assert "nan" not in err.lower()
    saved = json.loads((tmp_path / "lm" / "training.json").read_text())  # null, not NaN
    assert saved["heldout_loss"] is None and saved["unigram_heldout_loss"] is None
