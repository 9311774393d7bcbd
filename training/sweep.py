"""Stage 2: train an ensemble of sparse autoencoders (one per L1 penalty or k) on activation chunks.

Output folder:
    sweep.safetensors   stacked weights of every member: center [n, d_in], encoder [n, d_hidden, d_in],
                        encoder_bias [n, d_hidden], decoder [n, d_hidden, d_in]
    sweep.json          config, architecture, per-member hyperparameters and final metrics, source manifest
    checkpoint.safetensors / checkpoint.json   full training state (optimizer too) for --resume
    metrics.jsonl       one line per member every --log_every steps
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

import training
from training.chunks import HookData, atomic_write_json, open_hook, save_tensors
from training.cli import UserError, config_diff, config_from_dict, config_to_dict
from training.dictionary import SparseLinearAutoencoder, TopKAutoencoder, unstack_dictionaries
from training.models import resolve_device

ARCHITECTURES = ("l1", "topk")
PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass
class SweepConfig:
    """Everything that decides what a sweep trains (saved in sweep.json and checkpoint.json)."""

    dataset_dir: str = "activation_data"
    """Chunks to train on: a hook folder written by generate_test_data.py, or its dataset folder if it has one hook."""
    output_dir: str = "outputs/sweep"
    """Where the sweep, its checkpoints and its metrics go."""
    architecture: str = field(default="l1", metadata={"choices": list(ARCHITECTURES)})
    """l1: ReLU dictionary with an L1 penalty (swept); topk: TopK dictionary (k swept)."""
    ratio: float = 8.0
    """Dictionary size as a multiple of the activation width: d_hidden = ratio * d_in."""
    l1_value_min: float = -4.0
    """log10 of the smallest L1 penalty."""
    l1_value_max: float = -2.0
    """log10 of the largest L1 penalty."""
    l1_value_n: int = 8
    """Number of L1 penalties, log-spaced between min and max."""
    l1_values: list[float] | None = None
    """Explicit L1 penalties (instead of min/max/n)."""
    k_values: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    """Active features per token of each TopK member (--architecture topk)."""
    tied: bool = False
    """Tie encoder and decoder (the original paper's variant; L1 architecture only)."""
    batch_size: int = 4096
    """Activation rows per step, fed to every member."""
    adam_lr: float = 1e-3
    """Peak Adam learning rate."""
    lr_warmup_fraction: float = 0.01
    """Fraction of the steps over which the learning rate rises linearly from 0."""
    lr_decay_fraction: float = 0.2
    """Fraction of the steps at the end over which the learning rate decays linearly to 0."""
    l1_warmup_fraction: float = 0.05
    """Fraction of the steps over which the L1 penalty rises linearly from 0."""
    center_init: str = field(default="geometric_median", metadata={"choices": ["geometric_median", "mean", "zero"]})
    """Initial center (pre-encoder bias): geometric median or mean of the first chunk's rows, or zero."""
    dead_window_tokens: int = 1_000_000
    """A feature is dead when it has not fired over this many tokens."""
    resample_every: int = 25000
    """L1 only: resample dead features every this many steps (0: never), until the learning-rate decay starts."""
    n_repetitions: int = 1
    """Passes over the data."""
    max_tokens: int | None = None
    """Stop after training on this many tokens (per member)."""
    save_after_every: bool = False
    """Save the sweep and a checkpoint after every chunk instead of every repetition."""
    log_every: int = 100
    """Write per-member metrics every this many steps."""
    seed: int = 0
    """Seed of initialisation, chunk order and resampling."""
    device: str | None = None
    """cpu, cuda, cuda:N or mps (default: cuda when available)."""
    precision: str = field(default="fp32", metadata={"choices": list(PRECISIONS)})
    """fp32; tf32 matmuls (GPU); bf16 autocast (GPU)."""
    resume: bool = False
    """Continue the run in --output_dir from its last checkpoint (flags must match)."""
    overwrite: bool = False
    """Replace a finished or different sweep in --output_dir."""
    wandb_project: str | None = None
    """Also log metrics to this Weights & Biases project (needs wandb installed)."""


# Settings that may change between a run and its resumption.
RESUMABLE_CHANGES = ("resume", "overwrite", "device", "wandb_project", "log_every")


def l1_values(cfg: SweepConfig) -> list[float]:
    """The L1 penalties of the sweep."""
    if cfg.l1_values:
        return [float(v) for v in cfg.l1_values]
    if cfg.l1_value_min > cfg.l1_value_max:
        raise UserError(f"--l1_value_min {cfg.l1_value_min} is above --l1_value_max {cfg.l1_value_max} "
                        "(both are log10 of the penalty)")
    if cfg.l1_value_n < 1:
        raise UserError("--l1_value_n must be at least 1")
    if cfg.l1_value_n == 1:
        return [10 ** cfg.l1_value_min]
    step = (cfg.l1_value_max - cfg.l1_value_min) / (cfg.l1_value_n - 1)
    return [float(10 ** (cfg.l1_value_min + i * step)) for i in range(cfg.l1_value_n)]


def member_keys(cfg: SweepConfig) -> list[float] | list[int]:
    """What each member is keyed by: its L1 penalty, or its k."""
    return l1_values(cfg) if cfg.architecture == "l1" else [int(k) for k in cfg.k_values]


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


def chunk_order(n_chunks: int, seed: int, repetition: int) -> list[int]:
    """The order chunks are read in during one repetition (a seeded shuffle)."""
    g = torch.Generator().manual_seed(seed * 7919 + repetition)
    return torch.randperm(n_chunks, generator=g).tolist()


def load_chunk(data: HookData, index: int, seed: int, repetition: int) -> torch.Tensor:
    """Chunk `index` verified against its checksum, rows shuffled for this repetition: [n, d_in] (stored dtype)."""
    acts = data.load(index, verify=True)["activations"]
    g = torch.Generator().manual_seed(seed * 104729 + repetition * 1009 + index)
    return acts[torch.randperm(len(acts), generator=g)]


def iter_chunks(data: HookData, seed: int, repetition: int, start: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(position in this repetition's order, chunk rows) from position `start` on; the next chunk is read
    in a background thread while the caller trains on this one, so at most two chunks are in memory."""
    order = chunk_order(len(data.chunks), seed, repetition)
    with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
        pending: Future | None = pool.submit(load_chunk, data, order[start], seed, repetition) if start < len(order) else None
        for pos in range(start, len(order)):
            assert pending is not None
            chunk = pending.result()
            pending = pool.submit(load_chunk, data, order[pos + 1], seed, repetition) if pos + 1 < len(order) else None
            yield pos, chunk
            del chunk


def steps_per_repetition(data: HookData, batch_size: int) -> int:
    """Full batches in one pass (the remainder of each chunk, under one batch, is left out)."""
    return sum(c.rows // batch_size for c in data.chunks)
