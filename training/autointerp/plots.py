"""plot_interp.py: the clearness rating counts and the detection-accuracy histogram of one or several
interp.jsonl runs (grouped bars: e.g. dictionary features vs neurons) -> PNG.

Counts are of features with a usable score (unusable replies and never-fired features are left out);
detection accuracies fall in `bins` equal bins over [0, 1] (the last bin includes 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.autointerp.files import read_results
from training.cli import UserError


@dataclass
class PlotInterpConfig:
    """Which interp.jsonl runs to plot, under which names, and where."""

    runs: list[str] = field(default_factory=list)
    """interp.jsonl files of explain_features.py (one or several: grouped bars)."""
    labels: list[str] | None = None
    """A name per run (default: each file's folder name)."""
    bins: int = 10
    """Bins of the detection-accuracy histogram over [0, 1]."""
    output: str | None = None
    """PNG file (default: interp.png next to the first run)."""


@dataclass
class InterpCounts:
    """What the figure shows: per run, the clearness counts (ratings 1..5) and the detection histogram."""

    labels: list[str]
    clearness: np.ndarray        # [runs, 5] features rated 1..5
    detection: np.ndarray        # [runs, bins] features per accuracy bin
    edges: np.ndarray            # [bins + 1]
    n_scored: list[int]          # features with a clearness per run


def count_runs(paths: list[Path], labels: list[str], bins: int) -> InterpCounts:
    """Clearness counts and detection histograms of the runs."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    clear = np.zeros((len(paths), 5), dtype=np.int64)
    det = np.zeros((len(paths), bins), dtype=np.int64)
    n = []
    for r, p in enumerate(paths):
        recs = read_results(p).values()
        c = [int(x["clearness"]) for x in recs if x.get("clearness") is not None]
        clear[r] = np.bincount(np.asarray(c, dtype=np.int64) - 1, minlength=5)[:5] if c else 0
        d = [float(x["detection"]) for x in recs if x.get("detection") is not None]
        det[r] = np.histogram(d, bins=edges)[0] if d else 0
        n.append(len(c))
    return InterpCounts(labels, clear, det, edges, n)


def grouped_bars(ax: Any, counts: np.ndarray, ticks: list[str], labels: list[str]) -> None:
    """One group of bars per tick, one bar per run."""
    runs, groups = counts.shape
    width = 0.8 / runs
    x = np.arange(groups)
    for r in range(runs):
        ax.bar(x - 0.4 + width * (r + 0.5), counts[r], width, label=labels[r])
    ax.set_xticks(x, ticks)
    if runs > 1:
        ax.legend()


def plot_interp(cfg: PlotInterpConfig) -> tuple[Path, InterpCounts, Any]:
    """Draw and save the figure; returns (PNG path, the counts drawn, the matplotlib figure)."""
    if not cfg.runs:
        raise UserError("give --runs: one or more interp.jsonl files of explain_features.py")
    if cfg.bins < 1:
        raise UserError(f"--bins must be at least 1 (got {cfg.bins})")
    paths = [Path(r) for r in cfg.runs]
    labels = cfg.labels or [p.parent.name or p.stem for p in paths]
    if len(labels) != len(paths):
        raise UserError(f"{len(paths)} runs but {len(labels)} labels: give one label per run")
    counts = count_runs(paths, labels, cfg.bins)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    has_detection = bool(counts.detection.sum())
    fig, axes = plt.subplots(1, 2 if has_detection else 1, figsize=(11 if has_detection else 6, 4), squeeze=False)
    ax = axes[0, 0]
    grouped_bars(ax, counts.clearness, ["1", "2", "3", "4", "5"], labels)
    ax.set_xlabel("clearness (1: no pattern ... 5: clear, no exceptions)")
    ax.set_ylabel("features")
    ax.set_title("Clearness ratings (" + ", ".join(f"{lab}: {n:,}" for lab, n in zip(labels, counts.n_scored)) + ")")
    if has_detection:
        ax = axes[0, 1]
        e = counts.edges
        grouped_bars(ax, counts.detection, [f"{e[i]:.1f}-{e[i + 1]:.1f}" for i in range(len(e) - 1)], labels)
        ax.tick_params(axis="x", labelrotation=45)
        ax.set_xlabel("detection balanced accuracy (0.5: chance)")
        ax.set_ylabel("features")
        ax.set_title("Detection scores")
    fig.tight_layout()
    out = Path(cfg.output) if cfg.output else paths[0].parent / "interp.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(out)
    return out, counts, fig
