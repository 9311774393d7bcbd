"""Feature circuits: a planted circuit in a hand-built model (A -> B found with its hand-computed size and sign,
no edge between unrelated features, error node, attribution = ablation), the rank correlation against scipy,
the DOT/SVG/JSON/HTML outputs (graphviz, headless Chromium), --extend, and an end-to-end run on the embedded
model with dictionaries at layers 0 and 1."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from training.circuit_graph import edge_style, merge_graphs, read_graph, to_dot
from training.circuits import (CircuitConfig, Site, find_circuit, parse_sweep_arg, rank_correlation,
                               run_find_circuit)
from training.cli import UserError, run_cli
from training.dictionary import SparseLinearAutoencoder
from training.models import load_model
from training.sae_hooks import capture

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = REPO / "models" / "tiny-stdlib"
H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
D = 8
TOKENS = [5, 17, 42, 99, 23]
TARGET_TOKEN = 7


# ----------------------------------------------------------------------------- the planted circuit

@pytest.fixture(scope="module")
def planted(tiny_tokenizer_dir, tmp_path_factory):
    """A 2-layer GPT-NeoX (d_model 8) whose blocks add nothing (all weights 0): the residual after block 1 is the
    one after block 0, the token embedding. Embedding columns 0, 2, 3 are positive (1..2, 1..2, 0.5..1.5); the
    unembedding of token 7 reads direction 0 (weight 3)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    folder = tmp_path_factory.mktemp("planted")
    for f in Path(tiny_tokenizer_dir).iterdir():
        shutil.copy(f, folder / f.name)
    from transformers import AutoTokenizer
    vocab = len(AutoTokenizer.from_pretrained(folder))
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=D, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=16, max_position_embeddings=64,
                                             bos_token_id=0, eos_token_id=0, pad_token_id=0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in n and n.endswith("weight") else torch.zeros_like(p))
        emb = torch.randn(vocab, D, generator=g) * 0.3
        emb[:, 0] = 1 + torch.rand(vocab, generator=g)
        emb[:, 2] = 1 + torch.rand(vocab, generator=g)
        emb[:, 3] = 0.5 + torch.rand(vocab, generator=g)
        model.gpt_neox.embed_in.weight.copy_(emb)
        w_u = torch.randn(vocab, D, generator=g) * 0.1
        w_u[TARGET_TOKEN, 0] = 3.0
        model.get_output_embeddings().weight.copy_(w_u)
    model.save_pretrained(folder)
    return load_model(str(folder), "cpu"), emb


def hand_sae(enc: list[dict[int, float]], dec: list[dict[int, float]]) -> SparseLinearAutoencoder:
    """A dictionary whose feature i has encoder row enc[i] and decoder row dec[i] ({dim: value}), no biases."""
    sae = SparseLinearAutoencoder(D, len(enc))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        for i, (e, d) in enumerate(zip(enc, dec)):
            for k, v in e.items():
                sae.encoder[i, k] = v
            for k, v in d.items():
                sae.decoder[i, k] = v
    return sae


def planted_sites() -> list[Site]:
    """Layer 0: A writes/reads direction 0, C direction 2. Layer 1: B reads direction 0 with weight 0.5 (A's
    direction), D reads direction 3 (which no layer-0 feature writes: only the error term carries it)."""
    s0 = hand_sae([{0: 1.0}, {2: 1.0}], [{0: 1.0}, {2: 1.0}])
    s1 = hand_sae([{0: 0.5}, {3: 1.0}], [{0: 1.0}, {3: 1.0}])
    return [Site(H0, s0, "0", "A,C"), Site(H1, s1, "1", "B,D")]


def edges(circuit) -> dict[tuple[str, str], object]:
    """{(source, target): Edge} of every measured edge."""
    return {(e.source, e.target): e for e in circuit.edges}


@pytest.mark.parametrize("method", ["attribution", "ablation"])
def test_planted_circuit_is_found_with_its_size_and_sign(planted, method):
    model, emb = planted
    tokens = torch.tensor([TOKENS])
    _, acts = capture(model, tokens, [H0, H1])
    assert torch.equal(acts[H0], acts[H1])                       # the blocks add nothing: B reads what A wrote
    circuit = find_circuit(model, planted_sites(), tokens, threshold=1e-3, method=method)
    e = edges(circuit)
    a_last = float(emb[TOKENS[-1], 0])                          # A's activation at the last position
    # A -> B: B = ReLU(0.5 x_0), ablating A removes x_0: effect +0.5 a, measured both ways
    ab = e[("0.0", "1.0")]
    assert ab.ablation == pytest.approx(0.5 * a_last, rel=1e-5)
    assert ab.attribution == pytest.approx(0.5 * a_last, rel=1e-5)
    # unrelated pairs: exactly no effect, and not kept
    for pair in [("0.1", "1.0"), ("0.0", "1.1"), ("0.1", "1.1")]:
        assert e[pair].ablation == 0 and e[pair].attribution == 0
    kept = {(k.source, k.target) for k in circuit.kept}
    assert ("0.0", "1.0") in kept and not kept & {("0.1", "1.0"), ("0.0", "1.1"), ("0.1", "1.1")}
    # the error node carries direction 3, which no layer-0 feature explains: error -> D = x_3
    assert e[("0.err", "1.1")].ablation == pytest.approx(float(emb[TOKENS[-1], 3]), rel=1e-5)
    assert e[("0.err", "1.0")].ablation == 0
    # B raises token 7 (its unembedding reads direction 0): ablating B lowers its log-probability
    assert e[("1.0", f"logit.{TARGET_TOKEN}")].ablation > 0.1
    assert circuit.info["agreement"]["spearman"] > 0.8
    assert circuit.nodes["0.0"]["value"] == pytest.approx(a_last)
    assert 0 < circuit.share_drawn() <= 1


def test_planted_circuit_summed_over_positions(planted):
    model, emb = planted
    tokens = torch.tensor([TOKENS])
    circuit = find_circuit(model, planted_sites(), tokens, method="ablation", sum_positions=True)
    want = 0.5 * float(emb[TOKENS, 0].sum())
    e = edges(circuit)[("0.0", "1.0")]
    assert e.ablation == pytest.approx(want, rel=1e-5) and e.attribution == pytest.approx(want, rel=1e-5)


def test_features_from_and_threshold(planted):
    model, _ = planted
    tokens = torch.tensor([TOKENS])
    late = find_circuit(model, planted_sites(), tokens, features_from=1)
    assert {e.source.split(".")[0] for e in late.edges} == {"1"}
    with pytest.raises(UserError, match="no dictionary at block 5"):
        find_circuit(model, planted_sites(), tokens, features_from=5)
    strict = find_circuit(model, planted_sites(), tokens, threshold=1e9)
    assert strict.kept == [] and strict.share_drawn() == 0
    every = find_circuit(model, planted_sites(), tokens, threshold=0)
    two = find_circuit(model, planted_sites(), tokens, threshold=0, max_edges=2)
    strongest = sorted((abs(e.weight) for e in every.kept), reverse=True)[:2]
    assert sorted((abs(e.weight) for e in two.kept), reverse=True) == strongest


@pytest.mark.parametrize("hooks, names", [
    (["blocks.0.attn.hook_z", "blocks.1.mlp.hook_post"], ["0", "1"]),
    (["blocks.0.hook_mlp_out", "blocks.0.hook_attn_out"], ["0_attn_out", "0_mlp_out"]),   # parallel in GPT-NeoX
])
def test_attention_and_mlp_sites(tiny_neox_dir, hooks, names):
    """Dictionaries at attention and MLP hooks: sites named by block (and kind), in forward order; attribution
    agrees with ablation in sign and rank when features are small; a site the next does not depend on (the MLP
    and attention of one parallel block) gives zero effects, not an error."""
    from test_sae_hooks import random_sae
    from training.circuits import make_sites
    model = load_model(str(tiny_neox_dir), "cpu")
    entries = []
    for i, h in enumerate(hooks):
        _, acts = capture(model, torch.zeros(1, 2, dtype=torch.long), [h])
        sae = random_sae(math.prod(acts[h].shape[2:]), seed=i)
        with torch.no_grad():
            sae.decoder.mul_(0.002)            # small features: ablations are small steps, where attribution holds
        entries.append((h, sae, h, {}, None))
    sites = make_sites(entries, model)
    assert [s.name for s in sites] == names
    circuit = find_circuit(model, sites, torch.tensor([[3, 50, 7, 120, 9, 11]]), method="ablation", threshold=0)
    feature_edges = [e for e in circuit.edges if not e.source.endswith(".err") and not e.target.startswith("logit")]
    assert feature_edges
    if names[0] == "0_attn_out":
        assert all(e.ablation == 0 and e.attribution == 0 for e in feature_edges)
    else:
        clear = [e for e in feature_edges if abs(e.ablation) > 1e-3]
        agree = sum((e.ablation > 0) == (e.attribution > 0) for e in clear)
        assert len(clear) > 50 and agree >= 0.95 * len(clear)        # first order: a few targets cross their ReLU
        assert circuit.info["agreement"]["spearman"] > 0.9


def test_gather_contexts_finds_the_strongest_tokens(planted):
    """A's activation is embedding column 0 of the token: the top windows are centred on the tokens with the
    largest such values in the rows (special token 0 left out), in decreasing order."""
    from training.circuits import gather_contexts
    model, emb = planted
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 50, (6, 10), generator=g)
    rows[0, 4] = 0                                                       # special: never a context
    nodes = {"0.0": {"kind": "feature", "site": "0", "feature": 0}, "logit.7": {"kind": "logit"}}
    got = gather_contexts(model, planted_sites(), nodes, rows, 3, batch_size=4)
    assert set(got) == {"0.0"}
    ids = rows.flatten()
    vals = torch.where(ids == 0, torch.tensor(-1.0), emb[ids, 0])
    want = vals.topk(3).indices
    for ex, flat in zip(got["0.0"], want.tolist()):
        r, p = divmod(flat, 10)
        assert ex["tokens"][ex["center"]] == model.tokenizer.decode([int(rows[r, p])])
        assert ex["activation"] == pytest.approx(float(emb[rows[r, p], 0]), abs=1e-4) and ex["source"] == "stage1"


def test_rank_correlation_matches_scipy():
    from scipy.stats import spearmanr
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 6, (40,), generator=g).tolist()                       # with ties
    b = (torch.tensor(a) + torch.randn(40, generator=g) * 2).tolist()
    assert rank_correlation(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert rank_correlation([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(rank_correlation([1.0], [2.0])) and math.isnan(rank_correlation([1, 1], [1, 2]))


def test_edge_style():
    assert edge_style(2.0, 2.0) == {"color": "#1f4fd8ff", "penwidth": "5.00"}
    assert edge_style(-1.0, 4.0)["color"].startswith("#c62828")
    assert int(edge_style(0.5, 4.0)["color"][-2:], 16) < int(edge_style(2.0, 4.0)["color"][-2:], 16)


# ----------------------------------------------------------------------------- files and browser

@pytest.fixture(scope="module")
def drawn(planted, tmp_path_factory):
    """The planted circuit written out (JSON, DOT, SVG, HTML)."""
    from training.circuit_graph import write_outputs
    model, _ = planted
    out = tmp_path_factory.mktemp("planted-out")
    sites = planted_sites()
    # layer 0 as if gather_high_activations.py and make_dashboards.py had run: contexts and pages from there
    member = tmp_path_factory.mktemp("planted-features")
    example = {"tokens": ["def", " read", "_file"], "acts": [0.0, 0.5, 2.0], "center": 2, "activation": 2.0}
    (member / "features.json").write_text(json.dumps({"format": "top_activations", "features": [
        {"id": 0, "top": [example, example]}, {"id": 1, "top": []}]}))
    (member / "dashboards" / "features").mkdir(parents=True)
    (member / "dashboards" / "features" / "0.html").write_text("<html>feature 0</html>")
    sites[0].features_json, sites[0].dashboards = member / "features.json", member / "dashboards"
    circuit = find_circuit(model, sites, torch.tensor([TOKENS]), method="ablation")
    circuit.info["prompt"] = "planted"
    paths = write_outputs(circuit, sites, model, TOKENS, out, 2, extend=False)
    return circuit, sites, paths


def test_outputs_parse_and_render(drawn):
    circuit, _, paths = drawn
    graph = read_graph(paths["json"])
    assert set(graph["nodes"]) == set(circuit.nodes)
    assert {(e["source"], e["target"]) for e in graph["edges"]} == {(e.source, e.target) for e in circuit.kept}
    dot = paths["dot"].read_text()
    canon = subprocess.run(["dot", "-Tcanon"], input=dot, capture_output=True, text=True, timeout=60)
    assert canon.returncode == 0, canon.stderr                     # graphviz parses it
    ab = re.search(r'"0\.0" -> "1\.0" \[color="(#[0-9a-f]{8})"', dot)
    assert ab and ab.group(1).startswith("#1f4fd8")                    # positive: blue
    svg = paths["svg"].read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and 'id="0.0"' in svg and "drawn:" in svg
    node = graph["nodes"]["0.0"]                                       # contexts from features.json, with a page
    assert [c["source"] for c in node["contexts"]] == ["features.json"] * 2 and node["contexts"][0]["tokens"][2] == "_file"
    assert len(node["up"]) == 3 and len(node["down"]) == 3 and node["dashboard"].endswith("features/0.html")
    assert re.search(r'"0\.0" \[label=.*URL="[^"]*dashboards/features/0\.html"', dot)
    assert '<a href="../' in paths["html"].read_text() or "dashboards/features/0.html" in paths["html"].read_text()
    b = graph["nodes"]["1.0"]                                          # no features file: the prompt's context
    assert b["contexts"][0]["source"] == "prompt" and "dashboard" not in b


def test_extend_adds_the_same_edges_up(drawn, planted, tmp_path):
    from training.circuit_graph import write_outputs
    circuit, sites, paths = drawn
    model, _ = planted
    for f in paths.values():
        shutil.copy(f, tmp_path / f.name)
    again = write_outputs(circuit, sites, model, TOKENS, tmp_path, 2, extend=True)
    one, two = read_graph(paths["json"]), read_graph(again["json"])
    w1 = {(e["source"], e["target"]): e["weight"] for e in one["edges"]}
    w2 = {(e["source"], e["target"]): e["weight"] for e in two["edges"]}
    assert w2 == pytest.approx({k: 2 * v for k, v in w1.items()})
    assert len(two["runs"]) == 2 and two["totals"]["n_measured"] == 2 * one["totals"]["n_measured"]
    with pytest.raises(UserError, match="site 0 at blocks.0.hook_resid_post"):
        merge_graphs(one, {**one, "sites": [{"name": "0", "hook": "blocks.0.hook_mlp_out"}]})
    with pytest.raises(UserError, match="does not exist"):
        read_graph(tmp_path / "nothing.json")


def test_html_in_headless_chromium(drawn, tmp_path):
    from test_dashboards import CHROMIUM, chromium
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    circuit, _, paths = drawn
    dom = chromium(paths["html"].as_uri(), tmp_path / "profile", "--dump-dom")
    assert "<svg" in dom and 'id="0.0"' in dom and "drawn:" in dom
    listed = re.findall(r"<tr><td>([^<]+)</td>", dom)
    assert set(listed) == set(circuit.nodes)
    link = re.search(r'<a href="([^"]+)">dashboard</a>', dom)
    assert link and (paths["html"].parent / link.group(1)).read_text() == "<html>feature 0</html>"


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def embedded_sweeps(tmp_path_factory) -> Path:
    """Stage 1 chunks of the embedded model at layers 0 and 1 and a one-member L1 sweep at each (seconds)."""
    from training.generate import GenerateConfig, generate
    from training.sweep import SweepConfig, run_sweep
    assert (EMBEDDED / "config.json").exists(), f"the embedded model {EMBEDDED} is missing"
    root = tmp_path_factory.mktemp("circuit-embedded")
    generate(GenerateConfig(model=str(EMBEDDED), dataset="python-docs", dataset_folder=str(root / "chunks"),
                            layers=[0, 1], n_chunks=2, chunk_size=2000, context_length=64, device="cpu"), argv=["x"])
    for layer in (0, 1):
        run_sweep(SweepConfig(dataset_dir=str(root / "chunks" / f"blocks.{layer}.hook_resid_post"),
                              output_dir=str(root / f"l{layer}"), ratio=2, l1_values=[0.3], batch_size=500,
                              n_repetitions=2, adam_lr=3e-3, device="cpu", center_init="mean", log_every=1000))
    return root


def cli(argv: list[str]):
    """find_circuit.py's entry point."""
    return run_cli(lambda cfg: run_find_circuit(cfg), "find_circuit", CircuitConfig, argv)


def test_end_to_end_on_the_embedded_model(embedded_sweeps, tmp_path):
    out = tmp_path / "circuit"
    circuit, paths = cli(["--sweeps", str(embedded_sweeps / "l1"), str(embedded_sweeps / "l0") + ":0.3",
                          "--prompt", "def read_file(self, path):", "--threshold", "1e-3", "--out", str(out),
                          "--device", "cpu"])
    graph = json.loads(paths["json"].read_text())
    assert [s["hook"] for s in graph["sites"]] == [H0, H1]          # forward order, whatever the flag order
    kinds = {v["kind"] for v in graph["nodes"].values()}
    assert kinds == {"feature", "error", "logit"}
    assert any(k.startswith("0.") and v["kind"] == "feature" for k, v in graph["nodes"].items())
    agree = circuit.info["agreement"]
    assert agree["n_pairs"] > 10 and agree["spearman"] > 0.5          # attribution ranks like ablation
    feature_nodes = [v for v in graph["nodes"].values() if v["kind"] == "feature"]
    assert all(v["contexts"][0]["source"] == "stage1" for v in feature_nodes)  # no features.json: gathered
    assert 0.5 < circuit.share_drawn() <= 1
    for p in paths.values():
        assert p.stat().st_size > 0
    assert "<svg" in paths["html"].read_text()
    # a second prompt extends the graph
    cli(["--sweeps", str(embedded_sweeps / "l0"), str(embedded_sweeps / "l1"), "--prompt", "import os\n",
         "--out", str(out), "--extend", "--device", "cpu"])
    both = json.loads(paths["json"].read_text())
    assert [r["prompt"] for r in both["runs"]] == ["def read_file(self, path):", "import os\n"]
    assert set(graph["nodes"]) <= set(both["nodes"]) and len(both["edges"]) >= len(graph["edges"])


@pytest.mark.parametrize("argv, message", [
    ([], "no dictionaries"),
    (["--sweeps", "/nonexistent/sweep"], "not a sweep folder"),
    (["--sweeps", "{l0}:0.5"], "not in the sweep"),
    (["--sweeps", "{l0}", "{l0}"], "two dictionaries at blocks.0.hook_resid_post"),
    (["--sweeps", "{l0}", "--model", "{narrow}"], "reads 128 values but the model's activation there has 32"),
    (["--sweeps", "{l0}", "--confirm", "0"], "--confirm must be at least 1"),
    (["--sweeps", "{l0}", "--extend"], "run find_circuit.py without --extend first"),
])
def test_cli_errors_are_one_line(embedded_sweeps, tiny_neox_dir, tmp_path, capsys, argv, message):
    argv = [a.format(l0=embedded_sweeps / "l0", narrow=tiny_neox_dir) for a in argv]
    with pytest.raises(SystemExit) as exc:
        cli(argv + ["--prompt", "x = 1", "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_parse_sweep_arg(tmp_path):
    assert parse_sweep_arg("outputs/l0") == (Path("outputs/l0"), None)
    assert parse_sweep_arg("outputs/l0:0.01") == (Path("outputs/l0"), 0.01)
    with pytest.raises(UserError, match="after ':'"):
        parse_sweep_arg("outputs/l0:abc")


def test_dot_of_an_empty_circuit_renders():
    graph = {"sites": [], "nodes": {}, "edges": [], "totals": {"measured": 0, "drawn": 0, "n_measured": 0,
                                                                 "n_drawn": 0}, "runs": [{}]}
    dot = to_dot(graph)
    assert subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True).returncode == 0


def test_pretrained_dictionaries_give_the_same_circuit(embedded_sweeps, tmp_path):
    """--sae with the sweeps' members exported to SAELens folders finds the circuit --sweeps finds."""
    from training.saelens import ExportConfig, export_sweep
    exported = [export_sweep(ExportConfig(sweep=str(embedded_sweeps / f"l{layer}"), all=True,
                                          out=str(tmp_path / f"sae{layer}")))[0] for layer in (0, 1)]
    common = ["--prompt", "def read_file(self, path):", "--threshold", "1e-3", "--device", "cpu"]
    ours, _ = cli(["--sweeps", str(embedded_sweeps / "l0"), str(embedded_sweeps / "l1"), "--out",
                   str(tmp_path / "a")] + common)
    theirs, _ = cli(["--sae", *map(str, exported), "--out", str(tmp_path / "b"), "--model", str(EMBEDDED)] + common)
    a = {(e.source, e.target): e.weight for e in ours.edges}
    b = {(e.source, e.target): e.weight for e in theirs.edges}
    assert set(a) == set(b) and len(a) > 10
    for edge, value in a.items():
        assert b[edge] == pytest.approx(value, rel=1e-3, abs=1e-5), edge
