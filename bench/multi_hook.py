#!/usr/bin/env python
"""Benchmark: a multi-hook sweep (one run training one sweep per hook, each chunk read once) against one sweep per
hook run one after another, and the scaling of the multi-hook sweep from 1 to N ranks under torchrun.

Every variant is a fresh `basic_l1_sweep.py` process (or torchrun job) on the same synthetic dataset folder of
--hooks hooks (N(0, I) activations of width --d, --chunks chunks of --chunk_size rows), timed wall clock from launch
to exit, so process start-up, imports and chunk reads count: they are what one run per hook repeats. Variants run
round-robin, --rounds rounds, after one warm-up round; the table shows medians. Ranks use gloo on the CPU
(--device cpu) or one GPU each (--device cuda, NCCL).

    python bench/multi_hook.py [--hooks 4] [--members 4] [--d 64] [--chunks 4] [--chunk_size 16384]
                               [--batch 1024] [--ranks 1 2] [--rounds 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sweep import load_line, machine_line  # noqa: E402
from bench.top_activations import write_synthetic_folder  # noqa: E402
from training.chunks import MANIFEST  # noqa: E402


def write_multi_hook_folder(root: Path, hooks: list[str], n_rows: int, d: int, chunk_size: int) -> Path:
    """A dataset folder holding `hooks`, whose chunk i holds the same rows (tokens) in every hook and different
    activations (hook j: N(j, (1 + j)^2 I)); returns the folder."""
    for j, hook in enumerate(hooks):
        acts = (1 + j) * torch.randn(n_rows, d, generator=torch.Generator().manual_seed(100 + j)) + j
        where = root if j == 0 else root / f".tmp-{j}"
        write_synthetic_folder(where, n_rows, d, "synthetic", 50, chunk_size=chunk_size, context_length=20,
                               hook=hook, acts=acts)
        if j:
            (where / hook).rename(root / hook)
            manifest = json.loads((root / MANIFEST).read_text())
            manifest["hooks"][hook] = json.loads((where / MANIFEST).read_text())["hooks"][hook]
            (root / MANIFEST).write_text(json.dumps(manifest))
            shutil.rmtree(where)
    return root


def sweep_flags(dataset: Path, out: Path, args: argparse.Namespace) -> list[str]:
    """basic_l1_sweep.py flags of the benchmark's sweeps."""
    values = [str(10 ** (-3 + 2 * i / max(1, args.members - 1))) for i in range(args.members)]
    return ["--dataset_dir", str(dataset), "--output_dir", str(out), "--ratio", "4", "--l1_values", *values,
            "--batch_size", str(args.batch), "--device", args.device, "--holdout_rows", "1024", "--log_every", "50",
            "--overwrite"]


def timed(cmd: list[str], env: dict[str, str]) -> float:
    """Seconds `cmd` takes from launch to exit (it must succeed)."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed: {done.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def variants(data: Path, work: Path, hooks: list[str], args: argparse.Namespace) -> dict[str, list[list[str]]]:
    """{variant: the commands it runs one after another}."""
    py = sys.executable
    out = {"one sweep per hook, one after another":
           [[py, "basic_l1_sweep.py", *sweep_flags(data / h, work / "seq" / h, args)] for h in hooks]}
    for n in args.ranks:
        launcher = [py, "basic_l1_sweep.py"] if n == 1 else [
            py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "basic_l1_sweep.py"]
        out[f"multi-hook, {n} rank{'s' if n > 1 else ''}"] = [[*launcher, *sweep_flags(data, work / f"multi{n}",
                                                                                       args)]]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hooks", type=int, default=4)
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--chunk_size", type=int, default=16384)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(args.hooks)]
    with tempfile.TemporaryDirectory() as tmp:
        data = write_multi_hook_folder(Path(tmp) / "data", hooks, args.chunks * args.chunk_size, args.d,
                                       args.chunk_size)
        runs = variants(data, Path(tmp) / "out", hooks, args)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for round_ in range(args.rounds + 1):                  # round 0 warms the page cache and imports
            for name, cmds in runs.items():
                seconds = sum(timed(c, env) for c in cmds)
                if round_:
                    times[name].append(seconds)
    print(machine_line(torch.device(args.device if args.device != "cuda" else "cuda:0"), threads)
          + f"; {load_line()}")
    print(f"{args.hooks} hooks x {args.members} L1 members, d_in {args.d}, d_hidden {4 * args.d}, "
          f"{args.chunks} chunks x {args.chunk_size} rows, batch {args.batch}, {args.device}; "
          f"median of {args.rounds} rounds (wall clock, launch to exit)")
    base = statistics.median(next(iter(times.values())))
    print(f"{'variant':<40} {'seconds':>9} {'speed-up':>9}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:<40} {m:>9.2f} {base / m:>8.2f}x")


if __name__ == "__main__":
    main()
