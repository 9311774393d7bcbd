"""The analysis tools load the model in the dtype Stage 1 ran it in (--dtype auto), and --dtype overrides it:
the shared helper by hand, then evaluate_sweep, gather --model and make_dashboards on a bfloat16 Stage 1 run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import training.models
from training.cli import UserError, run_cli
from training.dashboards import DashboardConfig, make_dashboards
from training.evaluate import EvaluateConfig, evaluate_sweep
from training.generate import GenerateConfig, generate
from training.models import analysis_dtype, manifest_dtype
from training.sweep import SweepConfig, run_sweep
from training.top_activations import TopActivationsConfig, gather
from training.feature_file import read_features_json

HOOK = "blocks.1.hook_resid_post"


def test_analysis_dtype_by_hand():
    bf16 = {"config": {"dtype": "bfloat16"}, "has_tokens": True}
    assert manifest_dtype(bf16) == "bfloat16"
    assert manifest_dtype(None) is None
    assert manifest_dtype({"config": {"dtype": "bfloat16"}, "has_tokens": False}) is None   # imported: no model
    assert manifest_dtype({"config": {}}) is None
    assert analysis_dtype("auto", bf16) == "bfloat16"
    assert analysis_dtype("auto", None) == "float32"
    assert analysis_dtype("auto", bf16, "float16") == "float16"            # what a tool wrote down comes first
    assert analysis_dtype("auto", None, None) == "float32"
    assert analysis_dtype("float32", bf16) == "float32"
    assert analysis_dtype("float16", None) == "float16"
    with pytest.raises(UserError, match="auto, float32, float16, bfloat16"):
        analysis_dtype("fp8", bf16)


@pytest.fixture(scope="module")
def bf16_sweep(tiny_neox_dir, tmp_path_factory) -> dict[str, Path]:
    """Stage 1 in bfloat16 on the tiny GPT-NeoX (text with train and validation splits) and a 2-member L1 sweep."""
    from conftest import fixture_documents
    root = tmp_path_factory.mktemp("dtype")
    docs = fixture_documents(300)
    (root / "text").mkdir()
    (root / "text" / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:260]))
    (root / "text" / "validation.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[260:]))
    generate(GenerateConfig(model=str(tiny_neox_dir), dataset=str(root / "text"), dataset_folder=str(root / "data"),
                            layers=[1], n_chunks=2, chunk_size=600, context_length=32, dtype="bfloat16",
                            device="cpu"), argv=["x"])
    run_sweep(SweepConfig(dataset_dir=str(root / "data" / HOOK), output_dir=str(root / "sweep"), ratio=2,
                          l1_values=[1e-3, 1e-2], batch_size=150, device="cpu", center_init="mean", log_every=100))
    return {"root": root, "sweep": root / "sweep", "model": tiny_neox_dir}


@pytest.fixture
def loaded(monkeypatch) -> list[torch.dtype]:
    """The parameter dtype of every model the tools load (load_model wrapped)."""
    seen: list[torch.dtype] = []
    original = training.models.load_model

    def recording(*args, **kwargs):
        model = original(*args, **kwargs)
        seen.append(next(model.parameters()).dtype)
        return model

    monkeypatch.setattr(training.models, "load_model", recording)
    return seen


def test_evaluate_uses_the_manifest_dtype(bf16_sweep, loaded, capsys):
    folder = bf16_sweep["sweep"]
    evaluate_sweep(EvaluateConfig(sweep=str(folder), n_tokens=200, batch_size=8, device="cpu", with_error=False))
    report = json.loads((folder / "report.json").read_text())
    assert loaded == [torch.bfloat16] and report["evaluated"]["dtype"] == "bfloat16"
    assert f"- model `{bf16_sweep['model']}` in bfloat16, hook" in (folder / "report.md").read_text()
    assert all(0 < m["ce_loss_without_sae"] < 10 and m["explained_variance"] > -1 for m in report["members"])
    run_cli(evaluate_sweep, "", EvaluateConfig, ["--sweep", str(folder), "--n_tokens", "200", "--batch_size", "8",
                                                  "--device", "cpu", "--no-with_error", "--dtype", "float32"])
    report32 = json.loads((folder / "report.json").read_text())
    assert loaded == [torch.bfloat16, torch.float32] and report32["evaluated"]["dtype"] == "float32"
    # the same model in two precisions: clean losses agree to bf16 accuracy, but not bit for bit
    a, b = report["members"][0]["ce_loss_without_sae"], report32["members"][0]["ce_loss_without_sae"]
    assert a != b and abs(a - b) < 0.05 * abs(b)
    with pytest.raises(SystemExit):
        run_cli(evaluate_sweep, "", EvaluateConfig, ["--sweep", str(folder), "--dtype", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_gather_with_model_uses_the_manifest_dtype(bf16_sweep, loaded, tmp_path):
    text = bf16_sweep["root"] / "text"
    kw = dict(sweep=str(bf16_sweep["sweep"]), l1=1e-2, device="cpu", model=str(bf16_sweep["model"]),
              dataset=str(text), n_tokens=300, top_k=3, n_quantiles=0)
    doc = read_features_json(gather(TopActivationsConfig(output=str(tmp_path / "a"), **kw)).path)
    assert loaded == [torch.bfloat16] and doc["source"]["dtype"] == "bfloat16"
    doc = read_features_json(gather(TopActivationsConfig(output=str(tmp_path / "b"), dtype="float32", **kw)).path)
    assert loaded == [torch.bfloat16, torch.float32] and doc["source"]["dtype"] == "float32"
    # stored activations load no model, but record the dtype Stage 1 ran the model in
    stored = read_features_json(gather(TopActivationsConfig(sweep=str(bf16_sweep["sweep"]), l1=1e-2, device="cpu",
                                                            top_k=3, output=str(tmp_path / "c"))).path)
    assert len(loaded) == 2 and stored["source"]["dtype"] == "bfloat16"


def test_dashboards_use_the_recorded_dtype(bf16_sweep, loaded, tmp_path):
    features = gather(TopActivationsConfig(sweep=str(bf16_sweep["sweep"]), l1=1e-2, device="cpu", top_k=3,
                                           output=str(tmp_path / "f"))).path
    make_dashboards(DashboardConfig(features=str(features), device="cpu", n_logits=3, prompt=["The old lamp."],
                                    output=str(tmp_path / "site")))
    assert loaded == [torch.bfloat16]
    # an older features.json without a dtype: the sweep's Stage 1 manifest decides
    header, rest = features.read_text().split("\n", 1)
    assert header.count(',"dtype":"bfloat16"') == 1
    older = tmp_path / "older" / "features.json"
    older.parent.mkdir()
    older.write_text(header.replace(',"dtype":"bfloat16"', "") + "\n" + rest)
    assert "dtype" not in read_features_json(older)["source"]
    make_dashboards(DashboardConfig(features=str(older), device="cpu", n_logits=3, output=str(tmp_path / "site2")))
    assert loaded == [torch.bfloat16, torch.bfloat16]
    make_dashboards(DashboardConfig(features=str(features), device="cpu", n_logits=3, dtype="float32",
                                    output=str(tmp_path / "site3")))
    assert loaded == [torch.bfloat16, torch.bfloat16, torch.float32]


def test_steer_uses_the_manifest_dtype(bf16_sweep, loaded):
    from training.steering import SteerConfig, run_steer
    kw = dict(sweep=str(bf16_sweep["sweep"]), l1=1e-2, feature=0, strength=[4.0], prompt="The old lamp.",
              max_new_tokens=3, device="cpu", width=80)
    run_steer(SteerConfig(**kw))
    assert loaded == [torch.bfloat16]
    run_steer(SteerConfig(dtype="float32", **kw))
    assert loaded == [torch.bfloat16, torch.float32]
