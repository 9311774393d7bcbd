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
from typing import Any, Callable, ContextManager, Iterator, TypeVar

import torch
from tqdm.auto import tqdm

import training
from training.chunks import HookData, open_hook
from training.cli import UserError, config_diff, config_from_dict, config_to_dict
from training.architectures import Architecture, get as get_architecture, names as architecture_names
from training.dictionary import unit_norm_params
from training.locks import folder_lock
from training.memory import (available_bytes, estimate_sweep, eval_block_rows, format_bytes, memory_report,
                             param_bytes)
from training.models import resolve_device
from training.staging import PinnedStaging, staging_for
from training.sweep_files import (CHECKPOINT_JSON, METRICS, SWEEP_JSON, SWEEP_WEIGHTS, checkpoint_files, clear_sweep,
                                  load_sweep,
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
    """Chunks to train on: a hook folder written by generate_test_data.py, or its dataset folder if it has one hook."""
    output_dir: str = "outputs/sweep"
    """Where the sweep, its checkpoints and its metrics go."""
    architecture: str = field(default="l1", metadata={"choices": list(ARCHITECTURES)})
    """l1: ReLU dictionary with an L1 penalty (swept); topk: TopK dictionary (k swept); batchtopk: BatchTopK (k per
    token on average over the batch, swept; one learned threshold at inference); matryoshka: BatchTopK whose nested
    prefixes each reconstruct (k swept)."""
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
    tied: bool = False
    """Tie encoder and decoder (the original paper's variant; L1 architecture only)."""
    batch_size: int = 4096
    """Activation rows per step, fed to every member."""
    adam_lr: float = 1e-3
    """Peak Adam learning rate."""
    lr_warmup_fraction: float = 0.01
    """Fraction of the steps over which the learning rate rises linearly from 0."""
    lr_decay_fraction: float = 0.0
    """Fraction of the steps at the end over which the learning rate decays linearly to 0 (measured to hurt runs of a
    few thousand steps; try 0.2 for long ones)."""
    l1_warmup_fraction: float = 0.0
    """Fraction of the steps over which the L1 penalty rises linearly from 0 (measured to hurt short runs)."""
    activation_norm: float = 1.0
    """Train on activations scaled so that E||x||^2 equals this (0: raw activations), so L1 values mean the same
    across models and layers; the saved dictionaries take raw activations (the scale is folded into center and
    encoder bias)."""
    decoder_init_norm: float | None = None
    """Initial norm of the decoder rows, the encoder starting as their transpose (default: 0.1 for l1, 0.5 for topk,
    the best measured, see the README's ablation; batchtopk and matryoshka take topk's)."""
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
    """L1 only: resample dead features every this many steps (0: never), until the learning-rate decay starts."""
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


SWEEP_VALUES: dict[str, Callable[[SweepConfig], list]] = {"l1": l1_values, "k": k_values}
"""The flags that list each sweep parameter's member values (the CLI side of `Architecture.sweep_param`)."""


def architecture(cfg: SweepConfig) -> Architecture:
    """The declaration of --architecture (a one-line UserError for an unknown one)."""
    if cfg.architecture not in ARCHITECTURES:
        raise UserError(f"unknown --architecture {cfg.architecture!r}: choose one of {', '.join(ARCHITECTURES)}")
    return get_architecture(cfg.architecture)


def member_keys(cfg: SweepConfig) -> list[float] | list[int]:
    """What each member is keyed by: its value of the architecture's sweep parameter (L1 penalty, k, ...)."""
    return SWEEP_VALUES[architecture(cfg).sweep_param](cfg)


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
    member_keys(cfg)


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
"""Architectures with the aux-K dead policy (TopK): steps between refreshes of whether the aux-K loss is on (a host sync each), whatever --log_every is."""


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
                   metrics: list[dict[str, float]] | None, finished: bool, weights_sha256: str) -> dict[str, Any]:
    """The contents of sweep.json (`weights_sha256`: that of sweep.safetensors)."""
    keys = member_keys(cfg)
    name = architecture(cfg).sweep_param
    members = [{name: key, "lr": cfg.adam_lr, "frozen": bool(ens.frozen[i]),
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
    }


def save_sweep(out: Path, cfg: SweepConfig, ens: Any, data: HookData, progress: Progress,
               metrics: list[dict[str, float]] | None = None, finished: bool = False) -> str:
    """Write the full training state (one checkpoint unit), then the dictionaries (sweep.*); return the SHA-256
    of sweep.safetensors.

    Every tensor is copied straight to the host, one at a time (no device-side copy). Nothing random is
    stored: every random stream derives from (seed, step, member), so a checkpoint resumes on any device.
    """
    save_checkpoint(out, config_to_dict(cfg), dict(vars(progress)), ens.state_dict(device="cpu"))
    weights = raw_space_params(ens.params, progress.input_scale, ens.arch.scaled_params)
    digest = write_sweep_weights(out, weights)
    del weights
    write_sweep_json(out, sweep_metadata(cfg, ens, data, progress, metrics, finished, digest))
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
    """Wrap `run_sweep` so that a disk-full or read-only error while it writes into --output_dir is one line (its
    stale .tmp files removed), not a traceback; other OSErrors (e.g. reading a chunk) pass through."""
    @functools.wraps(fn)
    def wrapper(cfg: SweepConfig, *args: Any, **kwargs: Any) -> T:
        try:
            return fn(cfg, *args, **kwargs)
        except OSError as e:
            out = Path(cfg.output_dir)
            if e.errno not in DISK_ERRNOS or (e.filename is not None and not in_folder(Path(e.filename), out)):
                raise
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


def raw_space_params(params: dict[str, torch.Tensor], scale: float,
                     scaled: tuple[str, ...] = ("center", "encoder_bias")) -> dict[str, torch.Tensor]:
    """Weights with unit decoder rows that act on raw activations x, for a dictionary trained on s * x.

    First the decoder norms are folded into encoder and bias (`unit_norm_params`, exact); then with center
    c / s and encoder bias b / s the codes come out as codes(s x) / s and the reconstruction as x_hat(s x) / s,
    while encoder and decoder rows are unchanged; TopK picks the same features.
    """
    out = unit_norm_params({n: t.detach().cpu() for n, t in params.items()})
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


def build_ensemble(cfg: SweepConfig, d_in: int, device: torch.device, first_chunk: torch.Tensor) -> Any:
    """A fresh ensemble, one member per L1 value or k, centers initialised from `first_chunk` [n, d_in]."""
    from training.ensemble import Ensemble, make_members
    validate_flags(cfg)
    check_dictionary_size(cfg, d_in)
    keys = member_keys(cfg)
    d_hidden = max(1, round(cfg.ratio * d_in))
    arch = architecture(cfg)
    init_norm = arch.default_init_norm if cfg.decoder_init_norm is None else cfg.decoder_init_norm
    members = make_members(arch.name, len(keys), d_in, d_hidden, keys=keys,
                           tied=cfg.tied, seed=cfg.seed, init_norm=1.0 if cfg.unit_decoder else init_norm,
                           device=device)
    lr = torch.full((len(keys),), cfg.adam_lr, dtype=torch.float64)
    hparams = {"lr": lr, arch.sweep_param: torch.tensor(keys, dtype=torch.long if arch.sweep_param_integer
                                                         else torch.float64)}
    ens = Ensemble(members, hparams, dead_window=cfg.dead_window_tokens, backend="fused",
                   unit_decoder=cfg.unit_decoder, grad_clip=cfg.grad_clip,
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
                d_hidden: int, wandb_run: Any) -> None:
    """Append one line per member to metrics.jsonl (one host sync), and log to wandb when asked."""
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
        wandb_run.log({f"{key_name}={key}/{k}": v[i] for i, key in enumerate(keys) for k, v in host.items()},
                      step=progress.step)


def start_wandb(cfg: SweepConfig) -> Any:
    """A wandb run when --wandb_project is given (wandb must be installed), else None."""
    if not cfg.wandb_project:
        return None
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb_project needs wandb: pip install wandb (or drop the flag)") from None
    return wandb.init(project=cfg.wandb_project, config=config_to_dict(cfg), resume="allow")


@_reports_disk_errors
@_restores_backend_flags
def run_sweep(cfg: SweepConfig) -> SweepResult:
    """Train (or resume) the sweep described by `cfg`, holding the lock on `cfg.output_dir` (one writer per folder)."""
    validate_config(cfg)                    # flags, data and disk first: a bad input creates nothing
    data = open_dataset(cfg)
    warn_if_unfinished(data)
    total_steps(cfg, data, holdout_size(data, cfg.holdout_rows))
    check_dictionary_size(cfg, data.d)
    check_output_space(cfg, len(member_keys(cfg)), data.d)
    with folder_lock(cfg.output_dir):
        return _train_sweep(cfg, data)


def _train_sweep(cfg: SweepConfig, data: HookData) -> SweepResult:
    """Train (or resume) the checked sweep `cfg` on `data` and write it to `cfg.output_dir`."""
    keys = member_keys(cfg)
    held = holdout_size(data, cfg.holdout_rows)
    total = total_steps(cfg, data, held)
    device = training_device(cfg.device)
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))
    autocast = set_precision(cfg, device)
    out = Path(cfg.output_dir)
    if not cfg.resume:                                 # a --resume without a run creates nothing
        out.mkdir(parents=True, exist_ok=True)
    saved, state = prepare_output(cfg, out)

    if state is not None:
        from training.ensemble import Ensemble
        state.pop("rng.resample", None)           # stored by older versions; every stream now derives from the seed
        ens = Ensemble.from_state_dict(state, backend="fused", device=device)
        del state
        progress = Progress(**saved["progress"])
        check_same_dataset(progress, data)
        truncate_metrics(out / METRICS, progress.step)
    else:
        first = load_chunk(data, chunk_order(len(data.chunks), cfg.seed, 0)[0], cfg.seed, 0, held)
        progress = Progress(input_scale=input_scale(first[:EVAL_ROWS], cfg.activation_norm),
                            dataset_chunks=len(data.chunks), dataset_digest=dataset_digest(data))
        ens = build_ensemble(cfg, data.d, device, first[:16384].float() * progress.input_scale)
        del first
    arch = architecture(cfg)
    key_name = arch.sweep_param
    decay_start = total - round(cfg.lr_decay_fraction * total)
    wandb_run = start_wandb(cfg)
    t0, tokens0 = time.perf_counter(), progress.tokens
    staging = staging_for(device)
    bar = tqdm(total=total * cfg.batch_size, initial=progress.tokens, unit="tok/member", unit_scale=True,
               desc=f"training {len(keys)} members", dynamic_ncols=True)
    try:
        while progress.repetition < cfg.n_repetitions and progress.step < total:
            for pos, chunk in iter_chunks(data, cfg.seed, progress.repetition, progress.chunk_position, held,
                                          staging):
                for b in range(len(chunk) // cfg.batch_size):
                    if progress.step >= total:
                        break
                    x = chunk[b * cfg.batch_size:(b + 1) * cfg.batch_size].to(device, torch.float32, non_blocking=True)
                    x.mul_(progress.input_scale)
                    logs = (progress.step + 1) % cfg.log_every == 0 or progress.step + 1 == total
                    with autocast():
                        stats = ens.step(x, lr_scale=lr_scale(progress.step, total, cfg),
                                         coefficient_scales=dict.fromkeys(arch.scheduled,
                                                                          l1_scale(progress.step, total, cfg)),
                                         stats=logs)                # the logging reductions only when logged
                    progress.step += 1
                    progress.tokens += cfg.batch_size
                    if (arch.dead_policy == "resample" and cfg.resample_every
                            and progress.step % cfg.resample_every == 0
                            and progress.step < decay_start):
                        ens.resample_dead(chunk[:EVAL_ROWS].to(device, torch.float32) * progress.input_scale,
                                          seed=cfg.seed, step=progress.step)
                    if arch.dead_policy == "aux_k" and progress.step % AUX_REFRESH_STEPS == 0:
                        ens.resample_dead(x)  # refreshes whether the aux-K loss is needed (one host sync)
                    if logs:
                        log_metrics(out / METRICS, keys, key_name, progress, stats, ens.d_hidden, wandb_run)
                        bar.set_postfix(frozen=int(stats["frozen"].sum()))
                    bar.update(cfg.batch_size)
                progress.chunk_position = pos + 1
                del chunk
                if cfg.save_after_every and progress.step < total:
                    save_sweep(out, cfg, ens, data, progress)
                if progress.step >= total:
                    break
            else:
                progress.repetition, progress.chunk_position = progress.repetition + 1, 0
                if progress.step < total:
                    save_sweep(out, cfg, ens, data, progress)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if held:
        eval_rows, progress.eval_rows = heldout_rows(data, held), f"{held:,} held-out rows (tail of the last chunk)"
    else:
        eval_rows = load_chunk(data, chunk_order(len(data.chunks), cfg.seed, 0)[0], cfg.seed, 0)[:EVAL_ROWS]
        progress.eval_rows = f"{len(eval_rows):,} training rows (--holdout_rows 0)"
    digest = save_sweep(out, cfg, ens, data, progress)          # a crash in the evaluation loses nothing
    metrics = flag_diverged(evaluate(ens, eval_rows, device, progress.input_scale,
                                     eval_block_rows(cfg.architecture, cfg.batch_size)))
    usable = not all(m["frozen"] for m in metrics)
    write_sweep_json(out, sweep_metadata(cfg, ens, data, progress, metrics, usable, digest))
    if wandb_run is not None:
        wandb_run.finish()
    if not usable:
        raise UserError(f"every member hit a NaN/inf loss and was frozen, so the sweep in {out} is not finished: "
                        f"check the activations for non-finite values, or lower --adam_lr (now {cfg.adam_lr:g})")
    frozen = [k for k, m in zip(keys, metrics) if m["frozen"]]
    if frozen:
        print(f"warning: members {frozen} hit a NaN/inf loss and were frozen at that step")
    return SweepResult(out, keys, metrics, progress, seconds, cfg.architecture, progress.tokens - tokens0)


def sweep_memory_report(cfg: SweepConfig) -> str:
    """The --dry_run printout: the device-memory estimate of the sweep `cfg` describes, and whether it fits."""
    validate_config(cfg)
    keys = member_keys(cfg)
    data = open_dataset(cfg)
    device = resolve_device(cfg.device)
    d_hidden = max(1, round(cfg.ratio * data.d))
    precision = resolve_precision(cfg.precision, device)
    compute = 2 if precision == "bf16" else 4
    est = estimate_sweep(cfg.architecture, len(keys), cfg.batch_size, data.d, d_hidden, cfg.tied, compute,
                         max(keys))
    available, source = available_bytes(device)
    headline = (f"dry run: {len(keys)} {cfg.architecture} members x d_in {data.d} x d_hidden {d_hidden}, "
                f"batch {cfg.batch_size}, {precision} on {device} (nothing trained)")
    return memory_report(est, available, source, headline)


def main_sweep(cfg: SweepConfig) -> str:
    """What basic_l1_sweep.py prints: the memory estimate with --dry_run, else the summary of the trained sweep."""
    return sweep_memory_report(cfg) if cfg.dry_run else str(run_sweep(cfg))
