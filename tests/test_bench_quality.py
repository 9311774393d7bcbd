"""bench/quality.py: the scorer, the log-L0 interpolation and the verdicts on hand-computed values, and a small
`--quick --data synthetic` run end to end (ours only; the peers need side venvs and are run by hand)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench.quality import (OURS_L1, OURS_TOPK, ce_target, compare, interp_log_l0, main, score, verdict)


def tiny_system():
    # codes = relu(x @ W) with 3 latents; x_hat = codes @ D
    W = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    D = torch.tensor([[1.0, 0.0], [0.0, 0.5], [5.0, 5.0]])
    return (lambda x: torch.relu(x @ W)), (lambda c: c @ D)


def test_score_hand_computed():
    encode, decode = tiny_system()
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    # codes: [1, 0, -1] -> [1, 0, 0]; [3, 2, -3] -> [3, 2, 0]  => L0 = (1 + 2) / 2 = 1.5; latent 2 never fires
    # x_hat: [1, 0]; [3, 1]  => sum ||x - x_hat||^2 = 0 + 1 = 1
    # mean = [2, 1]; sum ||x - mean||^2 = (1 + 1) + (1 + 1) = 4  => FVU = 0.25
    for block in (1, 2, 100):
        s = score(encode, decode, x, block=block)
        assert s["l0"] == pytest.approx(1.5)
        assert s["fvu"] == pytest.approx(0.25)
        assert s["dead_pct"] == pytest.approx(100 / 3)
        assert s["rows"] == 2 and s["d_hidden"] == 3


def test_score_mean_is_over_the_rows_and_edge_cases():
    # reconstruction = the rows' mean: FVU exactly 1; a perfect one: 0; codes all zero: L0 0, every latent dead
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mean = x.mean(0)
    zero_codes = lambda x: torch.zeros(len(x), 4)  # noqa: E731
    s = score(zero_codes, lambda c: mean.expand(len(c), -1), x, block=2)
    assert s["fvu"] == pytest.approx(1.0) and s["l0"] == 0 and s["dead_pct"] == 100.0
    s = score(lambda x: x, lambda c: c, x)
    assert s["fvu"] == 0.0 and s["l0"] == pytest.approx(5 / 3) and s["dead_pct"] == 0.0
    # constant rows: no variance, FVU undefined
    assert math.isnan(score(lambda x: x, lambda c: c, torch.ones(3, 2))["fvu"])
    with pytest.raises(ValueError):
        score(lambda x: x, lambda c: c, torch.zeros(0, 2))


def test_interp_log_l0_hand_computed():
    l0s, fvus = [1000.0, 10.0, 100.0], [0.1, 0.5, 0.3]  # unsorted on purpose
    # at L0 = 50, between (10, 0.5) and (100, 0.3): w = log(50/10) / log(100/10) = log10(5) = 0.69897
    assert interp_log_l0(l0s, fvus, 50.0) == pytest.approx(0.5 - 0.2 * math.log10(5))
    assert interp_log_l0(l0s, fvus, 50.0) == pytest.approx(0.360206, abs=1e-6)
    assert interp_log_l0(l0s, fvus, math.sqrt(10 * 100)) == pytest.approx(0.4)  # geometric midpoint
    assert interp_log_l0(l0s, fvus, 10.0) == pytest.approx(0.5)                 # the ends are in range
    assert interp_log_l0(l0s, fvus, 1000.0) == pytest.approx(0.1)
    assert interp_log_l0(l0s, fvus, 100.0) == pytest.approx(0.3)
    # out of range: never extrapolated
    assert interp_log_l0(l0s, fvus, 9.99) is None
    assert interp_log_l0(l0s, fvus, 1000.5) is None
    assert interp_log_l0(l0s, fvus, 0.0) is None and interp_log_l0(l0s, fvus, float("nan")) is None
    assert interp_log_l0([], [], 5.0) is None
    # unusable points (L0 0, NaN FVU) are left out: the range is then [10, 100]
    assert interp_log_l0([0.0, 10.0, 100.0, 1000.0], [0.9, 0.5, 0.3, float("nan")], 500.0) is None
    assert interp_log_l0([0.0, 10.0, 100.0], [0.9, 0.5, 0.3], 50.0) == pytest.approx(0.360206, abs=1e-6)
    # one point: only its own L0 is in range
    assert interp_log_l0([20.0], [0.2], 20.0) == 0.2 and interp_log_l0([20.0], [0.2], 21.0) is None


def test_verdict():
    assert verdict(0.2, 0.3) == "PASS"
    assert verdict(0.3, 0.3) == "PASS"  # <= passes
    assert verdict(0.31, 0.3) == "FAIL"
    assert verdict(None, 0.3) == "N/A" and verdict(0.2, None) == "N/A"
    assert verdict(float("nan"), 0.3) == "N/A" and verdict(0.2, float("inf")) == "N/A"


def test_compare_frontier_and_topk():
    pts = [{"system": OURS_L1, "key": k, "l0": l, "fvu": f}
           for k, l, f in ((0.1, 100.0, 0.3), (0.3, 10.0, 0.5), (0.8, 1000.0, 0.1))]
    pts += [{"system": OURS_TOPK, "key": 16, "l0": 16.0, "fvu": 0.4},
            {"system": OURS_TOPK, "key": 32, "l0": 32.0, "fvu": 0.25},
            {"system": "saelens", "key": 1.0, "l0": 50.0, "fvu": 0.35},             # ours 0.3602 there: FAIL
            {"system": "reference", "key": 3.0, "l0": 50.0, "fvu": 0.40},           # PASS
            {"system": "dictionary_learning", "key": 0.1, "l0": 3.0, "fvu": 0.6},   # below our range
            {"system": "sparsify", "key": 32, "l0": 31.5, "fvu": 0.27}]             # ours 0.25: PASS
    rows = {r["peer"]: r for r in compare(pts)}
    assert set(rows) == {"saelens", "reference", "dictionary_learning", "sparsify"}
    sae = rows["saelens"]
    assert sae["ours_fvu"] == pytest.approx(0.360206, abs=1e-6)
    assert sae["diff"] == pytest.approx(0.360206 - 0.35, abs=1e-6) and sae["verdict"] == "FAIL"
    assert rows["reference"]["verdict"] == "PASS" and rows["reference"]["diff"] < 0
    dl = rows["dictionary_learning"]
    assert dl["ours_fvu"] is None and dl["diff"] is None and dl["verdict"] == "N/A"
    assert dl["note"].startswith("out of range")
    sp = rows["sparsify"]
    assert sp["ours_fvu"] == 0.25 and sp["diff"] == pytest.approx(-0.02) and sp["verdict"] == "PASS"
    # without our k=32 member the TopK comparison is N/A; without peers there is nothing to compare
    no32 = [p for p in pts if not (p["system"] == OURS_TOPK and p["key"] == 32)]
    assert {r["peer"]: r for r in compare(no32)}["sparsify"]["verdict"] == "N/A"
    assert compare([p for p in pts if p["system"] in (OURS_L1, OURS_TOPK)]) == []


def test_ce_target():
    m = lambda s, k, l0, ce: {"system": s, "key": k, "ce_l0": l0, "ce_score": ce}  # noqa: E731
    members = [m(OURS_L1, 0.05, 200.0, 0.99), m(OURS_L1, 0.3, 45.0, 0.91), m(OURS_TOPK, 32, 32.0, 0.95)]
    t = ce_target(members)
    assert t["verdict"] == "PASS" and t["best"]["key"] == 32
    assert t["best_by_system"][OURS_L1]["key"] == 0.3
    assert ce_target([m(OURS_L1, 0.05, 200.0, 0.99), m(OURS_L1, 0.5, 50.0, 0.89)])["verdict"] == "FAIL"
    assert ce_target([m(OURS_L1, 0.05, 200.0, 0.99)])["verdict"] == "FAIL"  # nothing under the L0 cap
    assert ce_target([m(OURS_L1, 0.5, 50.0, 0.9)])["verdict"] == "PASS"     # the bounds are inclusive
    assert ce_target([m(OURS_L1, 0.5, 50.0, None)])["verdict"] == "N/A"


def test_quick_synthetic_end_to_end(tmp_path):
    out = tmp_path / "quality"
    res = main(["--quick", "--data", "synthetic", "--out", str(out), "--tokens", "65536",
                "--l1_values", "0.1", "0.3", "--k_values", "16", "32", "--threads", "1"])
    png = out / "frontiers_synthetic_65536.png"
    for f in (out / "results.json", out / "results.md", png, out / "work" / "synthetic" / "meta.json"):
        assert f.exists() and f.stat().st_size > 0, f
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["machine"]["torch"] == torch.__version__ and saved["machine"]["date"]
    (run,) = saved["runs"]
    assert run["data"] == "synthetic" and run["tokens"] == 65536 and run["d"] == 64 and run["d_hidden"] == 512
    assert [(p["system"], p["key"]) for p in run["points"]] == [
        (OURS_L1, 0.1), (OURS_L1, 0.3), (OURS_TOPK, 16), (OURS_TOPK, 32)]
    for p in run["points"]:
        for name in ("l0", "fvu", "dead_pct", "recovered", "train_seconds"):
            assert isinstance(p[name], float) and math.isfinite(p[name]), (p, name)
        assert 0 <= p["fvu"] < 1.5 and 0 <= p["dead_pct"] <= 100 and 0 <= p["recovered"] <= 1
        assert p["trained_tokens"] == 65536  # 64 full batches of 1024
    topk = {p["key"]: p for p in run["points"] if p["system"] == OURS_TOPK}
    assert topk[16]["l0"] <= 16 and topk[32]["l0"] <= 32
    assert run["comparisons"] == [] and res["runs"][0]["plot"] == png.name
    md = (out / "results.md").read_text()
    assert "| system | key | L0 | FVU | dead % | recovered | train s |" in md and "ours TopK | k=32" in md
