"""Stage 3 end to end: evaluate tiny sweeps (both architectures) of a tiny GPT-NeoX, check the report against a
direct computation with training.metrics, the knee, the held-out text, the plots and the one-line errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from training.cli import UserError, run_cli
from training.evaluate import (EvaluateConfig, evaluate_sweep, knee_point, pareto_front, resolve_text,
                               token_batches)
from training.generate import GenerateConfig, generate
from training.sweep import SweepConfig, run_sweep
from training.sweep_files import read_sweep

HOOK = "blocks.1.hook_resid_post"
N_TOKENS = 1200
MEMBER_METRICS = {"mse", "mse_per_element", "explained_variance", "normalized_mse", "cossim", "l2_ratio", "l2_norm_in",
                  "l2_norm_out", "relative_reconstruction_bias", "kl_div_score",
                  "l0", "l1", "n_dead", "frac_dead", "n_dense", "frac_dense", "n_features", "n_tokens",
                  "ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation", "ce_loss_with_error", "kl_div_with_sae", "kl_div_with_ablation", "kl_div_with_error",
                  "ce_loss_score", "ce_delta", "ce_with_error_delta", "n_positions_ce", "n_positions_kl",
                  "density_histogram", "key"}


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """A local dataset with train and validation splits of fixture documents."""
    from conftest import fixture_documents
    root = tmp_path_factory.mktemp("eval-text")
    docs = fixture_documents(400)
    (root / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:340]))
    (root / "validation.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[340:]))
    return root


@pytest.fixture(scope="module")
def stage1(tiny_neox_dir, text_dir, tmp_path_factory) -> Path:
    """Stage 1 folder: tiny GPT-NeoX, hook blocks.1.hook_resid_post, 2 chunks of 1000 rows, context 32."""
    root = tmp_path_factory.mktemp("eval-chunks")
    generate(GenerateConfig(model=str(tiny_neox_dir), dataset=str(text_dir), dataset_folder=str(root), layers=[1],
                            n_chunks=2, chunk_size=1000, context_length=32, device="cpu"), argv=["x"])
    return root


def make_sweep(stage1: Path, out: Path, **kw) -> Path:
    """A 3-member sweep trained for a few seconds."""
    run_sweep(SweepConfig(dataset_dir=str(stage1 / HOOK), output_dir=str(out), ratio=2, batch_size=100, adam_lr=1e-2,
                          n_repetitions=4, device="cpu", center_init="mean", log_every=10, **kw))
    return out


@pytest.fixture(scope="module")
def l1_sweep(stage1, tmp_path_factory) -> Path:
    return make_sweep(stage1, tmp_path_factory.mktemp("eval-l1"), l1_values=[1e-2, 1e-1, 1.0])


@pytest.fixture(scope="module")
def topk_sweep(stage1, tmp_path_factory) -> Path:
    return make_sweep(stage1, tmp_path_factory.mktemp("eval-topk"), architecture="topk", k_values=[2, 4, 8])


@pytest.fixture(scope="module")
def l1_report(l1_sweep) -> dict:
    evaluate_sweep(EvaluateConfig(sweep=str(l1_sweep), n_tokens=N_TOKENS, batch_size=16, device="cpu"))
    return json.loads((l1_sweep / "report.json").read_text())


@pytest.fixture(scope="module")
def topk_report(topk_sweep) -> dict:
    """Evaluated through the CLI entry point."""
    run_cli(lambda c: print(evaluate_sweep(c)), "", EvaluateConfig,
            ["--sweep", str(topk_sweep), "--n_tokens", str(N_TOKENS), "--batch_size", "8", "--device", "cpu"])
    return json.loads((topk_sweep / "report.json").read_text())


# ---------------------------------------------------------------------------------------- the report


@pytest.mark.parametrize("which", ["l1_report", "topk_report"])
def test_report_has_every_metric_with_sane_values(which, request, tiny_neox_dir, text_dir):
    report = request.getfixturevalue(which)
    ev = report["evaluated"]
    assert ev["model"] == str(tiny_neox_dir) and ev["hook"] == HOOK and ev["dataset"] == str(text_dir)
    assert ev["dataset_split"] == "validation" and ev["skip_sequences"] == 0 and "held out" in ev["held_out"]
    assert N_TOKENS <= ev["n_tokens"] < N_TOKENS + 32 and ev["excluded_token_ids"] == [0]
    sweep_json = json.loads((Path(ev["sweep"]) / "sweep.json").read_text())
    assert ev["sweep_sha256"] == sweep_json["weights_sha256"]                  # tied to the weights it scored
    topk = which == "topk_report"
    assert ev["keys"] == ([2, 4, 8] if topk else [1e-2, 1e-1, 1.0]) == [m["key"] for m in report["members"]]
    for m in report["members"]:
        assert MEMBER_METRICS <= set(m), MEMBER_METRICS - set(m)
        assert m["n_tokens"] == ev["n_tokens"] == m["n_positions_kl"] and m["n_features"] == 64
        assert 0 < m["l0"] <= (m["key"] if topk else 64) and m["l1"] > 0
        assert 0 < m["explained_variance"] <= 1 and -1 <= m["cossim"] <= 1 and m["l2_ratio"] > 0
        assert 0 <= m["frac_dead"] <= 1 and 0 <= m["frac_dense"] <= 1 and m["mse"] > 0
        assert m["ce_loss_without_sae"] > 0 and m["ce_loss_with_sae"] > 0 and m["ce_loss_with_ablation"] > 0 and m["kl_div_with_sae"] > 0
        # the SAE error term kept gives the clean model back
        assert m["ce_loss_with_error"] == pytest.approx(m["ce_loss_without_sae"], abs=1e-5) and abs(m["kl_div_with_error"]) < 1e-6
        assert m["ce_loss_score"] == pytest.approx((m["ce_loss_with_ablation"] - m["ce_loss_with_sae"]) / (m["ce_loss_with_ablation"] - m["ce_loss_without_sae"]))
        hist = m["density_histogram"]
        assert sum(hist["counts"]) + hist["n_dead"] == 64 and hist["n_dead"] == m["n_dead"]
        assert hist["log10_edges"][0] == math.floor(math.log10(1 / m["n_tokens"])) and hist["log10_edges"][-1] == 0
    l0 = [m["l0"] for m in report["members"]]
    assert (l0[0] < l0[-1]) if topk else (l0[0] > l0[-1]), l0  # more k / a smaller penalty: denser codes
    assert report["clean"]["ce_loss_without_sae"] == report["members"][0]["ce_loss_without_sae"] == report["members"][-1]["ce_loss_without_sae"]
    assert report["knee"]["definition"] and report["knee"]["reason"]


@pytest.mark.parametrize("sweep", ["l1_sweep", "topk_sweep"])
def test_markdown_and_plots(sweep, request):
    folder = request.getfixturevalue(sweep)
    request.getfixturevalue(sweep.replace("sweep", "report"))
    md = (folder / "report.md").read_text()
    assert "## Recommended" in md and "| L0 |" in md and HOOK in md and "special token" in md
    assert len([ln for ln in md.splitlines() if ln.startswith("| ") and "|---" not in ln]) == 1 + 3
    import matplotlib.image
    for name in ("ev_vs_l0.png", "ce_score_vs_l0.png", "dead_vs_key.png", "density_histograms.png"):
        path = folder / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(path)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
        assert f"({name})" in md
    assert not list(folder.glob("*.tmp"))


def test_matches_direct_computation_on_same_tokens(l1_sweep, l1_report, tiny_neox_dir, text_dir):
    """Reconstruction, sparsity and clean CE of one member recomputed with training.metrics on the same tokens."""
    from training import load_sweep
    from training.metrics import (explained_variance, cosine_similarity, dense_features, feature_density, l0, l1,
                                  mse, next_token_ce, norm_ratio)
    from training.models import load_model
    from training.text import iter_documents, pack_token_rows
    ev = l1_report["evaluated"]
    model = load_model(str(tiny_neox_dir), "cpu")
    rows = pack_token_rows(iter_documents(str(text_dir), "validation"), model.tokenizer, 32)
    tokens = torch.tensor([next(rows) for _ in range(ev["n_sequences"])])
    mask = tokens != 0  # EOS/BOS id 0 separates the documents
    assert not mask.all() and int(mask.sum()) == ev["n_tokens"]
    sae = load_sweep(l1_sweep)[1e-1]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=[HOOK])
        x = cache[HOOK][mask]
        codes = sae.encode(x)
        x_hat = sae.decode(codes)
    m = l1_report["members"][1]
    assert m["explained_variance"] == pytest.approx(explained_variance(x, x_hat), rel=1e-5)
    assert m["mse"] == pytest.approx(mse(x, x_hat), rel=1e-5)
    assert m["cossim"] == pytest.approx(cosine_similarity(x, x_hat), rel=1e-5)
    assert m["l2_ratio"] == pytest.approx(norm_ratio(x, x_hat), rel=1e-5)
    assert m["l0"] == pytest.approx(l0(codes), rel=1e-6) and m["l1"] == pytest.approx(l1(codes), rel=1e-5)
    density = feature_density(codes)
    assert m["n_dead"] == int((density == 0).sum()) and m["n_dense"] == int(dense_features(density, 0.1).sum())
    ce = next_token_ce(logits, tokens)[mask[:, :-1]].double().mean().item()
    assert m["ce_loss_without_sae"] == pytest.approx(ce, rel=1e-5)


def test_splice_matches_splice_losses(l1_sweep, tiny_neox_dir, tmp_path):
    """With special tokens only at BOS, the downstream numbers equal training.metrics.splice_losses (BOS excluded)."""
    from conftest import fixture_documents
    from training import load_sweep
    from training.metrics import splice_losses
    from training.models import load_model
    from training.text import iter_documents, pack_token_rows
    one_doc = tmp_path / "one.txt"
    one_doc.write_text(" ".join(fixture_documents(60)))  # one paragraph: one document, no EOS in the first rows
    result = evaluate_sweep(EvaluateConfig(sweep=str(l1_sweep), dataset=str(one_doc), n_tokens=400, batch_size=5,
                                           device="cpu"))
    ev = result.report["evaluated"]
    model = load_model(str(tiny_neox_dir), "cpu")
    rows = pack_token_rows(iter_documents(str(one_doc), "train"), model.tokenizer, 32)
    tokens = torch.tensor([next(rows) for _ in range(ev["n_sequences"])])
    assert (tokens[:, 0] == 0).all() and (tokens[:, 1:] != 0).all()  # the bridge's tokenizer prepends BOS
    assert ev["dataset_split"] == "train" and ev["skip_sequences"] == 0 and ev["n_tokens"] == 13 * 31
    direct = splice_losses(model, tokens, HOOK, load_sweep(l1_sweep)[1.0], exclude_positions=(0,),
                           splice_excluded=False)
    m = result.report["members"][2]
    for key in ("ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation", "ce_loss_with_error", "kl_div_with_sae", "kl_div_with_ablation", "ce_loss_score"):
        assert m[key] == pytest.approx(direct[key], rel=1e-4, abs=1e-6), key
    assert m["n_positions_ce"] == direct["n_positions_ce"] and m["n_positions_kl"] == direct["n_positions_kl"]


# ---------------------------------------------------------------------------------------- knee, text


def test_knee_of_a_hand_made_curve():
    l0, ev = [1, 10, 100, 1000], [0.2, 0.8, 0.9, 0.95]
    # rescaled: u = 0, 1/3, 2/3, 1; v = 0, 0.8, 0.9333, 1; chord y = x; distance = (v - u) / sqrt(2)
    knee = knee_point(l0, ev)
    assert knee.index == 1
    v2 = (0.9 - 0.2) / 0.75
    assert knee.distances == pytest.approx([0.0, (0.8 - 1 / 3) / math.sqrt(2), (v2 - 2 / 3) / math.sqrt(2), 0.0], abs=1e-12)
    assert knee_point(l0, [10 * v + 3 for v in ev]).distances == pytest.approx(knee.distances)  # unit-free
    assert knee_point(l0[::-1], ev[::-1]).index == 2  # order of the members does not matter
    assert knee_point([1, 10, 100], [0.1, 0.2, 0.3]).index is None  # straight in (log L0, EV)
    assert knee_point([1, 10, 100], [0.1, 0.12, 0.9]).index is None  # convex
    assert knee_point([1, 10], [0.1, 0.9]).index is None and "at least 3" in knee_point([1, 10], [0.1, 0.9]).reason
    nan = knee_point([0, 1, 10, 100, 1000], [0.5, 0.2, 0.8, float("nan"), 0.95])  # L0 0 and NaN are skipped
    assert nan.index == 2 and nan.distances[0] is None and nan.distances[3] is None
    # members explaining no variance (EV <= 0) are no candidates: they would move the chord's end
    collapsed = knee_point([0.4, 24, 109, 187, 227], [-0.09, 0.30, 0.785, 0.914, 0.937])
    assert collapsed.index == 2 and collapsed.distances[0] is None
    assert knee_point([0.4, 24, 109, 187, 227], [0.01, 0.30, 0.785, 0.914, 0.937]).index == 3
    assert pareto_front([1, 2, 3, 3], [0.5, 0.4, 0.9, 0.8]) == [0, 2]


def test_token_batches_count_only_evaluated_positions():
    rows = iter([[5, 0, 6, 7]] * 10)  # one special token (0) per row: 3 evaluated positions each
    batches = list(token_batches(rows, 4, torch.tensor([0]), 10))
    assert [len(t) for t, _ in batches] == [4]  # 4 rows give 12 >= 10 positions: stop there
    tokens, mask = batches[0]
    assert mask.tolist() == [[True, False, True, True]] * 4
    assert [len(t) for t, _ in token_batches(iter([[1, 2]] * 10), 3, torch.tensor([0]), 7)] == [3, 1]


def test_training_split_skips_what_stage1_read(l1_sweep, stage1):
    meta = read_sweep(l1_sweep)
    ev = resolve_text(EvaluateConfig(sweep=str(l1_sweep), dataset_split="train"), meta)
    from training.chunks import mmap_tensors
    top = max(int(mmap_tensors(p)[0]["sequence_ids"].max()) for p in (stage1 / "contexts").glob("*.safetensors"))
    assert ev.skip_sequences == top + 1 > 0 and "same split as training" in ev.held_out
    gone = dict(meta, dataset_dir=str(l1_sweep / "nowhere" / HOOK))  # Stage 1 folder deleted: upper estimate
    est = resolve_text(EvaluateConfig(sweep=str(l1_sweep), dataset_split="train"), gone)
    assert est.skip_sequences >= ev.skip_sequences and "estimated" in est.held_out


# ---------------------------------------------------------------------------------------- errors


def test_bad_inputs_give_one_line_errors(l1_sweep, tmp_path, capsys):
    def fails(message: str, **kw) -> None:
        with pytest.raises(UserError, match=message) as info:
            evaluate_sweep(EvaluateConfig(**{"n_tokens": 64, "device": "cpu", **kw}))
        assert "\n" not in str(info.value)

    fails("sweep folder .* does not exist", sweep=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    fails("no sweep in .*empty", sweep=str(tmp_path / "empty"))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(l1_sweep, unfinished)
    meta = json.loads((unfinished / "sweep.json").read_text())
    (unfinished / "sweep.json").write_text(json.dumps(dict(meta, finished=False)))
    fails("has not finished training .* --allow_unfinished", sweep=str(unfinished))
    (unfinished / "sweep.safetensors").unlink()
    fails("no sweep.safetensors", sweep=str(unfinished))
    fails(r"hook 'blocks.7.hook_resid_post' is not in model .*valid hooks: .*blocks.\{0..1\}",
          sweep=str(l1_sweep), hook="blocks.7.hook_resid_post")
    fails("gives 128-wide activations at 'blocks.1.mlp.hook_post' but the sweep's dictionaries take 32",
          sweep=str(l1_sweep), hook="blocks.1.mlp.hook_post")
    fails("local dataset path .* does not exist", sweep=str(l1_sweep), dataset=str(tmp_path / "nope.txt"))
    fails("unknown split 'dev' of dataset", sweep=str(l1_sweep), dataset_split="dev")
    fails("--n_tokens must be at least 1", sweep=str(l1_sweep), n_tokens=0)
    capsys.readouterr()
    with pytest.raises(SystemExit) as code:
        run_cli(evaluate_sweep, "", EvaluateConfig, ["--sweep", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code.value.code == 2 and err.count("\n") == 1 and err.startswith("error: sweep folder")


def test_python_docs_defaults_to_its_validation_split(l1_sweep):
    meta = read_sweep(l1_sweep)
    meta["source_manifest"]["config"].update(dataset="python-docs", dataset_split="train")
    ev = resolve_text(EvaluateConfig(sweep=str(l1_sweep)), meta)
    assert (ev.dataset, ev.dataset_split, ev.skip_sequences, ev.context_length) == ("python-docs", "validation", 0, 32)
    assert "held out from training" in ev.held_out


def test_nan_member_is_reported_as_null_and_left_out_of_the_knee(l1_sweep, tmp_path):
    from safetensors.torch import load_file, save_file
    from training.chunks import file_sha256
    broken = tmp_path / "broken"
    shutil.copytree(l1_sweep, broken)
    weights = load_file(str(broken / "sweep.safetensors"))
    weights["decoder"][0] = float("nan")  # as a member frozen after a NaN loss
    save_file(weights, str(broken / "sweep.safetensors"))
    meta = json.loads((broken / "sweep.json").read_text())
    meta["members"][0]["frozen"] = True
    meta["weights_sha256"] = file_sha256(broken / "sweep.safetensors")   # as the sweep records it
    (broken / "sweep.json").write_text(json.dumps(meta))
    result = evaluate_sweep(EvaluateConfig(sweep=str(broken), n_tokens=64, device="cpu"))
    report = json.loads((broken / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert report["members"][0]["explained_variance"] is None and report["members"][0]["ce_loss_with_sae"] is None
    assert report["members"][1]["explained_variance"] is not None and report["knee"]["distances"][0] is None
    assert "n/a" in str(result) and (broken / "ev_vs_l0.png").exists()


def test_progress_bar_counts_to_the_tokens_the_text_holds(l1_sweep, tmp_path, monkeypatch):
    import training.evaluate as evaluate
    from conftest import fixture_documents
    bars = []

    class Recorder:
        def __init__(self, total, **kw):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass
    monkeypatch.setattr(evaluate, "tqdm", Recorder)
    short = tmp_path / "short.txt"
    short.write_text(" ".join(fixture_documents(20)))
    result = evaluate_sweep(EvaluateConfig(sweep=str(l1_sweep), dataset=str(short), n_tokens=200000, batch_size=5,
                                           device="cpu"))
    n = result.report["evaluated"]["n_tokens"]
    assert 0 < n < 200000 and [(b.total, b.n) for b in bars] == [(n, n)]


def test_pretrained_dictionaries_evaluate_like_the_sweep(l1_sweep, l1_report, tmp_path):
    """The sweep's members exported to SAELens folders and evaluated with --sae (hook, model, text and context from
    their cfg.json) give the sweep report's numbers."""
    from training.saelens import ExportConfig, export_sweep
    folders = export_sweep(ExportConfig(sweep=str(l1_sweep), all=True, out=str(tmp_path / "saelens")))
    result = evaluate_sweep(EvaluateConfig(sae=[str(f) for f in folders], output_dir=str(tmp_path / "report"),
                                           n_tokens=N_TOKENS, batch_size=16, device="cpu"))
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report == result.report and report["evaluated"]["keys"] == ["l1_0.01", "l1_0.1", "l1_1"]
    assert report["evaluated"]["hook"] == HOOK and report["evaluated"]["architectures"] == ["l1"] * 3
    assert report["evaluated"]["dataset_split"] == l1_report["evaluated"]["dataset_split"] == "validation"
    for ours, theirs in zip(report["members"], l1_report["members"]):
        for name in ("l0", "explained_variance", "mse", "cossim", "relative_reconstruction_bias",
                     "ce_loss_with_sae", "ce_loss_score", "kl_div_score"):
            assert ours[name] == pytest.approx(theirs[name], rel=1e-4, abs=1e-6), name
    assert "l1_0.1" in str(result) and (tmp_path / "report" / "report.md").exists()
