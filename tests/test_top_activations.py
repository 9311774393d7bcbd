"""Top-activating examples: hand-computed numbers, the streaming top-k against brute force, Stage 1 and text
sources end to end, neurons, and one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.top_activations import write_random_sweep, write_synthetic_folder
from training import load_sweep, open_hook
from training.cli import UserError, run_cli
from training.generate import GenerateConfig, generate
from training.sweep import SweepConfig, run_sweep
from training.top_activations import RunningTop, TopActivationsConfig, gather
from training.feature_file import read_features_json, round_sig
from training.render import BLOCKS, block_level, render_example, visible_token

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def chunk_root(tiny_neox_dir, tmp_path_factory) -> Path:
    """A Stage 1 folder from the tiny GPT-NeoX (one hook, 3 chunks of 700 rows, context 32) and its text file."""
    from conftest import fixture_documents
    text = tmp_path_factory.mktemp("ta-text") / "docs.txt"
    text.write_text("\n\n".join(fixture_documents(300)))
    root = tmp_path_factory.mktemp("ta-chunks")
    generate(GenerateConfig(model=str(tiny_neox_dir), dataset=str(text), dataset_folder=str(root), layers=[1],
                            n_chunks=3, chunk_size=700, context_length=32, device="cpu"), argv=["x"])
    return root


@pytest.fixture(scope="module")
def sweeps(chunk_root, tmp_path_factory) -> dict[str, Path]:
    """An L1 sweep (two members) and a TopK sweep, trained briefly on `chunk_root`."""
    out = tmp_path_factory.mktemp("ta-sweeps")
    common = dict(dataset_dir=str(chunk_root / HOOK), ratio=2, batch_size=175, device="cpu", center_init="mean",
                  log_every=100)
    run_sweep(SweepConfig(output_dir=str(out / "l1"), l1_values=[1e-3, 1e-2], **common))
    run_sweep(SweepConfig(output_dir=str(out / "topk"), architecture="topk", k_values=[4], **common))
    return {"l1": out / "l1", "topk": out / "topk"}


def brute_force_codes(hook_dir: Path, sae) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(codes [n, F], sequence ids [n], positions [n]) of every stored row, in stored order."""
    data = open_hook(hook_dir)
    chunks = list(data.iter_chunks())
    x = torch.cat([c["activations"].float() for c in chunks])
    seq = torch.cat([c["sequence_ids"] for c in chunks]).numpy()
    pos = torch.cat([c["positions"] for c in chunks]).numpy()
    with torch.no_grad():
        return sae.encode(x), seq, pos


# ----------------------------------------------------------------------------- hand-computed pieces

def test_block_levels_and_rendering():
    # max 2: level = ceil(8 a / 2) clipped to 1..8; 0, negative and unknown get no block
    assert [block_level(a, 2.0) for a in (0.0, 0.1, 0.25, 0.26, 1.0, 2.0, 3.0, None, -1.0)] == [0, 1, 1, 2, 4, 8, 8, 0, 0]
    assert block_level(1.0, 0.0) == 0
    assert BLOCKS == "▁▂▃▄▅▆▇█"
    line = render_example(["a", "b", "c", "d\n", "e", "f"], [0.0, 0.1, 1.0, 2.0, None, -1.0], 2.0)
    assert line == "ab▁c▄d↵█ef"
    assert visible_token("x\ty\r\n\x01") == "x⇥y↵␁"


def test_round_sig_is_short_in_json():
    r = round_sig(np.array([0.123456, 123456.0, -0.00098766, 0.0, np.nan, 2.0]))
    assert r[:4].tolist() == [0.1235, 123500.0, -0.0009877, 0.0] and math.isnan(r[4]) and r[5] == 2.0
    assert json.dumps(r[[0, 1, 2]].tolist()) == "[0.1235, 123500.0, -0.0009877]"


def test_running_top_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    n, F, k, R = 1000, 6, 5, 40
    codes = torch.randn(n, F, generator=g).relu() * torch.tensor([1.0, 2.0, 0.5, 1.0, 1.0, 0.0])
    codes[:, 3] *= (torch.rand(n, generator=g) < 0.02)   # a rare feature: fewer firings than the sample size
    rows = torch.arange(n) * 7 + 3
    stats = RunningTop(F, k, R, all_fire=False, device=torch.device("cpu"))
    for lo, hi in [(0, 3), (3, 300), (300, 301), (301, 1000)]:       # uneven batches, one smaller than k
        stats.update(codes[lo:hi].T.contiguous(), rows[lo:hi])
    want_v, want_i = codes.topk(k, dim=0)
    assert torch.equal(stats.top_values, want_v.T)
    live = want_v.T > 0
    assert torch.equal(stats.top_rows[live], rows[want_i.T][live])
    assert stats.count.tolist() == (codes > 0).sum(0).tolist() and stats.n_tokens == n
    assert stats.density()[5] == 0 and stats.density()[0] == pytest.approx((codes[:, 0] > 0).double().mean())
    filled = stats.sample_priority > 0
    # every sampled token fires, with its true activation; the rare feature's sample is all its firings
    for f in range(F):
        sr = stats.sample_rows[f][filled[f]]
        assert torch.equal(stats.sample_values[f][filled[f]], codes[(sr - 3) // 7, f])
        assert (stats.sample_values[f][filled[f]] > 0).all()
        assert int(filled[f].sum()) == min(R, int((codes[:, f] > 0).sum()))
    assert set(stats.sample_rows[3][filled[3]].tolist()) == set(rows[codes[:, 3] > 0].tolist())


def test_running_top_sample_is_uniform():
    """Each firing token lands in the sample with probability R / n_firing (checked over many seeds)."""
    n, R, hits = 50, 10, torch.zeros(50)
    codes = torch.linspace(0.1, 5.0, n)[None]                          # one feature, always firing
    for seed in range(400):
        stats = RunningTop(1, 1, R, all_fire=False, device=torch.device("cpu"), seed=seed)
        for lo in range(0, n, 7):
            stats.update(codes[:, lo:lo + 7].clone(), torch.arange(lo, min(n, lo + 7)))
        hits[stats.sample_rows[0]] += 1
    freq = hits / 400                                                  # expected 0.2 for every token
    assert freq.mean() == pytest.approx(0.2) and (freq - 0.2).abs().max() < 0.1
    assert abs(freq[:25].mean() - freq[25:].mean()) < 0.03               # no bias to small or large values


# ----------------------------------------------------------------------------- neurons, hand-computed

@pytest.fixture(scope="module")
def hand_folder(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """One sequence of 4 tokens with d=2 activations, split over two chunks of 2 rows (so windows cross chunks)."""
    acts = torch.tensor([[1.0, -3.0], [2.0, 0.0], [-1.0, 5.0], [0.5, -2.0]])
    return write_synthetic_folder(tmp_path_factory.mktemp("hand"), 4, 2, str(tiny_tokenizer_dir), 300,
                                  chunk_size=2, context_length=4, acts=acts)


@pytest.mark.parametrize("mode, density, maxes, f1_top_acts", [
    ("abs", [1.0, 0.75], [2.0, 5.0], [3.0, 0.0, 5.0, 2.0]),
    ("relu", [0.75, 0.25], [2.0, 5.0], [0.0, 0.0, 5.0, 0.0]),
    ("affine", [0.75, 0.75], [3.0, 8.0], [0.0, 3.0, 8.0, 1.0]),     # shifted by the minima -1 and -3
])
def test_neurons_by_hand(hand_folder, tiny_tokenizer_dir, tmp_path, mode, density, maxes, f1_top_acts):
    res = gather(TopActivationsConfig(neurons=True, dataset_dir=str(hand_folder), make_positive_by=mode,
                                      top_k=2, device="cpu", output=str(tmp_path)))
    data = read_features_json(res.path)
    assert res.path == tmp_path / "features.json" and data["n_tokens"] == 4 and data["source"]["kind"] == "neurons"
    feats = data["features"]
    assert [f["density"] for f in feats] == density and [f["max"] for f in feats] == maxes
    top = feats[1]["top"][0]
    assert top["acts"] == f1_top_acts and top["center"] == 2 and top["position"] == 2 and top["activation"] == maxes[1]
    from transformers import AutoTokenizer

    from training.chunks import mmap_tensors
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ctx = mmap_tensors(hand_folder.parent / "contexts" / "0.safetensors")[0]["tokens"][0].tolist()
    assert top["tokens"] == [tok.decode([i]) for i in ctx]
    if mode == "affine":
        assert [f["shift"] for f in feats] == [-1.0, -3.0]
    # the random pool holds the 4 tokens; every window spans the whole sequence (shifted like the top examples)
    assert sorted(e["position"] for e in feats[1]["random"]) == [0, 1, 2, 3]
    assert all(e["acts"] == f1_top_acts for e in feats[1]["random"])
    # the plain-text line of that example: block level ceil(8 a / max) after every token with a > 0
    levels = [block_level(a, maxes[1]) for a in f1_top_acts]
    line = "".join(visible_token(t) + (BLOCKS[lv - 1] if lv else "") for t, lv in zip(top["tokens"], levels))
    assert feats[1]["text"].split("\n")[1] == "  " + line


# ----------------------------------------------------------------------------- dictionaries end to end

@pytest.mark.parametrize("kind, key", [("l1", 1e-2), ("topk", 4)])
def test_sae_features_match_brute_force(chunk_root, sweeps, tmp_path, kind, key):
    flag = ["--l1", "0.01"] if kind == "l1" else ["--k", "4"]
    run_cli(gather, "", TopActivationsConfig, ["--sweep", str(sweeps[kind]), *flag, "--top_k", "6",
                                               "--window_before", "3", "--window_after", "2", "--device", "cpu"])
    label = "l1_0.01" if kind == "l1" else "k_4"
    path = sweeps[kind] / "features" / label / "features.json"
    data = read_features_json(path)
    assert not list(path.parent.glob("*.tmp"))
    assert len(path.read_text().splitlines()) == data["n_features"] + 2                  # one feature per line
    sae = load_sweep(sweeps[kind])[key]
    codes, seq, pos = brute_force_codes(chunk_root / HOOK, sae)
    n, F = codes.shape
    assert data["n_tokens"] == n == 2100 and data["n_features"] == F == 64
    lookup = {(int(s), int(p)): i for i, (s, p) in enumerate(zip(seq, pos))}
    density = (codes > 0).double().mean(0).numpy()
    assert [f["density"] for f in data["features"]] == round_sig(density).tolist()
    assert [f["max"] for f in data["features"]] == round_sig(codes.max(0).values.double().numpy()).tolist()
    assert data["n_dead"] == int((density == 0).sum())
    checked = 0
    for f, feat in enumerate(data["features"]):
        want = codes[:, f].topk(6).values
        want = want[want > 0]
        assert [e["activation"] for e in feat["top"]] == round_sig(want.double().numpy()).tolist()
        for ex in feat["top"] + [e for g in feat["quantiles"] for e in g["examples"]]:
            start = ex["position"] - ex["center"]
            for j, a in enumerate(ex["acts"]):
                row = lookup.get((ex["sequence"], start + j))
                expect = None if row is None else float(round_sig(np.array([codes[row, f].item()]))[0])
                assert a == pytest.approx(expect, rel=1e-3, abs=1e-6) if expect is not None else a is None
                checked += 1
            assert ex["center"] == min(3, ex["position"]) and len(ex["tokens"]) == len(ex["acts"]) <= 6
        for g in feat["quantiles"]:
            lo, hi = g["range"]
            assert all(lo <= e["activation"] <= hi for e in g["examples"])
        if feat["count"]:
            assert sum(feat["histogram"]["counts"]) == feat["histogram"]["sample"] == min(128, feat["count"])
    assert checked > 1000
    # random windows: per-token activations as brute force, and for each feature the 10 pool windows with the
    # smallest window maximum (every pool window some feature kept must have a maximum at least as large)
    pool = {(e["sequence"], e["position"]) for feat in data["features"] for e in feat["random"]}
    assert data["n_random"] == 10 and len(pool) > 10

    def window_max(f: int, s: int, p: int) -> float:
        return max(float(codes[lookup[(s, q)], f]) for q in range(p - 3, p + 3) if (s, q) in lookup)
    for f, feat in enumerate(data["features"]):
        assert len(feat["random"]) == 10
        for ex in feat["random"]:
            start = ex["position"] - ex["center"]
            rows = [lookup.get((ex["sequence"], start + j)) for j in range(len(ex["acts"]))]
            assert [a is None for a in ex["acts"]] == [r is None for r in rows]      # not stored: null
            want = [float(codes[r, f]) for r in rows if r is not None]
            assert [a for a in ex["acts"] if a is not None] == pytest.approx(want, rel=1e-3, abs=1e-6)
        mine = {(e["sequence"], e["position"]) for e in feat["random"]}
        worst = max(window_max(f, *w) for w in mine)
        assert all(window_max(f, *w) >= worst - 1e-5 for w in pool - mine)
        if feat["density"] < 0.01:
            assert worst == 0.0                                        # a sparse feature: windows where it is silent


def test_text_source_agrees_with_stored_chunks(chunk_root, sweeps, tiny_neox_dir, tmp_path):
    manifest = json.loads((chunk_root / "manifest.json").read_text())
    stored = read_features_json(gather(TopActivationsConfig(
        sweep=str(sweeps["l1"]), l1=1e-3, device="cpu", output=str(tmp_path / "a"))).path)
    text = read_features_json(gather(TopActivationsConfig(
        sweep=str(sweeps["l1"]), l1=1e-3, device="cpu", output=str(tmp_path / "b"), model=str(tiny_neox_dir),
        dataset=manifest["config"]["dataset"], n_tokens=2100)).path)
    assert text["n_tokens"] == stored["n_tokens"] == 2100 and text["source"]["dataset"]
    a = np.array([f["max"] for f in stored["features"]])
    b = np.array([f["max"] for f in text["features"]])
    assert np.allclose(a, b, rtol=2e-2, atol=2e-3)                    # Stage 1 stores fp16
    da = np.array([f["density"] for f in stored["features"]])
    db = np.array([f["density"] for f in text["features"]])
    assert np.abs(da - db).max() < 0.01
    fa, fb = stored["features"][int(a.argmax())]["top"][0], text["features"][int(a.argmax())]["top"][0]
    assert (fa["sequence"], fa["position"], fa["tokens"]) == (fb["sequence"], fb["position"], fb["tokens"])
    # neurons from the model run on text agree with neurons from the stored chunks
    kw = dict(neurons=True, make_positive_by="abs", device="cpu", top_k=3, n_quantiles=0)
    ns = read_features_json(gather(TopActivationsConfig(dataset_dir=str(chunk_root / HOOK), output=str(tmp_path / "c"),
                                                        **kw)).path)
    nt = read_features_json(gather(TopActivationsConfig(model=str(tiny_neox_dir), hook=HOOK, context_length=32,
                                                        dataset=manifest["config"]["dataset"], n_tokens=2100,
                                                        output=str(tmp_path / "d"), **kw)).path)
    assert nt["n_features"] == ns["n_features"] == 32
    assert np.allclose([f["max"] for f in ns["features"]], [f["max"] for f in nt["features"]], rtol=2e-3)


def test_random_dictionary_on_synthetic_folder(tiny_tokenizer_dir, tmp_path):
    hook_dir = write_synthetic_folder(tmp_path / "data", 5000, 8, str(tiny_tokenizer_dir), 300, chunk_size=1500,
                                      context_length=50)
    sweep = write_random_sweep(tmp_path / "sweep", hook_dir, 8, 32, bias=-1.0)
    res = gather(TopActivationsConfig(sweep=str(sweep), device="cpu", batch_size=700, n_tokens=4000))
    data = read_features_json(res.path)
    assert data["n_tokens"] == 4000 and res.path == sweep / "features" / "l1_0.001" / "features.json"
    x = torch.cat([c["activations"].float() for c in open_hook(hook_dir).iter_chunks()])[:4000]
    codes = load_sweep(sweep)[1e-3].encode(x)
    assert [f["count"] for f in data["features"]] == (codes > 0).sum(0).tolist()
    assert "wrote the top examples of 32 features over 4,000 tokens" in str(res)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kw, message", [
    (dict(l1=5e-3), r"--l1 0.005 is not in the sweep .* \(none within 5%\): its L1 values are 0.001, 0.01$"),
    (dict(), r"holds 2 dictionaries: choose one with --l1 \(one of 0.001, 0.01\)"),
    (dict(k=4), r"is an L1 sweep: choose its dictionary with --l1 \(one of 0.001, 0.01\)"),
    (dict(key="abc"), r"--key 'abc' is not a number"),
    (dict(l1=1e-3, k=3), "give one of --l1, --k, not several"),
    (dict(l1=1e-3, top_k=0), "--top_k must be at least 1"),
    (dict(l1=1e-3, model="x"), "--model and --dataset go together"),
])
def test_bad_member_or_flags(sweeps, kw, message):
    with pytest.raises(UserError, match=message) as info:
        gather(TopActivationsConfig(sweep=str(sweeps["l1"]), device="cpu", **kw))
    assert "\n" not in str(info.value)


def test_other_bad_input(sweeps, tmp_path, capsys):
    with pytest.raises(UserError, match="sweep .*missing does not exist"):
        gather(TopActivationsConfig(sweep=str(tmp_path / "missing")))
    with pytest.raises(UserError, match="give --sweep .* or --neurons"):
        gather(TopActivationsConfig())
    with pytest.raises(UserError, match="--neurons needs --dataset_dir"):
        gather(TopActivationsConfig(neurons=True))
    with pytest.raises(UserError, match="TopK sweep: choose its dictionary with --k \\(one of 4\\)"):
        gather(TopActivationsConfig(sweep=str(sweeps["topk"]), l1=1e-3))
    with pytest.raises(UserError, match="does not exist: run gather_high_activations.py first"):
        read_features_json(tmp_path / "nope.json")
    with pytest.raises(SystemExit) as info:
        run_cli(gather, "", TopActivationsConfig, ["--sweep", str(sweeps["l1"]), "--l1", "0.5"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --l1 0.5 is not in the sweep")


def test_features_file_streams_and_reports_damage(tmp_path):
    from training.feature_file import FORMAT, FeatureFile, write_features_json
    header = {"format": FORMAT, "version": 1, "n_features": 3}
    feats = [{"id": i, "text": "a\nb", "top": []} for i in range(3)]
    path = tmp_path / "features.json"
    size = write_features_json(path, header, iter(feats))               # any iterable, written as it comes
    assert size == path.stat().st_size and not list(tmp_path.glob("*.tmp"))
    assert read_features_json(path) == {**header, "features": feats}
    ff = FeatureFile(path)
    assert ff.header == header and list(ff) == feats and list(ff["features"]) == feats and ff["n_features"] == 3
    path.write_text(path.read_text()[:-20])                              # cut inside the last feature
    with pytest.raises(UserError, match="line 4 is not a feature"):
        list(FeatureFile(path))
    (tmp_path / "other.json").write_text(json.dumps({"format": "x", "features": []}, indent=1))
    with pytest.raises(UserError, match="not a features.json written by gather_high_activations.py"):
        FeatureFile(tmp_path / "other.json")


def test_locked_features_folder_is_refused(sweeps):
    from lock_holder import held_lock
    with held_lock(sweeps["l1"] / "features" / "l1_0.001") as holder:
        with pytest.raises(UserError, match=f"features.l1_0.001 is in use by another process \\(PID {holder.pid}\\)"):
            gather(TopActivationsConfig(sweep=str(sweeps["l1"]), l1=1e-3, device="cpu", top_k=2))


def test_a_corrupt_chunk_is_refused(tiny_tokenizer_dir, tmp_path):
    hook_dir = write_synthetic_folder(tmp_path / "data", 3000, 8, str(tiny_tokenizer_dir), 300, chunk_size=1500,
                                      context_length=50)
    sweep = write_random_sweep(tmp_path / "sweep", hook_dir, 8, 32, bias=-1.0)
    chunk = hook_dir / "1.safetensors"
    raw = bytearray(chunk.read_bytes())
    raw[-5] ^= 0x01                                             # one bit in the last stored activation
    chunk.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"1.safetensors does not match the checksum in the manifest"):
        gather(TopActivationsConfig(sweep=str(sweep), device="cpu", batch_size=700, n_tokens=3000))


def test_pretrained_dictionary_gathers_like_the_sweep_member(chunk_root, sweeps, tmp_path):
    """A sweep member exported to SAELens and gathered with --sae (on the same stored activations) gives the same
    features; its dashboards load the dictionary from the recorded --sae folder."""
    from training.dashboards import DashboardConfig, make_dashboards
    from training.saelens import ExportConfig, export_sweep
    [folder] = export_sweep(ExportConfig(sweep=str(sweeps["topk"]), k=4, out=str(tmp_path / "saelens")))
    member = read_features_json(gather(TopActivationsConfig(sweep=str(sweeps["topk"]), k=4, device="cpu",
                                                            output=str(tmp_path / "a"))).path)
    pretrained = read_features_json(gather(TopActivationsConfig(sae=str(folder), dataset_dir=str(chunk_root / HOOK),
                                                                device="cpu", output=str(tmp_path / "b"))).path)
    assert pretrained["source"]["sae"] == str(folder.resolve()) and pretrained["source"]["architecture"] == "topk"
    assert pretrained["source"]["hook"] == HOOK and pretrained["n_tokens"] == member["n_tokens"]
    assert [f["density"] for f in pretrained["features"]] == [f["density"] for f in member["features"]]
    assert np.allclose([f["max"] for f in pretrained["features"]], [f["max"] for f in member["features"]], rtol=1e-5)
    with pytest.raises(UserError, match="--sae needs activations to read"):
        gather(TopActivationsConfig(sae=str(folder)))
    site = make_dashboards(DashboardConfig(features=str(tmp_path / "b"), logits=False, n_neighbors=2))
    assert site.pages == 64 and "k_4" in (site.index.read_text())
