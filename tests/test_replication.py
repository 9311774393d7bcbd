"""Tests of the toy-model replication (training/replication.py): normalisation, grid, scoring, findings, outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training.cli import UserError, run_cli
from training.dictionary import SparseLinearAutoencoder
from training.ensemble import Ensemble
from training.replication import (
    GridResults,
    ReplicationConfig,
    check_findings,
    evaluate_ensemble,
    l1_scale,
    l1_values,
    lr_scale,
    mmcs_table,
    new_run_dir,
    ratio_label,
    report_alpha,
    resolve_config,
    run_replication,
    summary_paragraph,
    training_flops,
    write_outputs,
)

# ----------------------------------------------------------------------------------- normalisation, config


def test_report_alpha_maps_the_reports_loss_onto_ours() -> None:
    """d * (report loss with alpha) == our loss with l1 = alpha * d / d_hidden, on a random dictionary."""
    torch.manual_seed(0)
    d, h, alpha = 6, 15, 0.37
    sae = SparseLinearAutoencoder(d, h, init_norm=1.0)   # unit rows, as the replication trains
    x = torch.randn(40, d)
    codes = sae.encode(x)
    x_hat = sae.decode(codes)
    report = torch.nn.MSELoss()(x_hat, x) + alpha * codes.abs().sum(1).mean() / h   # Sharkey et al.'s code
    l1 = alpha * d / h
    ours, _ = sae.loss(x, l1)
    assert ours.item() == pytest.approx(d * report.item(), rel=1e-5)
    assert report_alpha(l1, h, d) == pytest.approx(alpha)
    assert report_alpha(0.5, 1024, 256) == 2.0


def test_default_grid_and_quick_preset() -> None:
    """Default: 17 L1 values 10^(e/4), e=-8..8, 9 ratios 1/8..32; --quick replaces only settings left at default."""
    cfg = resolve_config(ReplicationConfig())
    values = l1_values(cfg)
    assert len(values) == 17 and values[0] == pytest.approx(0.01) and values[8] == 1.0 and values[-1] == pytest.approx(100)
    assert cfg.ratios == [2.0 ** e for e in range(-3, 6)]
    quick = resolve_config(ReplicationConfig(quick=True))
    assert (quick.n_features, quick.d, quick.steps) == (128, 64, 6000) and len(l1_values(quick)) == 9
    mine = resolve_config(ReplicationConfig(quick=True, steps=50, ratios=[1.0, 2.0]))
    assert (mine.steps, mine.ratios, mine.n_features) == (50, [1.0, 2.0], 128)


@pytest.mark.parametrize("kw, words", [
    ({"ratios": [0.0]}, "give no dictionary rows"),
    ({"ratios": [1.0, 1.0005]}, "repeat a dictionary size"),
    ({"l1_exponents": []}, "at least one value"),
    ({"l1_exponents": [1.0, 1.0]}, "repeated values"),
    ({"steps": 0}, "--steps must be at least 1"),
    ({"avg_active": 600.0}, "--avg_active"),
    ({"lr_decay_fraction": 1.5}, "--lr_decay_fraction"),
])
def test_bad_settings_are_user_errors(kw, words) -> None:
    with pytest.raises(UserError, match=words):
        resolve_config(ReplicationConfig(**kw))


def test_cli_prints_one_line_error(capsys) -> None:
    from training.replication import run_replication as main
    with pytest.raises(SystemExit) as e:
        run_cli(main, "x", ReplicationConfig, ["--ratios", "0", "--steps", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --ratios") and "\n" not in err


def test_training_flops_by_hand() -> None:
    """Quick preset: 10 * 9 L1 values * 256 * 64 * (32+64+128+256+512) * 6000 steps; full grid: 17 values, d=256,
    sum(d_hidden) = 512 * 63.875 = 32704, 20000 steps."""
    assert training_flops(resolve_config(ReplicationConfig(quick=True))) == 10 * 9 * 256 * 64 * 992 * 6000
    assert training_flops(ReplicationConfig()) == pytest.approx(10 * 17 * 256 * 256 * 32704 * 20000)
    assert training_flops(ReplicationConfig()) == pytest.approx(7.29e15, rel=1e-3)


def test_schedules_by_hand() -> None:
    cfg = ReplicationConfig(steps=100, lr_warmup_fraction=0.1, lr_decay_fraction=0.2, l1_warmup_fraction=0.5)
    assert lr_scale(0, cfg) == pytest.approx(0.1) and lr_scale(9, cfg) == 1.0 and lr_scale(50, cfg) == 1.0
    assert lr_scale(90, cfg) == pytest.approx(0.5) and lr_scale(99, cfg) == pytest.approx(0.05)
    assert l1_scale(0, cfg) == pytest.approx(0.02) and l1_scale(49, cfg) == 1.0
    assert l1_scale(0, ReplicationConfig(l1_warmup_fraction=0.0)) == 1.0


# ----------------------------------------------------------------------------------- scoring


def test_evaluate_ensemble_by_hand() -> None:
    """Encoder rows (1,0), (0,1), (-1,-1), no biases; decoder rows (1,0), (0,1), (0.6,0.8); x = (1,2), (3,-1).

    codes: (1,2,0) and (3,0,0): row 3 never fires (dead 1/3); L0 = (2+1)/2 = 1.5;
    x_hat: (1,2) exact, (3,0) off by (0,-1): MSE = (0 + 1)/2 = 0.5.
    """
    torch.manual_seed(0)
    ens = Ensemble([SparseLinearAutoencoder(2, 3)], {"lr": torch.tensor([1e-3]), "l1": torch.tensor([0.1])})
    with torch.no_grad():
        ens.params["center"].zero_()
        ens.params["encoder_bias"].zero_()
        ens.params["encoder"].copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]]))
        ens.params["decoder"].copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]]))
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    for max_elements in (3, 1 << 20):                       # one row per chunk, then one chunk
        stats = evaluate_ensemble(ens, x, max_elements=max_elements)
        assert stats["dead_fraction"] == [pytest.approx(1 / 3)]
        assert stats["mse"] == [pytest.approx(0.5)]
        assert stats["l0"] == [pytest.approx(1.5)]


def test_small_grid_recovers_the_ground_truth(tmp_path, monkeypatch, capsys) -> None:
    """G=32 features in d=24, 3 active on average, 400 steps: MMCS > 0.95 at L1 10^(-3/4) ~ 0.18, ratio 1."""
    import training.replication as rep
    monkeypatch.setattr(rep, "CPU_FLOPS_PER_CORE", 1.0)      # pretend the CPU is slow: the GPU note must show
    cfg = ReplicationConfig(n_features=32, d=24, avg_active=3.0, ratios=[1.0, 2.0], l1_exponents=[-8.0, -3.0, 8.0],
                            steps=400, lr=1e-2, eval_samples=2048, output_dir=str(tmp_path), device="cpu")
    run = run_replication(cfg, progress=False)
    res = run.results
    assert res.mmcs_true.shape == (2, 3) and res.d_hidden == [32, 64]
    assert res.mmcs_true[0, 1] > 0.95                        # good L1, ratio 1
    assert res.mmcs_true[0, 0] < res.mmcs_true[0, 1]         # L1 0.01: not sparse enough
    assert res.dead_fraction[0, 2] > 0.5                     # L1 100: most rows die
    assert np.isnan(res.mmcs_larger[1]).all() and np.isfinite(res.mmcs_larger[0]).all()
    assert res.alpha_report[1, 2] == pytest.approx(100 * 64 / 24)
    saved = json.loads((run.output_dir / "results.json").read_text())
    assert saved["mmcs_larger"][1] == [None, None, None]
    assert saved["mmcs_true"][0][1] == pytest.approx(res.mmcs_true[0, 1])
    assert run.output_dir.parent == tmp_path
    assert "meant for a GPU" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- findings, outputs

L1S = [0.01, 0.1, 1.0, 10.0]
RATIOS = [0.5, 1.0, 2.0]


def hand_grid() -> dict[str, np.ndarray]:
    """A grid where all three findings hold."""
    return {
        "mmcs_true": np.array([[0.5, 0.7, 0.8, 0.3], [0.6, 0.995, 0.992, 0.3], [0.6, 0.98, 0.999, 0.3]]),
        "dead_fraction": np.array([[0.0, 0.0, 0.1, 0.9], [0.0, 0.0, 0.2, 0.95], [0.0, 0.1, 0.3, 0.99]]),
        "mmcs_larger": np.array([[0.5, 0.8, 0.85, 0.3], [0.6, 0.99, 0.97, 0.3], [np.nan] * 4]),
    }


def verdicts(grid: dict[str, np.ndarray]) -> dict[str, bool]:
    return {f.name: f.holds for f in check_findings(L1S, RATIOS, grid["mmcs_true"], grid["dead_fraction"],
                                                     grid["mmcs_larger"])}


def test_findings_hold_on_a_hand_made_grid() -> None:
    findings = check_findings(L1S, RATIOS, **hand_grid())
    assert [f.name for f in findings] == ["band", "dead", "size"] and all(f.holds for f in findings)
    assert findings[0].detail == "ratio 1: L1 0.1-1 (2 of 4); ratio 2: L1 1 (1 of 4)"
    assert "highest 0.990 at ratio 1, L1 0.1" in findings[2].detail
    assert "lower/upper half of L1 values 0.02/0.57" in findings[1].detail   # (0+0+0+0+0+.1)/6, (.1+.9+.2+.95+.3+.99)/6


def test_each_finding_can_fail() -> None:
    g = hand_grid()
    g["mmcs_true"][2] = 0.98                                 # ratio 2 never above 0.99
    assert verdicts(g) == {"band": False, "dead": True, "size": True}
    g = hand_grid()
    g["dead_fraction"][1, -1] = 0.05                         # ratio 1: rise 0.05 < 0.1
    assert verdicts(g) == {"band": True, "dead": False, "size": True}
    g = hand_grid()
    g["mmcs_larger"][0, 2] = 0.995                           # dictionaries agree best at ratio 1/2
    assert verdicts(g) == {"band": True, "dead": True, "size": False}
    small = check_findings(L1S, [0.25, 0.5], hand_grid()["mmcs_true"][:2], hand_grid()["dead_fraction"][:2],
                           np.array([[0.5] * 4, [np.nan] * 4]))
    assert small[0].holds is False and small[0].detail == "no ratio >= 1 in the grid"


def hand_results() -> GridResults:
    g = hand_grid()
    shape = g["mmcs_true"].shape
    return GridResults(l1_values=L1S, ratios=RATIOS, d_hidden=[16, 32, 64], mmcs_true=g["mmcs_true"],
                       dead_fraction=g["dead_fraction"], mse=np.array([[1.0, 0.5, 0.2, 1.6]] * 3), l0=np.ones(shape),
                       mmcs_larger=g["mmcs_larger"], alpha_report=np.ones(shape), frozen=np.zeros(shape, dtype=bool))


def test_write_outputs_and_summary(tmp_path) -> None:
    cfg = ReplicationConfig(n_features=32, d=16, steps=10)
    res = hand_results()
    res.mmcs_true[2] = 0.98                                  # finding 1 fails: the summary must say so
    findings = check_findings(res.l1_values, res.ratios, res.mmcs_true, res.dead_fraction, res.mmcs_larger)
    write_outputs(tmp_path, cfg, res, findings, {"train_seconds": 12.0})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["dead_fraction.png", "mmcs_larger.png", "mmcs_true.png", "reconstruction.png", "results.json",
                     "summary.md"]
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["mmcs_larger"][2] == [None] * 4 and saved["ratios"] == RATIOS
    assert [f["holds"] for f in saved["findings"]] == [False, True, True]
    summary = (tmp_path / "summary.md").read_text()
    paragraph = summary.split("\n\n")[0]
    assert "\n" not in paragraph
    assert "above 0.99 at: ratio 1 at L1 0.1, 1 (best 0.9950 at ratio 1, L1 0.1)" in paragraph
    assert "does NOT hold (ratio 1: L1 0.1-1 (2 of 4); ratio 2: none)" in paragraph
    assert "in 12 s" in paragraph and "| 1 (32) | 0.600 | **0.995** | **0.992** | 0.300 |" in summary


def test_summary_says_nowhere_when_nothing_recovers() -> None:
    res = hand_results()
    res.mmcs_true[:] = 0.5
    res.frozen[0, 0] = True
    findings = check_findings(res.l1_values, res.ratios, res.mmcs_true, res.dead_fraction, res.mmcs_larger)
    text = summary_paragraph(ReplicationConfig(), res, findings)
    assert "above 0.99 at: nowhere in the grid (best 0.5000 at ratio 1/2, L1 0.01)" in text
    assert "1 dictionaries diverged" in text and "(1) " in text and "does NOT hold" in text


def test_labels_table_and_run_dirs(tmp_path) -> None:
    assert [ratio_label(r) for r in (0.125, 0.5, 1.0, 32.0, 0.3)] == ["1/8", "1/2", "1", "32", "0.3"]
    table = mmcs_table(hand_results()).splitlines()
    assert table[0] == "| ratio (d_hidden) | 0.01 | 0.1 | 1 | 10 |" and len(table) == 5
    a, b = new_run_dir(tmp_path / "toy"), new_run_dir(tmp_path / "toy")
    assert a != b and a.is_dir() and b.is_dir() and a.parent == b.parent
