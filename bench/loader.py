#!/usr/bin/env python
"""Benchmark: rows/s that Stage 2's input pipeline delivers by itself (no training), against what an ensemble
consumes at GPU speed.

Times `training.sweep_data.iter_chunks` over every chunk of one hook (checksum checks, shuffle gather, prefetch thread),
consuming nothing:
  first pass   a new run's first repetition: each chunk is hashed once (by `training.sweep_data.verify_threads()`
               threads, while the prefetch thread gathers its rows) and handed over once it has passed
  later pass   a repetition after the first: chunks are only gathered (they were verified earlier in the run)
each into fresh tensors (what a CPU run does) and staged into two reusable buffers (what a CUDA run does: pinned
there; not pinned on a machine without CUDA). Each figure is the median over --repeats timed runs, with the page
cache warm (the files were just written or read).

The consumption it compares against is an estimate, not a measurement: an L1 training step costs about
10 * d_in * d_hidden FLOPs per row and member (encoder and decoder matmuls forward, 4; decoder, code and encoder
gradients backward, 6), run at --mfu of --peak_tflops (default 50% of the H100/H200 SXM dense bf16 datasheet peak,
989 TFLOP/s: the issue's target for the ensemble at d_in 2048 x 32768).

    python bench/loader.py [--dataset_dir FOLDER | --d 2048 --rows 131072 --chunk_size 32768] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.chunks import HookData, open_hook  # noqa: E402
from training.staging import PinnedStaging  # noqa: E402
import training.sweep_data  # noqa: E402
from training.sweep_data import iter_chunks  # noqa: E402

FLOPS_PER_ROW_MEMBER = 10  # x d_in x d_hidden: see the module docstring


def drain(data: HookData, repetition: int, staging: PinnedStaging | None = None) -> int:
    """Rows delivered by one pass of the loader over every chunk (nothing consumes them)."""
    rows = 0
    for _, chunk in iter_chunks(data, 0, repetition, 0, 0, staging):
        rows += len(chunk)
    return rows


def median_rate(run: Callable[[], int], repeats: int) -> float:
    """Median rows/s of `run` (which returns the rows it delivered) over `repeats` timed calls."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rows = run()
        rates.append(rows / (time.perf_counter() - t0))
    return statistics.median(rates)


def consumption(d_in: int, ratio: float, members: int, peak_tflops: float, mfu: float) -> float:
    """Estimated rows/s an ensemble of `members` L1 SAEs of d_in x ratio*d_in trains on at `mfu` of the peak."""
    return mfu * peak_tflops * 1e12 / (FLOPS_PER_ROW_MEMBER * d_in * round(ratio * d_in) * members)


def machine() -> str:
    """One line naming the machine."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} "
            f"intra-op threads, {training.sweep_data.verify_threads()} checksum thread(s)")


def build_synthetic(root: Path, rows: int, d: int, chunk_size: int) -> Path:
    """A synthetic fp16 dataset folder; returns its hook folder."""
    from bench.top_activations import write_synthetic_folder
    return write_synthetic_folder(root, rows, d, model="synthetic", vocab_size=2, chunk_size=chunk_size, hook="h")


def measure(hook_dir: Path, repeats: int) -> dict[str, float]:
    """Median rows/s of a run's first pass and of a later pass, into fresh tensors (CPU) and staged (CUDA)."""
    staging = PinnedStaging(pin=torch.cuda.is_available(), fence=_NoFence)
    later = open_hook(hook_dir)
    drain(later, 0, staging)  # verifies every chunk once (later passes then only gather) and sizes the buffers
    return {"first pass (hash once + gather), as on CPU": median_rate(lambda: drain(open_hook(hook_dir), 0), repeats),
            "first pass, staged as on CUDA": median_rate(lambda: drain(open_hook(hook_dir), 0, staging), repeats),
            "later pass (gather), as on CPU": median_rate(lambda: drain(later, 1), repeats),
            "later pass, staged as on CUDA": median_rate(lambda: drain(later, 1, staging), repeats)}


class _NoFence:
    """No device to wait for when the loader runs alone."""

    def record(self) -> None:
        pass

    def wait(self) -> None:
        pass


def main() -> None:
    """Run the benchmark and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir", help="a hook folder written by generate_test_data.py (default: a synthetic one)")
    p.add_argument("--d", type=int, default=2048, help="synthetic width")
    p.add_argument("--rows", type=int, default=131072, help="synthetic rows")
    p.add_argument("--chunk_size", type=int, default=32768, help="synthetic rows per chunk")
    p.add_argument("--verify_threads", type=int, help="checksum threads (default: training.sweep_data.verify_threads())")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each setting; the median is reported")
    p.add_argument("--ratio", type=float, default=16, help="dictionary size / d_in of the ensemble compared against")
    p.add_argument("--members", type=int, default=8, help="ensemble members compared against")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="device peak (H100/H200 SXM dense bf16: 989)")
    p.add_argument("--mfu", type=float, default=0.5, help="fraction of the peak the ensemble is assumed to reach")
    args = p.parse_args()
    if args.verify_threads is not None:
        import training.sweep_data
        training.sweep_data.verify_threads = lambda: args.verify_threads

    with tempfile.TemporaryDirectory() as tmp:
        hook_dir = (Path(args.dataset_dir) if args.dataset_dir
                    else build_synthetic(Path(tmp) / "ds", args.rows, args.d, args.chunk_size))
        data = open_hook(hook_dir)
        stored = data.load(0)["activations"]
        rates = measure(hook_dir, args.repeats)
    d_hidden = round(args.ratio * data.d)
    need = consumption(data.d, args.ratio, args.members, args.peak_tflops, args.mfu)
    print(machine())
    print(f"data: {hook_dir if args.dataset_dir else 'synthetic'}: {len(data.chunks)} chunks, {data.n_rows:,} rows "
          f"of d_in {data.d} ({stored.dtype}), page cache warm; median of {args.repeats}")
    print(f"ensemble (estimate): {args.members} L1 members of {data.d} x {d_hidden}, "
          f"{FLOPS_PER_ROW_MEMBER} * d_in * d_hidden FLOPs per row and member, at {args.mfu:.0%} of "
          f"{args.peak_tflops:g} TFLOP/s: {need:,.0f} rows/s")
    print(f"\n| {'loader setting':<44} | {'rows/s':>12} | {'GB/s':>6} | {'x ensemble':>10} |")
    print(f"|{'-' * 46}|{'-' * 14}|{'-' * 8}|{'-' * 12}|")
    row_bytes = data.d * stored.element_size()
    for name, rate in rates.items():
        print(f"| {name:<44} | {rate:>12,.0f} | {rate * row_bytes / 1e9:>6.2f} | {rate / need:>10.1f} |")


if __name__ == "__main__":
    main()
