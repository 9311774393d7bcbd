"""Stage 2: train an ensemble of sparse autoencoders (one per L1 penalty or k) on activation chunks.

Output folder:
    sweep.safetensors   stacked weights of every member: center [n, d_in], encoder [n, d_hidden, d_in],
                        encoder_bias [n, d_hidden], decoder [n, d_hidden, d_in]
    sweep.json          config, architecture, per-member hyperparameters and final metrics, source manifest, and
                        the SHA-256 of sweep.safetensors
    checkpoint.json + checkpoint-<generation>.safetensors   full training state (optimizer too) for --resume,
                        saved as one unit (see training/sweep_files.py)
    metrics.jsonl       one line per member every --log_every steps
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence, TypeVar

import torch
from tqdm.auto import tqdm

import training
from training.chunks import MANIFEST, HookData, open_hook, read_manifest
from training.cli import UserError, config_diff, config_from_dict, config_to_dict
from training.architectures import Architecture, get as get_architecture, names as architecture_names
from training.dead_latents import LOSS_POLICIES
from training.dictionary import unit_norm_params
from training.distributed import (Shard, batch_share, data_parallel_reduce, env_world, join_members, member_slices,
                                  session, slice_members)
from training.locks import folder_lock
from training.memory import (available_bytes, combined_estimate, estimate_sweep, eval_block_rows, format_bytes,
                             memory_report, param_bytes)
from training.models import resolve_device
from training.staging import PinnedStaging, staging_for
from training.sweep_files import (CHECKPOINT_JSON, METRICS, SWEEP_JSON, SWEEP_WEIGHTS, checkpoint_files, clear_sweep,
                                  read_checkpoint, remove_temporaries, save_checkpoint, write_sweep_json,
                                  write_sweep_weights)

ARCHITECTURES = architecture_names()
"""The --architecture choices: names in the registry (training/architectures/)."""
PRECISIONS = ("fp32", "tf32", "bf16")
T = TypeVar("T")


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
    """Learning-rate multiplier: linear warm-up, constant, linear decay to 0 over the last fraction."""
    warm = max(1, round(cfg.lr_warmup_fraction * total))
    decay_start = total - round(cfg.lr_decay_fraction * total)
    scale = min(1.0, (step + 1) / warm)
    if step >= decay_start:
        scale = min(scale, (total - step) / max(1, total - decay_start))
    return scale


def l1_scale(step: int, total: int, cfg: SweepConfig) -> float:
    """L1 multiplier: linear warm-up from 0 over the first fraction of the steps."""
    warm = round(cfg.l1_warmup_fraction * total)
    return 1.0 if warm == 0 else min(1.0, (step + 1) / warm)


# ------------------------------------------------------------------------------------- data

def open_dataset(cfg: SweepConfig) -> HookData:
    """The hook whose chunks the sweep trains on; bad folders are one-line errors."""
    path = Path(cfg.dataset_dir)
    if not path.exists():
        raise UserError(f"--dataset_dir {path} does not exist: run generate_test_data.py first")
    if path.is_dir() and not any(path.iterdir()):
        raise UserError(f"--dataset_dir {path} is empty: run generate_test_data.py first")
    data = open_hook(path)
    if cfg.batch_size > max(c.rows for c in data.chunks):
        raise UserError(f"--batch_size {cfg.batch_size} is larger than a chunk ({max(c.rows for c in data.chunks)} "
                        "rows): lower it or generate larger chunks")
    return data


def warn_if_unfinished(data: HookData) -> None:
    """One warning line (stderr) when the dataset's manifest says Stage 1 has not finished writing it."""
    if not data.manifest.get("finished", True):
        print(f"warning: {data.root} is not finished (generate_test_data.py still running or interrupted): training "
              f"on its {len(data.chunks)} complete chunks only; a later --resume on more chunks will be refused",
              file=sys.stderr)


def dataset_digest(data: HookData) -> str:
    """SHA-256 over the name, rows and checksum of every chunk: what the run's schedule and chunk order depend on."""
    listing = "\n".join(f"{c.path.name} {c.rows} {c.sha256}" for c in data.chunks)
    return hashlib.sha256(listing.encode()).hexdigest()


def check_same_dataset(progress: Progress, data: HookData) -> None:
    """A one-line UserError when a resumed run's dataset differs from the one it started on (older checkpoints,
    which did not record it, pass)."""
    if not progress.dataset_digest or progress.dataset_digest == dataset_digest(data):
        return
    now, then = len(data.chunks), progress.dataset_chunks
    change = f"{now} chunks now, {then} then" if now != then else f"same {now} chunks, other checksums"
    raise UserError(f"--resume: the dataset {data.root / data.hook} changed since this run started ({change}) and "
                    "the run's schedule was computed for the old one: restore it, or start over with --overwrite")


def chunk_order(n_chunks: int, seed: int, repetition: int) -> list[int]:
    """The order chunks are read in during one repetition (a seeded shuffle)."""
    g = torch.Generator().manual_seed(seed * 7919 + repetition)
    return torch.randperm(n_chunks, generator=g).tolist()


def holdout_size(data: HookData, requested: int) -> int:
    """Rows held out from training: the last `requested` rows of the last chunk, at most half of it."""
    if requested < 0:
        raise UserError(f"--holdout_rows must not be negative (got {requested})")
    return min(requested, data.chunks[-1].rows // 2)


def all_finite(acts: torch.Tensor) -> bool:
    """Whether `acts` holds no NaN or inf, from its min and max (NaN propagates through both; exact, no overflow): one
    pass with no copy, measured at 15 ms (float32) and 5 ms (float16, bfloat16) for 131072 x 128 rows on one core,
    against 110-150 ms for `isfinite().all()` and about 39 s of CPU training per such chunk at the default flags."""
    return acts.numel() == 0 or all(bool(torch.isfinite(v)) for v in torch.aminmax(acts))


def check_finite(acts: torch.Tensor, data: HookData, index: int) -> None:
    """A one-line UserError naming chunk `index` when its rows `acts` hold a NaN or inf (training on them would
    freeze every member)."""
    if all_finite(acts):
        return
    raw = data.load(index)["activations"]
    row = int((~torch.isfinite(raw)).any(1).nonzero()[0, 0])
    raise UserError(f"chunk {data.chunks[index].path} holds NaN or inf activations (first at row {row}): regenerate "
                    "the dataset with generate_test_data.py (or fix the source of imported activations)")


def heldout_rows(data: HookData, held: int) -> torch.Tensor:
    """The held-out rows [held, d_in] (stored dtype): the tail of the last chunk, in stored order, checked finite."""
    acts = data.load(len(data.chunks) - 1, verify=True)["activations"]
    check_finite(acts[len(acts) - held:], data, len(data.chunks) - 1)
    return acts[len(acts) - held:]


def load_chunk(data: HookData, index: int, seed: int, repetition: int, held: int = 0,
               staging: PinnedStaging | None = None, slot: int = 0, verify: bool = True) -> torch.Tensor:
    """Chunk `index` verified against its checksum (unless the caller checks it, `verify=False`), less the held-out
    tail if it is the last chunk, rows shuffled for this repetition and checked finite (every read: see `all_finite`
    for the cost): [n, d_in] (stored dtype); gathered into buffer `slot` of `staging` when given."""
    acts = data.load(index, verify=verify)["activations"]
    if index == len(data.chunks) - 1 and held:
        acts = acts[:len(acts) - held]
    g = torch.Generator().manual_seed(seed * 104729 + repetition * 1009 + index)
    perm = torch.randperm(len(acts), generator=g)
    rows = acts[perm] if staging is None else staging.gather(slot, acts, perm)
    check_finite(rows, data, index)
    return rows


def verify_threads() -> int:
    """Threads that check the checksums of upcoming chunks while the prefetch thread gathers (SHA-256 runs at about
    1.5 GB/s per core with SHA-NI, 0.5 GB/s without): half the cores, 1 to 8."""
    return min(8, max(1, (os.cpu_count() or 1) // 2))


def iter_chunks(data: HookData, seed: int, repetition: int, start: int, held: int = 0,
                staging: PinnedStaging | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(position in this repetition's order, chunk rows) from position `start` on; the next chunk is read
    in a background thread while the caller trains on this one, so at most two chunks are in memory (with
    `staging`, in its buffers, taken in turn: a chunk's buffer is refilled once the caller has moved on from it and
    the device has finished copying out of it). A chunk's checksum is checked (once per run) by other threads at
    the same time as its rows are gathered, and the chunk is handed over only once it has passed."""
    order = chunk_order(len(data.chunks), seed, repetition)
    slots = staging.slots if staging is not None else 1
    ahead = verify_threads()

    def submit(pos: int) -> Future | None:
        for later in range(pos, min(pos + ahead, len(order))):  # checksums of this and the next chunks, in parallel
            if order[later] not in data.verified and later not in checking:
                checking[later] = checks.submit(data.verify, order[later])
        return (pool.submit(load_chunk, data, order[pos], seed, repetition, held, staging, pos % slots, False)
                if pos < len(order) else None)

    checking: dict[int, Future] = {}
    with (ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool,
          ThreadPoolExecutor(ahead, thread_name_prefix="verify") as checks):
        pending = submit(start)
        for pos in range(start, len(order)):
            assert pending is not None
            if pos in checking:
                checking.pop(pos).result()  # a checksum mismatch is reported before anything the rows would show
            chunk = pending.result()
            pending = submit(pos + 1)
            yield pos, chunk
            del chunk
            if staging is not None:
                staging.release(pos % slots)


def total_steps(cfg: SweepConfig, data: HookData, held: int) -> int:
    """Training steps of the whole run (a UserError when the flags leave no full batch)."""
    total = steps_per_repetition(data, cfg.batch_size, held) * cfg.n_repetitions
    if cfg.max_tokens is not None:
        total = min(total, cfg.max_tokens // cfg.batch_size)
    if total < 1:
        raise UserError(f"no full batch of {cfg.batch_size} rows to train on: lower --batch_size or raise --max_tokens")
    return total


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


def steps_per_repetition(data: HookData, batch_size: int, held: int = 0) -> int:
    """Full batches in one pass over the training rows (the remainder of each chunk, under one batch, is left out)."""
    rows = [c.rows for c in data.chunks]
    rows[-1] -= held
    return sum(r // batch_size for r in rows)


# ------------------------------------------------------------------------------------- output

EVAL_ROWS = 65536
AUX_REFRESH_STEPS = 100
"""Dead policies that are a loss term (TopK's aux-K, L1's --ghost_grads): steps between refreshes of whether the term
is on (a host sync each), whatever --log_every is."""


@dataclass
class Progress:
    """Where training stands: the next chunk to read and the steps/tokens done."""

    repetition: int = 0
    chunk_position: int = 0
    step: int = 0
    tokens: int = 0
    input_scale: float = 1.0
    eval_rows: str = ""
    dataset_chunks: int = 0
    """Chunks of the dataset when the run started (0: recorded by an older version)."""
    dataset_digest: str = ""
    """`dataset_digest` of the dataset when the run started ("": recorded by an older version)."""


def prepare_output(cfg: SweepConfig, out: Path) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor] | None]:
    """Checkpoint JSON and tensors to resume from (None, None for a fresh run); refuses to clobber."""
    ckpt = out / CHECKPOINT_JSON
    if cfg.resume:
        if not ckpt.exists():
            raise UserError(f"--resume: no {CHECKPOINT_JSON} in {out}: start the run without --resume")
        remove_temporaries(out)
        saved, state = read_checkpoint(out, {f.name for f in dataclasses.fields(Progress)})
        diff = config_diff(config_from_dict(SweepConfig, saved["config"]), cfg, ignore=RESUMABLE_CHANGES)
        if diff:
            detail = "; ".join(f"--{k}: run has {a!r}, asked {b!r}" for k, (a, b) in sorted(diff.items()))
            raise UserError(f"--resume with different flags ({detail}): resume with the run's flags")
        return saved, state
    if (ckpt.exists() or (out / SWEEP_JSON).exists()) and not cfg.overwrite:
        raise UserError(f"{out} already holds a sweep: pass --resume to continue it, --overwrite to replace it, "
                        "or another --output_dir")
    clear_sweep(out, derived=cfg.overwrite)
    return None, None


def sweep_metadata(cfg: SweepConfig, ens: Any, data: HookData, progress: Progress,
                   metrics: list[dict[str, float]] | None, finished: bool, weights_sha256: str,
                   slices: list[list[int]] | None = None) -> dict[str, Any]:
    """The contents of sweep.json (`weights_sha256`: that of sweep.safetensors; `slices`: the global members each
    rank trained, recorded with the world size; default one process)."""
    keys = member_keys(cfg)
    name = architecture(cfg).sweep_param
    lrs = member_lrs(cfg)
    members = [{name: key, "lr": lrs[i], "frozen": bool(ens.frozen[i]),
                **({} if metrics is None else metrics[i])} for i, key in enumerate(keys)]
    return {
        "toolkit_version": training.__version__,
        "architecture": cfg.architecture,
        "tied": cfg.tied,
        "d_in": ens.d_in,
        "d_hidden": ens.d_hidden,
        "hook": data.hook,
        "dataset_dir": str(data.root.resolve() / data.hook),
        "keys": keys,
        "members": members,
        "progress": vars(progress),
        "finished": finished,
        "config": config_to_dict(cfg),
        "source_manifest": data.manifest,
        "weights_sha256": weights_sha256,
        "world_size": len(slices) if slices else 1,
        "rank_members": slices if slices else [list(range(len(keys)))],
    }


def save_sweep(out: Path, cfg: SweepConfig, ens: Any, data: HookData, progress: Progress,
               metrics: list[dict[str, float]] | None = None, finished: bool = False,
               slices: list[list[int]] | None = None) -> str:
    """Write the full training state (one checkpoint unit), then the dictionaries (sweep.*); return the SHA-256
    of sweep.safetensors.

    Every tensor is copied straight to the host, one at a time (no device-side copy). Nothing random is
    stored: every random stream derives from (seed, step, member), so a checkpoint resumes on any device.
    """
    save_checkpoint(out, config_to_dict(cfg), dict(vars(progress)), ens.state_dict(device="cpu"))
    weights = raw_space_params(ens.params, progress.input_scale, ens.arch)
    digest = write_sweep_weights(out, weights)
    del weights
    write_sweep_json(out, sweep_metadata(cfg, ens, data, progress, metrics, finished, digest, slices))
    return digest


SAVE_SLACK_BYTES = 1 << 20
"""Room allowed per save beyond the weights: JSON files, safetensors headers."""


def save_bytes(cfg: SweepConfig, n_models: int, d_in: int) -> int:
    """Bytes one save writes: sweep.safetensors (untied-size parameters, an upper bound) and checkpoint.safetensors
    (parameters, two Adam moments, int64 dead-latent counters [N, h]), plus SAVE_SLACK_BYTES."""
    d_hidden = max(1, round(cfg.ratio * d_in))
    return (param_bytes(n_models, d_in, d_hidden) + 3 * param_bytes(n_models, d_in, d_hidden, cfg.tied)
            + 8 * n_models * d_hidden + SAVE_SLACK_BYTES)


def existing_folder(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists."""
    return next(p for p in (path, *path.parents) if p.exists())


def writable(folder: Path) -> bool:
    """Whether files can be created in `folder`: not on a read-only mount, and write permission for this user."""
    return not os.statvfs(folder).f_flag & os.ST_RDONLY and os.access(folder, os.W_OK | os.X_OK)


def check_output_space(cfg: SweepConfig, n_models: int, d_in: int) -> None:
    """One-line UserErrors, before anything is written, when --output_dir (or the folder it would be made in) is
    read-only or its disk lacks room for two saves side by side (a save writes the new checkpoint beside the old
    one); the sweep's files already there count as room, since they are replaced."""
    out = Path(cfg.output_dir)
    where = existing_folder(out)
    if not writable(where):
        raise UserError(f"--output_dir {out}: {where} is read-only: make it writable or choose another --output_dir")
    held = sum(f.stat().st_size for f in [out / SWEEP_WEIGHTS, *checkpoint_files(out).values()] if f.is_file())
    need, free = 2 * save_bytes(cfg, n_models, d_in) - held, shutil.disk_usage(where).free
    if free < need:
        raise UserError(f"--output_dir {out}: the sweep needs {format_bytes(need).strip()} free on the disk of {where} "
                        f"(a save writes the new checkpoint beside the old one) but {format_bytes(free).strip()} is "
                        "free: free space or choose another --output_dir")


DISK_ERRNOS = {errno.ENOSPC: "no space left on its disk", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}
"""OSErrors while writing the output that are the disk's or the folder's fault, not the program's."""


def in_folder(path: Path, folder: Path) -> bool:
    """Whether `path` lies in `folder` (or is it)."""
    return path.resolve().is_relative_to(folder.resolve())


def _reports_disk_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Wrap `run_sweep` (of one config or a list, one per hook) so that a disk-full or read-only error while it
    writes into an --output_dir is one line (its stale .tmp files removed), not a traceback; other OSErrors (e.g.
    reading a chunk) pass through."""
    @functools.wraps(fn)
    def wrapper(cfg: SweepConfig | list[SweepConfig], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(cfg, *args, **kwargs)
        except OSError as e:
            outs = [Path(c.output_dir) for c in (cfg if isinstance(cfg, list) else [cfg])]
            hit = [o for o in outs if e.filename is None or in_folder(Path(e.filename), o)]
            if e.errno not in DISK_ERRNOS or not hit:
                raise
            out = hit[0]
            for tmp in out.glob("*.tmp") if out.is_dir() else ():
                tmp.unlink(missing_ok=True)
            raise UserError(f"writing {e.filename or out}: {DISK_ERRNOS[e.errno]}: free space (or fix the folder) and "
                            "rerun with --resume to continue from the last checkpoint (without it if none was saved)"
                            ) from None
    return wrapper


def input_scale(acts: torch.Tensor, target: float) -> float:
    """The factor s with E||s x||^2 = target over `acts` [n, d_in] (1 when target is 0: no normalisation)."""
    if target < 0:
        raise UserError(f"--activation_norm must be positive, or 0 for raw activations (got {target})")
    if target == 0:
        return 1.0
    mean_sq = acts.float().square().sum(1).mean().item()
    if not math.isfinite(mean_sq) or mean_sq <= 0:
        raise UserError("the activations are all zero or not finite: regenerate the dataset")
    return math.sqrt(target / mean_sq)


def raw_space_params(params: dict[str, torch.Tensor], scale: float, arch: Architecture | None = None
                     ) -> dict[str, torch.Tensor]:
    """Weights with unit decoder rows that act on raw activations x, for a dictionary of architecture `arch` (default
    L1's parameter set) trained on s * x.

    First the decoder norms are folded into encoder and the code biases (`unit_norm_params`, exact); then with the
    params in activation units (`Architecture.scaled_params`: center, encoder bias, ...) divided by s the codes come
    out as codes(s x) / s and the reconstruction as x_hat(s x) / s, while encoder and decoder rows are unchanged;
    TopK picks the same features.
    """
    scaled = arch.scaled_params if arch else ("center", "encoder_bias")
    code_biases = arch.code_biases if arch else ("encoder_bias",)
    host = {n: t.detach().cpu() for n, t in params.items()}
    out = unit_norm_params(host, code_biases)
    for name in scaled:                             # params in activation units (the architecture's scaled_params)
        out[name] /= scale
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after `step` (they belong to the part of a killed run that is redone), and a line
    that a kill cut short."""
    if path.exists():
        whole = path.read_text(errors="replace").split("\n")[:-1]      # the text after the last newline is cut short
        lines = [ln for ln in whole if (s := _metric_step(ln)) is not None and s <= step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in lines))
        tmp.replace(path)


# ------------------------------------------------------------------------------------- training

@dataclass
class SweepResult:
    """What a sweep run produced."""

    output_dir: Path
    keys: list[float] | list[int]
    metrics: list[dict[str, float]]
    progress: Progress
    seconds: float
    architecture: str
    tokens_this_run: int

    def table(self) -> str:
        """The end-of-run summary: one row per member."""
        name = get_architecture(self.architecture).sweep_param
        rows = [f"{name:>10} {'L0':>8} {'expl. var':>10} {'MSE':>10} {'dead %':>7} {'status':>8}"]
        for key, m in zip(self.keys, self.metrics):
            status = "frozen" if m["frozen"] else "diverged" if m.get("diverged") else ""
            rows.append(f"{key:>10.3g} {m['l0']:>8.1f} {m['explained_variance']:>10.4f} {m['mse']:>10.4g} "
                        f"{100 * m['dead_fraction']:>7.1f} {status:>8}")
        return "\n".join(rows)

    def __str__(self) -> str:
        rate = self.tokens_this_run / self.seconds if self.seconds > 0 else 0.0
        n = len(self.keys)
        return (f"trained {n} dictionaries for {self.progress.step:,} steps ({self.progress.tokens:,} tokens each; "
                f"{rate:,.0f} tokens/s per member, {n * rate:,.0f} tokens/s in all) into {self.output_dir}\n"
                f"scored on {self.progress.eval_rows}:\n{self.table()}{diverged_note(self.keys, self.metrics)}")


DIVERGED_EXPLAINED_VARIANCE = -1.0
"""A member that did not freeze but ends below this explained variance has diverged (see `flag_diverged`)."""


def flag_diverged(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mark each member's metrics with "diverged": not frozen, yet its final explained variance is not finite or
    below DIVERGED_EXPLAINED_VARIANCE (-1: its reconstruction error exceeds twice the inputs' variance, far worse
    than reconstructing every row as the mean, which any trained dictionary beats; a loss that exploded while
    staying finite, e.g. from too high an --adam_lr, ends there)."""
    for m in metrics:
        ev = m["explained_variance"]
        m["diverged"] = not m["frozen"] and not (math.isfinite(ev) and ev >= DIVERGED_EXPLAINED_VARIANCE)
    return metrics


def diverged_note(keys: list, metrics: list[dict[str, Any]]) -> str:
    """The summary's warning line about diverged members ('' if none)."""
    bad = [k for k, m in zip(keys, metrics) if m.get("diverged")]
    return (f"\nwarning: members {bad} diverged (explained variance below {DIVERGED_EXPLAINED_VARIANCE:g}: the loss "
            "exploded while staying finite): lower --adam_lr" if bad else "")


def training_device(name: str | None) -> torch.device:
    """The device to train on (see `resolve_device`); MPS is refused with a one-line error (no float64 there)."""
    try:
        kind = None if name is None else torch.device(name).type
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if kind == "mps":
        raise UserError(f"--device {name}: the sweep cannot train on MPS (it has no float64, which the ensemble's "
                        "Adam bookkeeping uses): use --device cpu or a CUDA GPU")
    return resolve_device(name)


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """--precision made concrete: the default (None) is tf32 on CUDA and fp32 elsewhere; tf32 needs CUDA."""
    if precision is None:
        return "tf32" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "tf32" and device.type != "cuda":
        raise UserError(f"--precision tf32 needs a CUDA device: use fp32 (or bf16) on {device.type}")
    return precision


BackendFlags = tuple[tuple[str, bool, bool] | None, tuple[str | None, ...]]
NEW_PRECISION_API = ("fp32_precision", "cuda.matmul.fp32_precision", "cudnn.conv.fp32_precision",
                     "cudnn.rnn.fp32_precision")
"""torch.backends attributes of the newer float32 precision API (torch >= 2.9)."""


def _backend_attr(path: str) -> str | None:
    """torch.backends.<path>, or None where this torch lacks it."""
    try:
        return functools.reduce(getattr, path.split("."), torch.backends)  # type: ignore[arg-type]
    except AttributeError:
        return None


def backend_flags() -> BackendFlags:
    """The process-wide float32 precision switches: the legacy view (float32 matmul precision, CUDA matmul TF32,
    cuDNN TF32; None where torch refuses to report it, in a session that mixed the legacy and newer APIs) and the
    newer API's values."""
    try:
        legacy = (torch.get_float32_matmul_precision(), bool(torch.backends.cuda.matmul.allow_tf32),
                  bool(torch.backends.cudnn.allow_tf32))
    except RuntimeError:
        legacy = None
    return legacy, tuple(_backend_attr(path) for path in NEW_PRECISION_API)


def restore_backend_flags(flags: BackendFlags) -> None:
    """Put back switches saved by `backend_flags` (the matmul precision last: it decides the CUDA TF32 switch)."""
    legacy, new = flags
    if legacy is not None:
        torch.backends.cudnn.allow_tf32 = legacy[2]
        torch.set_float32_matmul_precision(legacy[0])
        return
    for path, value in zip(NEW_PRECISION_API, new):
        if value is not None:
            _set_backend_attr(path, value)


def _set_backend_attr(path: str, value: str) -> None:
    """torch.backends.<path> = value."""
    parent, _, name = path.rpartition(".")
    owner = functools.reduce(getattr, parent.split("."), torch.backends) if parent else torch.backends
    setattr(owner, name, value)


def set_precision(cfg: SweepConfig, device: torch.device) -> Callable[[], ContextManager[Any]]:
    """Set the TF32 switches for --precision (on CUDA) and return the autocast context factory (not restoring the
    switches: use `setup_precision`, or run inside `run_sweep`, which restores them)."""
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cuda":       # through the legacy API, which keeps torch's two views of the switches consistent
        torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


@contextlib.contextmanager
def setup_precision(cfg: SweepConfig, device: torch.device) -> Iterator[Callable[[], ContextManager[Any]]]:
    """Set the TF32 switches for --precision, yield the autocast context factory, restore the switches on exit."""
    saved = backend_flags()
    try:
        yield set_precision(cfg, device)
    finally:
        restore_backend_flags(saved)


def _restores_backend_flags(fn: Callable[..., T]) -> Callable[..., T]:
    """Wrap `fn` so that the process-wide matmul precision switches are as before when it returns or raises."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        saved = backend_flags()
        try:
            return fn(*args, **kwargs)
        finally:
            restore_backend_flags(saved)
    return wrapper


def build_ensemble(cfg: SweepConfig, d_in: int, device: torch.device, first_chunk: torch.Tensor,
                   member_ids: Sequence[int] | None = None) -> Any:
    """A fresh ensemble, one member per L1 value or k (only the global members `member_ids` when given: a rank's
    share, each initialised as in the whole sweep), centers initialised from `first_chunk` [n, d_in]."""
    from training.ensemble import Ensemble, make_members
    validate_flags(cfg)
    check_dictionary_size(cfg, d_in)
    keys = member_keys(cfg)
    d_hidden = max(1, round(cfg.ratio * d_in))
    arch = architecture(cfg)
    init_norm = arch.default_init_norm if cfg.decoder_init_norm is None else cfg.decoder_init_norm
    init_norm = 1.0 if cfg.unit_decoder else init_norm
    lrs = member_lrs(cfg)
    if member_ids is None:
        members = make_members(arch.name, len(keys), d_in, d_hidden, keys=keys,
                               tied=cfg.tied, seed=cfg.seed, init_norm=init_norm, device=device)
    else:                                    # member i is drawn from seed + i whichever rank trains it
        keys, lrs = [keys[i] for i in member_ids], [lrs[i] for i in member_ids]
        members = [make_members(arch.name, 1, d_in, d_hidden, keys=[keys[j]], tied=cfg.tied, seed=cfg.seed + i,
                                init_norm=init_norm, device=device)[0] for j, i in enumerate(member_ids)]
    lr = torch.tensor(lrs, dtype=torch.float64)
    hparams = {"lr": lr, arch.sweep_param: torch.tensor(keys, dtype=torch.long if arch.sweep_param_integer
                                                         else torch.float64)}
    ens = Ensemble(members, hparams, dead_window=cfg.dead_window_tokens, backend="fused",
                   unit_decoder=cfg.unit_decoder, grad_clip=cfg.grad_clip, dead_policy=dead_policy(cfg),
                   arch_options={n: getattr(cfg, n) for n in arch.options})
    if cfg.center_init != "zero":
        ens.init_center(first_chunk.to(device, torch.float32), cfg.center_init)
    return ens


@torch.no_grad()
def eval_sums(ens: Any, acts: torch.Tensor, device: torch.device, scale: float = 1.0,
              block: int = 4096) -> dict[str, torch.Tensor]:
    """Float64 device sums over `acts` [n, d_in] (raw; the ensemble sees scale * acts), `block` rows at a time,
    no host sync: "sse" [N] squared errors, "code_sum" [N] code sums, "fired" [N, d_hidden] tokens each latent fired
    on, "x" [d_in] and "x_sq" [] sums of the inputs less "shift" [d_in] (the first block's mean) and of their
    squares (shifted so that the variance does not cancel)."""
    f64 = dict(device=device, dtype=torch.float64)
    sums = {"sse": torch.zeros(ens.n_models, **f64), "code_sum": torch.zeros(ens.n_models, **f64),
            "fired": torch.zeros(ens.n_models, ens.d_hidden, **f64), "x": torch.zeros(ens.d_in, **f64),
            "x_sq": torch.zeros((), **f64)}
    for rows in acts.split(block):
        x = rows.to(device, torch.float32) * scale                                    # [b, d_in]
        codes = ens.encode(x)                                                           # [N, b, d_hidden]
        sums["code_sum"] += codes.sum((1, 2), dtype=torch.float64)
        x_hat = ens.decode(codes)                                                       # [N, b, d_in]
        sums["fired"] += codes.sign_().sum(1, dtype=torch.float64)                     # codes >= 0
        del codes
        sums["sse"] += x_hat.sub_(x).square_().sum((1, 2), dtype=torch.float64)
        del x_hat
        if "shift" not in sums:
            sums["shift"] = x.mean(0, dtype=torch.float64)
        centred = x.double().sub_(sums["shift"])                                       # [b, d_in]
        sums["x"] += centred.sum(0)
        sums["x_sq"] += centred.square_().sum()
    return sums


@torch.no_grad()
def evaluate(ens: Any, acts: torch.Tensor, device: torch.device, scale: float = 1.0,
             block: int = 4096) -> list[dict[str, float]]:
    """Per-member final metrics on raw activations `acts` [n, d_in] and the dead fraction from training; the
    ensemble works on `scale` * acts, so MSE and L1 are converted back to raw units.

    Frees the step workspace first and encodes `block` rows at a time (each block once); one host transfer.
    l0: mean active latents per token; explained_variance: 1 - SSE / total variance; mse: per token; l1_norm:
    mean sum of codes per token; dead_on_eval: fraction of latents that fired on no row.
    """
    ens.release_workspace()
    n = len(acts)
    sums = eval_sums(ens, acts, device, scale, block)
    sums["dead_fraction"] = ens.dead_mask().double().mean(-1)
    host = {k: v.cpu() for k, v in sums.items()}
    m2 = float(host["x_sq"]) - float(host["x"].square().sum()) / n
    out = []
    for i in range(ens.n_models):
        fired, sse = host["fired"][i], float(host["sse"][i])
        out.append({"l0": float(fired.sum()) / n, "explained_variance": 1 - sse / m2 if m2 > 0 else float("nan"),
                    "mse": sse / n / scale ** 2, "l1_norm": float(host["code_sum"][i]) / n / scale,
                    "dead_fraction": float(host["dead_fraction"][i]),
                    "dead_on_eval": float((fired == 0).double().mean()), "frozen": bool(ens.frozen[i])})
    return out


def _metric_step(line: str) -> int | None:
    """The step of a metrics.jsonl line (None if the line is not one)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def log_metrics(path: Path, keys: list, key_name: str, progress: Progress, stats: dict[str, torch.Tensor],
                d_hidden: int, wandb_run: Any, wandb_prefix: str = "") -> None:
    """Append one line per member to metrics.jsonl (one host sync), and log to wandb when asked (`wandb_prefix`: a
    hook of a multi-hook run, whose metrics go against its own step metric "<hook>/step")."""
    names = {"loss": "loss", "mse": "mse", "l1_norm": "l1_norm", "l0": "l0", "explained_variance": "explained_variance",
             "aux": "aux"}
    host = {names[k]: v.double().tolist() for k, v in stats.items() if k in names}
    n_dead, frozen = stats["n_dead"].tolist(), stats["frozen"].tolist()
    lines = []
    for i, key in enumerate(keys):
        row = {"step": progress.step, "tokens": progress.tokens, key_name: key, **{k: v[i] for k, v in host.items()},
               "dead_fraction": n_dead[i] / d_hidden, "frozen": bool(frozen[i])}
        lines.append(json.dumps(row))
    with open(path, "a") as f:
        f.write("".join(ln + "\n" for ln in lines))
    if wandb_run is not None:
        logged = {f"{wandb_prefix}{key_name}={key}/{k}": v[i] for i, key in enumerate(keys) for k, v in host.items()}
        if wandb_prefix:            # the hooks take turns over each chunk: each has its own step axis
            wandb_run.log({**logged, f"{wandb_prefix}step": progress.step})
        else:
            wandb_run.log(logged, step=progress.step)


def start_wandb(cfgs: list[SweepConfig]) -> Any:
    """A wandb run when --wandb_project is given (wandb must be installed), else None: one run for the sweeps `cfgs`
    (several: one per hook, each hook's metrics under "<hook>/" against its own step metric "<hook>/step")."""
    cfg = cfgs[0]
    if not cfg.wandb_project:
        return None
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb_project needs wandb: pip install wandb (or drop the flag)") from None
    if len(cfgs) == 1:
        return wandb.init(project=cfg.wandb_project, config=config_to_dict(cfg), resume="allow")
    hooks = [Path(c.dataset_dir).name for c in cfgs]
    job = dataclasses.replace(cfg, dataset_dir=str(Path(cfg.dataset_dir).parent),
                              output_dir=str(Path(cfg.output_dir).parent), hooks=hooks)
    run = wandb.init(project=cfg.wandb_project, config=config_to_dict(job), resume="allow")
    for hook in hooks:
        run.define_metric(f"{hook}/step")
        run.define_metric(f"{hook}/*", step_metric=f"{hook}/step")
    return run


def run_sweep(cfg: SweepConfig) -> SweepResult:
    """Train (or resume) the sweep of one hook described by `cfg`, holding the lock on `cfg.output_dir` (one writer
    per folder); under torchrun, this rank's share of the members (training/distributed.py), the same sweep as one
    process."""
    if cfg.hooks:
        raise UserError("--hooks trains one sweep per hook: use run_sweeps")
    with session() as shard:
        return _run_hooks([cfg], shard)[0]


def run_sweeps(cfg: SweepConfig) -> list[SweepResult]:
    """`run_sweep`, or with several hooks (`sweep_hooks`) one sweep per hook trained in one run on the same rows,
    into --output_dir/<hook>; under torchrun the (hook, member) pairs are shared out evenly over the ranks."""
    hooks = sweep_hooks(cfg)
    if hooks is None:
        return [run_sweep(cfg)]
    with session() as shard:
        return _run_hooks(hook_configs(cfg, hooks), shard)


def sweep_hooks(cfg: SweepConfig) -> list[str] | None:
    """The hooks of a multi-hook run: --hooks, or every hook of a --dataset_dir dataset folder that holds several;
    None for a sweep of one hook folder."""
    root = Path(cfg.dataset_dir)
    if not (root / MANIFEST).is_file():
        if cfg.hooks:
            raise UserError(f"--hooks needs --dataset_dir to be a dataset folder (holding {MANIFEST}), not "
                            f"{cfg.dataset_dir}")
        return None
    found = list(read_manifest(root).get("hooks", {}))
    unknown = [h for h in cfg.hooks or [] if h not in found]
    if unknown:
        raise UserError(f"--hooks {' '.join(unknown)}: not in {root}; it has: {', '.join(found)}")
    if cfg.hooks:
        return list(dict.fromkeys(cfg.hooks))
    return found if len(found) > 1 else None


def hook_configs(cfg: SweepConfig, hooks: list[str]) -> list[SweepConfig]:
    """One sweep's flags per hook: its hook folder as --dataset_dir and --output_dir/<hook> as its folder (so each
    folder is the sweep one would train on that hook alone)."""
    return [dataclasses.replace(cfg, dataset_dir=str(Path(cfg.dataset_dir) / h),
                                output_dir=str(Path(cfg.output_dir) / h), hooks=None) for h in hooks]


@_reports_disk_errors
@_restores_backend_flags
def _run_hooks(cfgs: list[SweepConfig], shard: Shard) -> list[SweepResult]:
    """`run_sweeps` of the sweeps `cfgs` (one per hook) on this process, the `shard` of the job."""
    datas = []
    for cfg in cfgs:
        validate_config(cfg)                    # flags, data and disk first: a bad input creates nothing
        data = open_dataset(cfg)
        if shard.is_main:
            warn_if_unfinished(data)
        total_steps(cfg, data, holdout_size(data, cfg.holdout_rows))
        check_dictionary_size(cfg, data.d)
        check_output_space(cfg, len(member_keys(cfg)), data.d)
        datas.append(data)
    check_same_rows(datas)
    check_world_size(len(member_keys(cfgs[0])), len(cfgs), shard)
    with contextlib.ExitStack() as locks:
        for cfg in cfgs:                        # rank 0 holds the locks for the whole job
            locks.enter_context(shard.main_context(functools.partial(folder_lock, cfg.output_dir)))
        return _train_hooks(cfgs, datas, shard)


def check_same_rows(datas: list[HookData]) -> None:
    """A one-line UserError unless every hook has the same chunks (same rows), as one Stage 1 run writes them."""
    rows = [[c.rows for c in d.chunks] for d in datas]
    for d, r in zip(datas[1:], rows[1:]):
        if r != rows[0]:
            raise UserError(f"{d.root / d.hook} has chunks of {r} rows but {datas[0].root / datas[0].hook} has "
                            f"{rows[0]}: hooks trained together need the chunks of one generate_test_data.py run")


def check_world_size(n_members: int, n_hooks: int, shard: Shard) -> None:
    """A one-line UserError when there are more ranks than (hook, member) pairs of several hooks (one hook's sweep
    then trains data parallel, see `data_parallel`)."""
    if shard.world_size > n_members * n_hooks and n_hooks > 1:
        raise UserError(f"{shard.world_size} ranks for {n_members * n_hooks} members of {n_hooks} hooks: launch at "
                        f"most {n_members * n_hooks} processes, or train one hook at a time (data parallel)")


def data_parallel(n_members: int, n_hooks: int, shard: Shard) -> bool:
    """Whether the ranks split each batch (all-reducing the gradients) instead of the members: when one hook's
    sweep has fewer members than there are ranks (e.g. one wide dictionary)."""
    return n_hooks == 1 and n_members < shard.world_size


def prepare_shard(cfg: SweepConfig, out: Path, shard: Shard, slices: list[list[int]]
                  ) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor] | None]:
    """`prepare_output` on rank 0 (which alone reads or clears the folder); every rank gets the checkpoint's JSON
    and the state of its own members `slices[rank]` (the checkpoint may come from any world size)."""
    if shard.world_size == 1:
        return prepare_output(cfg, out)
    full: dict[str, dict[str, torch.Tensor] | None] = {"state": None}

    def prepare() -> dict[str, Any] | None:
        saved, full["state"] = prepare_output(cfg, out)
        return saved
    saved = shard.on_main(prepare)
    if saved is None:
        return None, None
    state = full["state"]
    n = sum(map(len, slices))
    pieces = ([slice_members(state, s, n) if s else None for s in slices] if shard.is_main and state is not None
              else None)
    del state
    full.clear()
    return saved, shard.scatter(pieces)


@dataclass
class GatheredEnsemble:
    """A whole ensemble's state, gathered on rank 0 from the ranks' members: what saving reads of an Ensemble."""

    state: dict[str, torch.Tensor]

    def state_dict(self, device: Any = None) -> dict[str, torch.Tensor]:
        """The gathered state (on the host)."""
        return self.state

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """{name: stacked [N, ...] parameter}."""
        return {n[len("param."):]: t for n, t in self.state.items() if n.startswith("param.")}

    @property
    def arch(self) -> Architecture:
        """The members' architecture (its declaration), named in the state."""
        from training.ensemble_state import architecture_name
        return get_architecture(architecture_name(self.state["option.architecture"]))

    @property
    def n_models(self) -> int:
        """Members."""
        return int(self.state["param.decoder"].shape[0])

    @property
    def frozen(self) -> torch.Tensor:
        """BoolTensor[N]: members frozen by a NaN/inf gradient (as a NaN/inf loss gives)."""
        return self.state["frozen"]

    @property
    def d_in(self) -> int:
        """Activation width."""
        return int(self.state["param.decoder"].shape[2])

    @property
    def d_hidden(self) -> int:
        """Dictionary size."""
        return int(self.state["param.decoder"].shape[1])


def use_sweep_member_state(ens: Any, keys: list, member_ids: Sequence[int]) -> None:
    """Give a rank's ensemble (global members `member_ids` of a sweep keyed by `keys`) the member state the whole
    sweep's ensemble has: its members' rows of the per-member tensors, and the sweep-wide values (e.g. TopK's largest
    k, which decides the ranking kernel), so that every member computes exactly as in one process. Entries that
    training changes (`saved_state`) are kept."""
    like = ens.params["decoder"]
    host_keys = torch.tensor(keys, dtype=torch.long if ens.arch.sweep_param_integer else torch.float64)
    whole = ens.arch.member_state(host_keys, like, **ens.arch_options)
    idx = torch.tensor(list(member_ids), dtype=torch.long, device=like.device)
    for name, value in whole.items():
        if name in ens.arch.saved_state:
            continue
        per_member = isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == len(keys)
        ens.member_state[name] = value.index_select(0, idx.to(value.device)) if per_member else value


def gather_ensemble(ens: Any, shard: Shard, data_parallel: bool = False) -> Any:
    """The whole ensemble on rank 0 (`ens` itself on one process or data parallel; a `GatheredEnsemble` of every
    rank's members with several; None on the other ranks)."""
    if shard.world_size == 1 or data_parallel:
        return ens if shard.is_main else None
    states = shard.gather(None if ens is None else ens.state_dict(device="cpu"))
    return None if states is None else GatheredEnsemble(join_members([s for s in states if s is not None]))


def save_shard(out: Path, cfg: SweepConfig, ens: Any, data: HookData, progress: Progress, shard: Shard,
               slices: list[list[int]]) -> tuple[str, Any]:
    """`save_sweep` of the whole ensemble by rank 0 from every rank's members (data parallel, every rank listing
    every member: rank 0's); returns (the SHA-256 of sweep.safetensors, the whole ensemble on rank 0 / None
    elsewhere) on every rank."""
    whole = gather_ensemble(ens, shard, len(slices) > 1 and len(set(map(tuple, slices))) == 1)
    digest = shard.on_main(lambda: save_sweep(out, cfg, whole, data, progress, slices=slices))
    return digest, whole


def gather_stats(stats: dict[str, torch.Tensor] | None, shard: Shard, data_parallel: bool = False
                 ) -> dict[str, torch.Tensor] | None:
    """Per-member step stats [n_rank, ...] of every rank (None: a rank with no member) joined into [N, ...] on
    rank 0 (None elsewhere; data parallel: rank 0's, already those of every member on the whole batch)."""
    if shard.world_size == 1 or data_parallel:
        return stats if shard.is_main else None
    mine = None if stats is None else {k: v.detach().cpu() for k, v in stats.items() if k in LOGGED_STATS}
    parts = shard.gather(mine)                              # None from a rank that trains none of the members
    if parts is None:
        return None
    parts = [p for p in parts if p is not None]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


LOGGED_STATS = ("loss", "mse", "l1_norm", "l0", "explained_variance", "aux", "n_dead", "frozen")
"""The step stats that metrics.jsonl records (see `log_metrics`)."""


def _train_sweep(cfg: SweepConfig, data: HookData, shard: Shard = Shard()) -> SweepResult:
    """Train (or resume) the checked sweep `cfg` on `data` (this rank's members) and write it to `cfg.output_dir`."""
    return _train_hooks([cfg], [data], shard)[0]


@dataclass
class HookRun:
    """One hook's sweep in a run: its flags (its own --dataset_dir and --output_dir), data, the members each rank
    trains, its progress and this rank's ensemble of its members (None where this rank trains none of them)."""

    cfg: SweepConfig
    data: HookData
    slices: list[list[int]]
    held: int
    total: int
    progress: Progress
    ens: Any
    tokens0: int = 0
    wandb_run: Any = None
    wandb_prefix: str = ""
    """Prefix of this hook's wandb metrics ("<hook>/" when one wandb run logs several hooks)."""
    data_parallel: bool = False
    """Every rank holds every member and trains on its share of each batch (gradients all-reduced)."""

    @property
    def out(self) -> Path:
        """The sweep folder."""
        return Path(self.cfg.output_dir)


def pair_slices(n_hooks: int, n_members: int, world_size: int) -> list[list[list[int]]]:
    """[hook][rank] -> the members of that hook the rank trains: the (hook, member) pairs, hook-major, spread evenly
    over the ranks in contiguous runs (one hook: `member_slices`)."""
    pairs = [(h, m) for h in range(n_hooks) for m in range(n_members)]
    out: list[list[list[int]]] = [[[] for _ in range(world_size)] for _ in range(n_hooks)]
    for rank, share in enumerate(member_slices(len(pairs), world_size)):
        for i in share:
            out[pairs[i][0]][rank].append(pairs[i][1])
    return out


def start_hook_run(cfg: SweepConfig, data: HookData, slices: list[list[int]], shard: Shard,
                   device: torch.device) -> HookRun:
    """Prepare the folder of one hook's sweep (on rank 0) and this rank's ensemble of its members, new or resumed."""
    keys = member_keys(cfg)
    mine = slices[shard.rank]
    held = holdout_size(data, cfg.holdout_rows)
    total = total_steps(cfg, data, held)
    out = Path(cfg.output_dir)
    if not cfg.resume and shard.is_main:               # a --resume without a run creates nothing
        out.mkdir(parents=True, exist_ok=True)
    saved, state = prepare_shard(cfg, out, shard, slices)
    ens = None
    if saved is not None:
        progress = Progress(**saved["progress"])
        check_same_dataset(progress, data)
        if shard.is_main:
            truncate_metrics(out / METRICS, progress.step)
        if state is not None:
            from training.ensemble import Ensemble
            state.pop("rng.resample", None)       # stored by older versions; every stream now derives from the seed
            ens = Ensemble.from_state_dict(state, backend="fused", device=device)
            del state
    else:
        first = load_chunk(data, chunk_order(len(data.chunks), cfg.seed, 0)[0], cfg.seed, 0, held)
        progress = Progress(input_scale=input_scale(first[:EVAL_ROWS], cfg.activation_norm),
                            dataset_chunks=len(data.chunks), dataset_digest=dataset_digest(data))
        if mine:
            ens = build_ensemble(cfg, data.d, device, first[:16384].float() * progress.input_scale,
                                 None if shard.world_size == 1 else mine)
        del first
    if ens is not None and shard.world_size > 1:
        use_sweep_member_state(ens, keys, mine)
    return HookRun(cfg, data, slices, held, total, progress, ens, progress.tokens)


def chunk_rows(data: HookData, index: int, held: int) -> int:
    """Training rows of chunk `index` (the held-out tail left out of the last chunk)."""
    return data.chunks[index].rows - (held if index == len(data.chunks) - 1 else 0)


def train_chunk(run: HookRun, chunk: torch.Tensor | None, n_batches: int, shard: Shard, device: torch.device,
                autocast: Callable[[], ContextManager[Any]], bar: Any) -> None:
    """Train this rank's members of `run` on the batches of one chunk (`chunk` None where the rank has none of
    them: it only follows the progress and joins the collectives)."""
    cfg, ens, progress, total = run.cfg, run.ens, run.progress, run.total
    arch, policy = architecture(cfg), dead_policy(cfg)
    decay_start = total - round(cfg.lr_decay_fraction * total)
    mine = run.slices[shard.rank]
    share = batch_share(cfg.batch_size, shard) if run.data_parallel else slice(0, cfg.batch_size)
    reduce = data_parallel_reduce(shard, cfg.batch_size) if run.data_parallel else None
    for b in range(n_batches):
        if progress.step >= total:
            break
        stats = None
        logs = (progress.step + 1) % cfg.log_every == 0 or progress.step + 1 == total
        if ens is not None:
            rows = chunk[b * cfg.batch_size:(b + 1) * cfg.batch_size][share]     # data parallel: this rank's share
            x = rows.to(device, torch.float32, non_blocking=True)
            x.mul_(progress.input_scale)
            with autocast():
                stats = ens.step(x, lr_scale=lr_scale(progress.step, total, cfg),
                                 coefficient_scales=dict.fromkeys(arch.scheduled, l1_scale(progress.step, total, cfg)),
                                 reduce=reduce, stats=logs)      # the logging reductions only when logged
        progress.step += 1
        progress.tokens += cfg.batch_size
        if (ens is not None and policy == "resample" and cfg.resample_every
                and progress.step % cfg.resample_every == 0 and progress.step < decay_start):
            ens.resample_dead(chunk[:EVAL_ROWS].to(device, torch.float32) * progress.input_scale,
                              seed=cfg.seed, step=progress.step, member_ids=mine)
        if policy in LOSS_POLICIES and progress.step % AUX_REFRESH_STEPS == 0:
            if ens is not None:
                ens.resample_dead(x)  # refreshes whether the dead-latent loss is needed (one host sync)
            if shard.world_size > 1:  # on while any member of the sweep has dead latents
                aux_on = shard.any(ens is not None and ens._aux_on)
                if ens is not None:
                    ens._aux_on = aux_on
        if logs:
            whole = gather_stats(stats, shard, run.data_parallel)
            if whole is not None:
                d_hidden = max(1, round(cfg.ratio * run.data.d))
                log_metrics(run.out / METRICS, member_keys(cfg), arch.sweep_param, progress, whole, d_hidden,
                            run.wandb_run, run.wandb_prefix)
                bar.set_postfix(frozen=int(whole["frozen"].sum()))
        bar.update(cfg.batch_size)


def train_runs(runs: list[HookRun], shard: Shard, device: torch.device,
               autocast: Callable[[], ContextManager[Any]], bar: Any) -> None:
    """Train every hook's sweep, chunk position by chunk position (chunk i of every hook holds the same rows), each
    from its own progress; saves as the flags ask."""
    cfg = runs[0].cfg
    while live := [r for r in runs if r.progress.repetition < cfg.n_repetitions and r.progress.step < r.total]:
        rep = min(r.progress.repetition for r in live)
        here = [r for r in live if r.progress.repetition == rep]
        readers = {id(r): iter_chunks(r.data, cfg.seed, rep, r.progress.chunk_position, r.held,
                                      staging_for(device)) for r in here if r.ens is not None}
        order = chunk_order(len(here[0].data.chunks), cfg.seed, rep)
        try:
            for pos in range(min(r.progress.chunk_position for r in here), len(order)):
                for r in here:
                    if r.progress.chunk_position > pos or r.progress.step >= r.total:
                        continue
                    chunk = next(readers[id(r)])[1] if r.ens is not None else None
                    n_batches = (len(chunk) if chunk is not None else chunk_rows(r.data, order[pos], r.held))
                    train_chunk(r, chunk, n_batches // cfg.batch_size, shard, device, autocast, bar)
                    del chunk
                    if len(here) > 1 and r.ens is not None:
                        r.ens.release_workspace()   # one hook's step buffers at a time (the allocator reuses them)
                    r.progress.chunk_position = pos + 1
                    if cfg.save_after_every and r.progress.step < r.total:
                        save_shard(r.out, r.cfg, r.ens, r.data, r.progress, shard, r.slices)
        finally:
            for reader in readers.values():
                reader.close()
        for r in here:
            if r.progress.step < r.total:
                r.progress.repetition, r.progress.chunk_position = r.progress.repetition + 1, 0
                save_shard(r.out, r.cfg, r.ens, r.data, r.progress, shard, r.slices)


def finish_run(run: HookRun, shard: Shard, device: torch.device, seconds: float) -> SweepResult:
    """Save one hook's trained sweep, score it on its evaluation rows and write its sweep.json."""
    cfg, data, progress, held, out = run.cfg, run.data, run.progress, run.held, run.out
    keys = member_keys(cfg)
    if held:
        eval_rows, progress.eval_rows = heldout_rows(data, held), f"{held:,} held-out rows (tail of the last chunk)"
    else:
        eval_rows = load_chunk(data, chunk_order(len(data.chunks), cfg.seed, 0)[0], cfg.seed, 0)[:EVAL_ROWS]
        progress.eval_rows = f"{len(eval_rows):,} training rows (--holdout_rows 0)"
    # saved before the evaluation: a crash there loses nothing
    digest, whole = save_shard(out, cfg, run.ens, data, progress, shard, run.slices)
    mine = [] if run.ens is None else evaluate(run.ens, eval_rows, device, progress.input_scale,
                                                eval_block_rows(cfg.architecture, cfg.batch_size))
    metrics = flag_diverged(mine if run.data_parallel else [m for part in shard.all_gather(mine) for m in part])
    usable = not all(m["frozen"] for m in metrics)
    shard.on_main(lambda: write_sweep_json(out, sweep_metadata(cfg, whole, data, progress, metrics, usable, digest,
                                                               run.slices)))
    if not usable:
        raise UserError(f"every member hit a NaN/inf loss or gradient and was frozen, so the sweep in {out} is not "
                        f"finished: check the activations for non-finite values, or lower --adam_lr (now {cfg.adam_lr:g})")
    frozen = [k for k, m in zip(keys, metrics) if m["frozen"]]
    if frozen and shard.is_main:
        print(f"warning: members {frozen} hit a NaN/inf loss or gradient and were frozen at that step")
    return SweepResult(out, keys, metrics, progress, seconds, cfg.architecture, progress.tokens - run.tokens0)


def _train_hooks(cfgs: list[SweepConfig], datas: list[HookData], shard: Shard) -> list[SweepResult]:
    """Train (or resume) the checked sweeps `cfgs` (one per hook, same flags but their folders) on `datas`, this
    rank's share of the (hook, member) pairs, and write each to its --output_dir."""
    device = training_device(shard.device(cfgs[0].device))
    cfgs = [dataclasses.replace(c, precision=resolve_precision(c.precision, device)) for c in cfgs]
    autocast = set_precision(cfgs[0], device)
    n = len(member_keys(cfgs[0]))
    parallel = data_parallel(n, len(cfgs), shard)
    slices = [[list(range(n))] * shard.world_size] if parallel else pair_slices(len(cfgs), n, shard.world_size)
    runs = [start_hook_run(c, d, s, shard, device) for c, d, s in zip(cfgs, datas, slices)]
    for r in runs:
        r.data_parallel = parallel
    wandb_run = start_wandb(cfgs) if shard.is_main else None
    for r in runs:
        r.wandb_run, r.wandb_prefix = wandb_run, f"{r.out.name}/" if len(runs) > 1 else ""
    t0 = time.perf_counter()
    n_members = len(member_keys(cfgs[0])) * len(runs)
    bar = tqdm(total=sum(r.total for r in runs) * cfgs[0].batch_size,
               initial=sum(r.progress.tokens for r in runs), unit="tok/member", unit_scale=True,
               desc=f"training {n_members} members" + (f" of {len(runs)} hooks" if len(runs) > 1 else ""),
               dynamic_ncols=True, disable=not shard.is_main)
    try:
        train_runs(runs, shard, device, autocast, bar)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    try:
        return [finish_run(r, shard, device, seconds) for r in runs]
    finally:
        if wandb_run is not None:
            wandb_run.finish()


def sweep_memory_report(cfg: SweepConfig) -> str:
    """The --dry_run printout: the device-memory estimate of the sweep(s) `cfg` describes, and whether it fits (one
    process; several hooks: every hook's parameters and optimizer at once, one hook's step buffers at a time)."""
    hooks = sweep_hooks(cfg)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    compute = 2 if precision == "bf16" else 4
    ests, shapes = [], []
    for c in [cfg] if hooks is None else hook_configs(cfg, hooks):
        validate_config(c)
        keys, data = member_keys(c), open_dataset(c)
        d_hidden = max(1, round(c.ratio * data.d))
        ests.append(estimate_sweep(c.architecture, len(keys), c.batch_size, data.d, d_hidden, c.tied, compute,
                                   max(keys)))
        shapes.append(f"{len(keys)} {c.architecture} members x d_in {data.d} x d_hidden {d_hidden}")
    available, source = available_bytes(device)
    if hooks is None:
        headline = f"dry run: {shapes[0]}, batch {cfg.batch_size}, {precision} on {device} (nothing trained)"
    else:
        headline = (f"dry run: {len(hooks)} hooks, batch {cfg.batch_size}, {precision} on {device} (nothing trained; "
                    f"one process: under torchrun each rank holds its share)\n"
                    + "\n".join(f"  {h}: {shape}" for h, shape in zip(hooks, shapes)))
    return memory_report(combined_estimate(ests), available, source, headline)


def main_sweep(cfg: SweepConfig) -> str:
    """What basic_l1_sweep.py prints: the memory estimate with --dry_run, else the summary of the trained sweep
    (under torchrun, on rank 0 only: "" on the others)."""
    if cfg.dry_run:
        return sweep_memory_report(cfg)
    results = run_sweeps(cfg)
    return "\n\n".join(map(str, results)) if env_world()[0] == 0 else ""
