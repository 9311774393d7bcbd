"""Replication of the toy-model experiment of Sharkey, Braun, Millidge (2022), "Taking features out of
superposition with sparse autoencoders" (interim report, first half).

Ground truth: G unit features in R^d (training/toy.py), ~5 active per sample. A grid of L1 dictionaries
(training/dictionary.py) is trained on fresh batches: one ensemble (training/ensemble.py) per dictionary
ratio d_hidden / G, holding every L1 value; all ensembles see the same batches. On a final batch of fresh
samples the grid is scored (cells: rows = ratios, columns = L1 values):
    mmcs_true      MMCS from the ground truth to the dictionary, (1/G) sum_i max_j cos(f_i, decoder_j)
    dead_fraction  fraction of dictionary rows whose code is 0 on every evaluation sample
    mse            reconstruction loss: mean over samples of ||x - x_hat||_2^2 (summed over d)
    l0             mean number of non-zero codes per sample
    mmcs_larger    MMCS from this dictionary to the next larger one at the same L1,
                   (1/h) sum_j max_k cos(decoder_j, larger_k) (the report's way of choosing the size
                   without ground truth; undefined for the largest ratio)

L1 normalisation. Our loss (training/dictionary.py) is
    mean_batch ||x - x_hat||^2  +  l1 * mean_batch sum_j |c_j|            (squared error summed over d).
The report's code used torch's MSELoss (mean over d as well) and divided the L1 term by the dictionary size:
    mean_batch ||x - x_hat||^2 / d  +  alpha * mean_batch sum_j |c_j| / d_hidden.
Multiplying it by d (which Adam does not notice, bar its epsilon) gives ours with
    l1 = alpha * d / d_hidden,   i.e.   alpha = l1 * d_hidden / d = l1 * ratio * G / d.
So one of our L1 values is a different report alpha in every column of dictionary sizes; results.json
stores both (`l1_values` and the per-cell `alpha_report`). Ours keeps the trade-off per sample fixed as the
dictionary grows: with ~5 active features of magnitude U[0, 1), a feature stops being worth coding when
l1 approaches twice its magnitude, whatever G, d or the ratio, so the default grid
10^(e/4), e = -8..8 (0.01 .. 100) brackets the useful band (~0.1 .. 0.5) with dead dictionaries above it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from training.chunks import atomic_write_json
from training.cli import UserError, config_to_dict
from training.architectures.l1 import L1
from training.ensemble import Ensemble, make_members
from training.metrics import mmcs
from training import sweep_config
from training.toy import ToyConfig, make_features, make_generator, sample_batch

MMCS_THRESHOLD = 0.99
"""A dictionary recovers the ground truth when its MMCS with it is above this (the report's criterion)."""
DEAD_RISE = 0.1
"""Finding 2: the dead fraction at the largest L1 must exceed the one at the smallest by at least this."""
RATIO_SEED_STRIDE = 10_000
"""Member i of ratio index r is initialised with seed + r * stride + i: no two dictionaries share their
initial rows (torch draws a larger matrix's first rows from the same stream as a smaller one's)."""


@dataclass
class ReplicationConfig:
    """The toy data, the grid of dictionaries (L1 values x dictionary ratios) and how they are trained."""

    n_features: int = 512
    """Number G of ground-truth features."""
    d: int = 256
    """Dimension of the activations."""
    avg_active: float = 5.0
    """Expected number of active ground-truth features per sample."""
    decay: float = 0.99
    """Feature i fires with probability proportional to decay**i."""
    correlated: bool = False
    """Correlate which features fire (Gaussian copula, see training/toy.py)."""
    l1_exponents: list[float] = field(default_factory=lambda: [float(e) for e in range(-8, 9)])
    """L1 values are 10**(e/4) for these e, in our normalisation (MSE summed over d; see the module docstring)."""
    ratios: list[float] = field(default_factory=lambda: [2.0 ** e for e in range(-3, 6)])
    """Dictionary sizes as multiples of G: d_hidden = round(ratio * G); one ensemble per ratio."""
    batch_size: int = 256
    """Fresh samples per step, fed to every dictionary."""
    steps: int = 20000
    """Adam steps."""
    lr: float = 1e-3
    """Peak Adam learning rate."""
    lr_warmup_fraction: float = 0.01
    """Fraction of the steps over which the learning rate rises linearly from 0."""
    lr_decay_fraction: float = 0.2
    """Fraction of the steps at the end over which the learning rate decays linearly to 0."""
    l1_warmup_fraction: float = 0.05
    """Fraction of the steps over which the L1 penalty rises linearly from 0."""
    eval_samples: int = 65536
    """Fresh samples of the final evaluation (dead features, reconstruction loss, L0)."""
    seed: int = 0
    """Seed of the toy data (features and stream) and of the initialisations."""
    device: str | None = None
    """cpu, cuda, cuda:N or mps (default: cuda when available)."""
    threads: int = 1
    """CPU threads for torch (0: torch's default); on a shared 2-core machine 2 threads ran 10-100x slower than 1."""
    output_dir: str = "outputs/toy"
    """Each run writes a new timestamped folder in here."""
    quick: bool = False
    """Small preset for a CPU (G=128, d=64, 5 ratios, 9 L1 values, 6000 steps): replaces the settings left at their defaults."""


QUICK_PRESET: dict[str, Any] = {
    "n_features": 128,
    "d": 64,
    "l1_exponents": [-8.0, -6.0, -4.0, -3.0, -2.0, -1.0, 0.0, 4.0, 8.0],
    "ratios": [0.25, 0.5, 1.0, 2.0, 4.0],
    "steps": 6000,
    "lr": 3e-3,
    "eval_samples": 16384,
}
"""--quick: G/d = 2 as in the report, ratios 1/4..4, L1 dense in the useful band, 3x the learning rate
(3000 steps at lr 1e-3 left ratio 1 below 0.99 everywhere; 4000 at 3e-3 reached it at one L1 only)."""


# ----------------------------------------------------------------------------------- configuration

def resolve_config(cfg: ReplicationConfig) -> ReplicationConfig:
    """`cfg` with the quick preset applied to the fields left at their defaults (when cfg.quick), validated."""
    if cfg.quick:
        defaults = ReplicationConfig()
        changes = {k: v for k, v in QUICK_PRESET.items() if getattr(cfg, k) == getattr(defaults, k)}
        cfg = dataclasses.replace(cfg, **changes)
    validate_config(cfg)
    return cfg


def validate_config(cfg: ReplicationConfig) -> None:
    """Raise a one-line UserError for settings that cannot run."""
    for name in ("n_features", "d", "batch_size", "steps", "eval_samples"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(cfg, name)})")
    if not 0 < cfg.avg_active <= cfg.n_features:
        raise UserError(f"--avg_active must be in (0, n_features={cfg.n_features}] (got {cfg.avg_active})")
    if not 0 < cfg.decay:
        raise UserError(f"--decay must be positive (got {cfg.decay})")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be positive (got {cfg.lr})")
    for name in ("lr_warmup_fraction", "lr_decay_fraction", "l1_warmup_fraction"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise UserError(f"--{name} must be in [0, 1] (got {getattr(cfg, name)})")
    if cfg.threads < 0:
        raise UserError(f"--threads must be 0 (torch's default) or more (got {cfg.threads})")
    if not cfg.l1_exponents:
        raise UserError("--l1_exponents needs at least one value")
    if len(set(cfg.l1_exponents)) != len(cfg.l1_exponents):
        raise UserError(f"--l1_exponents has repeated values: {cfg.l1_exponents}")
    if not cfg.ratios:
        raise UserError("--ratios needs at least one value")
    bad = [r for r in cfg.ratios if r <= 0 or round(r * cfg.n_features) < 1]
    if bad:
        raise UserError(f"--ratios {bad} give no dictionary rows with G={cfg.n_features}: use ratios >= {1 / cfg.n_features:g}")
    sizes = [round(r * cfg.n_features) for r in cfg.ratios]
    if len(set(sizes)) != len(sizes):
        raise UserError(f"--ratios {cfg.ratios} repeat a dictionary size ({sizes}): give distinct ratios")


def l1_values(cfg: ReplicationConfig) -> list[float]:
    """The L1 penalties (our normalisation), ascending: 10**(e/4) for e in cfg.l1_exponents."""
    return [10 ** (e / 4) for e in sorted(cfg.l1_exponents)]


def sorted_ratios(cfg: ReplicationConfig) -> list[float]:
    """The dictionary ratios, ascending."""
    return sorted(float(r) for r in cfg.ratios)


def report_alpha(l1: float, d_hidden: int, d: int) -> float:
    """The report's L1 coefficient for our `l1`: alpha = l1 * d_hidden / d (see the module docstring)."""
    return l1 * d_hidden / d


def toy_config(cfg: ReplicationConfig) -> ToyConfig:
    """The ground-truth data settings of a replication config."""
    return ToyConfig(n_features=cfg.n_features, d=cfg.d, avg_active=cfg.avg_active, decay=cfg.decay,
                     correlated=cfg.correlated, seed=cfg.seed)


def lr_scale(step: int, cfg: ReplicationConfig) -> float:
    """Learning-rate multiplier at `step` of `cfg.steps`: the sweep's schedule (training/sweep_config.py)."""
    return sweep_config.lr_scale(step, cfg.steps, cfg)


def l1_scale(step: int, cfg: ReplicationConfig) -> float:
    """L1 multiplier at `step` of `cfg.steps`: the sweep's warm-up (training/sweep_config.py)."""
    return sweep_config.l1_scale(step, cfg.steps, cfg)


CPU_FLOPS_PER_CORE = 5e10
"""Measured on the quick run (one thread of this project's 2-core CPU): ~50 GFLOP/s of training arithmetic."""


def training_flops(cfg: ReplicationConfig) -> float:
    """Matmul FLOPs of training the grid: 10 * N * batch * d * sum(d_hidden) per step (5 batched matmuls of
    2 * N * batch * d_hidden * d each in the fused L1 step), times the steps; N = number of L1 values."""
    total_hidden = sum(round(r * cfg.n_features) for r in cfg.ratios)
    return 10.0 * len(cfg.l1_exponents) * cfg.batch_size * cfg.d * total_hidden * cfg.steps


# ----------------------------------------------------------------------------------- training

def build_ensembles(cfg: ReplicationConfig, device: torch.device) -> list[Ensemble]:
    """One fresh L1 ensemble per ratio (ascending), one member per L1 value (ascending), center at zero."""
    l1s = l1_values(cfg)
    out = []
    for r_index, ratio in enumerate(sorted_ratios(cfg)):
        d_hidden = round(ratio * cfg.n_features)
        members = make_members(L1.name, len(l1s), cfg.d, d_hidden, seed=cfg.seed + r_index * RATIO_SEED_STRIDE,
                               init_norm=1.0, device=device)
        hparams = {"lr": torch.full((len(l1s),), cfg.lr, dtype=torch.float64),
                   L1.sweep_param: torch.tensor(l1s, dtype=torch.float64)}
        out.append(Ensemble(members, hparams, unit_decoder=True))   # the report's recipe: unit decoder rows
    return out


def train_grid(cfg: ReplicationConfig, ensembles: list[Ensemble], features: Tensor,
               generator: torch.Generator, progress: bool = True) -> None:
    """cfg.steps Adam steps of every ensemble on the same fresh batches drawn from `generator`."""
    toy = toy_config(cfg)
    for step in tqdm(range(cfg.steps), desc="training", unit="step", disable=not progress, dynamic_ncols=True):
        x, _ = sample_batch(toy, features, cfg.batch_size, generator)     # [batch, d]
        lr_s, l1_s = lr_scale(step, cfg), l1_scale(step, cfg)
        for ens in ensembles:
            ens.step(x, lr_scale=lr_s, coefficient_scales=dict.fromkeys(ens.arch.scheduled, l1_s))


@torch.no_grad()
def evaluate_ensemble(ens: Ensemble, x: Tensor, max_elements: int = 1 << 26) -> dict[str, list[float]]:
    """Per-member {"dead_fraction", "mse", "l0"} on `x: [n, d]` (definitions in the module docstring).

    Rows of x are processed in chunks so that the [N, chunk, d_hidden] codes hold at most `max_elements`.
    """
    n_models, d_hidden = ens.n_models, ens.d_hidden
    chunk = max(1, max_elements // (n_models * d_hidden))
    fired = torch.zeros(n_models, d_hidden, dtype=torch.bool, device=x.device)
    sq_err = torch.zeros(n_models, dtype=torch.float64, device=x.device)
    active = torch.zeros(n_models, dtype=torch.float64, device=x.device)
    center, decoder = ens.params["center"], ens.params["decoder"]
    for rows in x.split(chunk):
        codes = ens.encode(rows)                                                # [N, b, h]
        on = codes > 0
        fired |= on.any(1)
        active += on.sum((1, 2)).double()
        x_hat = torch.baddbmm(center.unsqueeze(1), codes, decoder)               # [N, b, d]
        sq_err += (x_hat - rows).square().sum((1, 2)).double()
    n = x.shape[0]
    return {"dead_fraction": (~fired).double().mean(-1).tolist(), "mse": (sq_err / n).tolist(),
            "l0": (active / n).tolist()}


@dataclass
class GridResults:
    """Every metric of the grid as a [n_ratios, n_l1] array (rows: ratios ascending, columns: L1 ascending)."""

    l1_values: list[float]
    ratios: list[float]
    d_hidden: list[int]
    mmcs_true: np.ndarray
    dead_fraction: np.ndarray
    mse: np.ndarray
    l0: np.ndarray
    mmcs_larger: np.ndarray
    """NaN in the last row (no larger dictionary)."""
    alpha_report: np.ndarray
    frozen: np.ndarray
    """True where a member's gradient became NaN/inf (as it does with its loss) and training froze it."""


def score_grid(cfg: ReplicationConfig, ensembles: list[Ensemble], features: Tensor, x_eval: Tensor) -> GridResults:
    """Score every dictionary of the trained grid against the ground truth `features: [G, d]` on `x_eval: [n, d]`."""
    l1s, ratios = l1_values(cfg), sorted_ratios(cfg)
    shape = (len(ratios), len(l1s))
    res = GridResults(l1_values=l1s, ratios=ratios, d_hidden=[e.d_hidden for e in ensembles],
                      mmcs_true=np.zeros(shape), dead_fraction=np.zeros(shape), mse=np.zeros(shape),
                      l0=np.zeros(shape), mmcs_larger=np.full(shape, np.nan), alpha_report=np.zeros(shape),
                      frozen=np.zeros(shape, dtype=bool))
    for r, ens in enumerate(ensembles):
        decoder = ens.params["decoder"]                                          # [N, h, d]
        stats = evaluate_ensemble(ens, x_eval)
        res.dead_fraction[r], res.mse[r], res.l0[r] = stats["dead_fraction"], stats["mse"], stats["l0"]
        res.frozen[r] = ens.frozen.cpu().numpy()
        for i, l1 in enumerate(l1s):
            res.mmcs_true[r, i] = mmcs(features, decoder[i])
            res.alpha_report[r, i] = report_alpha(l1, ens.d_hidden, cfg.d)
            if r + 1 < len(ensembles):
                res.mmcs_larger[r, i] = mmcs(decoder[i], ensembles[r + 1].params["decoder"][i])
    return res


# ----------------------------------------------------------------------------------- findings

@dataclass
class Finding:
    """One of the report's claims, checked on the measured grid."""

    name: str
    claim: str
    holds: bool
    detail: str


def _fmt(v: float) -> str:
    """A number in 3 significant digits."""
    return f"{v:.3g}"


def band_by_ratio(l1_values: list[float], ratios: list[float], mmcs_true: np.ndarray,
                  threshold: float = MMCS_THRESHOLD) -> dict[float, list[float]]:
    """{ratio: the L1 values where MMCS with the ground truth is above `threshold`}."""
    return {r: [l1 for l1, v in zip(l1_values, row) if v > threshold] for r, row in zip(ratios, mmcs_true)}


def check_findings(l1_values: list[float], ratios: list[float], mmcs_true: np.ndarray,
                   dead_fraction: np.ndarray, mmcs_larger: np.ndarray,
                   threshold: float = MMCS_THRESHOLD, dead_rise: float = DEAD_RISE) -> list[Finding]:
    """Check the report's three toy-model findings on [n_ratios, n_l1] arrays (ratios, L1 values ascending).

    1 band:  every ratio >= 1 has at least one L1 value with MMCS(ground truth -> dictionary) > threshold.
    2 dead:  in every ratio the dead fraction at the largest L1 is at least `dead_rise` above the one at the
             smallest L1, and over the grid the upper half of the L1 values has more dead rows on average
             than the lower half.
    3 size:  the grid's highest MMCS with the next larger dictionary is at ratio 1 (choosing the size, and
             the L1, without ground truth picks the true number of features).
    """
    mmcs_true, dead_fraction = np.asarray(mmcs_true, float), np.asarray(dead_fraction, float)
    mmcs_larger = np.asarray(mmcs_larger, float)
    findings = []

    band = band_by_ratio(l1_values, ratios, mmcs_true, threshold)
    big = [r for r in ratios if r >= 1]
    parts = []
    for r in big:
        vals = band[r]
        span = _fmt(vals[0]) if len(vals) == 1 else f"{_fmt(min(vals))}-{_fmt(max(vals))}" if vals else ""
        parts.append(f"ratio {_fmt(r)}: " + (f"L1 {span} ({len(vals)} of {len(l1_values)})" if vals else "none"))
    holds = bool(big) and all(band[r] for r in big)
    findings.append(Finding("band", f"at dictionary ratio >= 1 a band of L1 values gives MMCS with the ground truth > {threshold}",
                            holds, "; ".join(parts) if parts else "no ratio >= 1 in the grid"))

    if len(l1_values) < 2:
        findings.append(Finding("dead", "dead features grow at large L1", False, "needs at least 2 L1 values"))
    else:
        rise = dead_fraction[:, -1] - dead_fraction[:, 0]
        half = len(l1_values) // 2
        lower, upper = dead_fraction[:, :half].mean(), dead_fraction[:, len(l1_values) - half:].mean()
        holds = bool((rise >= dead_rise).all() and upper > lower)
        detail = (f"dead fraction from L1 {_fmt(l1_values[0])} to {_fmt(l1_values[-1])}: "
                  + ", ".join(f"ratio {_fmt(r)} {dead_fraction[i, 0]:.2f}->{dead_fraction[i, -1]:.2f}"
                              for i, r in enumerate(ratios))
                  + f"; mean over the lower/upper half of L1 values {lower:.2f}/{upper:.2f}")
        findings.append(Finding("dead", "dead features grow at large L1", holds, detail))

    finite = np.isfinite(mmcs_larger)
    if not finite.any():
        findings.append(Finding("size", "MMCS with the next larger dictionary peaks at the true size (ratio 1)",
                                False, "needs at least 2 ratios"))
    else:
        flat = np.where(finite, mmcs_larger, -np.inf)
        r_best, l_best = np.unravel_index(int(np.argmax(flat)), flat.shape)
        peaks = []
        for j, l1 in enumerate(l1_values):
            col = flat[:, j]
            peaks.append(f"L1 {_fmt(l1)}: {_fmt(ratios[int(np.argmax(col))])}")
        holds = bool(ratios[r_best] == 1.0)
        detail = (f"highest {mmcs_larger[r_best, l_best]:.3f} at ratio {_fmt(ratios[r_best])}, L1 {_fmt(l1_values[l_best])}; "
                  "peak ratio by L1: " + ", ".join(peaks))
        findings.append(Finding("size", "MMCS with the next larger dictionary peaks at the true size (ratio 1)",
                                holds, detail))
    return findings


# ----------------------------------------------------------------------------------- outputs

def ratio_label(r: float) -> str:
    """'1/8' for 0.125, '4' for 4.0, else 3 significant digits."""
    if r < 1 and abs(1 / r - round(1 / r)) < 1e-9:
        return f"1/{round(1 / r)}"
    return f"{r:g}"


def plot_heatmap(matrix: np.ndarray, l1_values: list[float], ratios: list[float], d_hidden: list[int],
                 title: str, path: Path, fmt: str = "{:.3f}", cmap: str = "viridis",
                 vmin: float | None = None, vmax: float | None = None, log_color: bool = False,
                 outline: np.ndarray | None = None, colorbar_label: str = "") -> None:
    """Annotated heatmap (rows: ratios, columns: L1 values) written atomically to `path` as PNG.

    NaN cells are grey and marked "-"; cells where `outline` is True get a white frame.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.patches import Rectangle

    m = np.asarray(matrix, float)
    n_r, n_l = m.shape
    finite = m[np.isfinite(m)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if log_color:
        lo = max(lo, float(finite[finite > 0].min()) if (finite > 0).any() else 1e-6)
        norm = LogNorm(vmin=lo, vmax=max(hi, lo * 1.0001))
    else:
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-9)
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="#d0d0d0")
    fig, ax = plt.subplots(figsize=(1.8 + 0.72 * n_l, 1.4 + 0.48 * n_r))
    plot_m = np.where(np.isfinite(m) & ((m > 0) if log_color else True), m, np.nan)
    im = ax.imshow(np.ma.masked_invalid(plot_m), cmap=colormap, norm=norm, aspect="auto", origin="lower")
    for i in range(n_r):
        for j in range(n_l):
            v = m[i, j]
            if not np.isfinite(v):
                ax.text(j, i, "-", ha="center", va="center", fontsize=7, color="#555555")
                continue
            r, g, b, _ = colormap(norm(v)) if (not log_color or v > 0) else (1, 1, 1, 1)
            color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color=color)
            if outline is not None and outline[i, j]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=1.8))
                ax.add_patch(Rectangle((j - 0.47, i - 0.47), 0.94, 0.94, fill=False, edgecolor="black", linewidth=0.6))
    ax.set_xticks(range(n_l), [f"{v:.3g}" for v in l1_values], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n_r), [f"{ratio_label(r)} ({h})" for r, h in zip(ratios, d_hidden)], fontsize=8)
    ax.set_xlabel("L1 coefficient (ours: MSE summed over d; report's alpha = L1 x d_hidden / d)", fontsize=9)
    ax.set_ylabel("dictionary ratio d_hidden / G (d_hidden)", fontsize=9)
    ax.set_title(title, fontsize=10)
    cbar = fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02)
    cbar.ax.tick_params(labelsize=7)
    if colorbar_label:
        cbar.set_label(colorbar_label, fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=130)
    plt.close(fig)
    os.replace(tmp, path)


HEATMAPS = {
    "mmcs_true.png": ("mmcs_true", "MMCS with the ground-truth features (framed: > 0.99)"),
    "dead_fraction.png": ("dead_fraction", "Fraction of dead dictionary rows (never fired on the evaluation samples)"),
    "reconstruction.png": ("mse", "Reconstruction loss: mean ||x - x_hat||^2 per sample"),
    "mmcs_larger.png": ("mmcs_larger", "MMCS with the next larger dictionary at the same L1"),
}


def write_heatmaps(out: Path, res: GridResults, toy_note: str = "") -> list[str]:
    """The four heatmaps of `res` in `out`; returns their file names."""
    common = dict(l1_values=res.l1_values, ratios=res.ratios, d_hidden=res.d_hidden)
    suffix = f"\n{toy_note}" if toy_note else ""
    plot_heatmap(res.mmcs_true, title=HEATMAPS["mmcs_true.png"][1] + suffix, path=out / "mmcs_true.png",
                 vmin=0.0, vmax=1.0, outline=res.mmcs_true > MMCS_THRESHOLD, colorbar_label="MMCS", **common)
    plot_heatmap(res.dead_fraction, title=HEATMAPS["dead_fraction.png"][1] + suffix, path=out / "dead_fraction.png",
                 fmt="{:.2f}", cmap="magma", vmin=0.0, vmax=1.0, colorbar_label="dead fraction", **common)
    plot_heatmap(res.mse, title=HEATMAPS["reconstruction.png"][1] + suffix, path=out / "reconstruction.png",
                 fmt="{:.2g}", cmap="viridis_r", log_color=True, colorbar_label="MSE (log colour)", **common)
    plot_heatmap(res.mmcs_larger, title=HEATMAPS["mmcs_larger.png"][1] + suffix, path=out / "mmcs_larger.png",
                 vmin=0.0, vmax=1.0, colorbar_label="MMCS", **common)
    return list(HEATMAPS)


def summary_paragraph(cfg: ReplicationConfig, res: GridResults, findings: list[Finding],
                      seconds: float | None = None) -> str:
    """One paragraph: the setting, where MMCS with the ground truth is above 0.99, and each finding's verdict."""
    band = band_by_ratio(res.l1_values, res.ratios, res.mmcs_true)
    cells = [f"ratio {ratio_label(r)} at L1 " + ", ".join(_fmt(v) for v in vals) for r, vals in band.items() if vals]
    where = "; ".join(cells) if cells else "nowhere in the grid"
    if np.isfinite(res.mmcs_true).any():
        b = np.unravel_index(int(np.nanargmax(res.mmcs_true)), res.mmcs_true.shape)
        best = f"best {res.mmcs_true[b]:.4f} at ratio {ratio_label(res.ratios[b[0]])}, L1 {_fmt(res.l1_values[b[1]])}"
    else:
        best = "no finite value"
    n_frozen = int(np.asarray(res.frozen).sum())
    frozen = f" {n_frozen} dictionaries diverged (loss or gradient NaN/inf) and were frozen." if n_frozen else ""
    verdicts = " ".join(f"({i}) {f.claim}: {'holds' if f.holds else 'does NOT hold'} ({f.detail})."
                        for i, f in enumerate(findings, 1))
    timing = f" in {seconds:.0f} s" if seconds is not None else ""
    return (f"Toy data: G={cfg.n_features} ground-truth features in d={cfg.d}, {cfg.avg_active:g} active per sample "
            f"on average (decay {cfg.decay:g}, {'correlated' if cfg.correlated else 'independent'}). "
            f"{len(res.ratios)} dictionary ratios x {len(res.l1_values)} L1 values, {cfg.steps} Adam steps of "
            f"{cfg.batch_size} fresh samples (lr {cfg.lr:g}){timing}. L1 values are in our normalisation "
            f"(MSE summed over d); the report's alpha = L1 x d_hidden / d. "
            f"MMCS with the ground truth is above {MMCS_THRESHOLD} at: {where} "
            f"({best}).{frozen} {verdicts}")


def mmcs_table(res: GridResults) -> str:
    """Markdown table of MMCS with the ground truth, rows: ratios, columns: L1 values (bold: > 0.99)."""
    head = "| ratio (d_hidden) | " + " | ".join(_fmt(v) for v in res.l1_values) + " |"
    rule = "|---|" + "---|" * len(res.l1_values)
    rows = []
    for r, h, row in zip(res.ratios, res.d_hidden, res.mmcs_true):
        cells = [f"**{v:.3f}**" if v > MMCS_THRESHOLD else f"{v:.3f}" for v in row]
        rows.append(f"| {ratio_label(r)} ({h}) | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def _jsonable(a: np.ndarray) -> list:
    """Nested lists with NaN/inf as None (valid JSON)."""
    return [[(None if isinstance(v, float) and not math.isfinite(v) else v) for v in row] for row in a.tolist()]


def results_dict(cfg: ReplicationConfig, res: GridResults, findings: list[Finding], timing: dict[str, Any]) -> dict:
    """Everything behind the plots and the summary, JSON-ready."""
    return {
        "config": config_to_dict(cfg),
        "normalisation": "loss = mean_batch ||x - x_hat||^2 (summed over d) + l1 * mean_batch sum_j |codes_j|; "
                         "the report's alpha = l1 * d_hidden / d",
        "layout": "every matrix is [ratio][l1], ratios and l1_values ascending",
        "l1_values": res.l1_values,
        "ratios": res.ratios,
        "d_hidden": res.d_hidden,
        "mmcs_true": _jsonable(res.mmcs_true),
        "dead_fraction": _jsonable(res.dead_fraction),
        "mse": _jsonable(res.mse),
        "l0": _jsonable(res.l0),
        "mmcs_larger": _jsonable(res.mmcs_larger),
        "alpha_report": _jsonable(res.alpha_report),
        "frozen": res.frozen.tolist(),
        "findings": [dataclasses.asdict(f) for f in findings],
        "timing": timing,
    }


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def new_run_dir(output_dir: str | Path) -> Path:
    """A new folder output_dir/<YYYYmmdd-HHMMSS>[-n] (created)."""
    root = Path(output_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        path = root / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise UserError(f"could not create a new run folder in {root}: too many runs in this second")


def write_outputs(out: Path, cfg: ReplicationConfig, res: GridResults, findings: list[Finding],
                  timing: dict[str, Any]) -> None:
    """results.json, the four heatmaps and summary.md in `out` (each written atomically)."""
    toy_note = (f"G={cfg.n_features}, d={cfg.d}, {cfg.steps} steps x {cfg.batch_size}, lr {cfg.lr:g}"
                + (", correlated" if cfg.correlated else ""))
    write_heatmaps(out, res, toy_note)
    atomic_write_json(out / "results.json", results_dict(cfg, res, findings, timing))
    text = (summary_paragraph(cfg, res, findings, timing.get("train_seconds")) + "\n\n"
            + "MMCS with the ground truth (rows: dictionary ratio, columns: L1 in our normalisation):\n\n"
            + mmcs_table(res) + "\n")
    write_text_atomic(out / "summary.md", text)


# ----------------------------------------------------------------------------------- the run

@dataclass
class ReplicationRun:
    """What a run produced: its folder, grid, findings and timing."""

    output_dir: Path
    config: ReplicationConfig
    results: GridResults
    findings: list[Finding]
    timing: dict[str, Any]

    def __str__(self) -> str:
        lines = [f"wrote {self.output_dir} (train {self.timing['train_seconds']:.0f} s, "
                 f"{self.timing['steps_per_second']:.1f} steps/s on {self.timing['device']}, "
                 f"load {self.timing['load_before'][0]:.1f} -> {self.timing['load_after'][0]:.1f})",
                 "", "MMCS with the ground truth:", mmcs_table(self.results), ""]
        for i, f in enumerate(self.findings, 1):
            lines.append(f"finding {i} [{'HOLDS' if f.holds else 'FAILS'}] {f.claim}: {f.detail}")
        return "\n".join(lines)


def run_replication(cfg: ReplicationConfig, progress: bool = True) -> ReplicationRun:
    """Train and score the grid of `cfg`, write its outputs to a new folder under cfg.output_dir."""
    from training.models import resolve_device

    cfg = resolve_config(cfg)
    device = resolve_device(cfg.device)
    try:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output_dir {cfg.output_dir} cannot be created ({e.strerror}): choose another folder") from None
    flops = training_flops(cfg)
    if device.type == "cpu" and flops / CPU_FLOPS_PER_CORE > 3600:
        print(f"note: this grid is {flops:.2g} FLOP, about {flops / CPU_FLOPS_PER_CORE / 3600:.0f} core-hours on this CPU; "
              "it is meant for a GPU (--device cuda) - use --quick on a CPU", file=sys.stderr)
    old_threads = torch.get_num_threads()
    if device.type == "cpu" and cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        load_before = list(os.getloadavg())
        toy = toy_config(cfg)
        features = make_features(toy).to(device)                                 # [G, d]
        generator = make_generator(toy, device)
        ensembles = build_ensembles(cfg, device)
        t0 = time.perf_counter()
        train_grid(cfg, ensembles, features, generator, progress)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - t0
        x_eval, _ = sample_batch(toy, features, cfg.eval_samples, generator)     # fresh: after the training stream
        t1 = time.perf_counter()
        res = score_grid(cfg, ensembles, features, x_eval)
        eval_seconds = time.perf_counter() - t1
    finally:
        torch.set_num_threads(old_threads)
    findings = check_findings(res.l1_values, res.ratios, res.mmcs_true, res.dead_fraction, res.mmcs_larger)
    timing = {"train_seconds": train_seconds, "eval_seconds": eval_seconds,
              "steps_per_second": cfg.steps / train_seconds, "device": str(device),
              "threads": torch.get_num_threads() if cfg.threads == 0 else cfg.threads,
              "load_before": load_before, "load_after": list(os.getloadavg()), "cpu_count": os.cpu_count(),
              "torch": torch.__version__}
    out = new_run_dir(cfg.output_dir)
    write_outputs(out, cfg, res, findings, timing)
    return ReplicationRun(out, cfg, res, findings, timing)


def load_results(path: str | Path) -> dict[str, Any]:
    """The results.json of a run folder (or the file itself)."""
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    if not p.exists():
        raise UserError(f"{p} does not exist: give a run folder written by replicate_toy_models.py")
    return json.loads(p.read_text())
