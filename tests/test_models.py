"""Model loading: device and dtype resolution, local folders, and hub failures as one-line errors."""

from __future__ import annotations

import pytest
import torch

from training.cli import UserError
from training.models import load_model, resolve_device, resolve_dtype, resolve_model_path


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no usable GPU: use --device cpu"):
            resolve_device("cuda:1")


def test_resolve_dtype():
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(UserError, match="choose one of float32"):
        resolve_dtype("float8")


def test_local_folder_and_hub_names(tmp_path):
    assert resolve_model_path("EleutherAI/pythia-70m-deduped") == "EleutherAI/pythia-70m-deduped"
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


def test_local_folder_boots_through_the_hub_path(tiny_neox_dir):
    model = load_model(str(tiny_neox_dir), "cpu")
    assert "blocks.0.hook_resid_post" in model.hook_dict
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_unreachable_hub_model_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not load model 'no-such-org/no-such-model'") as info:
        load_model("no-such-org/no-such-model", "cpu")
    assert "\n" not in str(info.value)
