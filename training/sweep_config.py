"""Stage 2's flags: `SweepConfig` (the single source of truth for basic_l1_sweep.py's flags, the README's table and
the config saved with a sweep), the member keys and learning rates they define, their validation, and the schedules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from training.architectures import Architecture, get as get_architecture, names as architecture_names
from training.cli import UserError
from training.precision import PRECISIONS

ARCHITECTURES = architecture_names()
"""The --architecture choices: names in the registry (training/architectures/)."""


@dataclass
class SweepConfig:
    """Everything that decides what a sweep trains (saved in sweep.json and checkpoint.json)."""

    dataset_dir: str = "activation_data"
    """Chunks to train on: a hook folder written by generate_test_data.py, or its dataset folder (with several hooks:
    one sweep per hook, see --hooks)."""
    hooks: list[str] | None = None
    """With --dataset_dir a dataset folder: the hooks to train (default: every hook when it has several), one sweep
    per hook in --output_dir/<hook>, all trained in one run on the same rows (each chunk read once)."""
    output_dir: str = "outputs/sweep"
    """Where the sweep, its checkpoints and its metrics go."""
    architecture: str = field(default="l1", metadata={"choices": list(ARCHITECTURES)})
    """l1: ReLU dictionary with an L1 penalty (swept); topk: TopK dictionary (k swept); batchtopk: BatchTopK (k per
    token on average over the batch, swept; one learned threshold at inference); matryoshka: BatchTopK whose nested
    prefixes each reconstruct (k swept); gated: Gated dictionary (Rajamanoharan et al. 2024; its gate's L1 penalty
    swept by the --l1_* flags); jumprelu: JumpReLU dictionary with learned thresholds and an L0 penalty (its
    coefficient swept)."""
    ratio: float = 8.0
    """Dictionary size as a multiple of the activation width: d_hidden = ratio * d_in."""
    l1_value_min: float = -2.0
    """log10 of the smallest L1 penalty."""
    l1_value_max: float = -0.5
    """log10 of the largest L1 penalty."""
    l1_value_n: int = 8
    """Number of L1 penalties, log-spaced between min and max."""
    l1_values: list[float] | None = None
    """Explicit L1 penalties (instead of min/max/n)."""
    k_values: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    """Active features per token of each TopK member (--architecture topk; batchtopk and matryoshka: on average over
    the batch)."""
    matryoshka_prefixes: list[float] = field(default_factory=lambda: [1 / 32, 3 / 32, 7 / 32, 15 / 32, 1.0])
    """Nested prefixes of the dictionary that each reconstruct the input (--architecture matryoshka), as rising
    fractions of the dictionary size ending at 1 (default: dictionary_learning's)."""
    l0_coefficient_values: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2])
    """L0 penalty coefficient (lambda) of each JumpReLU member (--architecture jumprelu); a latent's learned threshold
    settles near sqrt(lambda) at --activation_norm 1 (dropping a code of size t costs about t^2)."""
    jumprelu_bandwidth: float = 0.05
    """Width of the rectangle kernel of the JumpReLU threshold gradients, in pre-activation units at --activation_norm
    1 (--architecture jumprelu; SAELens' default; the paper's 0.001 is meant for runs of ~10^5 steps)."""
    tied: bool = False
    """Tie encoder and decoder (the original paper's variant; L1 architecture only)."""
    batch_size: int = 4096
    """Activation rows per step, fed to every member."""
    adam_lr: float = 1e-3
    """Peak Adam learning rate."""
    lr_values: list[float] | None = None
    """One peak learning rate per member instead of --adam_lr for all, paired in order with the sweep's values
    (--l1_values or the --l1_value_* range, --k_values: as many; the members' values must then differ)."""
    lr_warmup_fraction: float = 0.01
    """Fraction of the steps over which the learning rate rises linearly from 0."""
    lr_decay_fraction: float = 0.0
    """Fraction of the steps at the end over which the learning rate decays linearly to 0 (measured to hurt runs of a
    few thousand steps; try 0.2 for long ones)."""
    l1_warmup_fraction: float = 0.0
    """Fraction of the steps over which the L1 penalty (JumpReLU: the L0 coefficient) rises linearly from 0 (measured
    to hurt short L1 runs)."""
    activation_norm: float = 1.0
    """Train on activations scaled so that E||x||^2 equals this (0: raw activations), so L1 values mean the same
    across models and layers; the saved dictionaries take raw activations (the scale is folded into center and
    encoder bias)."""
    decoder_init_norm: float | None = None
    """Initial norm of the decoder rows, the encoder starting as their transpose (default: 0.1 for l1, 0.5 for topk,
    the best measured, see the README's ablation; batchtopk and matryoshka take topk's; 0.1 for gated, SAELens'
    default)."""
    unit_decoder: bool = False
    """Keep decoder rows at unit norm during training (Bricken et al. 2023) instead of leaving them free with the
    L1 weighted by their norms (Anthropic 2024, SAELens); tied dictionaries always keep unit rows."""
    grad_clip: float = 0.01
    """Scale each member's gradient to global norm at most this before Adam (0: off), on the loss of the scaled
    activations; at --activation_norm 1 the norms measured 0.12 falling to 0.015 on the embedded model, so the
    default normalises every step, which the quality benchmark measured to help (see the README's ablation)."""
    center_init: str = field(default="geometric_median", metadata={"choices": ["geometric_median", "mean", "zero"]})
    """Initial center (pre-encoder bias): geometric median or mean of the first chunk's rows, or zero."""
    dead_window_tokens: int = 1_000_000
    """A feature is dead when it has not fired over this many tokens."""
    resample_every: int = 25000
    """Architectures that resample (l1, gated): resample dead features every this many steps (0: never), until the
    learning-rate decay starts."""
    ghost_grads: bool = False
    """L1 only: revive dead features with ghost grads (the mats_sae_training recipe: a loss term through exp of their
    pre-activations, on while any feature is dead) instead of resampling them."""
    n_repetitions: int = 1
    """Passes over the data."""
    holdout_rows: int = 65536
    """Rows held out from training (the tail of the dataset's last chunk, at most half of it) for the end-of-run
    table; 0 scores the first training rows instead."""
    max_tokens: int | None = None
    """Stop after training on this many tokens (per member)."""
    save_after_every: bool = False
    """Save the sweep and a checkpoint after every chunk instead of every repetition."""
    log_every: int = 100
    """Write per-member metrics every this many steps."""
    seed: int = 0
    """Seed of initialisation, chunk order and resampling."""
    device: str | None = None
    """cpu, cuda or cuda:N (default: cuda when available); not mps, which lacks the float64 the ensemble's Adam
    bookkeeping uses."""
    precision: str | None = field(default=None, metadata={"choices": list(PRECISIONS)})
    """fp32; tf32 matmuls (CUDA); bf16 autocast (matmuls in bf16, parameters and Adam state in fp32); default: tf32 on
    CUDA (about 8x the fp32 matmul rate), fp32 elsewhere."""
    resume: bool = False
    """Continue the run in --output_dir from its last checkpoint (flags must match)."""
    overwrite: bool = False
    """Replace a finished or different sweep in --output_dir."""
    dry_run: bool = False
    """Print the estimated device memory (parameters, optimizer, step workspace, peak) for these flags and the
    device, say whether it fits, and exit without training."""
    wandb_project: str | None = None
    """Also log metrics to this Weights & Biases project (needs wandb installed)."""


# Settings that may change between a run and its resumption (precision too: its default depends on the device).
RESUMABLE_CHANGES = ("resume", "overwrite", "device", "wandb_project", "log_every", "dry_run", "precision")


def l1_values(cfg: SweepConfig) -> list[float]:
    """The L1 penalties of the sweep."""
    if cfg.l1_values:
        bad = [v for v in cfg.l1_values if not (math.isfinite(v) and v >= 0)]
        if bad:
            raise UserError(f"--l1_values must be finite and not negative (got {bad[0]})")
        return [float(v) for v in cfg.l1_values]
    for name in ("l1_value_min", "l1_value_max"):
        if not math.isfinite(getattr(cfg, name)):
            raise UserError(f"--{name} must be a finite number (log10 of the penalty; got {getattr(cfg, name)})")
    if cfg.l1_value_min > cfg.l1_value_max:
        raise UserError(f"--l1_value_min {cfg.l1_value_min} is above --l1_value_max {cfg.l1_value_max} "
                        "(both are log10 of the penalty)")
    if cfg.l1_value_n < 1:
        raise UserError("--l1_value_n must be at least 1")
    if cfg.l1_value_n == 1:
        return [10 ** cfg.l1_value_min]
    step = (cfg.l1_value_max - cfg.l1_value_min) / (cfg.l1_value_n - 1)
    # rounded to 3 significant digits, as every table prints them, so that saes[1.39] finds the member
    return [float(f"{10 ** (cfg.l1_value_min + i * step):.3g}") for i in range(cfg.l1_value_n)]


def k_values(cfg: SweepConfig) -> list[int]:
    """The k of each member, from --k_values (each at least 1)."""
    bad = [k for k in cfg.k_values if k < 1]
    if not cfg.k_values or bad:
        raise UserError(f"--k_values must be at least 1 each (got {bad[0] if bad else 'none'})")
    return [int(k) for k in cfg.k_values]


def l0_coefficient_values(cfg: SweepConfig) -> list[float]:
    """The L0 coefficient of each JumpReLU member, from --l0_coefficient_values (each finite and at least 0)."""
    bad = [v for v in cfg.l0_coefficient_values if not (math.isfinite(v) and v >= 0)]
    if not cfg.l0_coefficient_values or bad:
        raise UserError(f"--l0_coefficient_values must be finite and not negative (got {bad[0] if bad else 'none'})")
    return [float(v) for v in cfg.l0_coefficient_values]


SWEEP_VALUES: dict[str, Callable[[SweepConfig], list]] = {"l1": l1_values, "k": k_values,
                                                          "l0_coefficient": l0_coefficient_values}
"""The flags that list each sweep parameter's member values (the CLI side of `Architecture.sweep_param`)."""


def architecture(cfg: SweepConfig) -> Architecture:
    """The declaration of --architecture (a one-line UserError for an unknown one)."""
    if cfg.architecture not in ARCHITECTURES:
        raise UserError(f"unknown --architecture {cfg.architecture!r}: choose one of {', '.join(ARCHITECTURES)}")
    return get_architecture(cfg.architecture)


def member_keys(cfg: SweepConfig) -> list[float] | list[int]:
    """What each member is keyed by: its value of the architecture's sweep parameter (L1 penalty, k, ...)."""
    return SWEEP_VALUES[architecture(cfg).sweep_param](cfg)


def member_lrs(cfg: SweepConfig) -> list[float]:
    """Each member's peak learning rate: --lr_values zipped with the member keys (which must then be distinct, as
    sweep.json keys members by them), else --adam_lr for every member."""
    keys = member_keys(cfg)
    if cfg.lr_values is None:
        return [cfg.adam_lr] * len(keys)
    flag = f"--{architecture(cfg).sweep_param}_values"
    if len(cfg.lr_values) != len(keys):
        n = len(cfg.lr_values)
        raise UserError(f"--lr_values gives {n} learning rate{'' if n == 1 else 's'} for {len(keys)} members: give "
                        f"one per value of {flag}, in order")
    bad = [v for v in cfg.lr_values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise UserError(f"--lr_values must be positive (got {bad[0]})")
    if len(set(keys)) != len(keys):
        raise UserError(f"--lr_values needs distinct {flag} (members are keyed by them; got {keys}): to try several "
                        "learning rates at one value, nudge the repeats (e.g. 0.1 0.1001) or run one sweep per rate")
    return [float(v) for v in cfg.lr_values]


POSITIVE = ("ratio", "adam_lr")
"""Float flags that must be finite and above 0."""
NON_NEGATIVE = ("activation_norm", "grad_clip")
"""Float flags that must be finite and at least 0 (0 switches them off)."""
FRACTIONS = ("lr_warmup_fraction", "lr_decay_fraction", "l1_warmup_fraction")
"""Float flags that must lie in [0, 1]."""
AT_LEAST_ONE = ("batch_size", "n_repetitions", "log_every", "dead_window_tokens", "l1_value_n")
"""Integer flags that must be at least 1."""
AT_LEAST_ZERO = ("resample_every", "holdout_rows")
"""Integer flags that must be at least 0."""


def _check_number(name: str, value: float, ok: bool, what: str) -> None:
    """A one-line UserError naming flag `name` and its `value` unless `ok`."""
    if not ok:
        raise UserError(f"--{name} must be {what} (got {value})")


def validate_flags(cfg: SweepConfig) -> None:
    """Check every numeric and choice flag of `cfg` on its own (no file is touched): a one-line UserError if bad."""
    for name in POSITIVE:
        v = getattr(cfg, name)
        _check_number(name, v, math.isfinite(v) and v > 0, "positive")
    for name in NON_NEGATIVE:
        v = getattr(cfg, name)
        _check_number(name, v, math.isfinite(v) and v >= 0, "0 (off) or positive")
    for name in FRACTIONS:
        v = getattr(cfg, name)
        _check_number(name, v, 0 <= v <= 1, "a fraction between 0 and 1")
    for name in AT_LEAST_ONE:
        _check_number(name, getattr(cfg, name), getattr(cfg, name) >= 1, "at least 1")
    for name in AT_LEAST_ZERO:
        _check_number(name, getattr(cfg, name), getattr(cfg, name) >= 0, "0 or more")
    if cfg.max_tokens is not None:
        _check_number("max_tokens", cfg.max_tokens, cfg.max_tokens >= 1, "at least 1")
    if cfg.decoder_init_norm is not None:
        v = cfg.decoder_init_norm
        _check_number("decoder_init_norm", v, math.isfinite(v) and v > 0, "positive")
    arch = architecture(cfg)
    if cfg.tied and not arch.tieable:
        tieable = [a for a in ARCHITECTURES if get_architecture(a).tieable]
        raise UserError(f"--tied applies to the {', '.join(tieable)} architecture only")
    if dead_policy(cfg) not in (arch.dead_policy, *arch.dead_policies):
        able = [a for a in ARCHITECTURES if "ghost_grads" in get_architecture(a).dead_policies]
        raise UserError(f"--ghost_grads applies to the {', '.join(able)} architecture only")
    member_lrs(cfg)


def dead_policy(cfg: SweepConfig) -> str:
    """How the sweep revives dead latents: "ghost_grads" with --ghost_grads, else the architecture's own policy."""
    return "ghost_grads" if cfg.ghost_grads else architecture(cfg).dead_policy


def validate_paths(cfg: SweepConfig) -> None:
    """Check that --output_dir can be a folder and --dataset_dir exists (nothing is created): a one-line UserError."""
    out = Path(cfg.output_dir)
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--output_dir {out}: {parent} is a file, not a folder: choose another --output_dir")
    if not Path(cfg.dataset_dir).exists():
        raise UserError(f"--dataset_dir {cfg.dataset_dir} does not exist: run generate_test_data.py first")


def validate_config(cfg: SweepConfig) -> None:
    """Every check of `cfg` that needs no data, before anything is written: a one-line UserError at the first bad
    flag."""
    validate_flags(cfg)
    validate_paths(cfg)


def lr_scale(step: int, total: int, cfg: SweepConfig) -> float:
    """Learning-rate multiplier: linear warm-up, constant, linear decay to 0 over the last fraction (`cfg`: any config
    with lr_warmup_fraction and lr_decay_fraction; the toy replication's too)."""
    warm = max(1, round(cfg.lr_warmup_fraction * total))
    decay_start = total - round(cfg.lr_decay_fraction * total)
    scale = min(1.0, (step + 1) / warm)
    if step >= decay_start:
        scale = min(scale, (total - step) / max(1, total - decay_start))
    return scale


def l1_scale(step: int, total: int, cfg: SweepConfig) -> float:
    """L1 multiplier: linear warm-up from 0 over the first fraction of the steps (`cfg`: any config with
    l1_warmup_fraction)."""
    warm = round(cfg.l1_warmup_fraction * total)
    return 1.0 if warm == 0 else min(1.0, (step + 1) / warm)


def check_dictionary_size(cfg: SweepConfig, d_in: int) -> None:
    """A one-line UserError when a member's key does not fit the dictionary size for activations of width `d_in`
    (e.g. a TopK k above d_hidden)."""
    d_hidden = max(1, round(cfg.ratio * d_in))
    arch = architecture(cfg)
    problem = arch.check_keys(member_keys(cfg), d_hidden)
    if problem:
        raise UserError(problem)
    try:                                                 # the architecture's options, checked by its member state
        arch.member_state(torch.tensor(member_keys(cfg)), torch.empty(1, d_hidden, 1, device="meta"),
                          **{n: getattr(cfg, n) for n in arch.options})
    except ValueError as e:
        raise UserError(f"--{' / --'.join(arch.options)}: {e}") from None
