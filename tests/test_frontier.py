"""Frontiers read at matched L0 (hand-computed) and the comparison of several evaluated sweeps (report.json-shaped
inputs: tables, "—" outside the measured range, plots, one-line errors)."""

from __future__ import annotations

import json
import math

import pytest

from training.cli import UserError
from training.comparison import (COMPARISON_JSON, COMPARISON_MD, COMPARISON_PLOTS, CompareConfig, compare_reports,
                                 per_sweep_configs, write_comparison)
from training.frontier import frontier_points, value_at_l0, values_at_l0

T = math.log(1.6) / math.log(2)          # 16 (and 32, 64) lies this far from 10 (20, 40) to 20 (40, 80) in log L0
L0 = [10.0, 20.0, 40.0, 80.0, 30.0, 100.0]
EV = [0.5, 0.7, 0.8, 0.9, 0.6, 0.85]    # (30, .6) and (100, .85) are dominated


def test_frontier_drops_dominated_members_and_l0_zero():
    assert frontier_points(L0, EV) == [(10.0, 0.5), (20.0, 0.7), (40.0, 0.8), (80.0, 0.9)]
    assert frontier_points([0.0, 5.0, float("nan"), 8.0], [0.9, 0.2, 0.99, float("nan")]) == [(5.0, 0.2)]


def test_values_at_l0_by_hand():
    got = values_at_l0(L0, EV, (16, 32, 64))
    assert got == pytest.approx([0.5 + 0.2 * T, 0.7 + 0.1 * T, 0.8 + 0.1 * T], abs=1e-12)
    assert got[0] == pytest.approx(0.6356144, abs=1e-7)
    points = frontier_points(L0, EV)
    assert value_at_l0(points, 40) == 0.8 and value_at_l0(points, 10) == 0.5 and value_at_l0(points, 80) == 0.9
    # never extrapolated: below the sparsest or above the densest frontier member (a dominated member at 100 does
    # not extend the frontier), and nothing from an empty frontier or a non-positive target
    assert value_at_l0(points, 9.99) is None and value_at_l0(points, 90) is None
    assert value_at_l0([], 16) is None and value_at_l0(points, 0) is None
    assert values_at_l0([50.0], [0.3], (16, 50)) == [None, 0.3]


def _report(sweep: str, arch: str, l0: list, ev: list, ce: list, hook: str = "blocks.1.hook_resid_post") -> dict:
    members = [{"key": i + 1, "l0": a, "explained_variance": b, "ce_loss_score": c}
               for i, (a, b, c) in enumerate(zip(l0, ev, ce))]
    return {"evaluated": {"sweep": sweep, "architecture": arch, "model": "m", "hook": hook, "dataset": "d",
                          "dataset_split": "validation", "sweep_sha256": "x", "n_tokens": 1000},
            "members": members}


def test_comparison_of_two_sweeps_written(tmp_path):
    reports = [_report("/s/l1", "l1", L0, EV, [0.1, 0.3, 0.5, 0.7, 0.2, None]),
               _report("/s/topk", "topk", [20.0, 32.0, 70.0], [0.75, 0.85, 0.9], [0.4, 0.6, 0.8])]
    res = write_comparison(reports, tmp_path / "cmp")
    c = json.loads((tmp_path / "cmp" / COMPARISON_JSON).read_text())
    assert c == res.comparison and c["targets"] == [16, 32, 64]
    l1, topk = c["sweeps"]
    assert [l1["label"], topk["label"]] == ["L1", "TopK"]
    assert l1["metrics"]["explained_variance"]["at_l0"] == pytest.approx([0.5 + 0.2 * T, 0.7 + 0.1 * T, 0.8 + 0.1 * T])
    assert l1["metrics"]["ce_loss_score"]["at_l0"] == pytest.approx([0.1 + 0.2 * T, 0.3 + 0.2 * T, 0.5 + 0.2 * T])
    t64 = math.log(64 / 32) / math.log(70 / 32)
    ev_topk = topk["metrics"]["explained_variance"]["at_l0"]
    assert ev_topk[0] is None and ev_topk[1] == 0.85 and ev_topk[2] == pytest.approx(0.85 + 0.05 * t64)
    md = (tmp_path / "cmp" / COMPARISON_MD).read_text()
    assert "| architecture | EV @ L0=16 | EV @ L0=32 | EV @ L0=64 | CE score @ L0=16 |" in md
    assert f"| TopK | — | 0.8500 | {0.85 + 0.05 * t64:.4f} | — | 0.6000 |" in md and "| 20.0–70.0 |" in md
    import matplotlib.image
    for name in COMPARISON_PLOTS.values():
        assert matplotlib.image.imread(tmp_path / "cmp" / name).shape[0] > 100
    assert "TopK" in str(res) and "—" in str(res)
    same = compare_reports([reports[1], _report("/t/topk_long", "topk", [8.0, 16.0], [0.5, 0.6], [0.1, 0.2])])
    assert [s["label"] for s in same["sweeps"]] == ["TopK (topk)", "TopK (topk_long)"]


def test_comparison_refuses_sweeps_of_other_hooks_and_duplicates(tmp_path):
    with pytest.raises(UserError, match="different hook"):
        compare_reports([_report("/a", "l1", [1.0], [0.1], [0.1]),
                         _report("/b", "topk", [1.0], [0.1], [0.1], hook="blocks.0.hook_resid_post")])
    with pytest.raises(UserError, match="given twice"):
        per_sweep_configs(CompareConfig(sweep=[str(tmp_path), str(tmp_path / ".")]))
    one = per_sweep_configs(CompareConfig(sweep=["a", "b"], n_tokens=7))
    assert [c.sweep for c in one] == ["a", "b"] and {c.n_tokens for c in one} == {7}


def test_a_bad_sweep_among_several_fails_before_any_is_evaluated(tmp_path, monkeypatch):
    import training.comparison as comparison
    evaluated = []
    monkeypatch.setattr(comparison, "evaluate_sweep", evaluated.append)
    monkeypatch.setattr(comparison, "read_sweep", lambda path, allow: None)        # every sweep readable ...
    with pytest.raises(UserError, match="is one of the sweeps"):
        comparison.evaluate_and_compare(CompareConfig(sweep=["a", "b"], comparison_dir="b"))

    def read(path, allow):
        if path.name == "missing":
            raise UserError(f"sweep folder {path} does not exist")
    monkeypatch.setattr(comparison, "read_sweep", read)                            # ... or not: nothing evaluated
    with pytest.raises(UserError, match="missing does not exist"):
        comparison.evaluate_and_compare(CompareConfig(sweep=["a", str(tmp_path / "missing")]))
    assert evaluated == []
