"""The chunks a sweep trains on: opening a hook's folder, checking it, the chunk order of each repetition, the held-out
rows, and the loader that checks, shuffles and stages chunks ahead of training.
"""

from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch

from training.chunks import HookData, open_hook
from training.cli import UserError
from training.staging import PinnedStaging
from training.sweep_config import SweepConfig


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


def steps_per_repetition(data: HookData, batch_size: int, held: int = 0) -> int:
    """Full batches in one pass over the training rows (the remainder of each chunk, under one batch, is left out)."""
    rows = [c.rows for c in data.chunks]
    rows[-1] -= held
    return sum(r // batch_size for r in rows)
