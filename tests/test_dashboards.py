"""Feature dashboards: hand-computed logit effects and neighbours, HTML pieces, the site built from a real
pipeline (tiny model -> Stage 1 -> sweep -> features.json), the prompt view, and the site in headless Chromium."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import torch

from training import load_sweep
from training.cli import UserError
from training.dashboards import (DashboardConfig, DensityAxis, logit_effects, make_dashboards, nearest_features,
                                 SiteExtras, parse_scores, prompt_activations, residual_directions, token_spans)
from training.generate import GenerateConfig, generate
from training.sweep import SweepConfig, run_sweep
from training.top_activations import SaeScorer, TopActivationsConfig, gather
from training.feature_file import read_features_json
from training.render import visible_token

HOOK = "blocks.1.hook_resid_post"
PROMPTS = ["The quiet cat reads the parser number 12.", "The old lamp opens the queue."]


@pytest.fixture(scope="module")
def gathered(tiny_neox_dir, tmp_path_factory) -> dict[str, Path]:
    """A sweep on Stage 1 chunks of the tiny GPT-NeoX and the features.json of its l1=0.01 member."""
    from conftest import fixture_documents
    root = tmp_path_factory.mktemp("dash")
    (root / "docs.txt").write_text("\n\n".join(fixture_documents(300)))
    generate(GenerateConfig(model=str(tiny_neox_dir), dataset=str(root / "docs.txt"), dataset_folder=str(root / "data"),
                            layers=[1], n_chunks=3, chunk_size=700, context_length=32, device="cpu"), argv=["x"])
    run_sweep(SweepConfig(dataset_dir=str(root / "data" / HOOK), output_dir=str(root / "sweep"), ratio=2,
                          l1_values=[1e-3, 1e-2], batch_size=175, device="cpu", center_init="mean", log_every=100))
    res = gather(TopActivationsConfig(sweep=str(root / "sweep"), l1=1e-2, device="cpu", top_k=8))
    return {"root": root, "sweep": root / "sweep", "features": res.path, "model": tiny_neox_dir}


@pytest.fixture(scope="module")
def site(gathered) -> Path:
    """The site built with logit effects, neighbours, scores and two prompts."""
    scores = gathered["root"] / "scores.json"
    scores.write_text(json.dumps({"3": {"score": 0.75, "explanation": "the word cat"}, "5": 0.25}))
    res = make_dashboards(DashboardConfig(sweep=str(gathered["sweep"]), l1=1e-2, scores=str(scores), prompt=PROMPTS,
                                          device="cpu", n_logits=5))
    assert res.pages == 64 and res.index.exists()
    return res.index.parent


# ----------------------------------------------------------------------------- hand-computed pieces

def test_logit_effects_by_hand():
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    w_u = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 3.0]])      # effects: [1,-2,.5], [0,1,3], [1,-1,3.5]
    ti, tv, bi, bv = logit_effects(directions, w_u, 2, block=2)
    assert ti.tolist() == [[0, 2], [2, 1], [2, 0]] and tv.tolist() == [[1.0, 0.5], [3.0, 1.0], [3.5, 1.0]]
    assert bi.tolist() == [[1, 2], [0, 1], [1, 0]] and bv.tolist() == [[-2.0, 0.5], [0.0, 1.0], [-1.0, 1.0]]


def test_nearest_features_by_hand():
    dec = torch.tensor([[2.0, 0.0], [0.8, 0.6], [0.0, 3.0], [-1.0, 0.0]])  # cos(0,1)=.8 cos(1,2)=.6 cos(1,3)=-.8
    ids, cos = nearest_features(dec, 2, block=3)
    assert ids[0].tolist() == [1, 2] and cos[0].tolist() == pytest.approx([0.8, 0.0])
    assert ids[1].tolist() == [0, 2] and cos[1].tolist() == pytest.approx([0.8, 0.6])
    assert ids[3].tolist()[0] == 2 and cos[3].tolist() == pytest.approx([0.0, -0.8])


def test_density_axis():
    axis = DensityAxis.of([1e-4, 1e-2, 0.0, 0.5], bins=4)            # log10: -4, -2, (dead), -0.3 over [-4, 0]
    assert (axis.lo, axis.hi, axis.counts) == (-4.0, 0.0, [1, 0, 1, 1])
    assert axis.position(1e-2) == pytest.approx(0.5) and axis.position(0.0) is None


def test_token_spans_escape_shade_and_title():
    out = token_spans(["<script>", " a&b", "\n", "", "x"], [2.0, 0.0, None, 1.0, 0.3], 2.0, center=0)
    assert out == ('<b class="a8 c" title=2.0>&lt;script&gt;</b> a&amp;b<b class=u title="not stored">↵</b>'
                   '<b class=a4 title=1.0>∅</b><b class=a2 title=0.3>x</b>')


def test_parse_scores(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps([{"feature": 2, "score": "0.5", "explanation": "x"}, {"feature": 7, "score": None}]))
    assert parse_scores(p) == {2: {"feature": 2, "score": 0.5, "explanation": "x"}, 7: {"feature": 7, "score": None}}
    p.write_text(json.dumps({"a": 1}))
    with pytest.raises(UserError, match="'a' is not a feature id"):
        parse_scores(p)
    with pytest.raises(UserError, match="does not exist"):
        parse_scores(tmp_path / "none.json")


def test_interp_jsonl_scores_on_the_pages(tmp_path):
    from bench.top_activations import synthetic_features
    from training.dashboards import build_site
    recs = [{"feature": 0, "explanation": "the word <cat>", "clearness": 4, "detection": 0.675, "fuzzing": None},
            {"feature": 1, "explanation": "numbers", "clearness": 2},
            {"feature": 1, "explanation": "digits", "clearness": 3},                # a later line replaces
            {"feature": 2, "skipped": "never fired: nothing to explain"}]
    p = tmp_path / "interp.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    scores = parse_scores(p)
    assert scores == {0: {"score": 0.675, "explanation": "the word <cat>", "clearness": 4, "detection": 0.675},
                      1: {"score": 3.0, "explanation": "digits", "clearness": 3}}
    header, feats = synthetic_features(3, top_k=2, n_quantiles=1, per_quantile=1)
    extras = SiteExtras(scores=scores)
    index = build_site(tmp_path / "site", {**header, "features": list(feats)}, extras)
    page0 = (index.parent / "features" / "0.html").read_text()
    assert "<b>Explanation:</b> the word &lt;cat&gt;" in page0
    assert 'id="clearness">4<' in page0 and 'id="detection">0.675<' in page0 and 'id="fuzzing"' not in page0
    rows = json.loads((index.parent / "index_data.js").read_text().split("=", 1)[1].rstrip(";\n"))
    assert rows["has_score"] and [r[3] for r in rows["rows"]] == [0.675, 3.0, None]
    assert [r[5] for r in rows["rows"]] == ["the word <cat>", "digits", ""]


def test_residual_directions(tiny_neox_dir):
    from training.models import load_model
    model = load_model(str(tiny_neox_dir), "cpu")
    dec = torch.randn(5, 32)
    assert torch.equal(residual_directions(model, "blocks.1.hook_resid_post", dec), dec)
    mlp = torch.randn(5, 128)
    assert torch.allclose(residual_directions(model, "blocks.0.mlp.hook_post", mlp), mlp @ model.W_out[0])
    assert residual_directions(model, "blocks.0.attn.hook_pattern", torch.randn(5, 7)) is None


# ----------------------------------------------------------------------------- the site

def feature_numbers(page: str) -> dict[str, str]:
    """The data-value of the density and max cards of a feature page."""
    return dict(re.findall(r'id="(density|max)" data-value="([^"]+)"', page))


def test_site_pages_match_features_json(gathered, site):
    data = read_features_json(gathered["features"])
    assert site == gathered["features"].parent / "dashboards"
    assert not list(site.parent.glob("dashboards.*"))                         # no temporary folders left
    pages = sorted(site.glob("features/*.html"))
    assert len(pages) == data["n_features"] == 64
    rows = json.loads((site / "index_data.js").read_text().split("=", 1)[1].rstrip(";\n"))
    assert [r[0] for r in rows["rows"]] == list(range(64)) and rows["has_score"]
    assert rows["rows"][3][3] == 0.75 and rows["rows"][3][5] == "the word cat" and rows["rows"][5][3] == 0.25
    for f in data["features"]:
        page = (site / "features" / f"{f['id']}.html").read_text()
        assert feature_numbers(page) == {"density": repr(f["density"]), "max": repr(f["max"])}
        assert page.count("<div class=ex>") == len(f["top"]) + sum(len(g["examples"]) for g in f["quantiles"])
        assert "http://" not in page and "https://" not in page                # nothing from the network
    # logit effects of feature 0: decoder row through W_U, top token first
    from training.models import load_model
    model = load_model(str(gathered["model"]), "cpu")
    sae = load_sweep(gathered["sweep"])[1e-2]
    eff = sae.decoder[0].detach() @ model.W_U.detach()
    page0 = (site / "features" / "0.html").read_text()
    first = re.search(r'<td class="tok">(.*?)</td><td class="num pos">([^<]+)</td>', page0)
    assert html.unescape(first.group(1)) == visible_token(model.tokenizer.decode([int(eff.argmax())]))
    assert float(first.group(2)) == pytest.approx(float(eff.max()), abs=1e-3)
    assert page0.count('class="num pos"') == 5 and page0.count('class="num negv"') == 5
    # nearest features: 8 links to other pages, the first the most similar decoder row
    cos = torch.nn.functional.normalize(sae.decoder.detach(), dim=1) @ torch.nn.functional.normalize(sae.decoder.detach(), dim=1)[0]
    cos[0] = -2
    neighbours = re.findall(r'<a href="(\d+)\.html">#\d+ <span class="cos">', page0)
    assert len(neighbours) == 8 and int(neighbours[0]) == int(cos.argmax())
    assert "Explanation:</b> the word cat" in (site / "features" / "3.html").read_text()


def test_prompt_view(gathered, site):
    from training.models import load_model
    model = load_model(str(gathered["model"]), "cpu")
    sae = load_sweep(gathered["sweep"])[1e-2]
    res = prompt_activations(model, HOOK, SaeScorer(sae, torch.device("cpu")), PROMPTS[:1], 3)
    ids = model.tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=[HOOK])
        codes = sae.encode(cache[HOOK][0])                                        # [T, F]
    assert res[0]["tokens"] == [model.tokenizer.decode([i]) for i in ids]
    for t, fires in enumerate(res[0]["features"]):
        if res[0]["special"][t]:                                                  # left out, as in Stage 1
            assert fires == [] and ids[t] == model.tokenizer.eos_token_id
            continue
        v, i = codes[t].topk(3)
        assert [f for f, _ in fires] == [int(j) for j, a in zip(i, v) if a > 0]
        assert [a for _, a in fires] == pytest.approx([float(a) for a in v if a > 0], abs=1e-4)
    page = (site / "prompts.html").read_text()
    assert page.count('<div class="prompt">') == 2 and 'href="features/' in page
    assert html.escape(res[0]["tokens"][2]) in page


def test_neuron_dashboards(gathered, tmp_path):
    from training.models import load_model
    res = gather(TopActivationsConfig(neurons=True, dataset_dir=str(gathered["root"] / "data" / HOOK),
                                      make_positive_by="relu", device="cpu", output=str(tmp_path / "n")))
    make_dashboards(DashboardConfig(features=str(res.path), n_logits=3, device="cpu", prompt=PROMPTS[:1]))
    site = res.path.parent / "dashboards"
    assert len(list(site.glob("features/*.html"))) == 32                     # d_model of the tiny model
    w_u = load_model(str(gathered["model"]), "cpu").W_U.detach()
    page = (site / "features" / "7.html").read_text()
    values = [float(v) for v in re.findall(r'<td class="num pos">([^<]+)</td>', page)]
    assert values == pytest.approx(w_u[7].topk(3).values.tolist(), abs=1e-3)   # basis vector e_7 @ W_U
    assert "Nearest features" not in page and (site / "prompts.html").exists()


def test_repeated_prompt_flag():
    from make_dashboards import merge_repeated
    argv = ["--features", "f.json", "--prompt", "a b", "--device", "cpu", "--prompt", "c", "d"]
    assert merge_repeated(argv, "--prompt") == ["--features", "f.json", "--device", "cpu", "--prompt", "a b", "c", "d"]


def test_subset_rebuild_and_errors(gathered, tmp_path):
    res = make_dashboards(DashboardConfig(features=str(gathered["features"].parent), output=str(tmp_path / "s"),
                                          feature_ids=[5, 3], logits=False, device="cpu"))
    assert sorted(p.name for p in (tmp_path / "s" / "features").iterdir()) == ["3.html", "5.html"]
    assert "logit effects not computed (--no-logits)" in str(res)
    page = (tmp_path / "s" / "features" / "5.html").read_text()
    assert '<a href="3.html">#3 ›</a>' in page and "‹" not in page                # page order as given: 5, 3
    make_dashboards(DashboardConfig(features=str(gathered["features"]), output=str(tmp_path / "s"),
                                    feature_ids=[1], logits=False, n_neighbors=0, device="cpu"))
    assert sorted(p.name for p in (tmp_path / "s" / "features").iterdir()) == ["1.html"]   # replaced whole
    with pytest.raises(UserError, match="feature id 64 is out of range: this dictionary has features 0..63"):
        make_dashboards(DashboardConfig(features=str(gathered["features"]), output=str(tmp_path / "x"),
                                        feature_ids=[64], logits=False, device="cpu"))
    with pytest.raises(UserError, match="does not exist: run gather_high_activations.py first"):
        make_dashboards(DashboardConfig(features=str(tmp_path / "none.json")))
    with pytest.raises(UserError, match="give --features"):
        make_dashboards(DashboardConfig())
    with pytest.raises(UserError, match=r"--l1 0.5 is not in the sweep"):
        make_dashboards(DashboardConfig(sweep=str(gathered["sweep"]), l1=0.5))


# ----------------------------------------------------------------------------- in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def chromium(url: str, profile: Path, *extra: str) -> str:
    """Run headless Chromium on `url` (no network, no sandbox) and return its stdout."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={profile}", *extra, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")
def test_site_in_headless_chromium(gathered, site, tmp_path):
    data = read_features_json(gathered["features"])
    profile = tmp_path / "profile"
    index = chromium((site / "index.html").as_uri(), profile, "--dump-dom")
    listed = re.findall(r'<a href="(features/\d+\.html)">#(\d+)</a>', index)
    assert [int(i) for _, i in listed] == list(range(64))                    # the script listed every feature
    assert "64 features" in index
    # sorted by max activation, descending, through the URL; the first link opens that feature's page
    by_max = chromium((site / "index.html").as_uri() + "?sort=max&desc=1", profile, "--dump-dom")
    first = re.search(r'<a href="(features/(\d+)\.html)">', by_max)
    best = max(data["features"], key=lambda f: (f["max"], -f["id"]))
    assert int(first.group(2)) == best["id"]
    page = chromium((site / first.group(1)).as_uri(), profile, "--dump-dom")
    assert feature_numbers(page) == {"density": repr(best["density"]), "max": repr(best["max"])}
    assert f"Feature {best['id']}" in page
    # search by id and by token text
    one = chromium((site / "index.html").as_uri() + "?q=%2317", profile, "--dump-dom")
    assert re.findall(r'<a href="features/(\d+)\.html">', one) == ["17"]
    top = data["features"][best["id"]]["top"][0]
    token = visible_token(top["tokens"][top["center"]]).strip().lower()
    hits = re.findall(r'<a href="features/(\d+)\.html">', chromium(
        (site / "index.html").as_uri() + "?q=" + urllib.parse.quote(token), profile, "--dump-dom"))
    want = [f["id"] for f in data["features"]
            if any(token in visible_token(e["tokens"][e["center"]]).lower() for e in f["top"][:20])]
    assert str(best["id"]) in hits and set(map(int, hits)) <= set(want) | {3}      # 3: matched by its explanation
    # screenshots (kept in $DASHBOARD_SCREENSHOTS when set)
    shots = Path(os.environ.get("DASHBOARD_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    for name, url in (("index", site / "index.html"), ("feature", site / first.group(1))):
        png = shots / f"{name}.png"
        chromium(url.as_uri(), profile, f"--screenshot={png}", "--window-size=1280,1600")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_derived_outputs_of_an_overwritten_sweep_are_refused_or_gone(gathered, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(gathered["sweep"], sweep)
    res = gather(TopActivationsConfig(sweep=str(sweep), l1=1e-2, device="cpu", top_k=8))
    meta = json.loads((sweep / "sweep.json").read_text())
    assert read_features_json(res.path)["source"]["sweep_sha256"] == meta["weights_sha256"]
    kept = tmp_path / "kept" / "features.json"                      # a copy the overwrite cannot know of
    kept.parent.mkdir()
    shutil.copy(res.path, kept)
    (sweep / "report.json").write_text("{}")                         # as evaluate_sweep.py leaves it
    (sweep / "ev_vs_l0.png").write_bytes(b"png")
    make_dashboards(DashboardConfig(features=str(kept), device="cpu", logits=False))   # same weights: builds
    run_sweep(SweepConfig(dataset_dir=str(gathered["root"] / "data" / HOOK), output_dir=str(sweep), ratio=2,
                          l1_values=[1e-3, 1e-2], batch_size=175, device="cpu", center_init="mean", log_every=100,
                          seed=1, overwrite=True))
    assert not (sweep / "features").exists() and not (sweep / "report.json").exists()
    assert not (sweep / "ev_vs_l0.png").exists()
    with pytest.raises(UserError, match=r"kept/features.json was made from other weights than the sweep in .* now "
                                        r"holds \(it was retrained or overwritten since\): rerun "
                                        r"gather_high_activations.py$") as info:
        make_dashboards(DashboardConfig(features=str(kept), device="cpu", logits=False))
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="already holds a sweep"):    # without --overwrite nothing is removed
        run_sweep(SweepConfig(dataset_dir=str(gathered["root"] / "data" / HOOK), output_dir=str(sweep), ratio=2,
                              l1_values=[1e-3, 1e-2], batch_size=175, device="cpu"))


def test_locked_site_is_refused(gathered, tmp_path):
    from lock_holder import held_lock
    with held_lock(tmp_path, ".site.lock") as holder:
        with pytest.raises(UserError, match=f"site is in use by another process \\(PID {holder.pid}\\)"):
            make_dashboards(DashboardConfig(features=str(gathered["features"]), output=str(tmp_path / "site"),
                                            logits=False, device="cpu"))
    assert not (tmp_path / "site").exists()
